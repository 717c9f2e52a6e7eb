//! Pinned HTTP: the first request head of an HTTP/1.x connection decides
//! its instance, and the rest of the connection is spliced there unparsed.
//!
//! A browser or an HTTP client library does not reuse an HTTP/1.1
//! connection across origins, so one decision per connection serves it:
//! [`super::guard::Guard`] reads the first head (under the header deadline
//! and size limit), and [`Pinning::decide`] routes it by Host, asks the
//! edge policy once, and connects. The head is written as it came (less
//! any `x-tidegate-hop`; toward the owner, this agent's own pinned proof),
//! then both ways move through the splice path of TCP. Whatever the L7
//! proxy must see goes there instead, the bytes already read replayed: TLS
//! and HTTP/2, an `Upgrade` or CONNECT, an unknown host, an instance not
//! running, a refusal by the policy (it answers the 403), a declared body
//! over `max_body_bytes`, a failed connect (it answers the 502 or 504), a
//! hop claim this agent cannot prove pinned, and challenges in `l7` mode.
//!
//! Rules of a pinned connection:
//! - a later request naming another Host still goes to the first
//!   instance: nothing after the first head is parsed;
//! - no `X-Forwarded-*` header is added, on any request (the L7 path adds
//!   none for these challenges either), so a challenge sees one proxy;
//! - it is closed when a route build moves or removes its hostname's
//!   instance, and after the challenge-independent idle limit (the larger
//!   of `http_keepalive_timeout_secs` and `upstream_read_timeout_ms`) with
//!   no byte either way;
//! - bytes count as the instance's HTTP bytes, and as its activity.
//!
//! Toward the owner the edge proves a pinned hop ([`Protocol::Pinned`]),
//! which the owner pins to its local instance without asking the policy
//! again. An ordinary (`Http`) proof never pins: an L7 edge reuses one
//! upstream connection for many players' requests.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pingora::protocols::Stream;
use tidegate_schema::Hostname;
use tidegate_schema::spec::HttpMode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::HOP_HEADER;
use crate::hop::{Hop, Hops, Protocol};
use crate::policy::{Connection, EdgePolicy, Verdict};
use crate::routes::{Route, SharedRoutes, Target};

/// Headers looked at in a first head; one with more goes to the L7 path.
const MAX_HEADERS: usize = 96;

/// What pinning needs of the agent.
pub struct Pinning {
    pub routes: SharedRoutes,
    pub policy: Arc<dyn EdgePolicy>,
    pub hops: Arc<Hops>,
    /// This agent's registered address, where forwarded hops leave from.
    pub forward_from: Option<IpAddr>,
    /// The agent's `http_mode`, for challenges whose spec sets none.
    pub mode: HttpMode,
    pub max_body_bytes: u64,
    pub connect_timeout: Duration,
    /// A pinned connection moving no byte either way this long is closed.
    pub idle: Duration,
    pub pipe_bytes: usize,
    /// Bumped after every route table swap.
    pub builds: tokio::sync::watch::Receiver<u64>,
}

impl std::fmt::Debug for Pinning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinning")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A connection decided pinned: where it goes and what is written first.
#[derive(Debug)]
pub(super) struct Plan {
    route: Arc<Route>,
    host: String,
    /// The head as read, rewritten (hop header off or replaced) when needed.
    head: Option<Vec<u8>>,
    server: TcpStream,
}

impl Pinning {
    /// Whether a connection from `peer` is worth reading ahead: some
    /// route may pin, or it comes from an agent (which may have pinned).
    pub(super) fn wanted(&self, peer: IpAddr) -> bool {
        if self.mode == HttpMode::Pinned {
            return true;
        }
        let table = self.routes.load();
        table.pinned_any || table.agents.contains(&peer)
    }

