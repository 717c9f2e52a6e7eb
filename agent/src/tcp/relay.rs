//! One player connection: where it goes (the loop guard, the edge policy,
//! the owner or the instance), the connect, the hop header toward an
//! owning agent, and the data path that moves its bytes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::sockopt::IpBindAddressNoPort;
use tidegate_schema::config::DataPath;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use super::copy::copy;
use super::hop::Taken;
use super::{CONNECT_TIMEOUT, Failures, ebpf, hop, sockhash, splice, tls};
use crate::hop::{Hop, Hops, Protocol};
use crate::metrics::traffic::InstanceTraffic;
use crate::policy::{Connection, EdgePolicy, Throttle, Verdict};
use crate::routes::{Route, SharedRoutes, Target};

/// Pairs an accepted connection with its backend and moves the bytes.
pub struct Relay {
    pub(super) routes: SharedRoutes,
    pub(super) policy: Arc<dyn EdgePolicy>,
    pub(super) data_path: DataPath,
    pub(super) pipe_bytes: usize,
    pub(super) redirector: Option<Arc<ebpf::Redirector>>,
    pub(super) failures: Arc<Failures>,
    pub(super) forward_from: Option<IpAddr>,
    pub(super) hops: Arc<Hops>,
    pub(super) limits: Limits,
    pub(super) sources: Arc<Sources>,
}

/// Caps on open connections (`tcp_max_connections_per_*`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) per_source: u32,
    pub(super) per_instance: u32,
}

/// Open connections per player address.
#[derive(Debug, Default)]
pub(super) struct Sources(Mutex<HashMap<IpAddr, u32>>);

/// One open connection's places (its player address's, its instance's);
/// given back when dropped.
struct SourceSlot {
    sources: Arc<Sources>,
    ip: IpAddr,
    traffic: Arc<InstanceTraffic>,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        self.traffic.tcp_admitted.fetch_sub(1, Ordering::Relaxed);
        let mut open = self.sources.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// TCP keepalive on an accepted or connected socket: a peer that vanished
/// (no FIN, no RST) is found after about 90 s instead of never.
pub(super) fn keepalive(s: impl AsFd) {
    use rustix::net::sockopt;
    let _ = sockopt::set_socket_keepalive(&s, true);
    let _ = sockopt::set_tcp_keepidle(&s, Duration::from_secs(60));
    let _ = sockopt::set_tcp_keepintvl(&s, Duration::from_secs(10));
    let _ = sockopt::set_tcp_keepcnt(&s, 3);
}

/// What every accepted player socket needs (no Nagle delay on what the
/// relay writes to the player, TCP keepalive, urgent bytes in line), set
/// once on the listener: Linux copies them into each socket it accepts,
/// which saves six system calls a connection.
pub(super) fn player_options(listener: impl AsFd) -> std::io::Result<()> {
    rustix::net::sockopt::set_tcp_nodelay(&listener, true)?;
    urgent_in_line(&listener)?;
    keepalive(&listener);
    Ok(())
}

/// A TCP urgent byte (`MSG_OOB`, telnet's Synch) is read in line, as the
/// byte of the stream it is, and forwarded as such: the relay does not
/// drop it, and sees how many bytes are queued past its mark (see
/// `splice::splice_in`).
pub(super) fn urgent_in_line(s: impl AsFd) -> std::io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_oobinline(s, true)?)
}

/// A second handle on a socket whose first one a data path owns, to watch
/// its counters.
fn watch_handle(s: &TcpStream) -> std::io::Result<std::net::TcpStream> {
    Ok(std::net::TcpStream::from(s.as_fd().try_clone_to_owned()?))
}

