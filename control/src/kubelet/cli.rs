//! The kubelet's commands: `weft kubelet` (the daemon's flags), `weft image import`, `weft containerd-config`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::containerd::{self, Layout};

/// `weft image ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ImageCommand {
    /// Load a docker-archive or OCI tarball into containerd's k8s.io namespace (where CRI finds images)
    Import(ImportArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct ImportArgs {
    /// the tarball (e.g. target/images/busybox.tar from scripts/images.sh)
    pub files: Vec<PathBuf>,
    /// containerd's socket
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
}

/// `weft containerd-config`: a containerd config with root, state and socket under one directory.
#[derive(Debug, Clone, clap::Args)]
pub struct ContainerdConfigArgs {
    /// containerd's directory: root/, state/ and containerd.sock go under it
    #[arg(long)]
    pub dir: PathBuf,
    /// where CRI reads CNI network configs
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// where CRI finds CNI plugins
    #[arg(long, default_value = "/usr/lib/cni")]
    pub cni_bin_dir: PathBuf,
    /// the sandbox ("pause") image
    #[arg(long, default_value = containerd::PAUSE_IMAGE)]
    pub sandbox_image: String,
    /// containerd's own oom_score_adj; default: 1000 when this process lacks CAP_SYS_RESOURCE (then no process
    /// may lower its score, and runc would fail to give containers a lower one than their shim's), else unset
    #[arg(long, allow_hyphen_values = true)]
    pub oom_score: Option<i32>,
    /// write the config here (default: stdout)
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

pub fn image(cmd: ImageCommand) -> Result<i32> {
    match cmd {
        ImageCommand::Import(a) => {
            anyhow::ensure!(!a.files.is_empty(), "give one or more tarballs to import");
            for f in &a.files {
                let out =
                    containerd::import_image(&a.address, f).with_context(|| format!("importing {}", f.display()))?;
                if !out.is_empty() {
                    println!("{out}");
                }
            }
            Ok(0)
        }
    }
}

pub fn containerd_config(a: ContainerdConfigArgs) -> Result<i32> {
    let mut layout = Layout::under(&a.dir, &a.cni_conf_dir, &a.cni_bin_dir);
    layout.sandbox_image = a.sandbox_image;
    layout.oom_score = a.oom_score.or((!containerd::can_lower_oom_score()).then_some(1000));
    let text = containerd::render_config(&layout)?;
    match a.output {
        Some(p) => std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(0)
}
