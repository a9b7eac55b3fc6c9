//! The lab's small PKI, made with `openssl` under the lab's directory: a cluster CA, a serving certificate per
//! kubelet (its node name and address as subject alternative names) and an admin client certificate for
//! `weft logs`/`weft exec`. Writes only under the directory it is given; keys are EC P-256, PKCS#8 PEM.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("running openssl (install it): {0}")]
    Spawn(std::io::Error),
    #[error("openssl {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("{0:?} cannot be a certificate name (letters, digits, '-' and '.' only)")]
    BadName(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The environment variables `weft logs` and `weft exec` read (set by `weft lab exec`).
pub const ENV_KUBELET_CA: &str = "WEFT_KUBELET_CA";
pub const ENV_CLIENT_CERT: &str = "WEFT_KUBELET_CLIENT_CERT";
pub const ENV_CLIENT_KEY: &str = "WEFT_KUBELET_CLIENT_KEY";

/// What one certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    /// A kubelet's serving certificate: `system:node:<name>` with its name and address as SANs.
    KubeletServing { node: String, ip: Ipv4Addr },
    /// A client certificate (`CN=<user>, O=<group>`).
    Client { user: String, group: String },
}

impl Usage {
    /// The `-subj` of the request.
    pub fn subject(&self) -> String {
        match self {
            Usage::KubeletServing { node, .. } => format!("/O=system:nodes/CN=system:node:{node}"),
            Usage::Client { user, group } => format!("/O={group}/CN={user}"),
        }
    }

    /// The X.509 v3 extensions `openssl x509 -req -extfile` adds when the CA signs it.
    pub fn extensions(&self) -> String {
        let common = "basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n";
        match self {
            Usage::KubeletServing { node, ip } => {
                format!("{common}extendedKeyUsage = serverAuth\nsubjectAltName = DNS:{node}, IP:{ip}\n")
            }
            Usage::Client { .. } => format!("{common}extendedKeyUsage = clientAuth\n"),
        }
    }
}

/// A certificate and its key on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The lab's PKI: `<dir>/ca.{crt,key}`, `<dir>/admin.{crt,key}`, `<dir>/kubelet-<node>.{crt,key}`.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

fn check_name(s: &str) -> Result<()> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == ':') {
        return Err(Error::BadName(s.to_string()));
    }
    Ok(())
}

