//! Interactive exec's wire format: Kubernetes' `v4.channel.k8s.io` WebSocket subprotocol, spoken both by
//! containerd's streaming server (the URL CRI `Exec` returns) and on the kubelet's own port to `weft exec -i/-t`.
//! Every binary message starts with its channel byte: 0 stdin, 1 stdout, 2 stderr, 3 the command's final status
//! (a `metav1.Status` as JSON), 4 terminal size (`{"Width":..,"Height":..}`). The kubelet relays messages between
//! the two connections, each direction only on the channels that direction may carry.

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The one subprotocol spoken (v4: the status channel carries JSON with the exit code).
pub const PROTOCOL: &str = "v4.channel.k8s.io";

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const STATUS: u8 = 3;
pub const RESIZE: u8 = 4;

/// One message: the channel byte, then the data.
pub fn frame(channel: u8, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 1);
    out.push(channel);
    out.extend_from_slice(data);
    out
}

/// A message's channel and data; None for an empty message (carries no channel).
pub fn split(msg: &[u8]) -> Option<(u8, &[u8])> {
    msg.split_first().map(|(c, d)| (*c, d))
}

/// The resize message for a terminal of `width` columns and `height` rows.
pub fn resize(width: u16, height: u16) -> Vec<u8> {
    frame(RESIZE, serde_json::json!({"Width": width, "Height": height}).to_string().as_bytes())
}

/// Channels the client may send (what the kubelet passes on to the runtime).
pub fn client_may_send(channel: u8) -> bool {
    matches!(channel, STDIN | RESIZE)
}

/// Channels the runtime may send (what the kubelet passes on to the client).
pub fn runtime_may_send(channel: u8) -> bool {
    matches!(channel, STDOUT | STDERR | STATUS)
}

/// How the command ended, from the status channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and exited with this code.
    Exited(i32),
    /// It could not be run (or the runtime failed): the message to show.
    Failed(String),
}

