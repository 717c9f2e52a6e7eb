//! Forwarding: a standby carries a scheduling request (spawn, renew) to
//! the scheduler itself, with the caller's own `Authorization`, and hands
//! back the scheduler's answer. Platforms talk to any replica and never
//! see a redirect or resend a token.
//!
//! One hop only: a forwarded request is marked (`x-tidegate-forwarded-by`),
//! and a replica that gets one while not leading (the lead moved on the
//! way) answers 503, retryable, instead of passing it on. When the
//! scheduler cannot be reached the answer is a 503 naming it, with
//! `Retry-After`. The scheduler's own answer, whatever its status, is
//! passed back unchanged (plus `x-tidegate-scheduler` naming who made it).
//!
//! Forwards share a pool of kept-alive connections, at most
//! [`Forwarder::IN_FLIGHT`] at once per replica, so a rush through one
//! standby stays under the scheduler's per-source connection cap.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::IntoResponse;

use super::{ApiError, ApiResult, MAX_BODY};
use crate::App;
use crate::election::Candidate;

/// Marks a forwarded request; its value is the forwarding replica's id.
pub(crate) const FORWARDED_BY: HeaderName = HeaderName::from_static("x-tidegate-forwarded-by");
/// On a forwarded answer: the id of the replica that made it.
pub(crate) const SCHEDULER: HeaderName = HeaderName::from_static("x-tidegate-scheduler");

/// The standby's side of forwarding: one HTTP client, bounded.
#[derive(Debug)]
pub struct Forwarder {
    http: reqwest::Client,
    slots: tokio::sync::Semaphore,
    timeout: Duration,
}

impl Forwarder {
    /// Forwards in flight at once per replica (well under the default
    /// per-source cap of 256 connections).
    pub const IN_FLIGHT: usize = 64;

    /// `timeout` bounds a whole forward, waiting for a slot included;
    /// `idle` is how long a kept-alive connection is reused (below the
    /// scheduler's header timeout, after which it closes idle ones).
    pub fn new(timeout: Duration, idle: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(idle)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| format!("building the forwarding client: {e}"))?;
        Ok(Self {
            http,
            slots: tokio::sync::Semaphore::new(Self::IN_FLIGHT),
            timeout,
        })
    }
}

/// Carries a request to the scheduler `to` and answers with its answer.
pub(crate) async fn forward(
    app: &App,
    to: &Candidate,
    method: Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> ApiResult {
    if let Some(by) = headers.get(&FORWARDED_BY) {
        let by = String::from_utf8_lossy(by.as_bytes()).into_owned();
        return Err(ApiError::unavailable(format!(
            "replica {} was forwarded this request by {by:.64} but does not schedule its challenge's shard (its scheduler is {} now); retry",
            app.cfg.id, to.id
        ))
        .reason("not_scheduler"));
    }
    let f = &app.forwarder;
    let url = format!("{}{path_and_query}", to.url.trim_end_matches('/'));
    let unreachable = |why: String| {
        app.metrics.forward_failed.inc();
        ApiError::unavailable(format!(
            "this replica does not schedule this challenge's shard, and the scheduler {} at {} {why}; retry",
            to.id, to.url
        ))
        .leader(to.url.clone())
    };
    let sent = async {
        let _slot = f
            .slots
            .acquire()
            .await
            .map_err(|e| Hop::Unreached(e.to_string()))?;
        let mut req = f
            .http
            .request(method, &url)
            .header(FORWARDED_BY.as_str(), app.cfg.id.as_str())
            .body(body);
        for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
            if let Some(v) = headers.get(&name) {
                req = req.header(name.as_str(), v.as_bytes());
            }
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                Hop::Unreached(describe(e))
            } else {
                Hop::Lost(describe(e))
            }
        })?;
        let status = resp.status().as_u16();
        let kept: Vec<(String, Vec<u8>)> = [
            header::CONTENT_TYPE,
            header::RETRY_AFTER,
            header::LOCATION,
            header::WWW_AUTHENTICATE,
        ]
        .iter()
        .filter_map(|n| {
            resp.headers()
                .get(n.as_str())
                .map(|v| (n.as_str().to_string(), v.as_bytes().to_vec()))
        })
        .collect();
        let body = read_limited(resp).await.map_err(Hop::Lost)?;
        Ok::<_, Hop>((status, kept, body))
    };
    let (status, kept, body) = match tokio::time::timeout(f.timeout, sent).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(Hop::Unreached(why))) => {
            return Err(unreachable(format!("could not be reached ({why})")));
        }
        Ok(Err(Hop::Lost(why))) => {
            return Err(unreachable(format!(
                "failed to answer ({why}): the request may have been carried out, list the team's instances before asking again"
            )));
        }
        Err(_) => {
            return Err(unreachable(format!(
                "did not answer within {} s (the request may have been carried out: list the team's instances before asking again)",
                f.timeout.as_secs()
            )));
        }
    };
    app.metrics.forwarded.inc();
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut resp = (status, body).into_response();
    for (name, value) in kept {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_bytes(&value)) {
            resp.headers_mut().insert(n, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&to.id) {
        resp.headers_mut().insert(SCHEDULER, v);
    }
    Ok(resp)
}

/// How a hop failed: before the scheduler got the request (no effect), or
/// after (it may have been carried out).
enum Hop {
    Unreached(String),
    Lost(String),
}

/// The error without the URL reqwest repeats (the message names it once).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        s = format!("{s}: {inner}");
        source = inner.source();
    }
    s
}

/// The scheduler's answer body, refused past [`MAX_BODY`] (its answers
/// are small JSON documents).
async fn read_limited(mut resp: reqwest::Response) -> Result<Bytes, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(describe)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!("answered more than {MAX_BODY} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.into())
}
