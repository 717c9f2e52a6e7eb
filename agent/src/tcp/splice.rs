//! The default relay: per direction, bulk goes socket → pipe → socket with
//! splice(2) inside the kernel, small messages through one read and one
//! write. A direction holds one pipe or at most [`SMALL`] bytes in flight,
//! so a slow reader stalls its writer (TCP backpressure) instead of
//! growing memory.
//!
//! Small messages (an HTTP request or answer, a shell's keystrokes) skip
//! the pipe: one read(2) into a per-thread buffer of [`SMALL`] bytes and
//! one write(2). A short read shows the socket drained, so the direction
//! waits for the next readiness without the splice that would only find
//! the socket empty: 5.0 system calls a kept-alive request through a
//! pinned HTTP connection instead of 6.7, and about 7% less CPU per
//! request (`cargo xtask bench http`). A read that fills the buffer is the
//! start of bulk, and what follows goes through a pipe. A burst is what
//! moves between two reads that find the socket empty: after a burst of
//! at least [`SMALL`] bytes the next one goes through the pipe too (a
//! stream that keeps running dry for a moment is not copied at each
//! restart), after a smaller one the next starts with the small step.
//! What a full destination leaves of a small message is written before
//! the source is read again (at most [`SMALL`] bytes a direction).
//!
//! A direction holds a pipe only while bulk flows: it takes one from a
//! shared pool for a bulk read, keeps it while reads find bytes, and
//! gives it back once a read finds the socket empty (the pipe is empty
//! then too), so an idle connection holds no pipe (its two sockets'
//! descriptors instead of six; 40,000 held connections would otherwise
//! need 160,000 more descriptors and their pipe buffers).

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    client: &TcpStream,
    server: &TcpStream,
    pipe_bytes: usize,
    traffic: &InstanceTraffic,
) -> io::Result<()> {
    let counters = (&traffic.tcp_bytes_in, &traffic.tcp_bytes_out);
    pump_counted(client, server, pipe_bytes, counters, traffic).await
}

/// [`pump`], counting bytes from the client in `counters.0` and bytes to
/// it in `counters.1` (a pinned HTTP connection counts HTTP bytes). The
/// caller closes both sockets once this returns: the direction that ends
/// last leaves its FIN to that close instead of a `shutdown(2)` of its own.
pub async fn pump_counted(
    client: &TcpStream,
    server: &TcpStream,
    pipe_bytes: usize,
    counters: (&AtomicU64, &AtomicU64),
    traffic: &InstanceTraffic,
) -> io::Result<()> {
    let ended = AtomicBool::new(false);
    let up = one_way(client, server, pipe_bytes, counters.0, traffic, &ended);
    let down = one_way(server, client, pipe_bytes, counters.1, traffic, &ended);
    let result = tokio::try_join!(up, down).map(|_| ());
    if result.is_err() {
        reset(client);
        reset(server);
    }
    result
}

/// Makes the coming close send RST instead of FIN.
pub(crate) fn reset(s: impl std::os::fd::AsFd) {
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

/// What one read may take before a direction moves bytes with splice: a
/// message up to this size is read and written at once (one read, one
/// write, and a short read shows the socket drained); a read that fills
/// it is the start of bulk, which then goes through a pipe.
const SMALL: usize = 16 * 1024;

thread_local! {
    /// The read buffer of every direction on this thread: nothing crosses
    /// an await in it, bytes a full destination left are kept apart.
    static SMALL_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SMALL].into_boxed_slice());
}

/// The outcome of one small read and its write.
enum Small {
    /// The socket had nothing (its readiness is cleared).
    Empty,
    /// End of stream.
    Eof,
    /// `n` bytes read and written; `drained` when the read was short.
    Moved { n: usize, drained: bool },
    /// `n` bytes read, the destination took only part: `rest` is to write.
    Partial { n: usize, rest: Vec<u8> },
}

