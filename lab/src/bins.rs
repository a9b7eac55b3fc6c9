//! Where the lab finds the programs it runs, so that no distribution's install paths are compiled in: a program
//! is searched on `PATH` unless an environment variable names its file (`WEFT_ETCD_BIN` for etcd), and the
//! reference CNI plugins come from `--cni-bin-dir` / `$WEFT_CNI_BIN_DIR`, else from the first directory of
//! `$CNI_PATH` and the usual install locations that has them. Reads the file system only.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{program}` is not on PATH (install it, or set ${var} to its file)")]
    NotOnPath { program: String, var: &'static str },
    #[error("${var} is {path}, which is not an executable file")]
    NotExecutable { var: &'static str, path: PathBuf },
    #[error("no directory among {searched} has the CNI plugins {plugins} (give --cni-bin-dir or set $WEFT_CNI_BIN_DIR)", plugins = CNI_PLUGINS.join(", "))]
    NoCniDir { searched: String },
    #[error("{dir} lacks the CNI plugin `{plugin}`")]
    CniPluginMissing { dir: PathBuf, plugin: &'static str },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The environment variable that names etcd's binary, for a machine where it is not on `PATH`.
pub const ETCD_BIN_VAR: &str = "WEFT_ETCD_BIN";
/// The environment variable that names the reference CNI plugins' directory (what `--cni-bin-dir` sets).
pub const CNI_BIN_DIR_VAR: &str = "WEFT_CNI_BIN_DIR";
/// Where packages install the reference plugins (upstream's tarball, Debian/Ubuntu, Fedora), searched last.
pub const CNI_DIRS: [&str; 3] = ["/opt/cni/bin", "/usr/lib/cni", "/usr/libexec/cni"];
/// The plugins `weft-cni` delegates to.
pub const CNI_PLUGINS: [&str; 2] = ["bridge", "host-local"];

fn is_executable(p: &Path) -> bool {
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `program` as `$var` names it, else the first executable of that name on `path` (a `PATH` value).
pub fn find_in(
    program: &str,
    var: &'static str,
    var_value: Option<OsString>,
    path: Option<OsString>,
) -> Result<PathBuf> {
    if let Some(v) = var_value.filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        return if is_executable(&p) { Ok(p) } else { Err(Error::NotExecutable { var, path: p }) };
    }
    path.iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
        .ok_or_else(|| Error::NotOnPath { program: program.into(), var })
}

/// `program` as `$var` names it, else found on this process's `PATH`.
pub fn find(program: &str, var: &'static str) -> Result<PathBuf> {
    find_in(program, var, std::env::var_os(var), std::env::var_os("PATH"))
}

/// etcd's binary: `$WEFT_ETCD_BIN`, else `etcd` on `PATH`.
pub fn etcd() -> Result<PathBuf> {
    find("etcd", ETCD_BIN_VAR)
}

fn has_plugins(dir: &Path) -> Option<&'static str> {
    CNI_PLUGINS.into_iter().find(|p| !is_executable(&dir.join(p)))
}

/// The reference CNI plugins' directory: `given` (the flag or `$WEFT_CNI_BIN_DIR`) must have them; otherwise the
/// first of `cni_path`'s entries (a `CNI_PATH` value) and [`CNI_DIRS`] that has them.
pub fn cni_bin_dir_in(given: Option<&Path>, cni_path: Option<OsString>) -> Result<PathBuf> {
    if let Some(dir) = given {
        return match has_plugins(dir) {
            None => Ok(dir.to_path_buf()),
            Some(plugin) => Err(Error::CniPluginMissing { dir: dir.to_path_buf(), plugin }),
        };
    }
    let candidates: Vec<PathBuf> =
        cni_path.iter().flat_map(std::env::split_paths).chain(CNI_DIRS.iter().map(PathBuf::from)).collect();
    candidates.iter().find(|d| has_plugins(d).is_none()).cloned().ok_or_else(|| Error::NoCniDir {
        searched: candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

/// The reference CNI plugins' directory: `flag`, else `$WEFT_CNI_BIN_DIR`, else searched (see [`cni_bin_dir_in`]).
pub fn cni_bin_dir(flag: Option<&Path>) -> Result<PathBuf> {
    let env = std::env::var_os(CNI_BIN_DIR_VAR).filter(|v| !v.is_empty()).map(PathBuf::from);
    cni_bin_dir_in(flag.or(env.as_deref()), std::env::var_os("CNI_PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exe(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn programs_come_from_the_variable_else_the_first_path_entry_that_has_them() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        std::fs::write(a.path().join("etcd"), "not executable").unwrap();
        let in_b = exe(b.path(), "etcd");
        let other = exe(a.path(), "my-etcd");
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        // (variable, PATH, want)
        type Case = (Option<OsString>, Option<OsString>, Result<PathBuf, &'static str>);
        let cases: [Case; 5] = [
            (None, Some(path.clone()), Ok(in_b.clone())),
            (Some("".into()), Some(path.clone()), Ok(in_b)),
            (Some(other.clone().into()), Some(path.clone()), Ok(other)),
            (Some(a.path().join("etcd").into()), Some(path), Err("not an executable file")),
            (None, None, Err("`etcd` is not on PATH (install it, or set $WEFT_ETCD_BIN")),
        ];
        for (var, path, want) in cases {
            let got = find_in("etcd", ETCD_BIN_VAR, var.clone(), path.clone());
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{var:?} {path:?}"),
                (Err(e), Err(w)) => assert!(e.to_string().contains(w), "{e} lacks {w:?}"),
                (got, want) => panic!("{var:?} {path:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn the_cni_dir_is_the_flag_else_the_first_candidate_with_every_plugin() {
        let (half, full) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        exe(half.path(), "bridge");
        for p in CNI_PLUGINS {
            exe(full.path(), p);
        }
        let cni_path = std::env::join_paths([half.path(), full.path()]).unwrap();
        assert_eq!(cni_bin_dir_in(None, Some(cni_path)).unwrap(), full.path());
        assert_eq!(cni_bin_dir_in(Some(full.path()), None).unwrap(), full.path());
        let e = cni_bin_dir_in(Some(half.path()), None).unwrap_err().to_string();
        assert!(e.ends_with("lacks the CNI plugin `host-local`"), "{e}");
    }
}
