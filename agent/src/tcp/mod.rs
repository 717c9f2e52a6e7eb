//! The TCP data plane: every instance's public port on the agent's
//! `tcp_host`, spliced to the instance (here, or on the owning agent).
//!
//! Steering — how a connection reaches the agent:
//! - eBPF (`ebpf`): an `sk_lookup` program hands connections on allocated
//!   ports to one listening socket; the route table is mirrored into a BPF
//!   map after every swap, so a port opens or closes the moment the map
//!   changes and nothing is bound per port.
//! - Listeners (`listeners`): one bound listener per port, rebound after
//!   every route-table swap. Used when eBPF cannot load (no CAP_BPF) or when
//!   configured.
//!
//! Data paths — how bytes move once a connection is paired with its backend:
//! `splice` (default: splice(2) through a pipe per direction, bytes never
//! copied to userspace), `sockhash` (in-kernel `sk_skb` redirect; opt-in,
//! see docs/architecture.md "TCP data paths" for why), `copy` (tokio copy).
//! Each forwards half-close and resets and releases everything on close.

pub mod ebpf;
pub mod hop;
pub mod listeners;
pub mod sockhash;
pub mod splice;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::policy::{Connection, EdgePolicy, Verdict};
use crate::routes::{Route, SharedRoutes, Target};

/// Accept queue of the TCP listeners (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// How long connecting to an instance (or its owning agent) may take.
/// Covers three lost SYNs (resent after 1, 3 and 7 s): a challenge whose
/// small accept queue overflows under a burst still gets the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How connections reach the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Steering {
    /// eBPF `sk_lookup` if it loads, else listeners (one log line says which).
    Auto,
    /// eBPF `sk_lookup` or the agent does not start.
    Ebpf,
    /// One listener bound per instance port.
    Listeners,
}

/// How bytes move between a player and the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// splice(2) through a kernel pipe per direction.
    Splice,
    /// In-kernel sockhash + `sk_skb` redirect (needs eBPF).
    Sockhash,
    /// Userspace copy (tokio).
    Copy,
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataPath::Splice => "splice",
            DataPath::Sockhash => "sockhash",
            DataPath::Copy => "copy",
        })
    }
}

/// What the TCP data plane is given.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    pub host: IpAddr,
    /// This agent's registered address, when it is one of this host's:
    /// connections it forwards to other agents come from it, which is how
    /// they know them (see [`hop`]).
    pub forward_from: Option<IpAddr>,
    pub steering: Steering,
    pub data_path: DataPath,
    /// Pipe size per direction of the splice path, in bytes.
    pub pipe_bytes: usize,
    /// `tls_tcp_entry` with `tls_cert` and `tls_key`.
    pub tls: Option<(SocketAddr, std::path::PathBuf, std::path::PathBuf)>,
}

/// The TCP data plane, prepared: eBPF loaded (or the fallback chosen).
#[derive(Debug)]
pub struct TcpPlane {
    opts: TcpOptions,
    data_path: DataPath,
    redirector: Option<Arc<ebpf::Redirector>>,
    failures: Arc<Failures>,
    tls: std::sync::Mutex<Option<tls::Entry>>,
}

/// Accepted connections that ended without being served, or in an error.
#[derive(Debug, Default)]
struct Failures {
    /// The port has no route any more, or its instance is not ready.
    not_ready: AtomicU64,
    /// Connecting to the instance (or its owning agent) failed or timed out.
    connect: AtomicU64,
    /// Moving bytes failed: a reset or an error on either side.
    transfer: AtomicU64,
    /// Another agent forwarded it here, and this agent would forward it
    /// again: the tables disagree on the owner, or two workers are
    /// registered with one address.
    loops: AtomicU64,
    /// The TLS handshake on `tls_tcp_entry` failed or timed out.
    tls: AtomicU64,
}

