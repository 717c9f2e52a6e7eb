//! Upgrade requests (WebSocket) proxied by the agent itself.
//!
//! Pingora 0.9.1 drops an upgraded tunnel when it reads the instance's
//! `101 Switching Protocols` before it has taken the request's own (empty)
//! end of body from its queue: both are ready at its first unbiased
//! `select!`, and when the 101 wins, the end of body that follows ends the
//! tunnel. The player sees the 101 and then the connection closed
//! (cloudflare/pingora#946, fixes proposed upstream and not released). Here
//! the request's end of body is written before the response is read, so
//! the order is always the safe one. Drop this module once a Pingora
//! release carries the fix.

use std::sync::LazyLock;
use std::time::Duration;

use pingora::connectors::http::v1::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::HttpTask;
use pingora::protocols::http::v1::client::HttpSession as Upstream;
use pingora::proxy::{ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};

use super::{Ctx, EdgeProxy};

/// Upgraded connections are never reused, so no pool is kept.
static CONNECTOR: LazyLock<Connector> = LazyLock::new(|| Connector::new(None));

/// Headers of the player's request that describe its framing or this hop
/// only: the instance gets a request with no body, as the player sent.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "http2-settings",
];

/// Whether this request asks for a WebSocket (the only upgrade proxied
/// here; any other `Upgrade` goes through Pingora, which drops it and
/// proxies a plain request).
pub(super) fn is_websocket(session: &Session) -> bool {
    session.is_upgrade_req()
        && session
            .req_header()
            .headers
            .get(http::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
}

/// The request as the instance gets it: this hop's headers (and those the
/// player's `Connection` names) removed, the upgrade asked for afresh.
fn upstream_request(session: &Session) -> Result<RequestHeader> {
    let mut req = session.req_header().clone();
    req.set_version(http::Version::HTTP_11);
    let named: Vec<String> = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        // The route and the hop proof are this proxy's to decide.
        .filter(|t| !t.is_empty() && t != "host" && t != super::HOP_HEADER)
        .collect();
    for name in named.iter().map(String::as_str).chain(HOP_BY_HOP) {
        req.remove_header(name);
    }
    req.remove_header(http::header::CONTENT_LENGTH.as_str());
    req.insert_header(http::header::CONNECTION, "Upgrade")?;
    req.insert_header(http::header::UPGRADE, "websocket")?;
    Ok(req)
}

/// Proxies one HTTP/1.1 WebSocket request whose route and policy are
/// decided (`ctx.route` is set). An error before the answer is written
/// goes to `fail_to_proxy` (502/504 as for any request); an error in a
/// tunnel just ends it.
pub(super) async fn proxy(proxy: &EdgeProxy, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
    let peer = proxy.upstream_peer(session, ctx).await?;
    let mut req = upstream_request(session)?;
    proxy
        .upstream_request_filter(session, &mut req, ctx)
        .await?;
    let (mut up, _) = CONNECTOR
        .get_http_session(&*peer)
        .await
        .map_err(|e| e.into_up())?;
    up.read_timeout = peer.options.read_timeout;
    up.write_timeout = peer.options.write_timeout;
    up.write_request_header(Box::new(req))
        .await
        .map_err(|e| e.into_up())?;
    // The request's end of body before its answer: the order Pingora
    // sometimes gets wrong.
    up.finish_body().await.map_err(|e| e.into_up())?;
    // One deadline for the whole answer: an instance sending 1xx forever
    // holds the player's connection no longer than a silent one.
    let wait = peer.options.read_timeout.unwrap_or(Duration::from_secs(60));
    let answer = tokio::time::timeout(wait, async {
        loop {
            match up.read_response_task().await? {
                HttpTask::Header(h, _) if h.status.is_informational() && h.status != 101 => {}
                HttpTask::Header(h, end) => return Ok((h, end)),
                _ => return Error::e_explain(ErrorType::InvalidHTTPHeader, "no response header"),
            }
        }
    })
    .await;
    let (resp, end) = match answer {
        Ok(answer) => answer.map_err(|e| e.into_up())?,
        Err(_) => {
            return Err(Error::explain(
                ErrorType::ReadTimedout,
                "the instance did not answer the upgrade in time",
            )
            .into_up());
        }
    };
    let upgraded = up.was_upgraded();
    if !upgraded {
        // An instance that refused the upgrade: its answer, then close.
        session.set_keepalive(None);
    }
    session.write_response_header(resp, end).await?;
    // An answer is out: `fail_to_proxy` writes no page after it.
    if !upgraded {
        // A body cut short is an error, never a clean end of the answer.
        let sent = if end {
            Ok(())
        } else {
            body(session, &mut up).await
        };
        up.shutdown().await;
        return sent;
    }
    if let Err(e) = tunnel(session, &mut up).await {
        tracing::debug!(host = %ctx.host, error = %e, "upgraded connection ended");
    }
    up.shutdown().await;
    Ok(())
}

/// Bytes both ways until either side ends (as Pingora's tunnel does).
async fn tunnel(session: &mut Session, up: &mut Upstream) -> Result<()> {
    up.maybe_upgrade_body_writer();
    loop {
        // Both reads are cancel-safe (Pingora selects on them too).
        tokio::select! {
            task = up.read_response_task() => match task? {
                HttpTask::UpgradedBody(data, end) => {
                    if data.is_some() {
                        session.write_response_body(data, false).await?;
                    }
                    if end {
                        break;
                    }
                }
                _ => break,
            },
            read = session.read_request_body() => match read? {
                Some(bytes) => {
                    up.write_body(&bytes).await?;
                }
                None => break,
            },
        }
    }
    session.write_response_body(None, true).await
}

/// The body of an answer that was not an upgrade.
async fn body(session: &mut Session, up: &mut Upstream) -> Result<()> {
    loop {
        match up.read_response_task().await? {
            HttpTask::Body(data, end) => {
                session.write_response_body(data, end).await?;
                if end {
                    return Ok(());
                }
            }
            _ => return session.write_response_body(None, true).await,
        }
    }
}
