//! Error answers: every 4xx and 5xx body is an [`ErrorBody`], also the ones
//! axum makes itself (413, 405, 415, bad paths).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tidegate_plugin_host::MAX_COMPONENT_BYTES;

use super::MAX_BODY;
use super::bodies::{ErrorBody, PolicyDecision};
use crate::lifecycle::LifecycleError;
use crate::policy::{PolicyRefusal, RefusalKind};
use crate::{ChallengeError, SpawnError};

/// An error answer and what the API counts about it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    /// Boxed: an `ApiResult` stays small on the happy path.
    body: Box<ErrorBody>,
    headers: Vec<(header::HeaderName, HeaderValue)>,
    /// The etcd request behind it never reached a member (safe to retry).
    pub(super) never_sent: bool,
    /// Why a spawn or renewal was refused, for metrics and the dashboard.
    reason: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            body: Box::new(ErrorBody::new(error.into())),
            headers: Vec::new(),
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
        &self.body.error
    }

    /// Whether this is an answer with `status`.
    pub fn is_status(&self, status: StatusCode) -> bool {
        self.status == status
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.body.field = Some(field.into());
        self
    }

    /// The scheduler's URL, when a standby could not forward to it.
    pub(super) fn leader(mut self, url: String) -> Self {
        self.body.leader = Some(url);
        self
    }

    /// The policy that refused.
    pub(super) fn policy(mut self, decision: PolicyDecision) -> Self {
        self.body.policy = Some(decision);
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
        self.never_sent = tidegate_etcd::never_sent(e);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let reason = self.refusal();
        let mut body = self.body;
        body.reason = reason.map(str::to_string);
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

impl From<etcd_client::Error> for ApiError {
    fn from(e: etcd_client::Error) -> Self {
        Self::etcd(e)
    }
}

pub type ApiResult<T = Response> = Result<T, ApiError>;

// What each domain error answers.

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        let status = match &e {
            LifecycleError::NotFound(_) => StatusCode::NOT_FOUND,
            LifecycleError::MaxRenewals { .. }
            | LifecycleError::MaxLifetime { .. }
            | LifecycleError::TooEarly { .. }
            | LifecycleError::Conflict(_) => StatusCode::CONFLICT,
            LifecycleError::Fenced(_)
            | LifecycleError::Unsettled { .. }
            | LifecycleError::DeleteUnsettled { .. } => {
                return ApiError::unavailable(e.to_string());
            }
            LifecycleError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            LifecycleError::Etcd(inner) => {
                return ApiError::unavailable(e.to_string()).unsent_if(inner);
            }
        };
        let reason = match &e {
            LifecycleError::MaxRenewals { .. } => "max_renewals",
            LifecycleError::MaxLifetime { .. } => "max_lifetime",
            LifecycleError::TooEarly { .. } => "too_early",
            LifecycleError::Conflict(_) => "conflict",
            LifecycleError::NotFound(_) => "not_found",
            _ => "corrupt_record",
        };
        ApiError::new(status, e.to_string()).reason(reason)
    }
}

impl From<SpawnError> for ApiError {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::Etcd(ref inner) => ApiError::unavailable(e.to_string()).unsent_if(inner),
            SpawnError::TeamLimit { .. } => {
                ApiError::new(StatusCode::CONFLICT, e.to_string()).reason("team_limit")
            }
            SpawnError::Invalid { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            SpawnError::Fenced { .. } => ApiError::unavailable(e.to_string()).reason("fenced"),
            SpawnError::Contended => ApiError::unavailable(e.to_string()).reason("contended"),
            SpawnError::LeftQueue => {
                ApiError::new(StatusCode::NOT_FOUND, e.to_string()).reason("left_queue")
            }
            SpawnError::PortRange(_) => ApiError::unavailable(e.to_string()).reason("port_range"),
            SpawnError::PoolTaken => {
                ApiError::new(StatusCode::CONFLICT, e.to_string()).reason("pool_taken")
            }
            SpawnError::Guarded { .. } => ApiError::unavailable(e.to_string()).reason("guarded"),
        }
    }
}

impl From<PolicyRefusal> for ApiError {
    fn from(r: PolicyRefusal) -> Self {
        let policy = PolicyDecision {
            digest: r.digest.clone(),
            hook: r.hook.into(),
            decision: r.decision().into(),
            error: None,
        };
        let e = match r.kind {
            RefusalKind::Queue { retry_after_secs } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, r.message.clone()).header(
                    axum::http::header::RETRY_AFTER,
                    &retry_after_secs.to_string(),
                )
            }
            RefusalKind::Deny | RefusalKind::Refuse | RefusalKind::FallbackDeny => {
                ApiError::new(StatusCode::FORBIDDEN, r.message.clone())
            }
        };
        e.policy(policy).reason(r.reason())
    }
}

impl From<ChallengeError> for ApiError {
    fn from(e: ChallengeError) -> Self {
        match e {
            ChallengeError::RevisionMismatch { .. } => {
                ApiError::new(StatusCode::PRECONDITION_FAILED, e.to_string())
            }
            ChallengeError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            ChallengeError::Corrupt { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            ChallengeError::Etcd(e) => ApiError::etcd(e),
        }
    }
}

impl From<crate::rollout::RolloutError> for ApiError {
    fn from(e: crate::rollout::RolloutError) -> Self {
        use crate::rollout::RolloutError as R;
        match e {
            R::NoChallenge(_) | R::NoRollout(_) => {
                ApiError::new(StatusCode::NOT_FOUND, e.to_string())
            }
            R::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()),
            R::Conflict(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            R::Corrupt { .. } => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            R::Etcd(e) => ApiError::etcd(e),
        }
    }
}

/// Makes a non-JSON error answer (axum's own: 413, 405, 415, bad paths)
/// an [`ErrorBody`], keeping its status and headers.
pub(super) async fn json_errors(resp: Response) -> Response {
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
