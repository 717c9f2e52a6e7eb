//! One player connection: where it goes (the loop guard, the edge policy,
//! the owner or the instance), the connect, the hop header toward an
//! owning agent, and the data path that moves its bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use nix::sys::socket::sockopt::IpBindAddressNoPort;
use tidegate_schema::config::DataPath;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use super::copy::copy;
use super::hop::Taken;
use super::{CONNECT_TIMEOUT, Failures, ebpf, hop, sockhash, splice, tls};
use crate::hop::{Hop, Hops, Protocol};
use crate::metrics::traffic::InstanceTraffic;
use crate::policy::{Connection, EdgePolicy, Verdict};
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
        let local = client.local_addr()?;
        let (source, forwarded) = self.proven(&taken, peer, local, &route);
        let Some((server, sent)) = self.open(&route, source, forwarded, local, "").await? else {
            return Ok(());
        };
        let _ = client.set_nodelay(true);
        let traffic = &route.traffic;
        self.transfer(traffic, async {
            match (self.data_path, &self.redirector) {
                // A header taken off the client may have come in one skb
                // with the player's first bytes; the verdict program would
                // redirect that whole skb, header and all. splice(2)
                // moves what is left.
                (DataPath::Sockhash, Some(r)) if taken == Taken::Nothing => {
                    sockhash::pump(r, client, server, sent, self.pipe_bytes, traffic).await
                }
                (DataPath::Copy, _) => copy(client, server, traffic).await,
                _ => splice::pump(client, server, self.pipe_bytes, traffic).await,
            }
        })
        .await
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
        let result = async {
            let Some((server, _)) = self.open(&route, peer, false, local, &sni).await? else {
                let _ = client.shutdown().await;
                return Ok(());
            };
            let traffic = &route.traffic;
            self.transfer(traffic, copy(&mut client, server, traffic))
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
        Ok(Some((server, sent)))
    }

    /// Runs `pump` (the data path moving the connection's bytes) with the
    /// connection counted as active, and counts how it ended.
    async fn transfer(
        &self,
        traffic: &InstanceTraffic,
        pump: impl std::future::Future<Output = std::io::Result<()>>,
    ) -> std::io::Result<()> {
        traffic.tcp_connections.fetch_add(1, Ordering::Relaxed);
        traffic.tcp_active.fetch_add(1, Ordering::Relaxed);
        traffic.touch();
        let moved = pump.await;
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
        let socket = if upstream.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = self
            .forward_from
            .filter(|ip| remote && ip.is_ipv4() == upstream.is_ipv4())
        {
            // The port is picked at connect, per destination (as pingora
            // does for its forwarded hop): a port picked at bind is one no
            // other socket holds, TIME_WAIT included, so a storm of short
            // forwarded connections would use up the range in seconds.
            nix::sys::socket::setsockopt(&socket, IpBindAddressNoPort, &true)?;
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(upstream).await
    }
}
