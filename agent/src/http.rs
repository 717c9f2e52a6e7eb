//! The HTTP data plane: a Pingora proxy routing by Host header.
//!
//! Host (port stripped, lowercased) → the route snapshot (lock-free load).
//! A local instance is proxied to its container; a remote one to its
//! owner's HTTP entry with the Host kept and an `x-tidegate-hop` header
//! carrying a proof (see [`crate::hop`]). The owner serves a proven hop
//! without asking the policy again, and refuses one that would be
//! forwarded again (508) so a stale table can never loop; a header without
//! a valid proof is ignored (the request is the peer's own). Answers: unknown host
//! 404, known but not running 503 + Retry-After, refused/reset 502,
//! timeout 504; an HTML page, or JSON when the client accepts JSON.

pub mod guard;
pub mod pinned;
mod upgrade;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType};
use tidegate_schema::Hostname;

use crate::hop::{Hop, Hops, Protocol, Refused};
use crate::policy::{Connection, EdgePolicy, Throttle, Verdict};
use crate::routes::{Route, SharedRoutes, Target};

/// The header a forwarding agent adds: with a valid proof, it means "route
/// locally or fail".
pub const HOP_HEADER: &str = "x-tidegate-hop";

/// Limits and timeouts of the proxy.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    /// Idle time allowed between requests on a kept-alive connection, in
    /// seconds (set on every request: a client's own `Keep-Alive` header
    /// cannot lengthen it).
    pub keepalive_secs: u64,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// The agent's `http_mode`: a challenge in pinned mode gets no
    /// `X-Forwarded-*` headers on this path either.
    pub http_mode: tidegate_schema::spec::HttpMode,
}

/// The proxy's per-request state.
#[derive(Debug)]
pub struct Ctx {
    route: Option<Arc<Route>>,
    host: String,
    started: Instant,
    body_bytes: u64,
}

/// The Pingora `ProxyHttp` of an agent.
pub struct EdgeProxy {
    pub routes: SharedRoutes,
    /// This agent's registered address, when it is one of this host's:
    /// requests forwarded to other agents come from it, so the owner knows
    /// the edge agent already asked the policy.
    pub forward_from: Option<std::net::IpAddr>,
    pub limits: HttpLimits,
    pub policy: Arc<dyn EdgePolicy>,
    pub hops: Arc<Hops>,
}

impl std::fmt::Debug for EdgeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeProxy")
            .field("me", &self.hops.me())
            .finish_non_exhaustive()
    }
}

impl EdgeProxy {
    /// Whether the request carries a valid proof that another agent
    /// forwarded it here (for `route`'s instance, to this connection's
    /// local address, from its peer): an L7 edge's, or a pinned edge's
    /// (this agent read it ahead and did not pin: a stale route, a limit).
    /// A claim without one is counted, logged with the real source, and
    /// otherwise ignored. `agents`: the registered agents' addresses of the
    /// table the route came from.
    fn proven(
        &self,
        session: &Session,
        route: &Route,
        agents: &std::collections::HashSet<std::net::IpAddr>,
    ) -> Proven {
        let Some(value) = session.req_header().headers.get(HOP_HEADER) else {
            return Proven::NoClaim;
        };
        let peer = session.client_addr().and_then(|a| a.as_inet()).copied();
        let local = session.server_addr().and_then(|a| a.as_inet()).copied();
        let (Some(peer), Some(local)) = (peer, local) else {
            return Proven::Not;
        };
        // Only agents forward: a claim from any other address is refused
        // whatever its proof (as on TCP).
        let from_agent = agents.contains(&peer.ip());
        let hop = |protocol| Hop {
            protocol,
            source: peer.ip(),
            destination: local,
            instance: route.instance.as_str(),
        };
        let claim = crate::hop::parse_http(value.as_bytes()).and_then(|c| {
            if from_agent {
                Ok(c)
            } else {
                Err(Refused::NotAnAgent)
            }
        });
        match self.hops.check(&hop(Protocol::Http), claim.clone()) {
            Ok(()) => Proven::Http,
            // A pinned edge's proof: looked at only once an L7 one failed
            // (every forwarded L7 request pays one MAC, not two).
            Err(_)
                if claim
                    .as_ref()
                    .is_ok_and(|c| self.hops.verify(&hop(Protocol::Pinned), c).is_ok()) =>
            {
                Proven::Pinned
            }
            Err(reason) => {
                let claimed = String::from_utf8_lossy(value.as_bytes());
                let claimed: String = claimed.chars().take(120).collect();
                self.hops.refuse(Protocol::Http, reason, peer, &claimed);
                Proven::Not
            }
        }
    }
}

