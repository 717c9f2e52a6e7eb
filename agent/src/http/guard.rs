//! The HTTP entry's connection limits, in front of Pingora.
//!
//! Pingora reads a request head with a timeout per read (so one byte every
//! few seconds keeps it open forever) and buffers up to 1 MiB of it before
//! any check of ours runs. [`Guard`] wraps the proxy app and every accepted
//! (post-TLS) stream:
//! - it caps open connections per agent and per source address (503 and
//!   close past either);
//! - each request head must be complete within `header_timeout` of its
//!   first byte (of the accept, or the end of the TLS handshake, for a
//!   connection's first request); empty lines before a request line
//!   count, they do not end the head;
//! - head bytes are counted as they arrive: past `max_header_bytes` the
//!   connection gets a 431 and is closed, nothing more is read.
//!
//! The stream tells heads from bodies by the bytes themselves: a head ends
//! at its empty line, the next one starts with the first byte read after a
//! final (non-1xx) response began, and a response write while a head is
//! read means those bytes were an upload answered early (body, not head).
//! A registered agent's address (it forwards many players) counts toward
//! the total only; IPv6 sources count per /64. A 101 answer turns the connection into a
//! tunnel, and HTTP/2 (ALPN) is left to Pingora's own idle timeout. The
//! idle time between requests is Pingora's keep-alive timeout, which the
//! proxy sets on every request ([`super::HttpLimits::keepalive`]).
//! Refusals are counted in `tidegate_agent_http_connections_refused_total`
//! by reason.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
};
use pingora::server::ShutdownWatch;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tidegate_schema::caps::{ConnectionCaps, Refused, Slot};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The limits (the agent config's `http_*` fields and `max_header_bytes`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    /// How long a write to the player may wait for the player to take a
    /// byte (an answer's head or body, a tunnel's bytes, an HTTP/2
    /// frame): past it the connection ends.
    pub write_stall: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
}

/// Why a connection was refused or closed early.
const REASONS: [&str; 5] = [
    "max_connections",
    "max_per_source",
    "header_timeout",
    "header_too_large",
    "write_stalled",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The HTTP entry's open connections and refusals.
#[derive(Debug)]
pub struct Connections {
    limits: ConnLimits,
    caps: Arc<ConnectionCaps>,
    open_gauge: Gauge,
    refused: Family<ReasonLabel, Counter>,
    /// Connections served pinned.
    pub(super) pinned: Counter,
}

impl Connections {
    pub fn new(limits: ConnLimits) -> Self {
        let refused = Family::<ReasonLabel, Counter>::default();
        for reason in REASONS {
            let _ = refused.get_or_create(&ReasonLabel { reason });
        }
        Self {
            caps: ConnectionCaps::new(limits.max_connections, limits.max_connections_per_source),
            limits,
            open_gauge: Gauge::default(),
            refused,
            pinned: Counter::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_connections_open",
            "Connections open on the HTTP entry points",
            self.open_gauge.clone(),
        );
        registry.register(
            "http_connections_refused",
            "HTTP connections refused or closed early: past max_connections or max_per_source (503), a request head not complete within http_header_timeout_ms (header_timeout) or larger than max_header_bytes (431, header_too_large)",
            self.refused.clone(),
        );
        registry.register(
            "http_connections_pinned",
            "HTTP/1 connections served pinned: routed once by their first request, then spliced",
            self.pinned.clone(),
        );
    }

    /// How many connections were served pinned.
    pub fn pinned(&self) -> u64 {
        self.pinned.get()
    }

    /// How many connections were refused for `reason` (one of [`REASONS`]).
    pub fn refused(&self, reason: &'static str) -> u64 {
        self.refused.get_or_create(&ReasonLabel { reason }).get()
    }

    fn count(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Admits a connection from `source`, or says which cap it hit. An
    /// agent forwarding players' requests (`agent`) is held to the total
    /// only: its one address carries many players. IPv6 sources count per
    /// /64, what one host is usually given.
    fn admit(self: &Arc<Self>, source: IpAddr, agent: bool) -> Result<Admitted, &'static str> {
        let slot = self.caps.admit(source, agent).map_err(|r| match r {
            Refused::Total => "max_connections",
            Refused::PerSource => "max_per_source",
        })?;
        self.open_gauge.inc();
        Ok(Admitted {
            conns: self.clone(),
            _slot: slot,
        })
    }
}

/// One admitted connection; gives its place back when dropped.
struct Admitted {
    conns: Arc<Connections>,
    _slot: Slot,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.conns.open_gauge.dec();
    }
}