    /// Decides whether the connection whose first bytes are `buf` (a
    /// complete head, maybe more) is pinned, and if so connects. `None`:
    /// the L7 path serves it (and answers what is wrong, if anything).
    /// `local` gives the address the connection came to (asked only to
    /// check a hop's proof).
    pub(super) async fn decide(
        &self,
        buf: &[u8],
        peer: SocketAddr,
        local: impl FnOnce() -> Option<SocketAddr>,
    ) -> Option<Plan> {
        // One more than a player's head may have: the edge's proof.
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 1];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(buf), Ok(httparse::Status::Complete(_))) {
            return None;
        }
        if req.method == Some("CONNECT") {
            return None;
        }
        let mut host = None;
        let mut hop = None;
        for h in req.headers.iter() {
            let name = h.name;
            if name.eq_ignore_ascii_case("host") {
                if host.replace(h.value).is_some() {
                    return None;
                }
            } else if name.eq_ignore_ascii_case("upgrade") {
                return None;
            } else if name.eq_ignore_ascii_case(HOP_HEADER) {
                if hop.replace((h.name, h.value)).is_some() {
                    return None;
                }
            } else if name.eq_ignore_ascii_case("content-length") {
                let declared: u64 = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
                if declared > self.max_body_bytes {
                    return None;
                }
            }
        }
        if hop.is_none() && req.headers.len() > MAX_HEADERS {
            return None;
        }
        let host = Hostname::from_host_header(std::str::from_utf8(host?).ok()?)?;
        let table = self.routes.load();
        let route = table.get(host.as_str())?.clone();
        // From an agent's address only a valid pinned proof pins: an L7
        // edge reuses its connection for many players' requests, proven
        // or not (it cannot sign from an address not of this host). A
        // claim from anywhere else is the L7 path's to judge (and count).
        let from_agent = table.agents.contains(&peer.ip());
        let forwarded_for = match hop {
            None if from_agent => return None,
            None => None,
            Some((_, value)) => {
                if !from_agent {
                    return None;
                }
                let claim = crate::hop::parse_http(value).ok()?;
                let proven = Hop {
                    protocol: Protocol::Pinned,
                    source: peer.ip(),
                    destination: local()?,
                    instance: route.instance.as_str(),
                };
                if self.hops.verify(&proven, &claim).is_err() {
                    // Red-team plant: an L7 edge's proof pins too.
                    let l7 = Hop {
                        protocol: Protocol::Http,
                        ..proven
                    };
                    let planted = tidegate_schema::config::planted("pinned-proof");
                    if !planted || self.hops.verify(&l7, &claim).is_err() {
                        return None;
                    }
                }
                Some(claim.client)
            }
        };
        drop(table);
        if forwarded_for.is_none() && route.http_mode.unwrap_or(self.mode) != HttpMode::Pinned {
            return None;
        }
        let (upstream, remote) = match &route.target {
            Target::Local(a) => (*a, false),
            // A forwarded hop to a non-owner: the L7 path answers the 508
            // (it takes a pinned proof as forwarded, and closes).
            Target::Remote(a) if forwarded_for.is_none() => (*a, true),
            _ => return None,
        };
        // Toward the owner only with a proof (from this agent's registered
        // address, of the owner's family): the owner pins nothing else.
        let from = match self.forward_from {
            Some(ip) if remote && ip.is_ipv4() == upstream.is_ipv4() => Some(ip),
            _ if remote => return None,
            _ => None,
        };
        if forwarded_for.is_none() && !tidegate_schema::config::planted("pinned-policy") {
            let conn = Connection {
                instance: route.instance.as_str(),
                team: &route.team,
                challenge: &route.challenge,
                source: Some(peer.ip()),
                protocol: "http",
                host: host.as_str(),
            };
            if let Verdict::Reject(_) = self.policy.admit(&conn).await {
                return None;
            }
        }
        let server = tokio::time::timeout(
            self.connect_timeout,
            crate::tcp::connect_from(upstream, from),
        )
        .await
        .ok()?
        .ok()?;
        let proof = from.map(|source| {
            self.hops.http_proof(
                Protocol::Pinned,
                (source, upstream),
                route.instance.as_str(),
                forwarded_for.unwrap_or(peer),
            )
        });
        let head = match (hop, proof) {
            (None, None) => None,
            (hop, proof) => Some(rewrite(buf, hop.map(|(name, _)| name), proof.as_deref())),
        };
        Some(Plan {
            route,
            host: host.to_string(),
            head,
            server,
        })
    }

    /// Serves a pinned connection: writes the head (`buf`, or the plan's
    /// rewrite of it), then splices both ways until either side ends, the
    /// route moves, or the connection idles.
    pub(super) async fn serve(&self, player: std::net::TcpStream, plan: Plan, buf: Vec<u8>) {
        let Plan {
            route,
            host,
            head,
            mut server,
        } = plan;
        let traffic = &route.traffic;
        let result = async {
            let first = head.unwrap_or(buf);
            tokio::time::timeout(self.connect_timeout, server.write_all(&first))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            traffic
                .bytes_in
                .fetch_add(first.len() as u64, Ordering::Relaxed);
            // The head's buffers go now: a held connection keeps none.
            drop(first);
            traffic.touch();
            // No TCP keepalive (the idle limit ends a vanished player's
            // connection, the instance is this host's or an agent's), and
            // Pingora set the player's nodelay and non-blocking mode (the
            // descriptors share them): every system call here is paid per
            // connection.
            let _ = server.set_nodelay(true);
            let player = TcpStream::from_std(player)?;
            let counters = (&traffic.bytes_in, &traffic.bytes_out);
            tokio::select! {
                moved = crate::tcp::splice::pump_counted(&player, &server, self.pipe_bytes, counters, traffic) => moved,
                // Both cut with a reset: a client reading a body to the
                // close must not take a cut answer for a whole one.
                () = crate::tcp::idle(&player, self.idle) => {
                    crate::tcp::splice::reset(&player);
                    crate::tcp::splice::reset(&server);
                    Ok(())
                }
                () = self.moved(&route, &host) => {
                    tracing::debug!(%host, instance = %route.instance, "pinned connection closed: its route changed");
                    crate::tcp::splice::reset(&player);
                    crate::tcp::splice::reset(&server);
                    Ok(())
                }
            }
        }
        .await;
        traffic.touch();
        if let Err(e) = result {
            tracing::debug!(%host, error = %e, "pinned connection ended with an error");
        }
    }

    /// Returns once a route build no longer sends `host` to `route`'s
    /// instance and target.
    async fn moved(&self, route: &Route, host: &str) {
        let mut builds = self.builds.clone();
        builds.borrow_and_update();
        let same = || {
            self.routes
                .load()
                .get(host)
                .is_some_and(|now| now.instance == route.instance && now.target == route.target)
        };
        // A build between the decision and this subscription counts too.
        if !same() {
            return;
        }
        while builds.changed().await.is_ok() {
            if !same() {
                return;
            }
        }
        // The route watch is gone (the agent is stopping).
        std::future::pending().await
    }
}