/// What a request's hop header proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proven {
    /// No hop header: a player's request (or an unproven forward).
    NoClaim,
    /// A header without a valid proof: served as a player's.
    Not,
    /// An L7 edge forwarded it.
    Http,
    /// A pinned edge forwarded this connection: its later bytes are that
    /// edge's player's, unparsed there, so it is closed after this answer.
    Pinned,
}

fn wants_json(session: &Session) -> bool {
    session
        .req_header()
        .headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes a complete error answer; the connection stays usable.
async fn answer(
    session: &mut Session,
    status: u16,
    message: &str,
    retry_after: Option<u64>,
) -> Result<()> {
    let (body, ctype) = if wants_json(session) {
        (
            serde_json::json!({ "error": message, "status": status }).to_string(),
            "application/json",
        )
    } else {
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        (
            format!(
                "<!doctype html><meta charset=utf-8><title>{status} {reason}</title>\
                 <h1>{status} {reason}</h1><p>{}</p><p><small>tidegate</small></p>\n",
                escape(message)
            ),
            "text/html; charset=utf-8",
        )
    };
    let mut resp = ResponseHeader::build(status, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, ctype)?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    if let Some(secs) = retry_after {
        resp.insert_header(header::RETRY_AFTER, secs.to_string())?;
    }
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await?;
    Ok(())
}

/// The request's host: the Host header (HTTP/1) or the URI authority (HTTP/2).
fn request_host(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
}

#[async_trait]
impl ProxyHttp for EdgeProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            route: None,
            host: String::new(),
            started: Instant::now(),
            body_bytes: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.limits.keepalive_secs));
        }
        // An HTTP/2 player that grants no flow-control window holds a
        // stream while it goes on reading the connection, so the guard's
        // write-stall timer never runs: each chunk of the answer gets the
        // same limit here (it restarts at each window granted).
        if session.is_http2() && !tidegate_schema::config::planted("stalled-reader") {
            session.set_write_timeout(Some(self.limits.read_timeout));
        }
        let req = session.req_header();
        let header_bytes: usize = req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum();
        if header_bytes > self.limits.max_header_bytes {
            answer(session, 431, "request headers are too large", None).await?;
            return Ok(true);
        }
        let Some(raw) = request_host(req) else {
            answer(session, 400, "the request has no Host header", None).await?;
            return Ok(true);
        };
        let Some(host) = Hostname::from_host_header(raw) else {
            answer(
                session,
                404,
                &format!("no instance is served at {raw:?}"),
                None,
            )
            .await?;
            return Ok(true);
        };
        ctx.host = host.to_string();
        let table = self.routes.load();
        let Some(route) = table.get(host.as_str()).cloned() else {
            answer(
                session,
                404,
                &format!("no instance is served at {host}"),
                None,
            )
            .await?;
            return Ok(true);
        };
        let proven = self.proven(session, &route, &table.agents);
        let forwarded = matches!(proven, Proven::Http | Proven::Pinned);
        if matches!(proven, Proven::Not | Proven::Pinned) {
            // Whoever sent this claim, its next request on the connection
            // is not routed here: a pinned edge splices its player's bytes
            // unparsed, and they must not be routed by their own Host.
            session.set_keepalive(None);
        }
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        match &route.target {
            Target::NotReady(why) => {
                let msg = format!("instance {} is not running: {why}", route.instance);
                answer(session, 503, &msg, Some(2)).await?;
                return Ok(true);
            }
            Target::Remote(_) if forwarded => {
                answer(
                    session,
                    508,
                    "routing loop: another agent forwarded this to a non-owner",
                    None,
                )
                .await?;
                return Ok(true);
            }
            _ => {}
        }
        let conn = Connection {
            instance: route.instance.as_str(),
            team: &route.team,
            challenge: &route.challenge,
            source: client,
            protocol: "http",
            host: host.as_str(),
        };
        if !forwarded && let Verdict::Reject(reason) = self.policy.admit(&conn).await {
            static REFUSED: Throttle = Throttle::new();
            if let Some(left_out) = REFUSED.admit() {
                tracing::info!(host = %host, player = ?client, %reason, left_out, "request refused by policy (left_out: refusals since the last line, one a second)");
            }
            answer(session, 403, &reason, None).await?;
            return Ok(true);
        }
        let declared = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.limits.max_body_bytes) {
            answer(
                session,
                413,
                &format!(
                    "request body is larger than {} bytes",
                    self.limits.max_body_bytes
                ),
                None,
            )
            .await?;
            return Ok(true);
        }
        ctx.route = Some(route);
        if upgrade::is_websocket(session) {
            if !session.is_body_empty() {
                answer(session, 400, "an upgrade request cannot carry a body", None).await?;
                return Ok(true);
            }
            upgrade::proxy(self, session, ctx).await?;
            return Ok(true);
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let addr = match ctx.route.as_ref().map(|r| &r.target) {
            Some(Target::Local(a) | Target::Remote(a)) => *a,
            _ => {
                return Err(Error::explain(
                    ErrorType::InternalError,
                    "no route in upstream_peer",
                ));
            }
        };
        let mut peer = HttpPeer::new(addr, false, String::new());
        if let (Some(Target::Remote(_)), Some(ip)) =
            (ctx.route.as_ref().map(|r| &r.target), self.forward_from)
            && ip.is_ipv4() == addr.is_ipv4()
        {
            let mut bind = pingora::connectors::l4::BindTo::default();
            bind.addr = Some(std::net::SocketAddr::new(ip, 0));
            peer.options.bind_to = Some(bind);
        }
        peer.options.connection_timeout = Some(self.limits.connect_timeout);
        peer.options.read_timeout = Some(self.limits.read_timeout);
        peer.options.write_timeout = Some(self.limits.read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let pinned = ctx
            .route
            .as_ref()
            .and_then(|r| r.http_mode)
            .unwrap_or(self.limits.http_mode)
            == tidegate_schema::spec::HttpMode::Pinned;
        let client = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_string())
            .filter(|_| !pinned);
        if let Some(ip) = client {
            let xff = match up
                .headers
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
            {
                Some(prev) => format!("{prev}, {ip}"),
                None => ip,
            };
            up.insert_header("x-forwarded-for", xff)?;
        }
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        if !pinned && up.headers.get("x-forwarded-proto").is_none() {
            up.insert_header("x-forwarded-proto", if tls { "https" } else { "http" })?;
        }
        if !pinned && up.headers.get("x-forwarded-host").is_none() {
            up.insert_header("x-forwarded-host", ctx.host.as_str())?;
        }
        if let Some(Target::Remote(owner)) = ctx.route.as_ref().map(|r| &r.target) {
            // The proof holds only from the address the request leaves from.
            // Only when the request leaves from it (same family as the owner).
            let from = self
                .forward_from
                .filter(|ip| ip.is_ipv4() == owner.is_ipv4());
            let proof = match (from, session.client_addr().and_then(|a| a.as_inet())) {
                (Some(source), Some(client)) => ctx.route.as_ref().map(|r| {
                    self.hops.http_proof(
                        Protocol::Http,
                        (source, *owner),
                        r.instance.as_str(),
                        *client,
                    )
                }),
                _ => None,
            };
            match proof {
                Some(p) => up.insert_header(HOP_HEADER, p)?,
                None => up.remove_header(HOP_HEADER).map_or((), |_| ()),
            }
            // HTTP/2 clients send no Host header; the owner routes by it.
            if up.headers.get(header::HOST).is_none() {
                up.insert_header(header::HOST, ctx.host.as_str())?;
            }
        } else {
            up.remove_header(HOP_HEADER);
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.body_bytes += b.len() as u64;
            if ctx.body_bytes > self.limits.max_body_bytes {
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body too large",
                ));
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, _ctx: &mut Ctx) -> FailToProxy {
        use ErrorType::*;
        let (code, message) = match e.etype() {
            HTTPStatus(413) => (
                413,
                format!(
                    "request body is larger than {} bytes",
                    self.limits.max_body_bytes
                ),
            ),
            HTTPStatus(code) => (*code, format!("error {code}")),
            ConnectTimedout | ReadTimedout | WriteTimedout => {
                (504, "the instance did not answer in time".to_string())
            }
            _ if e.esource() == &pingora::ErrorSource::Upstream => (
                502,
                "the instance refused or dropped the connection".to_string(),
            ),
            ReadError | WriteError | ConnectionClosed => (0, String::new()),
            _ => (502, "the instance could not be reached".to_string()),
        };
        // An answer already begun (an upgraded tunnel, a body under way)
        // cannot take an error page in the middle of it; after a 1xx it can.
        let begun = session
            .response_written()
            .is_some_and(|r| !r.status.is_informational() || r.status == 101);
        if code > 0 && !begun {
            let _ = answer(session, code, &message, None).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        if let Some(route) = &ctx.route {
            let status = session.response_written().map_or(0, |r| r.status.as_u16());
            route.traffic.request(
                status,
                session.body_bytes_read() as u64,
                session.body_bytes_sent() as u64,
                ctx.started.elapsed(),
            );
        }
    }
}