/// The answer past a connection cap.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 45\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many connections to this agent, try again\n";

/// The answer to a request head past `max_header_bytes`.
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\nContent-Length: 31\r\nConnection: close\r\n\r\nrequest headers are too large\r\n";

/// How much a refused client may still send before the close.
const LINGER_BYTES: usize = 256 * 1024;

/// A Pingora app behind the connection limits.
pub struct Guard<A> {
    pub app: Arc<A>,
    pub conns: Arc<Connections>,
    /// The route table, for the registered agents' addresses.
    pub routes: crate::routes::SharedRoutes,
    /// Pinned HTTP (see [`super::pinned`]).
    pub pinning: Arc<super::pinned::Pinning>,
}

impl<A> std::fmt::Debug for Guard<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("conns", &self.conns)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guard<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let source = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let admitted = match source.map(|ip| {
            let agent = self.routes.load().agents.contains(&ip);
            self.conns.admit(ip, agent)
        }) {
            Some(Ok(admitted)) => Some(admitted),
            Some(Err(reason)) => {
                self.conns.count(reason);
                if !h2 {
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        stream.write_all(BUSY).await?;
                        stream.flush().await
                    })
                    .await;
                }
                return None;
            }
            // Not an inet socket: nothing to count it against.
            None => None,
        };
        let tls = stream.get_ssl().is_some();
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr()?.as_inet().copied());
        let mut guarded = Guarded::new(stream, self.conns.clone(), admitted, h2);
        if let Some(peer) = peer.filter(|peer| {
            !h2 && !tls
                && !tidegate_schema::config::planted("http-limits")
                && self.pinning.wanted(peer.ip())
        }) {
            // The first head, under the same deadline and size limit.
            let head = guarded.first_head().await?;
            // The local address (a system call) only for a hop's proof.
            let inner = &guarded.inner;
            let local = || inner.get_socket_digest()?.local_addr()?.as_inet().copied();
            if super::pinned::can_take(&guarded.inner)
                && let Some(plan) = self.pinning.decide(&head, peer, local).await
                && let Some(player) = super::pinned::player_socket(&guarded.inner)
            {
                self.conns.pinned.inc();
                // Pingora's descriptor closes here; the socket stays open
                // through `player`, and the connection keeps its place.
                // Nothing is lost with it only because the plain listener
                // reads unbuffered (`read(0)` in proxy.rs): bytes in a
                // Pingora read buffer would go with the stream.
                let (inner, admitted) = guarded.into_parts();
                drop(inner);
                self.pinning.serve(player, plan, head).await;
                drop(admitted);
                return None;
            }
            guarded.replay(head);
        }
        // HTTP/1 keep-alive reuse loops inside the app, on the same stream.
        self.app.process_new(Box::new(guarded), shutdown).await
    }

    async fn cleanup(&self) {
        self.app.cleanup().await
    }
}

/// Where a head scan is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Before the request line: empty lines here are skipped (as httparse
    /// does), they do not end the head; their bytes still count.
    Leading,
    /// Inside a line.
    Text,
    /// Just after a line feed: an empty line may follow.
    Start,
    /// A carriage return at the start of a line.
    StartCr,
}

/// Where a connection is in its request/response exchange.
#[derive(Debug)]
enum Phase {
    /// Reading a request head (`seen` bytes so far), under the deadline.
    Head { seen: usize, line: Line },
    /// The head is complete; the request body and the response follow.
    Body,
    /// A final response began: the next byte read starts a new head.
    Between,
    /// Upgraded (101) or HTTP/2: bytes pass as they are.
    Tunnel,
    /// Writing the 431 (`written` bytes so far).
    Refusing { written: usize },
    /// The 431 is out: dropping what still arrives (`left` bytes more at
    /// most), then closed.
    Lingering { left: usize },
    /// Timed out or refused: reads end.
    Closed,
}