/// The head in `buf` with the header line named `drop` (a slice of `buf`)
/// removed and, when given, `x-tidegate-hop: <proof>` added after the
/// request line.
fn rewrite(buf: &[u8], drop: Option<&str>, proof: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(buf.len() + 160);
    let line_end = |from: usize| {
        buf[from..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(buf.len(), |i| from + i + 1)
    };
    // Empty lines before the request line are skipped by parsers: the
    // proof goes after the request line itself.
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(0);
    let first = line_end(start);
    out.extend_from_slice(&buf[..first]);
    if let Some(p) = proof {
        out.extend_from_slice(HOP_HEADER.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(p.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let rest = &buf[first..];
    match drop.map(|name| name.as_ptr() as usize - buf.as_ptr() as usize) {
        Some(at) if at >= first && at <= buf.len() => {
            out.extend_from_slice(&buf[first..at]);
            out.extend_from_slice(&buf[line_end(at)..]);
        }
        _ => out.extend_from_slice(rest),
    }
    out
}

/// A second descriptor of the player's socket under a Pingora stream
/// (plain TCP only), taken through this process's pidfd: Pingora's stream
/// can then be dropped (closing only its own descriptor) and the socket
/// spliced as any TCP connection.
pub(super) fn player_socket(stream: &Stream) -> Option<std::net::TcpStream> {
    let l4 = stream
        .as_any()
        .downcast_ref::<pingora::protocols::l4::stream::Stream>()?;
    let pidfd = own_pidfd()?;
    let fd = rustix::process::pidfd_getfd(
        pidfd.as_fd(),
        l4.as_raw_fd(),
        rustix::process::PidfdGetfdFlags::empty(),
    )
    .ok()?;
    Some(std::net::TcpStream::from(fd))
}

/// Whether [`player_socket`] can work for `stream` (checked before a
/// decision, so that a stream it cannot take costs no upstream connect).
pub(super) fn can_take(stream: &Stream) -> bool {
    stream
        .as_any()
        .downcast_ref::<pingora::protocols::l4::stream::Stream>()
        .is_some()
        && own_pidfd().is_some()
}

/// This process's pidfd (kernel 5.3), opened once, and `pidfd_getfd` (5.6;
/// a seccomp profile may refuse it) tried once on it: `None` if either
/// fails, so that no connection is decided (policy asked, instance
/// connected) only to go to the L7 path after all.
fn own_pidfd() -> Option<&'static OwnedFd> {
    static PIDFD: OnceLock<Option<OwnedFd>> = OnceLock::new();
    PIDFD
        .get_or_init(|| {
            let works = rustix::process::pidfd_open(
                rustix::process::getpid(),
                rustix::process::PidfdFlags::empty(),
            )
            .and_then(|fd| {
                rustix::process::pidfd_getfd(
                    fd.as_fd(),
                    fd.as_raw_fd(),
                    rustix::process::PidfdGetfdFlags::empty(),
                )
                .map(|_| fd)
            });
            if let Err(e) = &works {
                tracing::warn!(error = %e, "pidfd_open or pidfd_getfd failed: HTTP connections are served by the L7 path only");
            }
            works.ok()
        })
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hop_header_is_replaced_by_the_proof_and_the_rest_kept() {
        let buf =
            b"GET / HTTP/1.1\r\nHost: a.b\r\nX-Tidegate-Hop: forged\r\nAccept: */*\r\n\r\nbody";
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(buf).unwrap();
        let name = req.headers[1].name;
        let out = rewrite(buf, Some(name), Some("v1;proof"));
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\nx-tidegate-hop: v1;proof\r\nHost: a.b\r\nAccept: */*\r\n\r\nbody"
        );
        let out = rewrite(buf, Some(name), None);
        assert_eq!(
            out,
            b"GET / HTTP/1.1\r\nHost: a.b\r\nAccept: */*\r\n\r\nbody"
        );
        let leading = b"\r\nGET / HTTP/1.1\r\nHost: a.b\r\n\r\n";
        assert_eq!(
            rewrite(leading, None, Some("p")),
            b"\r\nGET / HTTP/1.1\r\nx-tidegate-hop: p\r\nHost: a.b\r\n\r\n"
        );
        let plain = b"GET / HTTP/1.1\r\nHost: a.b\r\n\r\n";
        assert_eq!(
            rewrite(plain, None, Some("p")),
            b"GET / HTTP/1.1\r\nx-tidegate-hop: p\r\nHost: a.b\r\n\r\n"
        );
    }
}