fn openssl(args: &[&std::ffi::OsStr]) -> Result<()> {
    let out = Command::new("openssl").args(args).output().map_err(Error::Spawn)?;
    if !out.status.success() {
        return Err(Error::Failed {
            args: args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

impl Pki {
    /// A PKI rooted at `dir` (nothing is written until `create_ca`).
    pub fn at(dir: &Path) -> Pki {
        Pki { dir: dir.to_path_buf() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca(&self) -> Pair {
        self.pair("ca")
    }

    pub fn admin(&self) -> Pair {
        self.pair("admin")
    }

    pub fn kubelet(&self, node: &str) -> Pair {
        self.pair(&format!("kubelet-{node}"))
    }

    fn pair(&self, stem: &str) -> Pair {
        Pair { cert: self.dir.join(format!("{stem}.crt")), key: self.dir.join(format!("{stem}.key")) }
    }

    /// The cluster CA (self-signed, 10 years), named after the lab.
    pub fn create_ca(&self, cluster: &str) -> Result<Pair> {
        check_name(cluster)?;
        std::fs::create_dir_all(&self.dir).map_err(|source| Error::Io { path: self.dir.clone(), source })?;
        let ca = self.ca();
        let subj = format!("/CN=weft-{cluster}-ca");
        let s = std::ffi::OsStr::new;
        openssl(&[
            s("req"),
            s("-x509"),
            s("-new"),
            s("-nodes"),
            s("-newkey"),
            s("ec"),
            s("-pkeyopt"),
            s("ec_paramgen_curve:prime256v1"),
            s("-keyout"),
            ca.key.as_os_str(),
            s("-out"),
            ca.cert.as_os_str(),
            s("-days"),
            s("3650"),
            s("-subj"),
            s(&subj),
            s("-addext"),
            s("basicConstraints=critical,CA:TRUE"),
            s("-addext"),
            s("keyUsage=critical,keyCertSign,cRLSign,digitalSignature"),
        ])?;
        Ok(ca)
    }

    /// A key and a certificate for `usage`, signed by the CA, written as `<stem>.{crt,key}`.
    pub fn issue(&self, stem: &str, usage: &Usage) -> Result<Pair> {
        check_name(stem)?;
        if let Usage::KubeletServing { node, .. } = usage {
            check_name(node)?;
        }
        if let Usage::Client { user, group } = usage {
            check_name(user)?;
            check_name(group)?;
        }
        let ca = self.ca();
        let pair = self.pair(stem);
        let csr = self.dir.join(format!("{stem}.csr"));
        let ext = self.dir.join(format!("{stem}.ext"));
        write(&ext, &usage.extensions())?;
        let subj = usage.subject();
        let s = std::ffi::OsStr::new;
        openssl(&[
            s("req"),
            s("-new"),
            s("-nodes"),
            s("-newkey"),
            s("ec"),
            s("-pkeyopt"),
            s("ec_paramgen_curve:prime256v1"),
            s("-keyout"),
            pair.key.as_os_str(),
            s("-out"),
            csr.as_os_str(),
            s("-subj"),
            s(&subj),
        ])?;
        openssl(&[
            s("x509"),
            s("-req"),
            s("-in"),
            csr.as_os_str(),
            s("-CA"),
            ca.cert.as_os_str(),
            s("-CAkey"),
            ca.key.as_os_str(),
            s("-CAcreateserial"),
            s("-days"),
            s("825"),
            s("-sha256"),
            s("-extfile"),
            ext.as_os_str(),
            s("-out"),
            pair.cert.as_os_str(),
        ])?;
        let _ = std::fs::remove_file(&csr);
        let _ = std::fs::remove_file(&ext);
        Ok(pair)
    }

    /// The whole lab PKI: the CA, the admin client certificate and one serving certificate per node.
    pub fn create(&self, cluster: &str, nodes: &[(String, Ipv4Addr)]) -> Result<()> {
        self.create_ca(cluster)?;
        self.issue("admin", &Usage::Client { user: "admin".into(), group: "system:masters".into() })?;
        for (node, ip) in nodes {
            self.issue(&format!("kubelet-{node}"), &Usage::KubeletServing { node: node.clone(), ip: *ip })?;
        }
        Ok(())
    }

    /// The environment `weft logs`/`weft exec` use: (variable, path).
    pub fn client_env(&self) -> [(&'static str, PathBuf); 3] {
        let admin = self.admin();
        [(ENV_KUBELET_CA, self.ca().cert), (ENV_CLIENT_CERT, admin.cert), (ENV_CLIENT_KEY, admin.key)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_say_what_each_certificate_is_for() {
        let cases = [
            (
                Usage::KubeletServing { node: "node-2".into(), ip: Ipv4Addr::new(192, 168, 56, 12) },
                "/O=system:nodes/CN=system:node:node-2",
                "extendedKeyUsage = serverAuth\nsubjectAltName = DNS:node-2, IP:192.168.56.12\n",
            ),
            (
                Usage::Client { user: "admin".into(), group: "system:masters".into() },
                "/O=system:masters/CN=admin",
                "extendedKeyUsage = clientAuth\n",
            ),
        ];
        for (usage, subject, tail) in cases {
            assert_eq!(usage.subject(), subject);
            let ext = usage.extensions();
            assert!(ext.starts_with("basicConstraints = critical, CA:FALSE\n"), "{ext}");
            assert!(ext.ends_with(tail), "{ext}");
        }
    }

    fn openssl_out(args: &[&str]) -> String {
        let out = Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn certificates_verify_against_the_ca_for_their_purpose_only() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::at(&dir.path().join("pki"));
        pki.create("t1", &[("node-1".into(), Ipv4Addr::new(192, 168, 56, 11))]).unwrap();
        let ca = pki.ca().cert.to_string_lossy().into_owned();
        let serving = pki.kubelet("node-1").cert.to_string_lossy().into_owned();
        let admin = pki.admin().cert.to_string_lossy().into_owned();
        let ok = |purpose: &str, cert: &str| {
            Command::new("openssl")
                .args(["verify", "-purpose", purpose, "-CAfile", &ca, cert])
                .output()
                .unwrap()
                .status
                .success()
        };
        assert!(ok("sslserver", &serving));
        assert!(ok("sslclient", &admin));
        assert!(!ok("sslclient", &serving), "a serving certificate must not pass as a client");
        assert!(!ok("sslserver", &admin), "the admin certificate must not pass as a server");
        let text = openssl_out(&["x509", "-noout", "-text", "-in", &serving]);
        assert!(text.contains("DNS:node-1, IP Address:192.168.56.11"), "{text}");
        // The key matches its certificate.
        let pubkey = |args: &[&str]| openssl_out(args);
        assert_eq!(
            pubkey(&["x509", "-noout", "-pubkey", "-in", &admin]),
            pubkey(&["pkey", "-pubout", "-in", &pki.admin().key.to_string_lossy()])
        );
        let env = pki.client_env();
        assert_eq!(env[0], (ENV_KUBELET_CA, pki.ca().cert));
        assert!(Pki::at(dir.path()).issue("bad name", &Usage::Client { user: "a".into(), group: "b".into() }).is_err());
    }
}
