//! The splice(2) data path: per direction, bytes go socket → pipe → socket
//! inside the kernel; the agent only waits for readiness. The pipe's size
//! bounds what one direction holds in flight, so a slow reader stalls its
//! writer (TCP backpressure) instead of growing memory.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustix::net::Shutdown;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::metrics::traffic::InstanceTraffic;

/// Moves bytes both ways until both directions have ended. Half-close is
/// forwarded (EOF on one side → `shutdown(SHUT_WR)` on the other); an error
/// on either side resets both.
pub async fn pump(
    client: TcpStream,
    server: TcpStream,
    pipe_bytes: usize,
    traffic: &InstanceTraffic,
) -> io::Result<()> {
    let up = one_way(&client, &server, pipe_bytes, &traffic.tcp_bytes_in, traffic);
    let down = one_way(
        &server,
        &client,
        pipe_bytes,
        &traffic.tcp_bytes_out,
        traffic,
    );
    let result = tokio::try_join!(up, down).map(|_| ());
    if result.is_err() {
        reset(&client);
        reset(&server);
    }
    result
}

/// Makes the coming close send RST instead of FIN.
pub(crate) fn reset(s: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO));
}

async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    pipe_bytes: usize,
    counter: &AtomicU64,
    traffic: &InstanceTraffic,
) -> io::Result<()> {
    let (pipe_r, pipe_w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
    // Pipes default to 64 KiB; a bigger one moves more per wakeup.
    let cap = rustix::pipe::fcntl_setpipe_size(&pipe_w, pipe_bytes).unwrap_or(64 * 1024);
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    loop {
        // The pipe is empty here, so EAGAIN means the socket has nothing.
        let n = loop {
            let r = src.try_io(Interest::READABLE, || {
                Ok(rustix::pipe::splice(src, None, &pipe_w, None, cap, flags)?)
            });
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => src.readable().await?,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // EOF: forward the half-close; the other direction goes on.
            match rustix::net::shutdown(dst, Shutdown::Write) {
                Ok(()) | Err(rustix::io::Errno::NOTCONN) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        let mut left = n;
        while left > 0 {
            // The pipe holds `left` bytes, so EAGAIN means the socket is full.
            let r = dst.try_io(Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(&pipe_r, None, dst, None, left, flags)?)
            });
            match r {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
                Err(e) => return Err(e),
            }
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
        traffic.touch();
    }
}
