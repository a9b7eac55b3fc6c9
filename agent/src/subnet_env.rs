//! flannel's `/run/flannel/subnet.env`, the file the CNI plugin and the next agent start read:
//! rendered exactly as flanneld writes it, replaced atomically, parsed tolerantly. Touches only that file.

use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ipnetwork::Ipv4Network;

/// The default location, as flanneld writes it.
pub const DEFAULT_PATH: &str = "/run/flannel/subnet.env";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("subnet.env: {var} is missing")]
    Missing { var: &'static str },
    #[error("subnet.env: {var}={value:?} is invalid: {problem}")]
    Invalid { var: &'static str, value: String, problem: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the file says: the whole pod network, this node's subnet, MTU and whether flannel masquerades.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetEnv {
    pub network: Ipv4Network,
    /// The leased subnet (network address form, e.g. `10.244.1.0/24`).
    pub subnet: Ipv4Network,
    pub mtu: u32,
    pub ipmasq: bool,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io { op, path: path.to_path_buf(), source }
}

impl SubnetEnv {
    /// The file's text. `FLANNEL_SUBNET` is the subnet's first host with the prefix, as flanneld writes it
    /// (the CNI bridge plugin uses it as the gateway address).
    pub fn render(&self) -> String {
        let first_host = Ipv4Addr::from(u32::from(self.subnet.network()).wrapping_add(1));
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}/{}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network,
            first_host,
            self.subnet.prefix(),
            self.mtu,
            self.ipmasq
        )
    }

    /// Parses `KEY=value` lines in any order; blank lines, `#` comments, `export ` prefixes, quotes and
    /// variables we do not use (flannel's IPv6 ones) are accepted.
    pub fn parse(text: &str) -> Result<SubnetEnv> {
        let (mut network, mut subnet, mut mtu, mut ipmasq) = (None, None, None, None);
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim().trim_matches('"').trim_matches('\'');
            match key.trim() {
                "FLANNEL_NETWORK" => network = Some(value.to_string()),
                "FLANNEL_SUBNET" => subnet = Some(value.to_string()),
                "FLANNEL_MTU" => mtu = Some(value.to_string()),
                "FLANNEL_IPMASQ" => ipmasq = Some(value.to_string()),
                _ => {}
            }
        }
        let cidr = |var: &'static str, v: Option<String>| -> Result<Ipv4Network> {
            let v = v.ok_or(Error::Missing { var })?;
            let n: Ipv4Network =
                v.parse().map_err(|e| Error::Invalid { var, value: v.clone(), problem: format!("{e}") })?;
            // Store the network form: FLANNEL_SUBNET holds a host address.
            Ipv4Network::new(n.network(), n.prefix()).map_err(|e| Error::Invalid {
                var,
                value: v,
                problem: e.to_string(),
            })
        };
        let network = cidr("FLANNEL_NETWORK", network)?;
        let subnet = cidr("FLANNEL_SUBNET", subnet)?;
        let mtu_s = mtu.ok_or(Error::Missing { var: "FLANNEL_MTU" })?;
        let mtu = mtu_s.parse::<u32>().map_err(|e| Error::Invalid {
            var: "FLANNEL_MTU",
            value: mtu_s.clone(),
            problem: e.to_string(),
        })?;
        let ipmasq_s = ipmasq.ok_or(Error::Missing { var: "FLANNEL_IPMASQ" })?;
        let ipmasq = match ipmasq_s.as_str() {
            "true" => true,
            "false" => false,
            _ => {
                return Err(Error::Invalid {
                    var: "FLANNEL_IPMASQ",
                    value: ipmasq_s,
                    problem: "expected true or false".into(),
                })
            }
        };
        Ok(SubnetEnv { network, subnet, mtu, ipmasq })
    }

    pub fn read(path: &Path) -> Result<SubnetEnv> {
        let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
        SubnetEnv::parse(&text)
    }

    /// Replaces `path` atomically: a reader sees the old file or the new one, never a partial one
    /// (temp file in the same directory, fsync, rename, fsync of the directory).
    pub fn write_atomic(&self, path: &Path) -> Result<()> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(io_err("creating directory", &dir))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "subnet.env".into());
        // Unique per process and call, so two writers never share a temp file.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.tmp.{}.{seq}", std::process::id()));
        let result = (|| {
            let mut f = fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
            f.write_all(self.render().as_bytes()).map_err(io_err("writing", &tmp))?;
            f.sync_all().map_err(io_err("syncing", &tmp))?;
            fs::rename(&tmp, path).map_err(io_err("renaming into place", path))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result?;
        // The rename itself is durable only once the directory is synced.
        if let Ok(d) = fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn sample() -> SubnetEnv {
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            mtu: 1450,
            ipmasq: true,
        }
    }

    #[test]
    fn renders_like_flanneld() {
        assert_eq!(
            sample().render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
    }

    #[test]
    fn round_trips() {
        let e = sample();
        assert_eq!(SubnetEnv::parse(&e.render()).unwrap(), e);
        let other = SubnetEnv { subnet: "10.244.7.128/25".parse().unwrap(), mtu: 1500, ipmasq: false, ..e };
        assert_eq!(SubnetEnv::parse(&other.render()).unwrap(), other);
    }

    #[test]
    fn parse_tolerates_comments_order_and_extra_vars() {
        let text = "# written by flanneld\n\nFLANNEL_IPMASQ=false\nexport FLANNEL_MTU=\"1400\"\n\
                    FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_SUBNET=10.244.9.1/24\nFLANNEL_NETWORK=10.244.0.0/16\n";
        let e = SubnetEnv::parse(text).unwrap();
        assert_eq!(e.subnet, "10.244.9.0/24".parse::<Ipv4Network>().unwrap());
        assert_eq!((e.mtu, e.ipmasq), (1400, false));
    }

    #[test]
    fn parse_errors_name_the_variable() {
        let good = sample().render();
        let cases: Vec<(String, &str)> = vec![
            (good.replace("FLANNEL_NETWORK=10.244.0.0/16\n", ""), "FLANNEL_NETWORK"),
            (good.replace("FLANNEL_SUBNET=10.244.1.1/24\n", ""), "FLANNEL_SUBNET"),
            (good.replace("1450", ""), "FLANNEL_MTU"),
            (good.replace("1450", "big"), "FLANNEL_MTU"),
            (good.replace("IPMASQ=true", "IPMASQ=yes"), "FLANNEL_IPMASQ"),
            (good.replace("10.244.1.1/24", "10.244.1.1/40"), "FLANNEL_SUBNET"),
            (good.replace("FLANNEL_IPMASQ=true\n", ""), "FLANNEL_IPMASQ"),
        ];
        for (text, var) in cases {
            match SubnetEnv::parse(&text) {
                Err(Error::Missing { var: v }) | Err(Error::Invalid { var: v, .. }) => assert_eq!(v, var, "{text}"),
                other => panic!("{text}: expected an error about {var}, got {other:?}"),
            }
        }
    }

    #[test]
    fn write_atomic_creates_dirs_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        sample().write_atomic(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), sample().render());
        assert_eq!(SubnetEnv::read(&path).unwrap(), sample());
    }

    #[test]
    fn write_atomic_replaces_by_rename_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        fs::write(&path, "FLANNEL_NETWORK=old\n").unwrap();
        let old_inode = fs::metadata(&path).unwrap().ino();
        // Keep the old file open: a reader holding it must still see the old, complete content.
        let reader_view = fs::File::open(&path).unwrap();
        sample().write_atomic(&path).unwrap();
        assert_ne!(fs::metadata(&path).unwrap().ino(), old_inode, "the file was rewritten in place, not renamed");
        let mut old = String::new();
        io::Read::read_to_string(&mut &reader_view, &mut old).unwrap();
        assert_eq!(old, "FLANNEL_NETWORK=old\n");
        let names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["subnet.env".to_string()]);
    }

    #[test]
    fn failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: the rename fails.
        let path = dir.path().join("subnet.env");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), "x").unwrap();
        assert!(matches!(sample().write_atomic(&path), Err(Error::Io { .. })));
        let names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["subnet.env".to_string()]);
    }

    #[test]
    fn read_missing_file_names_the_path() {
        let err = SubnetEnv::read(Path::new("/nonexistent/weft/subnet.env")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/weft/subnet.env"), "{err}");
    }
}
