//! Readiness probes of services: from this host into the instance's
//! network, as the proxy reaches them.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tidegate_schema::spec::ReadySpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one probe may take.
const PROBE: Duration = Duration::from_millis(500);

/// Whether the service at `address` passes `ready`: its port accepts a
/// connection (`tcp`), or `GET path` answers 2xx or 3xx (`http`).
pub(super) async fn probe(address: IpAddr, ready: &ReadySpec) -> bool {
    tokio::time::timeout(PROBE, attempt(address, ready))
        .await
        .unwrap_or(false)
}

async fn attempt(address: IpAddr, ready: &ReadySpec) -> bool {
    match ready {
        ReadySpec::Tcp(port) => TcpStream::connect(SocketAddr::new(address, *port))
            .await
            .is_ok(),
        ReadySpec::Http { port, path } => {
            let Ok(mut s) = TcpStream::connect(SocketAddr::new(address, *port)).await else {
                return false;
            };
            let head =
                format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n");
            if s.write_all(head.as_bytes()).await.is_err() {
                return false;
            }
            let mut buf = [0u8; 32];
            let mut n = 0;
            while n < 12 {
                match s.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
            }
            answered_ok(&buf[..n])
        }
    }
}

/// The check as a reason names it: `ready.tcp 5432`, `ready.http 8080 /health`.
pub(super) fn describe(ready: &ReadySpec) -> String {
    match ready {
        ReadySpec::Tcp(port) => format!("ready.tcp {port}"),
        ReadySpec::Http { port, path } => format!("ready.http {port} {path}"),
    }
}

/// Whether a response starts with `HTTP/1.x 2xx` or `3xx`.
fn answered_ok(head: &[u8]) -> bool {
    let Some(rest) = head.strip_prefix(b"HTTP/1.") else {
        return false;
    };
    matches!(rest.get(1..3), Some([b' ', b'2' | b'3']))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_2xx_and_3xx_are_ready() {
        assert!(answered_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(answered_ok(b"HTTP/1.0 302 Found"));
        assert!(!answered_ok(b"HTTP/1.1 404 Not Found"));
        assert!(!answered_ok(b"HTTP/1.1 500 x"));
        assert!(!answered_ok(b"SSH-2.0-dropbear"));
        assert!(!answered_ok(b"HTTP/1."));
        assert!(!answered_ok(b""));
    }

    #[tokio::test]
    async fn probes_a_real_listener() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(probe(lo, &ReadySpec::Tcp(port)).await);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut b = [0u8; 256];
                let _ = s.read(&mut b).await;
                let answer: &[u8] = if b.starts_with(b"GET /ok ") {
                    b"HTTP/1.0 200 OK\r\n\r\n"
                } else {
                    b"HTTP/1.0 503 Starting\r\n\r\n"
                };
                let _ = s.write_all(answer).await;
            }
        });
        let http = |path: &str| ReadySpec::Http {
            port,
            path: path.into(),
        };
        assert!(probe(lo, &http("/ok")).await);
        assert!(!probe(lo, &http("/not-yet")).await);
        // Nothing listening.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gone = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(!probe(lo, &ReadySpec::Tcp(gone)).await);
    }
}