impl TcpPlane {
    /// Loads the eBPF programs unless steering is `listeners`. Fails only
    /// when `steering = ebpf` and they cannot load; with `auto` one log
    /// line says why eBPF is not used and the listeners take over.
    pub fn prepare(opts: TcpOptions) -> anyhow::Result<Self> {
        let redirector = match opts.steering {
            Steering::Listeners => None,
            Steering::Ebpf | Steering::Auto => {
                match ebpf::Redirector::load(opts.host, opts.data_path == DataPath::Sockhash) {
                    Ok(r) => Some(Arc::new(r)),
                    Err(e) if opts.steering == Steering::Auto => {
                        tracing::warn!(
                            error = %format!("{e:#}"),
                            "eBPF TCP steering unavailable; falling back to one listener per instance port"
                        );
                        None
                    }
                    Err(e) => return Err(e.context("tcp_steering = ebpf")),
                }
            }
        };
        let tls = match &opts.tls {
            Some((entry, cert, key)) => Some(tls::Entry::bind(*entry, cert, key)?),
            None => None,
        };
        let mut data_path = opts.data_path;
        if data_path == DataPath::Sockhash && redirector.is_none() {
            tracing::warn!("tcp_data_path sockhash needs eBPF; using splice");
            data_path = DataPath::Splice;
        }
        Ok(Self {
            opts,
            data_path,
            redirector,
            failures: Arc::default(),
            tls: std::sync::Mutex::new(tls),
        })
    }

    /// Serves TCP until `builds` closes.
    pub async fn run(
        self: Arc<Self>,
        routes: SharedRoutes,
        builds: tokio::sync::watch::Receiver<u64>,
        policy: Arc<dyn EdgePolicy>,
    ) -> anyhow::Result<()> {
        let host = self.opts.host;
        let relay = Arc::new(Relay {
            routes: routes.clone(),
            policy,
            data_path: self.data_path,
            pipe_bytes: self.opts.pipe_bytes,
            redirector: self.redirector.clone(),
            failures: self.failures.clone(),
            forward_from: self.opts.forward_from,
        });
        let entry = self.tls.lock().ok().and_then(|mut t| t.take());
        let tls_task = entry.map(|entry| {
            let relay = relay.clone();
            tokio::spawn(async move {
                if let Err(e) = tls::serve(entry, relay).await {
                    tracing::error!(error = %format!("{e:#}"), "tls_tcp_entry stopped");
                }
            })
        });
        let served = match &self.redirector {
            Some(r) => {
                tracing::info!(%host, data_path = %self.data_path, "TCP ports steered by eBPF sk_lookup");
                ebpf::serve(r.clone(), host, relay, routes, builds).await
            }
            None => {
                tracing::info!(%host, data_path = %self.data_path, "TCP ports served by one listener each");
                listeners::run(host, relay, routes, builds).await;
                Ok(())
            }
        };
        if let Some(t) = tls_task {
            t.abort();
        }
        served
    }

    /// Appends the data plane's own series to a Prometheus text body.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "# HELP tidegate_tcp_ebpf_steering 1 if eBPF sk_lookup steers the TCP ports, 0 with one listener per port.\n# TYPE tidegate_tcp_ebpf_steering gauge\ntidegate_tcp_ebpf_steering {}",
            u8::from(self.redirector.is_some())
        );
        let _ = writeln!(
            out,
            "# HELP tidegate_tcp_data_path_info The TCP data path in use.\n# TYPE tidegate_tcp_data_path_info gauge\ntidegate_tcp_data_path_info{{path=\"{}\"}} 1",
            self.data_path
        );
        let (f, n) = (&self.failures, |v: &AtomicU64| v.load(Ordering::Relaxed));
        tidegate_schema::telemetry::counters(
            out,
            "tidegate_tcp_failed_connections_total",
            "Accepted connections not served (no route or instance not ready; connecting to the instance failed; forwarded by another agent and to be forwarded again: loop) or ended in an error (transfer).",
            "stage",
            &[
                ("not_ready", n(&f.not_ready)),
                ("connect", n(&f.connect)),
                ("transfer", n(&f.transfer)),
                ("loop", n(&f.loops)),
                ("tls", n(&f.tls)),
            ],
        );
        if let Some(r) = &self.redirector {
            let _ = writeln!(
                out,
                "# HELP tidegate_tcp_steered_ports Ports in the BPF port map, read from the kernel.\n# TYPE tidegate_tcp_steered_ports gauge\ntidegate_tcp_steered_ports {}",
                r.steered_ports().len()
            );
            if self.data_path == DataPath::Sockhash {
                let [pairs, targets, peers] = r.spliced_entries();
                let _ = writeln!(
                    out,
                    "# HELP tidegate_tcp_sockhash_entries Entries of the in-kernel splice maps, read from the kernel.\n# TYPE tidegate_tcp_sockhash_entries gauge"
                );
                let (spliced, refused) = r.spliced_pairs();
                let _ = writeln!(
                    out,
                    "# HELP tidegate_tcp_sockhash_pairs_total Connections spliced in the kernel, and those it refused (served by splice(2)).\n# TYPE tidegate_tcp_sockhash_pairs_total counter\ntidegate_tcp_sockhash_pairs_total{{result=\"spliced\"}} {spliced}\ntidegate_tcp_sockhash_pairs_total{{result=\"refused\"}} {refused}"
                );
                let ids = r.spliced_map_ids();
                for (map, n) in [("PAIRS", pairs), ("TARGETS", targets), ("PEERS", peers)] {
                    let id = ids
                        .iter()
                        .find(|(name, _)| *name == map)
                        .map_or(0, |(_, id)| *id);
                    let _ = writeln!(
                        out,
                        "tidegate_tcp_sockhash_entries{{map=\"{map}\",id=\"{id}\"}} {n}"
                    );
                }
            }
        }
    }
}

