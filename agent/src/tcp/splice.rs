//! The splice(2) data path: per direction, bytes go socket → pipe → socket
//! inside the kernel; the agent only waits for readiness. The pipe's size
//! bounds what one direction holds in flight, so a slow reader stalls its
//! writer (TCP backpressure) instead of growing memory.
//!
//! A direction holds a pipe only while bytes flow: it takes one from a
//! shared pool when its socket is readable, keeps it while reads find
//! bytes, and gives it back once a read finds the socket empty (the pipe
//! is empty then too), so an idle connection holds no pipe (three
//! descriptors on TCP, its sockets and the idle watch's, two for a pinned
//! HTTP connection, instead of seven; 40,000
//! held connections would otherwise need 160,000 more descriptors and
//! their pipe buffers).

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustix::net::Shutdown;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::metrics::traffic::InstanceTraffic;

/// Moves bytes both ways until both directions have ended. Half-close is
/// forwarded (EOF on one side → `shutdown(SHUT_WR)` on the other); an error
/// on either side resets both. Bytes count as the instance's TCP bytes.
pub async fn pump(
    client: TcpStream,
    server: TcpStream,
    pipe_bytes: usize,
    traffic: &InstanceTraffic,
) -> io::Result<()> {
    let counters = (&traffic.tcp_bytes_in, &traffic.tcp_bytes_out);
    pump_counted(&client, &server, pipe_bytes, counters, traffic).await
}

/// [`pump`], counting bytes from the client in `counters.0` and bytes to
/// it in `counters.1` (a pinned HTTP connection counts HTTP bytes).
pub async fn pump_counted(
    client: &TcpStream,
    server: &TcpStream,
    pipe_bytes: usize,
    counters: (&AtomicU64, &AtomicU64),
    traffic: &InstanceTraffic,
) -> io::Result<()> {
    let up = one_way(client, server, pipe_bytes, counters.0, traffic);
    let down = one_way(server, client, pipe_bytes, counters.1, traffic);
    let result = tokio::try_join!(up, down).map(|_| ());
    if result.is_err() {
        reset(client);
        reset(server);
    }
    result
}

/// Makes the coming close send RST instead of FIN.
pub(crate) fn reset(s: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(s, Some(Duration::ZERO));
}

/// Empty pipes kept for the next transfer; past this many, a returned
/// pipe is closed.
const IDLE_PIPES: usize = 256;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// An empty pipe and its capacity.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    cap: usize,
}

impl Pipe {
    /// An idle pipe from the pool, or a new one of `bytes`.
    fn take(bytes: usize) -> io::Result<Pipe> {
        if let Some(p) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Pipes default to 64 KiB; a bigger one moves more per wakeup.
        let cap = rustix::pipe::fcntl_setpipe_size(&write, bytes).unwrap_or(64 * 1024);
        Ok(Pipe { read, write, cap })
    }

    /// Gives an empty pipe back (a pipe still holding bytes is dropped
    /// instead, never returned).
    fn give_back(self) {
        let mut idle = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_PIPES {
            idle.push(self);
        }
    }
}

async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    pipe_bytes: usize,
    counter: &AtomicU64,
    traffic: &InstanceTraffic,
) -> io::Result<()> {
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    // The pipe is kept while the socket keeps having bytes, and given back
    // once a read finds it empty: no pool lock per chunk of a busy stream,
    // no pipe held by an idle one.
    let mut held: Option<Pipe> = None;
    loop {
        // Returns at once while the socket is known readable, but takes
        // from the task's budget: a stream that never runs dry still lets
        // the thread's other tasks run.
        src.readable().await?;
        let pipe = match held.take() {
            Some(p) => p,
            None => Pipe::take(pipe_bytes)?,
        };
        let r = src.try_io(Interest::READABLE, || {
            Ok(rustix::pipe::splice(
                src,
                None,
                &pipe.write,
                None,
                pipe.cap,
                flags,
            )?)
        });
        let n = match r {
            Ok(n) => n,
            // The pipe is still empty: back to the pool.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            Err(e) => {
                pipe.give_back();
                return Err(e);
            }
        };
        if n == 0 {
            pipe.give_back();
            // EOF: forward the half-close; the other direction goes on.
            match rustix::net::shutdown(dst, Shutdown::Write) {
                Ok(()) | Err(rustix::io::Errno::NOTCONN) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
        let mut left = n;
        while left > 0 {
            // The pipe holds `left` bytes, so EAGAIN means the socket is
            // full. On an error the pipe, not empty, is dropped.
            let r = dst.try_io(Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(
                    &pipe.read, None, dst, None, left, flags,
                )?)
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
        // Empty again; the next read tells whether the socket has more.
        held = Some(pipe);
    }
}
