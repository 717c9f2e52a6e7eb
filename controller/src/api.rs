//! The REST API under `/v1`: the routes (each handler in `api/`, documented
//! by its `#[utoipa::path]`), bearer scopes, the etcd call wrapper, and the
//! leader check. Handlers only map outcomes to HTTP: decisions are in
//! `policy`, placement in `view`, writes in `spawn` and `lifecycle`.

mod bodies;
mod challenges;
mod cluster;
mod dashboard;
mod error;
mod flags;
mod forward;
mod instances;
mod openapi;
mod policies;
mod pool;
mod queue;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tidegate_plugin_host::MAX_COMPONENT_BYTES;
use tidegate_schema::ChallengeName;
use utoipa::OpenApi as _;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

pub use error::{ApiError, ApiResult};
pub use forward::Forwarder;
pub use pool::run_pools;
pub use queue::run_admissions;

use crate::App;

/// Bodies larger than this are refused with 413.
pub const MAX_BODY: usize = 1024 * 1024;

/// Routes served but left out of the OpenAPI document: they are not JSON
/// API endpoints (Prometheus text, the dashboard's HTML page).
pub const UNDOCUMENTED: &[(&str, &str)] = &[("/metrics", "GET"), ("/dashboard", "GET")];

/// Every documented route: the one list both the router and the OpenAPI
/// document are made from.
fn documented() -> OpenApiRouter<Arc<App>> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(openapi::document))
        .routes(routes!(cluster::status))
        .routes(routes!(cluster::workers))
        .routes(routes!(challenges::list))
        .routes(routes!(
            challenges::get,
            challenges::put,
            challenges::delete
        ))
        .routes(routes!(challenges::rollout_get, challenges::rollout_start))
        .routes(routes!(challenges::rollout_ask))
        .routes(
            routes!(policies::get, policies::put, policies::delete)
                // Components up to 10 MiB; a bit more is read so that an
                // oversized one gets a 400 saying so.
                .layer(DefaultBodyLimit::max(2 * MAX_COMPONENT_BYTES)),
        )
        .routes(routes!(instances::spawn, instances::list))
        .routes(routes!(instances::get, instances::delete))
        .routes(routes!(instances::renew))
        .routes(routes!(instances::flag))
        .routes(routes!(flags::check))
        .routes(routes!(queue::list))
        .routes(routes!(pool::list))
        .routes(routes!(dashboard::data))
}

/// The OpenAPI document of every documented route (`GET /v1/openapi.json`).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let mut doc = documented().into_openapi();
    openapi::add_common_responses(&mut doc);
    doc
}

/// Every route, the fallback and the layers, before the state is given.
fn routes() -> Router<Arc<App>> {
    let (router, _) = documented().split_for_parts();
    router
        .route("/metrics", get(metrics))
        .route("/dashboard", get(dashboard::page))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint; see GET /v1/openapi.json",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(error::json_errors))
}

/// The API's routes.
pub fn router(app: Arc<App>) -> Router {
    routes().with_state(app)
}

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

/// Who makes scheduling writes (spawns, renewals) for a challenge.
#[derive(Debug)]
pub enum Scheduler {
    /// This replica: it leads the challenge's shard (key and token).
    Here(Arc<crate::scheduler::LeaderInfo>),
    /// Another replica, which leads it: the request is forwarded there
    /// (`forward`).
    There(crate::election::Candidate),
}

/// How long a request waits for its shard to have a leader (a shard being
/// handed over between controllers is led again within a poll).
const SHARD_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// This replica's lead of `challenge`'s shard, or the replica that leads
/// it; a 503 naming the shard when nobody does for [`SHARD_WAIT`].
pub async fn scheduler(app: &App, challenge: &ChallengeName) -> ApiResult<Scheduler> {
    let shard = app.shards.of(challenge.as_str());
    let until = std::time::Instant::now() + SHARD_WAIT;
    loop {
        if let Some(l) = app.shards.lead(shard) {
            return Ok(Scheduler::Here(l));
        }
        // Who led it at the last poll: not this replica, which may have
        // just handed it over (its key outlives its lead by up to a poll).
        if let Some((m, _)) = app.shards.seen().leaders.get(&shard)
            && m.id != app.cfg.id
        {
            return Ok(Scheduler::There(crate::election::Candidate {
                id: m.id.clone(),
                url: m.url.clone(),
            }));
        }
        if std::time::Instant::now() >= until {
            return Err(ApiError::unavailable(format!(
                "shard {shard} (challenge {:?}) has no scheduler right now: none is elected yet, or it is moving between controllers; retry shortly",
                challenge.as_str()
            ))
            .reason("no_scheduler"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub(crate) use forward::forward;

/// `GET /metrics`: Prometheus text, no token (like the agents' metrics;
/// expose the API only where Prometheus, organizers and the platform are).
async fn metrics(State(app): AppState) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        app.render_metrics(),
    )
        .into_response()
}

/// A JSON answer with a status.
pub(crate) fn json_response(status: StatusCode, body: impl serde::Serialize) -> Response {
    (status, axum::Json(body)).into_response()
}

pub(crate) type AppState = State<Arc<App>>;

#[cfg(test)]
mod tests;
