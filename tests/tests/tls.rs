//! `--etcd-cafile/--etcd-certfile/--etcd-keyfile` against a real etcd that requires client certificates
//! (certificates made with openssl for this test; etcd and the CLI on loopback only).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn make_pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=weft-test-ca",
        ],
    );
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let cn = if name == "server" { "/CN=127.0.0.1" } else { "/CN=weft" };
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                cn,
            ],
        );
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Kill(std::process::Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cli_talks_to_etcd_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_pki(d);
    let (cp, pp) = (free_port(), free_port());
    let endpoint = format!("https://127.0.0.1:{cp}");
    let log = std::fs::File::create(d.join("etcd.log")).unwrap();
    let _etcd = Kill(
        Command::new(weft_lab::bins::etcd().unwrap())
            .args(["--name", "tls", "--data-dir"])
            .arg(d.join("data"))
            .arg(format!("--listen-client-urls={endpoint}"))
            .arg(format!("--advertise-client-urls={endpoint}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{pp}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{pp}"))
            .arg(format!("--initial-cluster=tls=http://127.0.0.1:{pp}"))
            .args(["--client-cert-auth", "--log-level=error"])
            .arg("--trusted-ca-file")
            .arg(d.join("ca.pem"))
            .arg("--cert-file")
            .arg(d.join("server.pem"))
            .arg("--key-file")
            .arg(d.join("server.key"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd starts"),
    );
    let tls_args = |with_client_cert: bool| {
        let mut a = vec![
            "--etcd-endpoints".to_string(),
            endpoint.clone(),
            "--etcd-cafile".into(),
            d.join("ca.pem").display().to_string(),
        ];
        if with_client_cert {
            a.extend(["--etcd-certfile".into(), d.join("client.pem").display().to_string()]);
            a.extend(["--etcd-keyfile".into(), d.join("client.key").display().to_string()]);
        }
        a
    };
    let weft = |args: &[&str], tls: &[String]| -> Output {
        Command::new(weft_lab::weft_bin()).args(args).args(tls).output().unwrap()
    };
    let set = ["network", "config", "set", "--network", "10.244.0.0/16"];
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = weft(&set, &tls_args(true));
    while !out.status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        out = weft(&set, &tls_args(true));
    }
    assert!(out.status.success(), "with client certificate: {}", String::from_utf8_lossy(&out.stderr));
    let get = weft(&["network", "config", "get", "-o", "json"], &tls_args(true));
    assert!(String::from_utf8_lossy(&get.stdout).contains("10.244.0.0/16"));
    // etcd demands a client certificate: without one the command fails with an etcd error, not a hang.
    let started = Instant::now();
    let refused = weft(&["network", "config", "get"], &tls_args(false));
    assert!(!refused.status.success(), "etcd requires a client certificate");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("etcd"), "{}", String::from_utf8_lossy(&refused.stderr));
    assert!(started.elapsed() < Duration::from_secs(30));
    // A missing file is named.
    let mut bad = tls_args(true);
    bad[3] = d.join("nope.pem").display().to_string();
    let missing = weft(&["network", "config", "get"], &bad);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("nope.pem"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