/// Reads what `src` has (up to [`SMALL`]) and writes it to `dst`.
fn small_step(src: &TcpStream, dst: &TcpStream, buf: &mut [u8]) -> io::Result<Small> {
    let mut short = 0;
    let read = src.try_io(Interest::READABLE, || {
        let n = rustix::io::read(src, &mut *buf)?;
        // A short read on a stream socket took everything queued: report
        // it as WouldBlock so that the readiness is cleared (what tokio's
        // own reads do; a byte arriving meanwhile keeps it set).
        if n > 0 && n < buf.len() {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    let (n, drained) = match read {
        Ok(0) => return Ok(Small::Eof),
        Ok(n) => (n, false),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => (short, true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Small::Empty),
        Err(e) => return Err(e),
    };
    let mut written = 0;
    while written < n {
        match dst.try_write(&buf[written..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => written += m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok(Small::Partial {
                    n,
                    rest: buf[written..n].to_vec(),
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Small::Moved { n, drained })
}

async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    pipe_bytes: usize,
    counter: &AtomicU64,
    traffic: &InstanceTraffic,
    ended: &AtomicBool,
) -> io::Result<()> {
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    // The pipe is kept while the socket keeps having bytes, and given back
    // once a read finds it empty: no pool lock per chunk of a busy stream,
    // no pipe held by an idle one.
    let mut held: Option<Pipe> = None;
    // Whether the last burst (the bytes moved between two reads that found
    // the socket empty) was bulk: a stream that runs dry between bursts
    // goes on through the pipe instead of copying each burst's start; one
    // that sends a small message again goes back to the small step.
    let mut bulk = false;
    let mut burst = 0;
    // Whether the last splice took less than the pipe holds (the socket is
    // then most likely empty), and whether the source stands at a TCP
    // urgent mark (see `Spliced::AtMark`).
    let mut short = false;
    let mut at_mark = false;
    loop {
        // A stream that never runs dry still lets the thread's other tasks
        // (connections, timers) run: readiness alone takes no budget.
        tokio::task::coop::consume_budget().await;
        src.readable().await?;
        if std::mem::take(&mut at_mark) || (held.is_none() && !bulk) {
            // Not in bulk: a small message is read and written at once.
            let step = SMALL_BUF.with_borrow_mut(|buf| small_step(src, dst, buf))?;
            let n = match step {
                Small::Empty => continue,
                Small::Eof => return forward_eof(dst, ended),
                Small::Moved { n, drained } => {
                    // A full read: bulk follows, through a pipe.
                    bulk = !drained;
                    burst = if drained { 0 } else { n };
                    n
                }
                Small::Partial { n, rest } => {
                    write_rest(dst, &rest).await?;
                    n
                }
            };
            counter.fetch_add(n as u64, Ordering::Relaxed);
            traffic.touch();
            continue;
        }
        let pipe = match held.take() {
            Some(p) => p,
            None => Pipe::take(pipe_bytes)?,
        };
        let r = src.try_io(Interest::READABLE, || splice_in(src, &pipe, short));
        short = false;
        let n = match r {
            Ok(Spliced::Moved(n)) => n,
            // The pipe is still empty: back to the pool (the next burst
            // takes one again if this one was bulk).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                bulk = burst >= SMALL;
                burst = 0;
                continue;
            }
            // read(2) steps over the mark: the small step takes what
            // follows it (the readiness is still set).
            Ok(Spliced::AtMark) => {
                pipe.give_back();
                at_mark = true;
                continue;
            }
            Err(e) => {
                pipe.give_back();
                return Err(e);
            }
        };
        if n == 0 {
            // The end, or an urgent mark with the FIN queued behind it:
            // splice(2) finds nothing there either. read(2) tells them
            // apart (it returns 0 only at the end).
            pipe.give_back();
            at_mark = true;
            continue;
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
        burst += n;
        short = n < pipe.cap;
        // Empty again; the next read tells whether the socket has more.
        held = Some(pipe);
    }
}

/// What one splice from the source into an empty pipe did.
enum Spliced {
    /// `n` bytes are in the pipe (0: the end of the stream, or an urgent
    /// mark with the FIN queued behind it).
    Moved(usize),
    /// Nothing, while bytes are queued: splice(2) stops at a TCP urgent
    /// mark (a player's `MSG_OOB`) and then finds nothing, however much
    /// is queued behind it, until a read(2) steps over the mark.
    AtMark,
}

/// Splices what `src` has into `pipe`; WouldBlock once the socket is
/// empty. After a `short` splice (one that took less than the pipe
/// holds) the socket is most likely empty, so the queue is asked first
/// (FIONREAD) instead of splicing again: as many system calls, and, with
/// urgent bytes in line (`SO_OOBINLINE`, which the relay sets on both
/// sockets), it tells an empty socket from one stopped at an urgent mark.
/// Without it FIONREAD counts only up to the mark, and a direction
/// stopped there waits for the source's next bytes.
fn splice_in(src: &TcpStream, pipe: &Pipe, short: bool) -> io::Result<Spliced> {
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    let queued = || rustix::io::ioctl_fionread(src);
    let asked = if short { Some(queued()?) } else { None };
    if asked == Some(0) {
        return Err(io::ErrorKind::WouldBlock.into());
    }
    match rustix::pipe::splice(src, None, &pipe.write, None, pipe.cap, flags) {
        Ok(n) => Ok(Spliced::Moved(n)),
        Err(rustix::io::Errno::AGAIN) => match asked {
            Some(_) => Ok(Spliced::AtMark),
            None if queued()? > 0 => Ok(Spliced::AtMark),
            None => Err(io::ErrorKind::WouldBlock.into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// EOF from the source: forward the half-close; the other direction goes
/// on. Once both have ended, the caller's close sends the FIN (each socket
/// has been read to its end, so it is a FIN, not a reset).
fn forward_eof(dst: &TcpStream, ended: &AtomicBool) -> io::Result<()> {
    if ended.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    match rustix::net::shutdown(dst, Shutdown::Write) {
        Ok(()) | Err(rustix::io::Errno::NOTCONN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Writes what a full destination left of a small message, waiting for
/// room (the source is not read meanwhile: backpressure).
async fn write_rest(dst: &TcpStream, mut rest: &[u8]) -> io::Result<()> {
    while !rest.is_empty() {
        dst.writable().await?;
        match dst.try_write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => rest = &rest[m..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Two ends of one loopback connection.
    async fn pair() -> io::Result<(TcpStream, TcpStream)> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let near = TcpStream::connect(listener.local_addr()?).await?;
        let (far, _) = listener.accept().await?;
        Ok((near, far))
    }

    /// A player's socket and an instance's with [`pump`] relaying between
    /// them (with a pipe of `pipe_bytes`), its counters, and its task. With
    /// `buffers`, all four sockets get fixed buffers of that size.
    async fn relayed(
        pipe_bytes: usize,
        buffers: Option<usize>,
    ) -> io::Result<(
        TcpStream,
        TcpStream,
        std::sync::Arc<InstanceTraffic>,
        tokio::task::JoinHandle<io::Result<()>>,
    )> {
        use rustix::net::sockopt::{set_socket_recv_buffer_size, set_socket_send_buffer_size};
        let (player, client) = pair().await?;
        let (server, instance) = pair().await?;
        if let Some(bytes) = buffers {
            for s in [&player, &client, &server, &instance] {
                set_socket_recv_buffer_size(s, bytes)?;
                set_socket_send_buffer_size(s, bytes)?;
            }
        }
        let traffic = std::sync::Arc::new(InstanceTraffic::default());
        let t = traffic.clone();
        let relay = tokio::spawn(async move { pump(&client, &server, pipe_bytes, &t).await });
        Ok((player, instance, traffic, relay))
    }

    /// Bytes that never repeat in a way a swapped, doubled or dropped
    /// chunk could hide (xorshift).
    fn pattern(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A relay that loses bytes leaves the test waiting for them: fail
    /// instead of hanging.
    async fn within_a_minute(test: impl Future<Output = io::Result<()>>) -> io::Result<()> {
        tokio::time::timeout(Duration::from_secs(60), test)
            .await
            .map_err(|_| io::Error::other("no end within 60 s: bytes lost or a direction stuck"))?
    }

    /// Small messages one way and back.
    async fn ping_pong(player: &mut TcpStream, instance: &mut TcpStream) -> io::Result<()> {
        for i in 0..20u8 {
            let msg = [b'q', i];
            player.write_all(&msg).await?;
            let mut got = [0; 2];
            instance.read_exact(&mut got).await?;
            assert_eq!(got, msg);
            instance.write_all(&[b'r', i, i]).await?;
            let mut back = [0; 3];
            player.read_exact(&mut back).await?;
            assert_eq!(back, [b'r', i, i]);
        }
        Ok(())
    }

    /// Small messages, bulk both ways at once, small ones again: every byte
    /// arrives in order, the counters hold each direction's bytes and the
    /// half-closes pass through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_and_bulk_bytes_arrive_whole_both_ways_with_the_half_closes() -> io::Result<()> {
        within_a_minute(small_and_bulk()).await
    }

    async fn small_and_bulk() -> io::Result<()> {
        let (mut player, mut instance, traffic, relay) = relayed(1 << 20, None).await?;

        ping_pong(&mut player, &mut instance).await?;
        // Bulk both ways at once.
        let (up, down) = (pattern(6 << 20, 1), pattern(5 << 20, 7));
        let (mut got_up, mut got_down) = (vec![0; up.len()], vec![0; down.len()]);
        {
            let (mut player_r, mut player_w) = player.split();
            let (mut instance_r, mut instance_w) = instance.split();
            tokio::try_join!(
                player_w.write_all(&up),
                instance_r.read_exact(&mut got_up),
                instance_w.write_all(&down),
                player_r.read_exact(&mut got_down),
            )?;
        }
        assert!(got_up == up, "bulk bytes up differ");
        assert!(got_down == down, "bulk bytes down differ");
        // Small again, after bulk.
        ping_pong(&mut player, &mut instance).await?;
        player.write_all(b"end").await?;
        player.shutdown().await?;
        let mut tail = Vec::new();
        instance.read_to_end(&mut tail).await?;
        assert_eq!(tail, b"end");
        instance.write_all(b"bye").await?;
        instance.shutdown().await?;
        let mut tail = Vec::new();
        player.read_to_end(&mut tail).await?;
        assert_eq!(tail, b"bye");
        relay.await??;
        let ins = 2 * 20 * 2 + up.len() as u64 + 3;
        let outs = 2 * 20 * 3 + down.len() as u64 + 3;
        assert_eq!(traffic.tcp_bytes_in.load(Ordering::Relaxed), ins);
        assert_eq!(traffic.tcp_bytes_out.load(Ordering::Relaxed), outs);
        Ok(())
    }

    /// A TCP urgent byte (`MSG_OOB`) in bulk: splice(2) stops at its mark
    /// and then finds nothing however much is queued behind it. With
    /// urgent bytes in line (as the relay's sockets have them), the byte
    /// and what follows it arrive, in order, and the relay goes on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_behind_an_urgent_mark_arrive() -> io::Result<()> {
        tokio::time::timeout(Duration::from_secs(20), behind_urgent(false))
            .await
            .map_err(|_| io::Error::other("stuck at an urgent mark for 20 s"))?
    }

    /// The same with the player's FIN queued behind the mark: splice(2)
    /// then returns 0 there, which is not the end yet.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_and_the_end_behind_an_urgent_mark_arrive() -> io::Result<()> {
        tokio::time::timeout(Duration::from_secs(20), behind_urgent(true))
            .await
            .map_err(|_| io::Error::other("stuck at an urgent mark for 20 s"))?
    }

    /// With `end`, the player half-closes right after the bytes behind
    /// the mark, before the relay starts.
    async fn behind_urgent(end: bool) -> io::Result<()> {
        use rustix::net::{SendFlags, send};
        let (mut player, client) = pair().await?;
        let (server, mut instance) = pair().await?;
        for s in [&client, &server] {
            rustix::net::sockopt::set_socket_oobinline(s, true)?;
        }
        // Everything is queued before the relay starts: its first read
        // fills the small buffer, so the rest goes through the pipe, whose
        // splice stops at the mark.
        let bulk = pattern(48 << 10, 20);
        player.write_all(&bulk).await?;
        player.write_all(b"<before").await?;
        send(&player, b"!", SendFlags::OOB)?;
        player.write_all(b"after>").await?;
        if end {
            player.shutdown().await?;
        }
        let queued = bulk.len() as u64 + 14;
        // (FIONREAD counts the in-line urgent byte and what follows it.)
        for _ in 0..100 {
            if rustix::io::ioctl_fionread(&client)? == queued {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rustix::io::ioctl_fionread(&client)?, queued);
        let traffic = std::sync::Arc::new(InstanceTraffic::default());
        let t = traffic.clone();
        let relay = tokio::spawn(async move { pump(&client, &server, 1 << 20, &t).await });
        let mut got = vec![0; bulk.len() + 14];
        instance.read_exact(&mut got).await?;
        assert!(got[..bulk.len()] == bulk[..], "bulk bytes differ");
        assert_eq!(&got[bulk.len()..], b"<before!after>");
        if end {
            let mut tail = Vec::new();
            instance.read_to_end(&mut tail).await?;
            assert!(tail.is_empty(), "bytes after the end: {tail:?}");
            instance.write_all(b"bye").await?;
            drop(instance);
            let mut bye = Vec::new();
            player.read_to_end(&mut bye).await?;
            assert_eq!(bye, b"bye");
            relay.await??;
            let expected = (bulk.len() + 14) as u64;
            assert_eq!(traffic.tcp_bytes_in.load(Ordering::Relaxed), expected);
            return Ok(());
        }
        // The relay goes on: bulk and small again.
        let more = pattern(1 << 20, 21);
        let mut got = vec![0; more.len()];
        tokio::try_join!(player.write_all(&more), instance.read_exact(&mut got))?;
        assert!(got == more, "bulk bytes after the mark differ");
        ping_pong(&mut player, &mut instance).await?;
        player.shutdown().await?;
        let mut tail = Vec::new();
        instance.read_to_end(&mut tail).await?;
        assert!(tail.is_empty(), "bytes after the end: {tail:?}");
        drop(instance);
        relay.await??;
        let expected = (bulk.len() + 14 + more.len() + 40) as u64;
        assert_eq!(traffic.tcp_bytes_in.load(Ordering::Relaxed), expected);
        Ok(())
    }

    /// A destination with no room: the small step writes what fits and
    /// hands back the rest, which then arrives after it, in order.
    #[tokio::test]
    async fn a_full_destination_gets_the_rest_of_a_small_message_after_it() -> io::Result<()> {
        within_a_minute(rest_after_full()).await
    }

    async fn rest_after_full() -> io::Result<()> {
        use rustix::net::sockopt::{set_socket_recv_buffer_size, set_socket_send_buffer_size};
        let (mut player, src) = pair().await?;
        let (dst, mut instance) = pair().await?;
        set_socket_send_buffer_size(&dst, 16 << 10)?;
        set_socket_recv_buffer_size(&instance, 16 << 10)?;
        // Fill the destination until it takes nothing more, twice a little
        // apart (segments in flight settle).
        let filler = vec![b'f'; 64 << 10];
        let mut queued = 0;
        for _ in 0..2 {
            loop {
                match dst.try_write(&filler) {
                    Ok(n) => queued += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let msg = pattern(1000, 5);
        player.write_all(&msg).await?;
        src.readable().await?;
        let mut buf = vec![0; SMALL];
        let rest = match small_step(&src, &dst, &mut buf)? {
            Small::Partial { n, rest } => {
                assert_eq!(n, msg.len(), "the whole message was read");
                rest
            }
            Small::Moved { .. } => panic!("a full destination took the whole message"),
            Small::Empty | Small::Eof => panic!("the message was not read"),
        };
        assert!(
            !rest.is_empty() && msg.ends_with(&rest),
            "the rest is not the message's tail"
        );
        let written = msg.len() - rest.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0; queued + msg.len()];
            instance.read_exact(&mut got).await?;
            assert!(got[..queued].iter().all(|&b| b == b'f'), "filler changed");
            assert!(
                got[queued..] == msg[..],
                "the message arrived changed or out of order"
            );
            io::Result::Ok(())
        });
        write_rest(&dst, &rest).await?;
        reader.await??;
        assert!(written < 1000);
        Ok(())
    }

    /// A destination that does not read holds the source back: with small
    /// socket buffers the relay stops taking bytes well short of what is
    /// sent (it holds one pipe), and everything arrives, in order, once the
    /// destination reads again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_destination_that_stops_reading_holds_the_source_back() -> io::Result<()> {
        within_a_minute(held_back()).await
    }

    async fn held_back() -> io::Result<()> {
        // Fixed buffers (no autotuning): each socket holds at most about
        // twice what is set.
        let (mut player, mut instance, traffic, relay) = relayed(1 << 16, Some(64 << 10)).await?;
        // Writes of 10,000 bytes while the instance reads nothing.
        let data = pattern(8 << 20, 3);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(10_000) {
                player.write_all(chunk).await?;
            }
            player.shutdown().await?;
            io::Result::Ok(player)
        });
        // The relay stops: two looks 300 ms apart see the same count, far
        // below what is sent.
        let mut before = u64::MAX;
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = traffic.tcp_bytes_in.load(Ordering::Relaxed);
            if now == before {
                break;
            }
            before = now;
        }
        assert!(
            before < 2 << 20,
            "the relay took {before} bytes while nobody read"
        );
        assert!(
            !writer.is_finished(),
            "8 MiB went somewhere while nobody read"
        );
        let mut got = Vec::new();
        instance.read_to_end(&mut got).await?;
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes differ after the stall");
        let _player = writer.await??;
        drop(instance);
        relay.await??;
        Ok(())
    }
}
