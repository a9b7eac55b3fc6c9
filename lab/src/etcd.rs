//! A real etcd (found on `PATH` or at `$WEFT_ETCD_BIN`, see `crate::bins`) on free loopback ports with a temporary data dir, healthy before
//! `start` returns, killed and removed on drop. Inside a namespace the lab starts its own instead.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct EtcdFixture {
    child: Child,
    endpoint: String,
    peer: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The etcd command line for one member listening on `client` (host:port) with peers on `peer`.
pub fn etcd_command(data_dir: &Path, name: &str, client: &str, peer: &str) -> Result<Command> {
    let mut c = Command::new(crate::bins::etcd()?);
    c.arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(data_dir)
        .arg(format!("--listen-client-urls=http://{client}"))
        .arg(format!("--advertise-client-urls=http://{client}"))
        .arg(format!("--listen-peer-urls=http://{peer}"))
        .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
        .arg(format!("--initial-cluster={name}=http://{peer}"))
        .arg("--initial-cluster-state=new")
        .arg("--log-level=error")
        .env("ETCD_UNSUPPORTED_ARCH", "")
        .stdin(Stdio::null());
    Ok(c)
}

impl EtcdFixture {
    /// Starts etcd on two free loopback ports, retrying on a port race.
    pub fn start() -> Result<EtcdFixture> {
        let mut last = None;
        for _ in 0..5 {
            match Self::try_start() {
                Ok(f) => return Ok(f),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn try_start() -> Result<EtcdFixture> {
        let dir = tempfile::Builder::new().prefix("weft-etcd-").tempdir()?;
        let (cp, pp) = (free_port()?, free_port()?);
        let client = format!("127.0.0.1:{cp}");
        let log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let peer = format!("127.0.0.1:{pp}");
        let mut cmd = etcd_command(&dir.path().join("data"), "fixture", &client, &peer)?;
        let child = cmd
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (run scripts/setup.sh)", cmd.get_program().to_string_lossy()))?;
        let mut f = EtcdFixture { child, endpoint: format!("http://{client}"), peer, _dir: dir };
        f.wait_healthy(&client, Duration::from_secs(20))?;
        Ok(f)
    }

    fn wait_healthy(&mut self, client: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(self._dir.path().join("etcd.log")).unwrap_or_default();
                bail!("etcd exited ({status}): {}", log.lines().rev().take(5).collect::<Vec<_>>().join(" | "));
            }
            if health(client) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("etcd on {client} not healthy within {limit:?}")
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// A connected client (the caller's runtime drives it).
    pub async fn client(&self) -> Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.endpoint.as_str()], None).await?)
    }

    /// Stops etcd (SIGKILL) keeping its data, to test what clients do while it is away.
    pub fn stop(&mut self) -> Result<()> {
        let _ = self.child.kill();
        self.child.wait()?;
        Ok(())
    }

    /// Starts etcd again on the same ports and data dir.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let client = self.endpoint.trim_start_matches("http://").to_string();
        let peer = self.peer.clone();
        let log = std::fs::OpenOptions::new().append(true).open(self._dir.path().join("etcd.log"))?;
        self.child =
            etcd_command(&self.data_dir(), "fixture", &client, &peer)?.stdout(log.try_clone()?).stderr(log).spawn()?;
        self.wait_healthy(&client, Duration::from_secs(20))
    }
}

/// etcd's `/health` over plain HTTP/1.0 on a TCP socket: true when it says `"health":"true"`.
pub fn health(client: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &match client.parse() {
            Ok(a) => a,
            Err(_) => return false,
        },
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdFixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
