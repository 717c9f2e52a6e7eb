//! The in-kernel splice path: the pair goes into the sockhash and the
//! `tidegate_splice` verdict program sends each socket's bytes out of its
//! peer; the agent only forwards half-close and resets and tears down.
//!
//! The kernel forwards neither FIN nor RST for us (the program drops the
//! zero-length FIN skb: redirecting it would fail the peer with EPIPE and
//! truncate replies). So per direction the agent waits for the read side
//! to close, then until the other socket's remote end has acknowledged
//! every byte this one received (`tcpi_bytes_acked` of one ≥
//! `tcpi_bytes_received` of the other), and only then sends the FIN with
//! `shutdown(SHUT_WR)`. (Not the program's own count: the FIN can wake the
//! agent before the program has run over the bytes that came with it.)
//!
//! No backpressure: the kernel queues redirected bytes for a slow receiver
//! without TCP's memory limits. That is why this path is opt-in (see
//! docs/architecture.md, "TCP data paths").

use std::io;
use std::time::Duration;

use rustix::net::Shutdown;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::ebpf::{Redirector, tcp_counters};
use super::splice;
use crate::metrics::traffic::InstanceTraffic;

/// Moves bytes both ways in the kernel until both directions have ended.
/// A pair the kernel refuses (e.g. a socket already closed) goes through
/// the splice(2) path instead. `server_sent` bytes (the hop header) were
/// written to `server` already.
pub async fn pump(
    r: &Redirector,
    client: TcpStream,
    server: TcpStream,
    server_sent: usize,
    pipe_bytes: usize,
    traffic: &InstanceTraffic,
) -> io::Result<()> {
    // Nothing else has been sent on either socket yet: what `bytes_acked`
    // says now (1 on the socket we connected: its SYN) is the baseline. On
    // the server the hop header's `server_sent` bytes come on top, whether
    // their acknowledgement has arrived yet or not: it can come seconds
    // late (a lost segment under a burst of connections), and counted as
    // the player's bytes it would send the FIN before the last of them,
    // which the kernel then fails with EPIPE (a reset for the player).
    let (Ok(client_base), Ok(server_base)) = (tcp_counters(&client), tcp_counters(&server)) else {
        return splice::pump(&client, &server, pipe_bytes, traffic).await;
    };
    let server_base = server_baseline(server_base.bytes_acked, server_sent);
    let pair = match r.pair(&client, &server) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %format!("{e:#}"), "cannot splice this pair in the kernel; using splice(2)");
            return splice::pump(&client, &server, pipe_bytes, traffic).await;
        }
    };
    // Counted and taken out of the maps however this ends: also when the
    // caller drops this future (the idle timeout).
    let paired = Paired { r, pair, traffic };
    let result = tokio::try_join!(
        one_way(&client, &server, server_base),
        one_way(&server, &client, client_base.bytes_acked)
    )
    .map(|_| ());
    tracing::trace!(
        ok = result.is_ok(),
        client = ?tcp_counters(&client).ok(),
        server = ?tcp_counters(&server).ok(),
        "kernel-spliced connection closed"
    );
    drop(paired);
    if result.is_err() {
        splice::reset(&client);
        splice::reset(&server);
    }
    result
}

/// What `bytes_acked` of the socket we connected counts before the
/// player's first byte: its SYN and the `sent` bytes of the hop header,
/// acknowledged (`acked` already says so) or not yet.
fn server_baseline(acked: u64, sent: usize) -> u64 {
    acked.max(1 + sent as u64)
}

/// A pair in the kernel's maps: on drop, its bytes are counted and it is
/// taken out.
struct Paired<'a> {
    r: &'a Redirector,
    pair: super::ebpf::Pair,
    traffic: &'a InstanceTraffic,
}

impl Drop for Paired<'_> {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let (up, down) = (
            self.r.redirected(self.pair.a),
            self.r.redirected(self.pair.b),
        );
        self.traffic.tcp_bytes_in.fetch_add(up, Relaxed);
        self.traffic.tcp_bytes_out.fetch_add(down, Relaxed);
        self.r.unpair(&self.pair);
    }
}

/// Waits for `src` to stop sending, then forwards the half-close to `dst`.
async fn one_way(src: &TcpStream, dst: &TcpStream, dst_base: u64) -> io::Result<()> {
    loop {
        let ready = src.ready(Interest::READABLE).await?;
        if ready.is_read_closed() {
            break;
        }
        // Woken without a close (the program consumes the data): wait again.
        let _ = src.try_io(Interest::READABLE, || {
            Err::<(), _>(io::ErrorKind::WouldBlock.into())
        });
    }
    if let Some(e) = src.take_error()? {
        return Err(e);
    }
    // Every byte `src` received goes out of `dst` (the program redirects
    // all of it); forward the FIN once `dst`'s remote end has acknowledged
    // that many. TCP's own counters, not the program's: the FIN can wake us
    // before the program has run over the bytes that came with it.
    // The read side is closed, so the count includes the FIN's one sequence number.
    let received = tcp_counters(src)?.bytes_received.saturating_sub(1);
    let mut pause = Duration::from_millis(1);
    while tcp_counters(dst)?.bytes_acked.saturating_sub(dst_base) < received {
        if let Some(e) = dst.take_error()? {
            return Err(e);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    match rustix::net::shutdown(dst, Shutdown::Write) {
        Ok(()) | Err(rustix::io::Errno::NOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::server_baseline;

    #[test]
    fn the_hop_header_is_in_the_baseline_before_its_acknowledgement() {
        // Only the SYN acknowledged so far: the 60-byte header still counts.
        assert_eq!(server_baseline(1, 60), 61);
        // Header acknowledged already: the same baseline.
        assert_eq!(server_baseline(61, 60), 61);
        // No header: the SYN alone.
        assert_eq!(server_baseline(1, 0), 1);
    }
}
