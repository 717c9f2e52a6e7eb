//! The REST API under `/v1`: router, bearer scopes, JSON errors, helpers.
//! Handlers live in `api/`.

mod challenges;
mod cluster;
mod dashboard;
mod instances;
pub mod openapi;
mod policies;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use tidegate_plugin_host::MAX_COMPONENT_BYTES;

use crate::App;

/// Bodies larger than this are refused with 413.
pub const MAX_BODY: usize = 1024 * 1024;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The API's routes.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi::document))
        .route("/v1/status", get(cluster::status))
        .route("/v1/workers", get(cluster::workers))
        .route("/v1/challenges", get(challenges::list))
        .route(
            "/v1/challenges/{name}",
            get(challenges::get)
                .put(challenges::put)
                .delete(challenges::delete),
        )
        .route(
            "/v1/challenges/{name}/policy",
            get(policies::get)
                .put(policies::put)
                .delete(policies::delete)
                // Components up to 10 MiB; a bit more is read so that an
                // oversized one gets a 400 saying so.
                .layer(DefaultBodyLimit::max(2 * MAX_COMPONENT_BYTES)),
        )
        .route("/v1/instances", post(instances::spawn).get(instances::list))
        .route(
            "/v1/instances/{id}",
            get(instances::get).delete(instances::delete),
        )
        .route("/v1/instances/{id}/renew", post(instances::renew))
        .route("/v1/instances/{id}/flag", post(instances::flag))
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard::page))
        .route("/v1/dashboard", get(dashboard::data))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint; see GET /v1/openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(json_errors))
        .with_state(app)
}

/// Every 4xx/5xx body is JSON `{"error", "field"?}`, also the ones axum
/// makes itself (413, 405, 415, bad paths).
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_string();
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_lowercase();
    }
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        message = format!(
            "request body is too large: at most {MAX_BODY} bytes ({MAX_COMPONENT_BYTES} for a policy plugin)"
        );
    }
    let mut resp = ApiError::new(status, message).into_response();
    for (k, v) in parts
        .headers
        .iter()
        .filter(|(k, _)| *k != header::CONTENT_TYPE && *k != header::CONTENT_LENGTH)
    {
        resp.headers_mut().insert(k.clone(), v.clone());
    }
    resp
}

/// An error answer: `{"error": ..., "field"?: ..., "leader"?: ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<String>,
    headers: Vec<(header::HeaderName, HeaderValue)>,
    extra: Option<Box<serde_json::Map<String, serde_json::Value>>>,
    /// The etcd request behind it never reached a member (safe to retry).
    never_sent: bool,
    /// Why a spawn or renewal was refused, for metrics and the dashboard.
    reason: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            field: None,
            headers: Vec::new(),
            extra: None,
            never_sent: false,
            reason: None,
        }
    }

    /// Labels a refusal (`tidegate_controller_refusals_total{reason}`).
    pub fn reason(mut self, reason: &'static str) -> Self {
        self.reason = Some(reason);
        self
    }

    /// The refusal label: the one given, or `unavailable` for any 503.
    pub fn refusal(&self) -> Option<&'static str> {
        self.reason
            .or((self.status == StatusCode::SERVICE_UNAVAILABLE).then_some("unavailable"))
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn message(&self) -> &str {
        &self.error
    }

    /// Whether this is an answer with `status`.
    pub fn is_status(&self, status: StatusCode) -> bool {
        self.status == status
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// An extra member of the JSON body (e.g. `"policy": {...}`).
    pub fn with(mut self, key: &str, value: serde_json::Value) -> Self {
        self.extra
            .get_or_insert_default()
            .insert(key.to_string(), value);
        self
    }

    pub(crate) fn header(mut self, name: header::HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }

    pub fn bad_request(e: tidegate_schema::FieldError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.to_string()).field(e.field)
    }

    pub fn unavailable(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, reason).header(header::RETRY_AFTER, "1")
    }

    pub fn etcd(e: etcd_client::Error) -> Self {
        Self::unavailable(format!("etcd is unreachable or has no quorum: {e}")).unsent_if(&e)
    }

    /// A 503 for a failed etcd request, marked retryable when `e` says the
    /// request never reached a member.
    pub fn unsent_if(mut self, e: &etcd_client::Error) -> Self {
        self.never_sent = tidegate_schema::endpoints::never_sent(e);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.error });
        if let Some(f) = self.field {
            body["field"] = json!(f);
        }
        for (k, v) in self.extra.into_iter().flat_map(|m| *m) {
            body[k] = v;
        }
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

pub type ApiResult<T = Response> = Result<T, ApiError>;

/// Runs an etcd call with the configured timeout; no quorum means 503, not a hang.
pub async fn etcd<T, E: Into<ApiError>, F: Future<Output = Result<T, E>>>(
    app: &App,
    mut op: impl FnMut() -> F,
) -> ApiResult<T> {
    let limit = Duration::from_millis(app.cfg.etcd_timeout_ms);
    let attempts = async {
        // A request that never reached a member (it was balanced onto one
        // that is down) had no effect: try again on another one at once.
        let mut pause = Duration::from_millis(10);
        loop {
            match op().await.map_err(Into::into) {
                Err(e) if e.never_sent => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    };
    match tokio::time::timeout(limit, attempts).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::unavailable(format!(
            "etcd did not answer within {} ms: is a quorum of its members up?",
            app.cfg.etcd_timeout_ms
        ))),
    }
}

impl From<etcd_client::Error> for ApiError {
    fn from(e: etcd_client::Error) -> Self {
        Self::etcd(e)
    }
}

/// Which token the caller presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Admin,
    Platform,
}

impl FromRequestParts<Arc<App>> for Scope {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing `Authorization: Bearer <token>`",
                )
                .header(header::WWW_AUTHENTICATE, "Bearer")
            })?;
        if crate::flag::matches(&app.cfg.admin_token, token) {
            Ok(Scope::Admin)
        } else if crate::flag::matches(&app.cfg.platform_token, token) {
            Ok(Scope::Platform)
        } else {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "unknown token")
                .header(header::WWW_AUTHENTICATE, "Bearer"))
        }
    }
}

impl Scope {
    pub fn require_admin(self) -> ApiResult<()> {
        match self {
            Scope::Admin => Ok(()),
            Scope::Platform => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this needs the admin token",
            )),
        }
    }
}

/// The leader's token and key when this replica leads; otherwise a 307 to
/// the leader (same path) or a 503 when nobody leads.
pub async fn leading(app: &App, path: &str) -> ApiResult<Arc<crate::scheduler::LeaderInfo>> {
    if let Some(l) = app.leader.load_full() {
        return Ok(l);
    }
    match etcd(app, || cluster::current_leader(app)).await? {
        Some(c) => {
            let e = ApiError::new(
                StatusCode::TEMPORARY_REDIRECT,
                format!(
                    "this replica is a standby; the scheduler is {} at {}",
                    c.id, c.url
                ),
            )
            .header(
                header::LOCATION,
                &format!("{}{path}", c.url.trim_end_matches('/')),
            );
            Err(e.with("leader", json!(c.url)))
        }
        None => Err(ApiError::unavailable(
            "no scheduler is elected yet; retry shortly",
        )),
    }
}

/// `GET /metrics`: Prometheus text, no token (like the agents' metrics;
/// expose the API only where Prometheus, organizers and the platform are).
async fn metrics(State(app): AppState) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&app),
    )
        .into_response()
}

/// A JSON answer with a status.
pub fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

pub(crate) type AppState = State<Arc<App>>;