/// Where the head ends in `bytes` (the index past its empty line), if it
/// does. Bare line feeds are accepted as line ends, as httparse does.
fn head_end(line: &mut Line, bytes: &[u8]) -> Option<usize> {
    for (i, &b) in bytes.iter().enumerate() {
        *line = match (b, *line) {
            (b'\r' | b'\n', Line::Leading) => Line::Leading,
            (b'\n', Line::Start | Line::StartCr) => return Some(i + 1),
            (b'\n', Line::Text) => Line::Start,
            (b'\r', Line::Start) => Line::StartCr,
            _ => Line::Text,
        };
    }
    None
}

/// The status code a response write starts with, if it is a status line.
fn status(bytes: &[u8]) -> Option<u16> {
    let line = bytes.get(..12)?;
    if !line.starts_with(b"HTTP/1.") || line[8] != b' ' {
        return None;
    }
    std::str::from_utf8(&line[9..12]).ok()?.parse().ok()
}

/// An accepted stream under the head deadline and size limit.
struct Guarded {
    inner: Stream,
    phase: Phase,
    deadline: Pin<Box<Sleep>>,
    /// Armed while a write waits for the player to take bytes; dropped
    /// at the first write that goes through.
    stalled: Option<Stall>,
    limits: ConnLimits,
    conns: Arc<Connections>,
    _admitted: Option<Admitted>,
    /// Bytes read ahead (a first head) that reads give out again first.
    replay: Vec<u8>,
    replayed: usize,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl Guarded {
    fn new(inner: Stream, conns: Arc<Connections>, admitted: Option<Admitted>, h2: bool) -> Self {
        let limits = conns.limits;
        Self {
            inner,
            phase: if h2 {
                Phase::Tunnel
            } else {
                Phase::Head {
                    seen: 0,
                    line: Line::Leading,
                }
            },
            deadline: Box::pin(tokio::time::sleep(limits.header_timeout)),
            stalled: None,
            limits,
            conns,
            _admitted: admitted,
            replay: Vec::new(),
            replayed: 0,
        }
    }

    /// Reads the connection's first request head (and whatever came with
    /// it) under the deadline and size limit. `None`: the connection ended
    /// or was refused (a 431 was written).
    async fn first_head(&mut self) -> Option<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&chunk[..n]);
            if !matches!(self.phase, Phase::Head { .. }) {
                return Some(head);
            }
        }
    }

    /// Gives `bytes` (already counted as read) out again before anything
    /// more is read from the socket.
    fn replay(&mut self, bytes: Vec<u8>) {
        self.replay = bytes;
        self.replayed = 0;
    }

    /// The stream and its place under the connection caps.
    fn into_parts(self) -> (Stream, Option<Admitted>) {
        (self.inner, self._admitted)
    }

    /// Writes the 431, then reads and drops what the client still sends
    /// (a second at most, `LINGER_BYTES` at most) so that closing does not
    /// reset the connection before the client read the answer; then ends
    /// the read with an error.
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            match &mut self.phase {
                Phase::Refusing { written } if *written < TOO_LARGE.len() => {
                    let n =
                        ready!(Pin::new(&mut self.inner).poll_write(cx, &TOO_LARGE[*written..]))?;
                    if n == 0 {
                        self.phase = Phase::Closed;
                    } else {
                        *written += n;
                    }
                }
                Phase::Refusing { .. } => {
                    ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
                    let at = Instant::now() + Duration::from_secs(1);
                    self.deadline.as_mut().reset(at);
                    self.phase = Phase::Lingering { left: LINGER_BYTES };
                }
                Phase::Lingering { left } => {
                    if self.deadline.as_mut().poll(cx).is_ready() {
                        self.phase = Phase::Closed;
                        continue;
                    }
                    let mut scratch = [0u8; 4096];
                    let mut dropped = ReadBuf::new(&mut scratch);
                    match ready!(Pin::new(&mut self.inner).poll_read(cx, &mut dropped)) {
                        Ok(()) if !dropped.filled().is_empty() => {
                            *left = left.saturating_sub(dropped.filled().len());
                            if *left == 0 {
                                self.phase = Phase::Closed;
                            }
                        }
                        _ => self.phase = Phase::Closed,
                    }
                }
                _ => break,
            }
        }
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "request head larger than max_header_bytes ({})",
                self.limits.max_header_bytes
            ),
        )))
    }

    /// Notes a response write: a final status ends the request. Over
    /// HTTP/1 without pipelining nothing is written while the next head
    /// is read, so a write during `Head` means those bytes were the body
    /// of a request answered early (an upload the response did not wait
    /// for): they are not a head, and get no deadline.
    fn saw_write(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self.phase {
            Phase::Body => {
                self.phase = match status(bytes) {
                    Some(101) => Phase::Tunnel,
                    Some(100..=199) => Phase::Body,
                    _ => Phase::Between,
                };
            }
            Phase::Head { .. } => self.phase = Phase::Between,
            _ => {}
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.replay.len() {
            let left = &this.replay[this.replayed..];
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        match this.phase {
            Phase::Refusing { .. } | Phase::Lingering { .. } => return this.poll_refuse(cx),
            Phase::Closed => return Poll::Ready(Ok(())),
            Phase::Head { .. } if this.deadline.as_mut().poll(cx).is_ready() => {
                this.conns.count("header_timeout");
                this.phase = Phase::Closed;
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "request head not complete within {:?}",
                        this.limits.header_timeout
                    ),
                )));
            }
            _ => {}
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if read.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if matches!(this.phase, Phase::Between) {
            this.phase = Phase::Head {
                seen: 0,
                line: Line::Leading,
            };
            let at = Instant::now() + this.limits.header_timeout;
            this.deadline.as_mut().reset(at);
        }
        if let Phase::Head { seen, line } = &mut this.phase {
            let end = head_end(line, read);
            *seen += end.unwrap_or(read.len());
            if *seen > this.limits.max_header_bytes {
                this.conns.count("header_too_large");
                buf.set_filled(before);
                this.phase = Phase::Refusing { written: 0 };
                return this.poll_refuse(cx);
            }
            if end.is_some() {
                this.phase = Phase::Body;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Guarded {
    /// A write that waits (`written` is pending): pending until the
    /// player has taken no byte for `write_stall`, then an error that ends
    /// the connection. A player who stops reading what it asked for (a
    /// download, a WebSocket tunnel's echo, heads of answers to requests
    /// it keeps sending) holds its place, the upstream connection and
    /// their buffers no longer than that; one that reads slowly is never
    /// cut. A write that goes through disarms it.
    ///
    /// On a TCP socket a waiting write resumes only once about a third of
    /// the send buffer has drained, which a slow reader may take longer
    /// than the limit to do. There the timer looks at the bytes the player
    /// has acknowledged (`tcpi_bytes_acked`) every eighth of the limit,
    /// from the first look on (a write that waits less costs no system
    /// call): [`MIN_PROGRESS`] more counts as taking bytes, and the limit
    /// runs from the last time it did. A player that stops reading has a
    /// zero window and acknowledges nothing new (the agent's probes carry
    /// nothing it can acknowledge beyond a byte), so it is cut once the
    /// limit has passed since the write began to wait; one that takes
    /// less than [`MIN_PROGRESS`] a limit is cut as well.
    fn stall<T>(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if written.is_ready() {
            self.stalled = None;
            return written;
        }
        let limit = self.limits.write_stall;
        if self.stalled.is_none() {
            if tidegate_schema::config::planted("stalled-reader") {
                return written;
            }
            let since = Instant::now();
            self.stalled = Some(Stall {
                timer: Box::pin(tokio::time::sleep(limit / 8)),
                since,
                acked: None,
            });
        }
        loop {
            let Some(stall) = self.stalled.as_mut() else {
                return written;
            };
            ready!(stall.timer.as_mut().poll(cx));
            let sample = self.acked();
            let Some(stall) = self.stalled.as_mut() else {
                return written;
            };
            let now = Instant::now();
            match (sample, stall.acked) {
                // The player took bytes: a slow reader, not a stalled one.
                (Some(acked), Some(before)) if acked >= before.saturating_add(MIN_PROGRESS) => {
                    stall.acked = Some(acked);
                    stall.since = now;
                }
                // The first look: what is acknowledged from here on counts.
                (Some(acked), None) => stall.acked = Some(acked),
                _ => {}
            }
            let end = stall.since + limit;
            if now >= end {
                break;
            }
            // Not a TCP socket (or a kernel without the counter): the
            // limit alone.
            let next = match stall.acked {
                Some(_) => end.min(now + limit / 8),
                None => end,
            };
            stall.timer.as_mut().reset(next);
        }
        self.stalled = None;
        self.conns.count("write_stalled");
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the player took no byte for {limit:?}"),
        )))
    }

    /// The bytes the player has acknowledged, on a TCP socket (the
    /// listener's streams, plain or TLS, have a socket digest; for them
    /// the stream's id is the socket's descriptor).
    fn acked(&self) -> Option<u64> {
        struct Fd(std::os::fd::RawFd);
        impl std::os::fd::AsRawFd for Fd {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                self.0
            }
        }
        self.inner.get_socket_digest()?;
        let counters = crate::tcp::ebpf::tcp_counters(&Fd(self.inner.id())).ok()?;
        Some(counters.bytes_acked)
    }
}