/// Pairs an accepted connection with its backend and moves the bytes.
pub struct Relay {
    routes: SharedRoutes,
    policy: Arc<dyn EdgePolicy>,
    data_path: DataPath,
    pipe_bytes: usize,
    redirector: Option<Arc<ebpf::Redirector>>,
    failures: Arc<Failures>,
    forward_from: Option<IpAddr>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("data_path", &self.data_path)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Serves one accepted connection that arrived for public `port`.
    pub async fn serve(&self, client: TcpStream, peer: SocketAddr, port: u16) {
        if let Err(e) = self.serve_inner(client, peer, port).await {
            tracing::debug!(port, %peer, error = %e, "TCP connection ended with an error");
        }
    }

    async fn serve_inner(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        port: u16,
    ) -> std::io::Result<()> {
        let table = self.routes.load_full();
        // From another agent: it may have forwarded a player here.
        let forwarded = if table.agents.contains(&peer.ip()) {
            hop::take_header(&mut client).await?
        } else {
            None
        };
        let route = table.by_port.get(&port).cloned();
        drop(table);
        let Some(route) = route else {
            self.failures.not_ready.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let local = client.local_addr()?;
        let source = forwarded.unwrap_or(peer);
        let Some((server, sent)) = self
            .open(&route, source, forwarded.is_some(), local, "")
            .await?
        else {
            return Ok(());
        };
        let _ = client.set_nodelay(true);
        let stats = &route.stats;
        self.moving(stats, async {
            match (self.data_path, &self.redirector) {
                // A header taken off the client may have come in one skb
                // with the player's first bytes; the verdict program would
                // redirect that whole skb, header and all. splice(2)
                // moves what is left.
                (DataPath::Sockhash, Some(r)) if forwarded.is_none() => {
                    sockhash::pump(r, client, server, sent, self.pipe_bytes, stats).await
                }
                (DataPath::Copy, _) => copy(client, server, stats).await,
                _ => splice::pump(client, server, self.pipe_bytes, stats).await,
            }
        })
        .await
    }

    /// Serves one connection from `tls_tcp_entry` after its handshake.
    pub async fn serve_tls(&self, mut client: tls::ServerStream, peer: SocketAddr) {
        let (tcp, session) = client.get_ref();
        let local = tcp.local_addr();
        let sni = session.server_name().map(str::to_string);
        let route = tls::sni_key(sni.as_deref())
            .and_then(|key| self.routes.load().by_sni.get(&key).cloned());
        let (Some(route), Ok(local)) = (route, local) else {
            self.failures.not_ready.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, ?sni, "TLS connection for no instance");
            // close_notify, so the client sees a clean end rather than a reset.
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut client).await;
            return;
        };
        let sni = sni.unwrap_or_default();
        let result = async {
            let Some((server, _)) = self.open(&route, peer, false, local, &sni).await? else {
                let _ = client.shutdown().await;
                return Ok(());
            };
            let stats = &route.stats;
            self.moving(stats, copy(&mut client, server, stats)).await
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(%peer, %sni, error = %e, "TLS connection ended with an error");
        }
    }

    /// Decides where a connection for `route` goes and connects there: the
    /// loop guard, the edge policy (unless another agent asked it already),
    /// the connect, and the hop header toward an owning agent. `None`: not
    /// served (and counted).
    async fn open(
        &self,
        route: &Route,
        source: SocketAddr,
        forwarded: bool,
        local: SocketAddr,
        host: &str,
    ) -> std::io::Result<Option<(TcpStream, usize)>> {
        let upstream = match &route.target {
            Target::Local(a) => *a,
            Target::Remote(a) if forwarded => {
                self.failures.loops.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    port = local.port(), player = %source, owner = %a, instance = %route.instance,
                    "TCP routing loop: another agent forwarded this connection here, and this agent's table says {a} owns it; closed. Are two workers registered with one address?"
                );
                return Ok(None);
            }
            Target::Remote(a) => *a,
            Target::NotReady(why) => {
                self.failures.not_ready.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(port = local.port(), player = %source, why = %why, "TCP connection to an instance that is not ready");
                return Ok(None);
            }
        };
        // The forwarding agent already asked the edge policy.
        if !forwarded {
            let conn = Connection {
                instance: route.instance.as_str(),
                team: &route.team,
                challenge: &route.challenge,
                source: Some(source.ip()),
                protocol: "tcp",
                host,
            };
            if let Verdict::Reject(reason) = self.policy.admit(&conn) {
                tracing::info!(port = local.port(), player = %source, %reason, "connection refused by policy");
                return Ok(None);
            }
        }
        let remote = matches!(route.target, Target::Remote(_));
        let mut server =
            match tokio::time::timeout(CONNECT_TIMEOUT, self.connect(upstream, remote)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.failures.connect.fetch_add(1, Ordering::Relaxed);
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("connecting to {upstream}: {e}"),
                    ));
                }
                Err(_) => {
                    self.failures.connect.fetch_add(1, Ordering::Relaxed);
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {upstream} timed out after {CONNECT_TIMEOUT:?}"),
                    ));
                }
            };
        let mut sent = 0;
        if remote {
            // The owner serves it as a connection to this public port.
            let header = hop::header(source, SocketAddr::new(local.ip(), upstream.port()));
            server.write_all(&header).await?;
            sent = header.len();
        }
        let _ = server.set_nodelay(true);
        Ok(Some((server, sent)))
    }

    /// Runs `pump` with the connection counted as active, and counts how it ended.
    async fn moving(
        &self,
        stats: &crate::stats::InstanceStats,
        pump: impl std::future::Future<Output = std::io::Result<()>>,
    ) -> std::io::Result<()> {
        stats.tcp_connections.fetch_add(1, Ordering::Relaxed);
        stats.tcp_active.fetch_add(1, Ordering::Relaxed);
        stats.touch();
        let moved = pump.await;
        stats.tcp_active.fetch_sub(1, Ordering::Relaxed);
        stats.touch();
        if moved.is_err() {
            self.failures.transfer.fetch_add(1, Ordering::Relaxed);
        }
        moved
    }

    /// Connects to the instance, or to its owning agent from this agent's
    /// registered address (so the owner knows the connection is forwarded).
    async fn connect(&self, upstream: SocketAddr, remote: bool) -> std::io::Result<TcpStream> {
        let socket = if upstream.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self
            .forward_from
            .filter(|ip| remote && ip.is_ipv4() == upstream.is_ipv4())
        {
            // (Binding takes a port from ip_local_port_range per source
            // address: ~28,000 forwarded connections open at once.)
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(upstream).await
    }
}

/// The userspace copy path (also TLS's): bytes are counted, and the
/// instance marked active, chunk by chunk as they move, so a long session
/// counts for the idle policy while it lasts.
async fn copy<C>(
    client: C,
    mut server: TcpStream,
    stats: &crate::stats::InstanceStats,
) -> std::io::Result<()>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut client = Counted {
        inner: client,
        stats,
    };
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

/// The player's side of a copied connection: reads count as bytes in,
/// writes as bytes out.
struct Counted<'a, S> {
    inner: S,
    stats: &'a crate::stats::InstanceStats,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.stats
                .tcp_bytes_in
                .fetch_add(n as u64, Ordering::Relaxed);
            self.stats.touch();
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.stats
                .tcp_bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
            self.stats.touch();
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