/// Returns once the player's socket has moved no byte (received from the
/// player, or acknowledged by it) for `limit`. Its kernel counters see
/// every data path, the in-kernel ones too. On a kernel without them it
/// never returns.
///
/// The first sample is taken at the first tick, not at the start: most
/// connections end before it and never pay for one, and a silent one
/// closes up to a tick (a quarter of `limit`, 1 to 10 s) late.
pub(crate) async fn idle(player: &impl std::os::fd::AsRawFd, limit: Duration) {
    if tidegate_schema::config::planted("tcp-idle") {
        return std::future::pending().await;
    }
    let moved = || ebpf::tcp_counters(player).map(|c| c.bytes_acked + c.bytes_received);
    let every = (limit / 4).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let mut last = None;
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        match moved() {
            Ok(n) if last != Some(n) => {
                last = Some(n);
                quiet_since = Instant::now();
            }
            Ok(_) if quiet_since.elapsed() >= limit => return,
            Ok(_) => {}
            Err(_) => return std::future::pending().await,
        }
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("data_path", &self.data_path)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Serves one accepted connection that arrived for `local` (its
    /// public address and port), from a listener set up with
    /// [`player_options`].
    pub async fn serve(&self, client: TcpStream, peer: SocketAddr, local: SocketAddr) {
        if let Err(e) = self.serve_inner(client, peer, local).await {
            tracing::debug!(port = local.port(), %peer, error = %e, "TCP connection ended with an error");
        }
    }

    async fn serve_inner(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> std::io::Result<()> {
        let port = local.port();
        let table = self.routes.load_full();
        // From another agent's address: it may have forwarded a player here.
        let taken = if table.agents.contains(&peer.ip()) {
            hop::take_header(&mut client).await?
        } else {
            Taken::Nothing
        };
        let route = table.by_port.get(&port).cloned();
        drop(table);
        let Some(route) = route else {
            self.failures.not_ready.inc();
            return Ok(());
        };
        let (source, forwarded) = self.proven(&taken, peer, local, &route);
        let Some(_slot) = self.admit(&route, source.ip(), port) else {
            return Ok(());
        };
        let Some((server, sent)) = self.open(&route, source, forwarded, local, "").await? else {
            return Ok(());
        };
        let traffic = &route.traffic;
        match (self.data_path, &self.redirector) {
            // A header taken off the client may have come in one skb with
            // the player's first bytes; the verdict program would redirect
            // that whole skb, header and all. splice(2) moves what is left.
            (DataPath::Sockhash, Some(r)) if taken == Taken::Nothing => {
                let watch = watch_handle(&client)?;
                let pump = sockhash::pump(r, client, server, sent, self.pipe_bytes, traffic);
                self.transfer(&route, &watch, None, pump).await
            }
            (DataPath::Copy, _) => {
                let watch = watch_handle(&client)?;
                self.transfer(&route, &watch, None, copy(client, server, traffic))
                    .await
            }
            // The relay only borrows the sockets: the idle watch reads
            // the player's own, no second handle (two system calls).
            _ => {
                let pump = splice::pump(&client, &server, self.pipe_bytes, traffic);
                self.transfer(&route, &client, Some(server.as_fd()), pump)
                    .await
            }
        }
    }

    /// Takes a place for a connection from `source` to `route`'s instance,
    /// or counts why there is none.
    fn admit(&self, route: &Route, source: IpAddr, port: u16) -> Option<SourceSlot> {
        let limits = if tidegate_schema::config::planted("tcp-caps") {
            Limits {
                per_source: u32::MAX,
                per_instance: u32::MAX,
            }
        } else {
            self.limits
        };
        let mut open = self.sources.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.get(&source).copied().unwrap_or(0);
        if n >= limits.per_source {
            self.failures.per_source.inc();
            tracing::debug!(port, player = %source, open = n, "TCP connection refused: the player's address is at tcp_max_connections_per_source");
            return None;
        }
        let cap = u64::from(limits.per_instance);
        let admitted = &route.traffic.tcp_admitted;
        if admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
                (a < cap).then_some(a + 1)
            })
            .is_err()
        {
            self.failures.per_instance.inc();
            tracing::debug!(port, player = %source, instance = %route.instance, "TCP connection refused: the instance is at tcp_max_connections_per_instance");
            return None;
        }
        *open.entry(source).or_default() += 1;
        Some(SourceSlot {
            sources: self.sources.clone(),
            ip: source,
            traffic: route.traffic.clone(),
        })
    }

    /// Who the connection is from, and whether another agent proved it
    /// forwarded it (for `route`'s instance, to `local`, from `peer`). A
    /// header without a valid proof is the peer's own connection.
    fn proven(
        &self,
        taken: &Taken,
        peer: SocketAddr,
        local: SocketAddr,
        route: &Route,
    ) -> (SocketAddr, bool) {
        let Taken::Header { source, proof } = taken else {
            return (peer, false);
        };
        let hop = Hop {
            protocol: Protocol::Tcp,
            source: peer.ip(),
            destination: local,
            instance: route.instance.as_str(),
        };
        match self.hops.check(&hop, proof.clone()) {
            Ok(()) => (*source, true),
            Err(reason) => {
                self.hops
                    .refuse(Protocol::Tcp, reason, peer, &source.to_string());
                (peer, false)
            }
        }
    }

    /// Serves one connection from `tls_tcp_entry` after its handshake.
    pub async fn serve_tls(&self, mut client: tls::ServerStream, peer: SocketAddr) {
        let (tcp, session) = client.get_ref();
        let local = tcp.local_addr();
        let sni = session.server_name().map(str::to_string);
        let route = tls::sni_key(sni.as_deref())
            .and_then(|key| self.routes.load().by_sni.get(&key).cloned());
        let (Some(route), Ok(local)) = (route, local) else {
            self.failures.not_ready.inc();
            tracing::debug!(%peer, ?sni, "TLS connection for no instance");
            // close_notify, so the client sees a clean end rather than a reset.
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut client).await;
            return;
        };
        let sni = sni.unwrap_or_default();
        let Some(_slot) = self.admit(&route, peer.ip(), local.port()) else {
            let _ = client.shutdown().await;
            return;
        };
        let result = async {
            let Some((server, _)) = self.open(&route, peer, false, local, &sni).await? else {
                let _ = client.shutdown().await;
                return Ok(());
            };
            keepalive(client.get_ref().0);
            let watch = watch_handle(client.get_ref().0)?;
            let traffic = &route.traffic;
            self.transfer(&route, &watch, None, copy(&mut client, server, traffic))
                .await
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
                self.failures.loops.inc();
                tracing::warn!(
                    port = local.port(), player = %source, owner = %a, instance = %route.instance,
                    "TCP routing loop: another agent forwarded this connection here, and this agent's table says {a} owns it; closed. Are two workers registered with one address?"
                );
                return Ok(None);
            }
            Target::Remote(a) => *a,
            Target::NotReady(why) => {
                self.failures.not_ready.inc();
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
            if let Verdict::Reject(reason) = self.policy.admit(&conn).await {
                static REFUSED: Throttle = Throttle::new();
                if let Some(left_out) = REFUSED.admit() {
                    tracing::info!(port = local.port(), player = %source, %reason, left_out, "connection refused by policy (left_out: refusals since the last line, one a second)");
                }
                return Ok(None);
            }
        }
        let remote = matches!(route.target, Target::Remote(_));
        let mut server =
            match tokio::time::timeout(CONNECT_TIMEOUT, self.connect(upstream, remote)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    self.failures.connect.inc();
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("connecting to {upstream}: {e}"),
                    ));
                }
                Err(_) => {
                    self.failures.connect.inc();
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connecting to {upstream} timed out after {CONNECT_TIMEOUT:?}"),
                    ));
                }
            };
        let mut sent = 0;
        if remote {
            // The owner serves it as a connection to this public port; the
            // proof holds only from the address the connection leaves from.
            let proof = self
                .forward_from
                .filter(|ip| ip.is_ipv4() == upstream.is_ipv4())
                .map(|ip| {
                    let hop = Hop {
                        protocol: Protocol::Tcp,
                        source: ip,
                        destination: upstream,
                        instance: route.instance.as_str(),
                    };
                    self.hops.sign(&hop, source)
                });
            let header = hop::header(source, upstream, proof.as_ref());
            server.write_all(&header).await?;
            sent = header.len();
        }
        let _ = server.set_nodelay(true);
        let _ = urgent_in_line(&server);
        // Toward another host's agent only: a local instance's kernel is
        // this one, which answers keepalive probes whatever the container
        // does, and a container that stops closes its sockets.
        if remote {
            keepalive(&server);
        }
        Ok(Some((server, sent)))
    }

    /// Runs `pump` (the data path moving the connection's bytes) with the
    /// connection counted as active, until it ends or `player` (the
    /// player's socket) has been idle for the challenge's
    /// `tcp_idle_timeout_secs`, and counts how it ended. An idle connection
    /// is reset, not closed with a FIN: what a destination that stopped
    /// reading left in the relay is dropped, and the player (and the
    /// instance, given its `server` socket) is told so.
    async fn transfer(
        &self,
        route: &Route,
        player: &(impl std::os::fd::AsRawFd + AsFd),
        server: Option<std::os::fd::BorrowedFd<'_>>,
        pump: impl std::future::Future<Output = std::io::Result<()>>,
    ) -> std::io::Result<()> {
        let traffic: &InstanceTraffic = &route.traffic;
        traffic.tcp_connections.fetch_add(1, Ordering::Relaxed);
        traffic.tcp_active.fetch_add(1, Ordering::Relaxed);
        traffic.touch();
        let moved = tokio::select! {
            moved = pump => moved,
            () = idle(player, route.tcp_idle) => {
                splice::reset(player);
                if let Some(server) = server {
                    splice::reset(server);
                }
                self.failures.idle.inc();
                tracing::debug!(instance = %route.instance, idle = ?route.tcp_idle, "TCP connection closed: idle for the challenge's tcp_idle_timeout_secs");
                Ok(())
            }
        };
        traffic.tcp_active.fetch_sub(1, Ordering::Relaxed);
        traffic.touch();
        if moved.is_err() {
            self.failures.transfer.inc();
        }
        moved
    }

    /// Connects to the instance, or to its owning agent from this agent's
    /// registered address (so the owner knows the connection is forwarded).
    async fn connect(&self, upstream: SocketAddr, remote: bool) -> std::io::Result<TcpStream> {
        let from = self.forward_from.filter(|_| remote);
        connect_from(upstream, from).await
    }
}

