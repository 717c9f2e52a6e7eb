//! `/v1/challenges/{name}/policy`: upload, show and remove a challenge's
//! policy plugin (admin scope).
//!
//! Upload = validate the bytes (WebAssembly, a component, the policy
//! world), compile, dry-run `admit-spawn` on a sample request, store the
//! blob by digest in the artifact store, then point the challenge at the
//! digest with put-if-revision. Any failure before the last step changes
//! nothing.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use tidegate_plugin_host::MAX_COMPONENT_BYTES;
use tidegate_schema::{ChallengeRecord, PolicyRef};

use super::bodies::{ErrorBody, Policy};
use super::challenges::{if_match, parse_name, with_etag};
use super::{ApiError, ApiResult, AppState, Scope, etcd, json_response};
use crate::policy::UploadError;

fn policy_body(rec: &ChallengeRecord, policy: &PolicyRef, revision: i64) -> Policy {
    Policy {
        challenge: rec.name.clone(),
        digest: policy.digest.clone(),
        hooks: policy.hooks.clone(),
        size: policy.size,
        uploaded_at: policy.uploaded_at,
        fallback: rec.spec.policy_fallback,
        revision,
    }
}

fn no_policy(name: &tidegate_schema::ChallengeName) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("challenge {:?} has no policy", name.as_str()),
    )
}

/// Uploads a WebAssembly component (world `tidegate:policy/policy@0.1.0`,
/// at most 10 MiB) as the challenge's policy: checked, dry-run
/// (`admit-spawn`), stored by sha256, then pointed at.
#[utoipa::path(
    put, path = "/v1/challenges/{name}/policy", tag = "policies", operation_id = "put_policy",
    params(
        ("name" = String, Path, description = "the challenge's name"),
        ("If-Match" = Option<String>, Header, description = "the challenge's revision in quotes"),
    ),
    request_body(description = "the component", content_type = "application/wasm", content = Vec<u8>),
    security(("admin" = [])),
    responses(
        (status = 200, description = "the policy in force", body = Policy, headers(("ETag" = String, description = "the challenge's new revision"))),
        (status = 400, description = "not wasm, a core module, another world, a missing export, too big, or the dry run trapped", body = ErrorBody),
        (status = 403, description = "this needs the admin token", body = ErrorBody),
        (status = 404, description = "no such challenge", body = ErrorBody),
        (status = 412, description = "the challenge is at another revision", body = ErrorBody),
    )
)]
pub(super) async fn put(
    State(app): AppState,
    scope: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    scope.require_admin()?;
    let name = parse_name(&name)?;
    let expected = if_match(&headers)?;
    // The challenge must exist before anything is compiled or stored.
    let stored = etcd(&app, || app.challenges.get(&name)).await?;
    if let Some(e) = expected.filter(|e| *e != stored.revision) {
        return Err(ApiError::new(
            StatusCode::PRECONDITION_FAILED,
            format!(
                "challenge {:?} is at revision {}, not {e} (If-Match)",
                name.as_str(),
                stored.revision
            ),
        ));
    }
    if body.len() > MAX_COMPONENT_BYTES {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the plugin is {} bytes; at most {MAX_COMPONENT_BYTES} are accepted",
                body.len()
            ),
        )
        .field("body"));
    }
    let policies = app.policies.clone();
    let challenge = name.to_string();
    let size = body.len() as u64;
    let plugin = tokio::task::spawn_blocking(move || policies.upload(&challenge, &body))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| match e {
            UploadError::Store(m) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the artifact store refused the plugin: {m}"),
            ),
            e => ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).field("body"),
        })?;
    let policy = PolicyRef {
        digest: plugin.digest().to_string(),
        hooks: plugin.hook_names().iter().map(|h| h.to_string()).collect(),
        size,
        uploaded_at: tidegate_schema::time::unix_secs(),
    };
    let (revision, previous) = etcd(&app, || {
        app.challenges
            .set_policy(&name, Some(policy.clone()), Some(stored.revision))
    })
    .await?;
    tracing::info!(challenge = %name, digest = %policy.digest, hooks = ?policy.hooks,
        previous = previous.as_ref().map(|p| p.digest.as_str()), "policy uploaded");
    let mut rec = stored.value;
    rec.policy = Some(policy.clone());
    Ok(with_etag(
        json_response(StatusCode::OK, policy_body(&rec, &policy, revision)),
        revision,
    ))
}

/// The challenge's policy plugin: digest, hooks, size, fallback.
#[utoipa::path(
    get, path = "/v1/challenges/{name}/policy", tag = "policies", operation_id = "get_policy",
    params(("name" = String, Path, description = "the challenge's name")),
    responses(
        (status = 200, description = "the policy in force", body = Policy, headers(("ETag" = String, description = "the challenge's revision"))),
        (status = 404, description = "no such challenge, or no policy", body = ErrorBody),
    )
)]
pub(super) async fn get(
    State(app): AppState,
    _scope: Scope,
    Path(name): Path<String>,
) -> ApiResult {
    let name = parse_name(&name)?;
    let stored = etcd(&app, || app.challenges.get(&name)).await?;
    let Some(policy) = &stored.value.policy else {
        return Err(no_policy(&name));
    };
    Ok(with_etag(
        json_response(
            StatusCode::OK,
            policy_body(&stored.value, policy, stored.revision),
        ),
        stored.revision,
    ))
}

/// Removes the challenge's policy.
#[utoipa::path(
    delete, path = "/v1/challenges/{name}/policy", tag = "policies", operation_id = "delete_policy",
    params(
        ("name" = String, Path, description = "the challenge's name"),
        ("If-Match" = Option<String>, Header, description = "the challenge's revision in quotes"),
    ),
    security(("admin" = [])),
    responses(
        (status = 204, description = "removed", headers(("ETag" = String, description = "the challenge's new revision"))),
        (status = 403, description = "this needs the admin token", body = ErrorBody),
        (status = 404, description = "no such challenge, or no policy", body = ErrorBody),
        (status = 412, description = "the challenge is at another revision", body = ErrorBody),
    )
)]
pub(super) async fn delete(
    State(app): AppState,
    scope: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    scope.require_admin()?;
    let name = parse_name(&name)?;
    let expected = if_match(&headers)?;
    let stored = etcd(&app, || app.challenges.get(&name)).await?;
    if stored.value.policy.is_none() {
        return Err(no_policy(&name));
    }
    let (revision, previous) = etcd(&app, || {
        app.challenges
            .set_policy(&name, None, Some(expected.unwrap_or(stored.revision)))
    })
    .await?;
    tracing::info!(challenge = %name, previous = previous.as_ref().map(|p| p.digest.as_str()),
        "policy removed");
    Ok(with_etag(StatusCode::NO_CONTENT.into_response(), revision))
}
