//! Probes: when one is due and what its results add up to (pure: Kubernetes' defaults, thresholds, initial
//! results), and the three ways to run one — exec through CRI, a TCP connect and an HTTP GET to the pod's
//! address. Touches only the container (ExecSync) and the pod's address.

use std::time::Duration;

use http_body_util::Empty;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::cri::Runtime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Liveness,
    Readiness,
    Startup,
}

/// The probe's parameters with Kubernetes' defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

pub fn params(p: &Probe, kind: Kind) -> Params {
    let secs = |v: Option<i32>, d: i32| Duration::from_secs(v.filter(|v| *v > 0).unwrap_or(d) as u64);
    Params {
        initial_delay: Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64),
        period: secs(p.period_seconds, 10),
        timeout: secs(p.timeout_seconds, 1),
        // Liveness and startup probes must use 1 (the API server refuses anything else).
        success_threshold: match kind {
            Kind::Readiness => p.success_threshold.filter(|v| *v > 0).unwrap_or(1) as u32,
            _ => 1,
        },
        failure_threshold: p.failure_threshold.filter(|v| *v > 0).unwrap_or(3) as u32,
    }
}

/// One probe's running tally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The result that counts: liveness starts as success, readiness as failure, startup as not started.
    pub ok: bool,
    pub successes: u32,
    pub failures: u32,
    pub last_run: Option<Timestamp>,
    pub last_message: String,
}

impl State {
    pub fn new(kind: Kind) -> State {
        State { ok: kind == Kind::Liveness, successes: 0, failures: 0, last_run: None, last_message: String::new() }
    }

    /// Whether the probe runs now: after the initial delay from the container's start, every period.
    pub fn due(&self, p: &Params, started_at: Timestamp, now: Timestamp) -> bool {
        let after = |t: Timestamp, d: Duration| {
            t.saturating_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)).unwrap_or(t)
        };
        if now < after(started_at, p.initial_delay) {
            return false;
        }
        self.last_run.is_none_or(|l| now >= after(l, p.period))
    }

    /// Counts one outcome; the result flips after `threshold` outcomes in a row.
    pub fn record(&mut self, p: &Params, success: bool, message: String, now: Timestamp) {
        self.last_run = Some(now);
        self.last_message = message;
        if success {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= p.success_threshold {
                self.ok = true;
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            if self.failures >= p.failure_threshold {
                self.ok = false;
            }
        }
    }
}

/// The port a probe names: a number, or the name of one of the container's ports.
pub fn resolve_port(port: &IntOrString, c: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|n| *n > 0).ok_or_else(|| format!("invalid port {n}")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("port {name:?} is not one of the container's ports"))
        }
    }
}

/// Runs the probe once: (success, message).
pub async fn run<R: Runtime>(
    rt: &R,
    probe: &Probe,
    p: &Params,
    c: &Container,
    container_id: &str,
    pod_ip: &str,
) -> (bool, String) {
    if let Some(e) = &probe.exec {
        let cmd = e.command.clone().unwrap_or_default();
        return match rt.exec_sync(container_id, cmd, p.timeout).await {
            Ok(r) if r.exit_code == 0 => (true, String::new()),
            Ok(r) => (false, format!("exit code {}: {}", r.exit_code, String::from_utf8_lossy(&r.stdout).trim())),
            Err(e) => (false, e.message()),
        };
    }
    let host = |h: &Option<String>| h.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| pod_ip.to_string());
    if let Some(t) = &probe.tcp_socket {
        let port = match resolve_port(&t.port, c) {
            Ok(p) => p,
            Err(m) => return (false, m),
        };
        let addr = format!("{}:{port}", host(&t.host));
        return match tokio::time::timeout(p.timeout, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Ok(_)) => (true, String::new()),
            Ok(Err(e)) => (false, format!("dial tcp {addr}: {e}")),
            Err(_) => (false, format!("dial tcp {addr}: i/o timeout")),
        };
    }
    if let Some(h) = &probe.http_get {
        let port = match resolve_port(&h.port, c) {
            Ok(p) => p,
            Err(m) => return (false, m),
        };
        let addr = format!("{}:{port}", host(&h.host));
        let path = h.path.clone().filter(|p| p.starts_with('/')).unwrap_or_else(|| "/".into());
        return match tokio::time::timeout(
            p.timeout,
            http_get(&addr, &path, h.http_headers.as_deref().unwrap_or_default()),
        )
        .await
        {
            Ok(Ok(code)) if (200..400).contains(&code) => (true, String::new()),
            Ok(Ok(code)) => (false, format!("HTTP probe failed with statuscode: {code}")),
            Ok(Err(e)) => (false, format!("Get \"http://{addr}{path}\": {e}")),
            Err(_) => (false, format!("Get \"http://{addr}{path}\": context deadline exceeded")),
        };
    }
    (false, "the probe has no handler (exec, tcpSocket or httpGet)".into())
}