/// Reads the status message: `Success` is exit code 0; `Failure` with reason `NonZeroExitCode` carries the code
/// as the message of its `ExitCode` cause (as kubectl reads it); any other failure is its message.
pub fn outcome(status: &[u8]) -> Outcome {
    let v: serde_json::Value = match serde_json::from_slice(status) {
        Ok(v) => v,
        Err(_) => return Outcome::Failed(format!("unreadable exec status: {}", String::from_utf8_lossy(status))),
    };
    match v["status"].as_str() {
        Some("Success") => Outcome::Exited(0),
        Some("Failure") if v["reason"] == "NonZeroExitCode" => {
            let code = v["details"]["causes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["reason"] == "ExitCode")
                .and_then(|c| c["message"].as_str())
                .and_then(|m| m.parse().ok());
            match code {
                Some(c) => Outcome::Exited(c),
                None => Outcome::Failed("the command failed with no exit code in its status".into()),
            }
        }
        _ => Outcome::Failed(v["message"].as_str().map(str::to_string).unwrap_or_else(|| v.to_string())),
    }
}

/// The status message for a failure the kubelet itself reports on an open connection.
pub fn failure(message: &str) -> Vec<u8> {
    let status = serde_json::json!({
        "metadata": {}, "status": "Failure", "message": message, "reason": "InternalError", "code": 500,
    });
    frame(STATUS, status.to_string().as_bytes())
}

/// Does a `Sec-WebSocket-Protocol` header value offer `PROTOCOL`?
pub fn offers_protocol(header: &str) -> bool {
    header.split(',').any(|p| p.trim() == PROTOCOL)
}

/// Is this an HTTP/1.1 WebSocket upgrade (`Upgrade: websocket` and `upgrade` among the `Connection` tokens)?
pub fn is_websocket_upgrade(upgrade: Option<&str>, connection: Option<&str>) -> bool {
    upgrade.is_some_and(|u| u.trim().eq_ignore_ascii_case("websocket"))
        && connection.is_some_and(|c| c.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Relays between the client's connection and the runtime's until either side ends: the client's stdin and
/// resize messages to the runtime, the runtime's output and status to the client. Empty messages and other
/// channels are dropped. Returns after closing both.
pub async fn relay<C, R>(client: WebSocketStream<C>, runtime: WebSocketStream<R>)
where
    C: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_tx, mut client_rx) = client.split();
    let (mut runtime_tx, mut runtime_rx) = runtime.split();
    let up = async {
        while let Some(Ok(m)) = client_rx.next().await {
            let keep_going = match m {
                Message::Binary(b) if split(&b).is_some_and(|(c, _)| client_may_send(c)) => {
                    runtime_tx.send(Message::Binary(b)).await.is_ok()
                }
                Message::Close(_) => false,
                _ => true,
            };
            if !keep_going {
                break;
            }
        }
    };
    let down = async {
        let mut status_sent = false;
        while let Some(Ok(m)) = runtime_rx.next().await {
            match m {
                Message::Binary(b) if split(&b).is_some_and(|(c, _)| runtime_may_send(c)) => {
                    status_sent |= split(&b).is_some_and(|(c, _)| c == STATUS);
                    if client_tx.send(Message::Binary(b)).await.is_err() {
                        return;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        if !status_sent {
            // The runtime went away without saying how the command ended: say so rather than leave the client
            // guessing from a bare close.
            let _ =
                client_tx.send(Message::Binary(failure("the container runtime closed the exec stream").into())).await;
        }
        let _ = client_tx.close().await;
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
    // Whichever side ended, the other is done too (closing the runtime's side ends its copy of stdin).
    let _ = runtime_tx.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_channel_first() {
        let cases: &[(u8, &[u8], &[u8])] = &[
            (STDIN, b"foo\n", &[0, b'f', b'o', b'o', b'\n']),
            (STDOUT, b"", &[1]),
            (STDERR, b"\x00\xff", &[2, 0, 255]),
            (STATUS, b"{}", &[3, b'{', b'}']),
        ];
        for (channel, data, wire) in cases {
            assert_eq!(frame(*channel, data), *wire, "frame({channel}, {data:?})");
            assert_eq!(split(wire), Some((*channel, *data)), "split({wire:?})");
        }
        assert_eq!(split(&[]), None);
    }

    #[test]
    fn resize_is_json_on_channel_four() {
        let msg = resize(132, 43);
        let (c, data) = split(&msg).unwrap();
        assert_eq!(c, RESIZE);
        let v: serde_json::Value = serde_json::from_slice(data).unwrap();
        assert_eq!(v, serde_json::json!({"Width": 132, "Height": 43}));
    }

    #[test]
    fn status_messages_give_the_exit_code_or_the_failure() {
        let cases: &[(&str, Outcome)] = &[
            (r#"{"metadata":{},"status":"Success"}"#, Outcome::Exited(0)),
            (
                r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: exit status 7","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"7"}]}}"#,
                Outcome::Exited(7),
            ),
            (
                r#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"Other","message":"x"},{"reason":"ExitCode","message":"130"}]}}"#,
                Outcome::Exited(130),
            ),
            (
                r#"{"status":"Failure","message":"error executing command in container: exec: \"nope\": not found","reason":"InternalError"}"#,
                Outcome::Failed("error executing command in container: exec: \"nope\": not found".into()),
            ),
            (
                r#"{"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[]}}"#,
                Outcome::Failed("the command failed with no exit code in its status".into()),
            ),
            ("not json", Outcome::Failed("unreadable exec status: not json".into())),
        ];
        for (json, want) in cases {
            assert_eq!(outcome(json.as_bytes()), *want, "{json}");
        }
        let (c, data) = split(&failure("runtime gone")).map(|(c, d)| (c, d.to_vec())).unwrap();
        assert_eq!((c, outcome(&data)), (STATUS, Outcome::Failed("runtime gone".into())));
    }

    #[test]
    fn each_direction_carries_only_its_channels() {
        let cases = [
            (STDIN, true, false),
            (STDOUT, false, true),
            (STDERR, false, true),
            (STATUS, false, true),
            (RESIZE, true, false),
            (5, false, false),
            (255, false, false),
        ];
        for (c, from_client, from_runtime) in cases {
            assert_eq!((client_may_send(c), runtime_may_send(c)), (from_client, from_runtime), "channel {c}");
        }
    }

    use tokio_tungstenite::tungstenite::protocol::Role;

    /// Two ends of an in-memory WebSocket: (client side, server side).
    async fn ws_pair() -> (WebSocketStream<tokio::io::DuplexStream>, WebSocketStream<tokio::io::DuplexStream>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let server = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        (client, server)
    }

    /// Everything `ws` receives until it closes, as (channel, data).
    async fn drain(ws: &mut WebSocketStream<tokio::io::DuplexStream>) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Binary(b) => got.extend(split(&b).map(|(c, d)| (c, d.to_vec()))),
                Message::Close(_) => break,
                _ => {}
            }
        }
        got
    }

    #[tokio::test]
    async fn the_relay_passes_each_direction_only_its_channels_and_reports_a_runtime_that_vanished() {
        // (what the runtime sends before closing, what the client must see)
        type Received = Vec<(u8, Vec<u8>)>;
        let cases: Vec<(Vec<Vec<u8>>, Received)> = vec![
            (
                vec![
                    frame(STDOUT, b""),
                    frame(STDOUT, b"out"),
                    frame(STDIN, b"bogus"),
                    frame(STDERR, b"err"),
                    frame(STATUS, b"{}"),
                ],
                vec![(STDOUT, vec![]), (STDOUT, b"out".to_vec()), (STDERR, b"err".to_vec()), (STATUS, b"{}".to_vec())],
            ),
            (vec![frame(STDOUT, b"partial")], {
                let (c, d) = split(&failure("the container runtime closed the exec stream"))
                    .map(|(c, d)| (c, d.to_vec()))
                    .unwrap();
                vec![(STDOUT, b"partial".to_vec()), (c, d)]
            }),
        ];
        for (from_runtime, want) in cases {
            let (mut client, kubelet_client_side) = ws_pair().await;
            let (kubelet_runtime_side, mut runtime) = ws_pair().await;
            let relay = tokio::spawn(relay(kubelet_client_side, kubelet_runtime_side));
            for m in [frame(STDIN, b"typed"), frame(STDOUT, b"forged"), resize(80, 24), frame(200, b"x")] {
                client.send(Message::Binary(m.into())).await.unwrap();
            }
            // The runtime sees stdin and the resize, nothing else, in order.
            let mut seen = Vec::new();
            while seen.len() < 2 {
                if let Some(Ok(Message::Binary(b))) = runtime.next().await {
                    seen.extend(split(&b).map(|(c, d)| (c, d.to_vec())));
                }
            }
            assert_eq!(seen, vec![(STDIN, b"typed".to_vec()), (RESIZE, resize(80, 24)[1..].to_vec())]);
            for m in from_runtime {
                runtime.send(Message::Binary(m.into())).await.unwrap();
            }
            runtime.close(None).await.unwrap();
            assert_eq!(drain(&mut client).await, want);
            tokio::time::timeout(std::time::Duration::from_secs(10), relay).await.unwrap().unwrap();
        }
    }

    #[test]
    fn upgrade_and_protocol_headers_are_recognised() {
        let cases = [
            (Some("websocket"), Some("Upgrade"), true),
            (Some("WebSocket"), Some("keep-alive, upgrade"), true),
            (Some("websocket"), Some("keep-alive"), false),
            (Some("h2c"), Some("Upgrade"), false),
            (None, Some("Upgrade"), false),
            (Some("websocket"), None, false),
        ];
        for (u, c, want) in cases {
            assert_eq!(is_websocket_upgrade(u, c), want, "{u:?} {c:?}");
        }
        assert!(offers_protocol("v4.channel.k8s.io"));
        assert!(offers_protocol("channel.k8s.io, v4.channel.k8s.io"));
        assert!(!offers_protocol("channel.k8s.io"));
        assert!(!offers_protocol("v4.channel.k8s.io.evil"));
    }
}