/// How much more a player must acknowledge for a waiting write to count
/// it as taking bytes: a player (or a TCP stack of its own) that opens its
/// window a byte at a time, or acknowledges one probe byte a minute, does
/// not hold a connection with that.
const MIN_PROGRESS: u64 = 16 * 1024;

/// A write waiting on the player (see [`Guarded::stall`]).
struct Stall {
    timer: Pin<Box<Sleep>>,
    /// When the write began to wait, or the player last took
    /// [`MIN_PROGRESS`] more.
    since: Instant,
    /// What the player had acknowledged at the last look; `None` before
    /// the first, and on a stream that is not a TCP socket.
    acked: Option<u64>,
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.saw_write(bytes);
        let written = Pin::new(&mut self.inner).poll_write(cx, bytes);
        self.stall(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            self.saw_write(first);
        }
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.stall(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        self.stall(cx, flushed)
    }

    /// A TLS close writes (close_notify, and what is still buffered):
    /// it waits on the player like any write.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let closed = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.stall(cx, closed)
    }
}

#[async_trait]
impl Shutdown for Guarded {
    async fn shutdown(&mut self) {
        let limit = self.limits.write_stall;
        let _ = tokio::time::timeout(limit, Shutdown::shutdown(&mut *self.inner)).await;
    }
}