/// One HTTP/1.1 GET with hyper; the status code. Redirects are not followed (3xx counts as success).
async fn http_get(addr: &str, path: &str, headers: &[k8s_openapi::api::core::v1::HTTPHeader]) -> Result<u16, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req =
        hyper::Request::builder().method("GET").uri(path).header("Host", addr).header("User-Agent", "weft-probe/1.0");
    for h in headers {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let req = req.body(Empty::<hyper::body::Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string());
    driver.abort();
    Ok(resp?.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap()
    }

    #[test]
    fn defaults_are_kubernetes_defaults() {
        let p = params(&Probe::default(), Kind::Readiness);
        assert_eq!(
            p,
            Params {
                initial_delay: Duration::ZERO,
                period: Duration::from_secs(10),
                timeout: Duration::from_secs(1),
                success_threshold: 1,
                failure_threshold: 3
            }
        );
        let custom: Probe = serde_json::from_value(json!({"initialDelaySeconds": 5, "periodSeconds": 2, "timeoutSeconds": 3, "successThreshold": 2, "failureThreshold": 1})).unwrap();
        let p = params(&custom, Kind::Readiness);
        assert_eq!(
            (
                p.initial_delay.as_secs(),
                p.period.as_secs(),
                p.timeout.as_secs(),
                p.success_threshold,
                p.failure_threshold
            ),
            (5, 2, 3, 2, 1)
        );
        assert_eq!(params(&custom, Kind::Liveness).success_threshold, 1, "liveness success threshold is always 1");
    }

    #[test]
    fn initial_results() {
        assert!(State::new(Kind::Liveness).ok, "liveness: success until it fails");
        assert!(!State::new(Kind::Readiness).ok, "readiness: failure until it passes");
        assert!(!State::new(Kind::Startup).ok);
    }

    #[test]
    fn thresholds_flip_the_result() {
        let p = Params {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 2,
            failure_threshold: 3,
        };
        let mut s = State::new(Kind::Readiness);
        let mut seen = Vec::new();
        for (i, ok) in [true, true, false, false, true, false, false, false, true, true].iter().enumerate() {
            s.record(&p, *ok, String::new(), t(i as i64));
            seen.push(s.ok);
        }
        assert_eq!(seen, vec![false, true, true, true, true, true, true, false, false, true]);
    }

    #[test]
    fn due_after_the_initial_delay_every_period() {
        let p = Params {
            initial_delay: Duration::from_secs(5),
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 3,
        };
        let mut s = State::new(Kind::Liveness);
        assert!(!s.due(&p, t(0), t(4)));
        assert!(s.due(&p, t(0), t(5)));
        s.record(&p, true, String::new(), t(5));
        assert!(!s.due(&p, t(0), t(14)));
        assert!(s.due(&p, t(0), t(15)));
    }

    #[test]
    fn ports_by_number_or_name() {
        let c: Container =
            serde_json::from_value(json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}]})).unwrap();
        assert_eq!(resolve_port(&IntOrString::Int(80), &c), Ok(80));
        assert_eq!(resolve_port(&IntOrString::String("http".into()), &c), Ok(8080));
        assert!(resolve_port(&IntOrString::String("nope".into()), &c).is_err());
        assert!(resolve_port(&IntOrString::Int(0), &c).is_err());
        assert!(resolve_port(&IntOrString::Int(70000), &c).is_err());
    }

    #[tokio::test]
    async fn http_get_reads_the_status_of_a_real_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            for code in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(format!("HTTP/1.1 {code}\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        assert_eq!(http_get(&addr, "/healthz", &[]).await, Ok(200));
        assert_eq!(http_get(&addr, "/healthz", &[]).await, Ok(503));
    }
}
