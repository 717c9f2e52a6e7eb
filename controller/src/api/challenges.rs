//! `/v1/challenges`: organizers' challenge specs, written put-if-revision.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use etcd_client::GetOptions;
use serde_json::json;
use tidegate_schema::{ChallengeName, ChallengeRecord, ChallengeSpec, Kind, Record, decode_json};

use super::{ApiError, ApiResult, AppState, Scope, etcd, json_response};
use crate::ChallengeError;

pub(super) fn parse_name(name: &str) -> ApiResult<ChallengeName> {
    ChallengeName::parse(name)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).field("name"))
}

/// `If-Match: "123"` (or `123`); `"0"` means "create only".
pub(super) fn if_match(headers: &HeaderMap) -> ApiResult<Option<i64>> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .map(|s| s.trim().trim_start_matches("W/").trim_matches('"'))
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|r| *r >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "If-Match must be a revision in quotes, e.g. \"42\"",
            )
            .field("If-Match")
        })
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

fn challenge_json(rec: &ChallengeRecord, revision: i64) -> serde_json::Value {
    json!({
        "name": rec.name,
        "revision": revision,
        "spec": rec.spec,
        "policy": rec.policy,
    })
}

pub(super) fn with_etag(mut resp: Response, revision: i64) -> Response {
    if let Ok(v) = format!("\"{revision}\"").parse() {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

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
    let spec: ChallengeSpec = decode_json(&body).map_err(ApiError::bad_request)?;
    let (revision, created) =
        etcd(&app, || app.challenges.put(&name, spec.clone(), expected)).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let body = json!({ "name": name, "revision": revision, "created": created, "spec": spec });
    Ok(with_etag(json_response(status, body), revision))
}

pub(super) async fn get(
    State(app): AppState,
    _scope: Scope,
    Path(name): Path<String>,
) -> ApiResult {
    let name = parse_name(&name)?;
    let stored = etcd(&app, || app.challenges.get(&name)).await?;
    Ok(with_etag(
        json_response(
            StatusCode::OK,
            challenge_json(&stored.value, stored.revision),
        ),
        stored.revision,
    ))
}

pub(super) async fn delete(
    State(app): AppState,
    scope: Scope,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    scope.require_admin()?;
    let name = parse_name(&name)?;
    let expected = if_match(&headers)?;
    etcd(&app, || app.challenges.delete(&name, expected)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Every stored challenge; a malformed one is listed under `errors`, not hidden.
pub(super) async fn list(State(app): AppState, _scope: Scope) -> ApiResult {
    let (records, errors) = load_all(&app).await?;
    let items: Vec<_> = records
        .iter()
        .map(|(rec, revision)| challenge_json(rec, *revision))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({ "challenges": items, "errors": errors }),
    ))
}

/// Every challenge with its revision, and the keys that do not decode.
pub(super) async fn load_all(
    app: &crate::App,
) -> ApiResult<(Vec<(ChallengeRecord, i64)>, Vec<serde_json::Value>)> {
    let prefix = app.ks.prefix(Kind::Challenges);
    let resp = etcd(app, || {
        let mut client = app.client.clone();
        let prefix = prefix.clone();
        async move {
            client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
        }
    })
    .await?;
    let mut items = Vec::new();
    let mut errors = Vec::new();
    for kv in resp.kvs() {
        match ChallengeRecord::decode(kv.value()) {
            Ok(rec) => items.push((rec, kv.mod_revision())),
            Err(e) => errors.push(json!({
                "key": String::from_utf8_lossy(kv.key()),
                "error": e.to_string(),
            })),
        }
    }
    Ok((items, errors))
}