impl UniqueID for Guarded {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Guarded {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Guarded {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Guarded {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Guarded {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Guarded {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_its_empty_line_across_reads_and_line_endings() {
        let mut line = Line::Leading;
        assert_eq!(head_end(&mut line, b"GET / HTTP/1.1\r\nHost: a\r"), None);
        assert_eq!(head_end(&mut line, b"\n\r"), None);
        assert_eq!(head_end(&mut line, b"\nbody"), Some(1));
        let mut line = Line::Text;
        assert_eq!(
            head_end(&mut line, b"GET / HTTP/1.0\nX: y\n\nrest"),
            Some(21)
        );
        let mut line = Line::Text;
        assert_eq!(head_end(&mut line, b"GET / HTTP/1.1\r\nX: \r\r\n"), None);
        // Empty lines before the request line do not end a head.
        let mut line = Line::Leading;
        assert_eq!(head_end(&mut line, b"\r\n\r\n\n\nGET / HTTP/1.1\r\n"), None);
        assert_eq!(head_end(&mut line, b"\r\n"), Some(2));
    }

    #[test]
    fn response_writes_are_told_apart_by_status() {
        assert_eq!(status(b"HTTP/1.1 101 Switching Protocols\r\n"), Some(101));
        assert_eq!(status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status(b"HTTP/1.0 100 Continue"), Some(100));
        assert_eq!(status(b"body bytes that are long"), None);
        assert_eq!(status(b"HTTP/1.1 2"), None);
    }

    fn connections(max_header_bytes: usize) -> Arc<Connections> {
        Arc::new(Connections::new(ConnLimits {
            header_timeout: Duration::from_secs(4),
            write_stall: Duration::from_secs(10),
            max_header_bytes,
            max_connections: 8,
            max_connections_per_source: 8,
        }))
    }

