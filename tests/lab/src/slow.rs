//! Slow and abusive HTTP clients for the limits tests: a slowloris
//! connection, raw exchanges read to the close, and a process's RSS.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The resident memory of process `pid`, in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Opens a connection from `source` (any port) to `to`.
pub async fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if source.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// A slowloris connection from `source`: a request line and a header
/// started (`Host: host`), then one more header byte every `every`.
/// Returns how long the server kept it open, or `None` if it was still
/// open at `until` (or could not be opened).
pub async fn slowloris(
    source: IpAddr,
    to: SocketAddr,
    host: &str,
    every: Duration,
    until: Instant,
) -> Option<Duration> {
    let mut s = connect_from(source, to).await.ok()?;
    let opened = Instant::now();
    let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Slow: ");
    s.write_all(head.as_bytes()).await.ok()?;
    let mut buf = [0u8; 256];
    while Instant::now() < until {
        tokio::select! {
            r = s.read(&mut buf) => {
                // Closed (or answered: an error answer, then the close).
                if matches!(r, Ok(0) | Err(_)) {
                    return Some(opened.elapsed());
                }
            }
            () = tokio::time::sleep(every) => {
                if s.write_all(b"a").await.is_err() {
                    return Some(opened.elapsed());
                }
            }
        }
    }
    None
}

/// Sends `bytes` on a new connection and reads until it closes (5 s at most).
pub async fn raw_exchange(to: SocketAddr, bytes: &[u8]) -> String {
    let Ok(mut s) = TcpStream::connect(to).await else {
        return String::new();
    };
    let _ = s.write_all(bytes).await;
    read_to_close(&mut s).await
}

/// Reads `s` until it closes (5 s at most).
pub async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Percentile `p` (0–100) of sorted `samples`.
pub fn percentile(samples: &[Duration], p: usize) -> Duration {
    samples
        .get((samples.len() * p / 100).min(samples.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}