/// Connects to `upstream`, from `from` when it is of the same family (an
/// agent forwarding to the owner leaves from its registered address).
pub(crate) async fn connect_from(
    upstream: SocketAddr,
    from: Option<IpAddr>,
) -> std::io::Result<TcpStream> {
    let socket = if upstream.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = from.filter(|ip| ip.is_ipv4() == upstream.is_ipv4()) {
        // The port is picked at connect, per destination (as pingora
        // does for its forwarded hop): a port picked at bind is one no
        // other socket holds, TIME_WAIT included, so a storm of short
        // forwarded connections would use up the range in seconds.
        nix::sys::socket::setsockopt(&socket, IpBindAddressNoPort, &true)?;
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(upstream).await
}

#[cfg(test)]
mod tests {
    use rustix::net::sockopt;
    use tokio::net::TcpListener;

    use super::*;

    /// A listener on loopback, with [`player_options`] or without.
    fn listener(options: bool) -> std::io::Result<TcpListener> {
        let socket = TcpSocket::new_v4()?;
        socket.bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?)?;
        if options {
            player_options(&socket)?;
        }
        socket.listen(16)
    }

    /// One connection accepted from `listener`: the accepted socket.
    async fn accepted(listener: &TcpListener) -> std::io::Result<(TcpStream, TcpStream)> {
        let near = TcpStream::connect(listener.local_addr()?).await?;
        let (far, _) = listener.accept().await?;
        Ok((near, far))
    }

    /// The relay sets no option on an accepted player socket: it relies on
    /// the kernel copying the listener's. Without them on the listener the
    /// accepted socket has neither (what this test would see if the copy
    /// stopped).
    #[tokio::test]
    async fn accepted_player_sockets_have_the_listeners_nodelay_keepalive_and_oobinline()
    -> std::io::Result<()> {
        let with = listener(true)?;
        let (_near, s) = accepted(&with).await?;
        assert!(
            sockopt::tcp_nodelay(&s)?,
            "no TCP_NODELAY on the accepted socket"
        );
        assert!(sockopt::socket_keepalive(&s)?, "no SO_KEEPALIVE");
        assert!(sockopt::socket_oobinline(&s)?, "no SO_OOBINLINE");
        assert_eq!(sockopt::tcp_keepidle(&s)?, Duration::from_secs(60));
        assert_eq!(sockopt::tcp_keepintvl(&s)?, Duration::from_secs(10));
        assert_eq!(sockopt::tcp_keepcnt(&s)?, 3);

        let without = listener(false)?;
        let (_near, s) = accepted(&without).await?;
        assert!(!sockopt::tcp_nodelay(&s)?);
        assert!(!sockopt::socket_keepalive(&s)?);
        assert!(!sockopt::socket_oobinline(&s)?);
        Ok(())
    }
}