    /// Reads `g` until it fails, answering every complete head with `answer`.
    async fn serve(g: &mut Guarded, answer: &[u8]) -> std::io::Error {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 4096];
        loop {
            match g.read(&mut buf).await {
                Ok(0) => panic!("the stream ended without an error"),
                Ok(n) if buf[..n].ends_with(b"\r\n\r\n") => g.write_all(answer).await.unwrap(),
                Ok(_) => {}
                Err(e) => return e,
            }
        }
    }

    #[tokio::test]
    async fn a_head_past_the_limit_gets_a_431_and_the_rest_is_dropped() {
        use tokio::io::AsyncReadExt;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let conns = connections(1024);
        let mut g = Guarded::new(Box::new(server), conns.clone(), None, false);
        let head = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(3000));
        client.write_all(head.as_bytes()).await.unwrap();
        let e = serve(&mut g, b"HTTP/1.1 200 OK\r\n\r\n").await;
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        drop(g);
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
        assert_eq!(conns.refused("header_too_large"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn every_head_has_the_deadline_the_first_and_a_kept_alive_one() {
        use tokio::io::AsyncReadExt;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let conns = connections(1024);
        let mut g = Guarded::new(Box::new(server), conns.clone(), None, false);
        let started = Instant::now();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(g.read(&mut buf).await.unwrap() > 0);
        g.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        assert!(client.read(&mut buf).await.unwrap() > 0);
        // Idle between requests: not this deadline's business.
        tokio::time::sleep(Duration::from_secs(30)).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nX-Slow: a")
            .await
            .unwrap();
        let second = Instant::now();
        let trickle = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if client.write_all(b"a").await.is_err() {
                    break;
                }
            }
        });
        let e = serve(&mut g, b"").await;
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert_eq!(second.elapsed(), Duration::from_secs(4));
        assert!(started.elapsed() >= Duration::from_secs(34));
        assert_eq!(conns.refused("header_timeout"), 1);
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_answered_early_is_body_not_a_slow_head() {
        use tokio::io::AsyncReadExt;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut g = Guarded::new(Box::new(server), connections(1024), None, false);
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(g.read(&mut buf).await.unwrap() > 0);
        // The instance answers (and streams) before the upload is done.
        g.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        for _ in 0..3 {
            client.write_all(&[b'x'; 600]).await.unwrap();
            assert!(g.read(&mut buf).await.unwrap() > 0);
            g.write_all(b"echo").await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        client.write_all(&[b'x'; 600]).await.unwrap();
        assert!(g.read(&mut buf).await.unwrap() > 0, "the upload was cut");
    }

    /// A WebSocket upgrade through `g` from `client`, answered 101.
    async fn upgrade(client: &mut tokio::io::DuplexStream, g: &mut Guarded) {
        use tokio::io::AsyncReadExt;
        client
            .write_all(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        assert!(g.read(&mut buf).await.unwrap() > 0);
        g.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_upgraded_connection_is_a_tunnel_without_deadline() {
        use tokio::io::AsyncReadExt;
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut g = Guarded::new(Box::new(server), connections(1024), None, false);
        upgrade(&mut client, &mut g).await;
        let mut buf = vec![0u8; 4096];
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(&[0x81; 5000]).await.unwrap();
        let mut got = 0;
        while got < 5000 {
            got += g.read(&mut buf).await.unwrap();
        }
        assert!(matches!(g.phase, Phase::Tunnel));
    }

    /// A player who stops reading: the write waiting on it fails once it
    /// has taken no byte for `write_stall` (10 s here), in a tunnel too.
    /// One that reads slowly (64 bytes every 5 s, on this in-memory pipe,
    /// which wakes the writer at each read) is never cut.
    #[tokio::test(start_paused = true)]
    async fn a_write_the_player_takes_no_byte_of_ends_after_write_stall() {
        use tokio::io::AsyncReadExt;
        let (mut client, server) = tokio::io::duplex(1024);
        let conns = connections(1024);
        let mut g = Guarded::new(Box::new(server), conns.clone(), None, false);
        upgrade(&mut client, &mut g).await;
        // A slow reader: 64 bytes every 5 s, for a minute.
        let slow = tokio::spawn(async move {
            let mut got = [0u8; 64];
            for _ in 0..12 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                client.read_exact(&mut got).await.unwrap();
            }
            client
        });
        let started = Instant::now();
        let mut written = 0;
        while started.elapsed() < Duration::from_secs(55) {
            written += g.write(&[b'x'; 256]).await.unwrap();
        }
        assert!(
            written >= 11 * 64,
            "{written} bytes written to the slow reader"
        );
        let _client = slow.await.unwrap();
        // It stops reading: the next write that waits fails 10 s later.
        let stalled = Instant::now();
        let e = loop {
            match g.write(&[b'x'; 256]).await {
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(
            stalled.elapsed() >= Duration::from_secs(10)
                && stalled.elapsed() < Duration::from_secs(11),
            "{:?}",
            stalled.elapsed()
        );
        assert_eq!(conns.refused("write_stalled"), 1);
    }

    /// On a real TCP socket a waiting write resumes only once about a
    /// third of the send buffer has drained: here (256 KiB asked, which
    /// Linux doubles, or `wmem_max` doubled if lower) 139 KiB or more. A
    /// player reading 4 KiB every 200 ms (20 KiB/s) wakes the writer every
    /// 7 s or more, past the 3 s limit, and is not cut: it acknowledges
    /// 60 KiB a limit, past `MIN_PROGRESS`. Once it stops reading (a zero
    /// window: probes acknowledge nothing), the write fails.
    #[tokio::test]
    async fn a_slow_reader_on_a_tcp_socket_is_not_cut_and_a_stopped_one_is() {
        use pingora::protocols::l4::stream::Stream as TcpStream;
        use std::os::fd::AsRawFd;
        use tokio::io::AsyncReadExt;
        let conns = Arc::new(Connections::new(ConnLimits {
            header_timeout: Duration::from_secs(4),
            write_stall: Duration::from_secs(3),
            max_header_bytes: 1024,
            max_connections: 8,
            max_connections_per_source: 8,
        }));
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(256 * 1024).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let player = tokio::net::TcpSocket::new_v4().unwrap();
        player.set_recv_buffer_size(32 * 1024).unwrap();
        let (player, accepted) = tokio::join!(
            player.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        let (mut player, (accepted, _)) = (player.unwrap(), accepted.unwrap());
        let mut stream = TcpStream::from(accepted);
        stream.set_socket_digest(SocketDigest::from_raw_fd(stream.as_raw_fd()));
        let mut g = Guarded::new(Box::new(stream), conns.clone(), None, true);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            let mut written = 0usize;
            loop {
                match g.write_all(&chunk).await {
                    Ok(()) => written += chunk.len(),
                    Err(e) => return (written, e),
                }
            }
        });
        // Slow: 4 KiB every 200 ms for 9 s.
        let mut got = 0usize;
        let mut buf = vec![0u8; 4096];
        let slow = Instant::now();
        while slow.elapsed() < Duration::from_secs(9) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            got += player.read(&mut buf).await.unwrap();
        }
        assert!(!writer.is_finished(), "the slow reader was cut");
        assert_eq!(conns.refused("write_stalled"), 0);
        // Stopped: the write fails (well before this test's 30 s).
        let (written, e) = tokio::time::timeout(Duration::from_secs(30), writer)
            .await
            .expect("a player who stopped reading was never cut")
            .unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert_eq!(conns.refused("write_stalled"), 1);
        assert!(written > got, "{written} bytes written, {got} read");
    }

    /// The caps themselves are `tidegate_schema::caps`'s (tested there):
    /// here, the reasons they are counted under and the open gauge.
    #[test]
    fn refusals_are_named_and_the_gauge_follows_open_connections() {
        let conns = Arc::new(Connections::new(ConnLimits {
            header_timeout: Duration::from_secs(1),
            write_stall: Duration::from_secs(1),
            max_header_bytes: 1024,
            max_connections: 2,
            max_connections_per_source: 1,
        }));
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "198.18.0.2".parse().unwrap();
        let a1 = conns.admit(a, false).unwrap();
        assert_eq!(conns.admit(a, false).err(), Some("max_per_source"));
        let _agent = conns.admit(a, true).unwrap();
        assert_eq!(conns.admit(b, false).err(), Some("max_connections"));
        assert_eq!(conns.open_gauge.get(), 2);
        drop(a1);
        assert_eq!(conns.open_gauge.get(), 1);
        assert!(conns.admit(b, false).is_ok());
    }
}
