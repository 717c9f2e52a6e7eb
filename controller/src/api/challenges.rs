//! `/v1/challenges`: organizers' challenge specs, written put-if-revision.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use etcd_client::GetOptions;
use tidegate_schema::{ChallengeName, ChallengeRecord, ChallengeSpec, Kind, Record, decode_json};

use super::bodies::{Challenge, ChallengeList, ChallengeWritten, ErrorBody, StoredError};
use super::{ApiError, ApiResult, AppState, Scope, etcd, json_response};

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

fn challenge(rec: ChallengeRecord, revision: i64) -> Challenge {
    Challenge {
        name: rec.name,
        revision,
        spec: rec.spec,
        policy: rec.policy,
    }
}

pub(super) fn with_etag(mut resp: Response, revision: i64) -> Response {
    if let Ok(v) = format!("\"{revision}\"").parse() {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

/// Creates or replaces a challenge.
#[utoipa::path(
    put, path = "/v1/challenges/{name}", tag = "challenges", operation_id = "put_challenge",
    params(
        ("name" = String, Path, description = "the challenge's name (a DNS label)"),
        ("If-Match" = Option<String>, Header, description = "its revision in quotes; \"0\": create only"),
    ),
    request_body = ChallengeSpec,
    security(("admin" = [])),
    responses(
        (status = 200, description = "replaced", body = ChallengeWritten, headers(("ETag" = String, description = "the new revision"))),
        (status = 201, description = "created", body = ChallengeWritten, headers(("ETag" = String, description = "the new revision"))),
        (status = 400, description = "an invalid spec, naming the field", body = ErrorBody),
        (status = 403, description = "this needs the admin token", body = ErrorBody),
        (status = 412, description = "the challenge is at another revision", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
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
    let spec: ChallengeSpec = decode_json(&body).map_err(ApiError::bad_request)?;
    let (revision, created) =
        etcd(&app, || app.challenges.put(&name, spec.clone(), expected)).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let warnings = app
        .view
        .lock()
        .too_large(tidegate_schema::Resources::of_spec(&spec))
        .map(|short| {
            format!("no registered worker could run an instance of this challenge ({short} on the largest); spawns are refused with 409 until a worker gives more (allocatable_*) or the limits are lowered")
        })
        .into_iter()
        .collect();
    let body = ChallengeWritten {
        name,
        revision,
        created,
        // As stored: secret_env values are not echoed.
        spec: spec.without_secret_values().0,
        warnings,
    };
    Ok(with_etag(json_response(status, body), revision))
}

/// One challenge; its ETag is its revision.
#[utoipa::path(
    get, path = "/v1/challenges/{name}", tag = "challenges", operation_id = "get_challenge",
    params(("name" = String, Path, description = "the challenge's name")),
    responses(
        (status = 200, description = "the challenge", body = Challenge, headers(("ETag" = String, description = "its revision"))),
        (status = 400, description = "not a challenge name", body = ErrorBody),
        (status = 404, description = "no such challenge", body = ErrorBody),
    )
)]
pub(super) async fn get(
    State(app): AppState,
    _scope: Scope,
    Path(name): Path<String>,
) -> ApiResult {
    let name = parse_name(&name)?;
    let stored = etcd(&app, || app.challenges.get(&name)).await?;
    let revision = stored.revision;
    Ok(with_etag(
        json_response(StatusCode::OK, challenge(stored.value, revision)),
        revision,
    ))
}

/// Deletes a challenge (its live instances live on until they expire).
#[utoipa::path(
    delete, path = "/v1/challenges/{name}", tag = "challenges", operation_id = "delete_challenge",
    params(
        ("name" = String, Path, description = "the challenge's name"),
        ("If-Match" = Option<String>, Header, description = "its revision in quotes"),
    ),
    security(("admin" = [])),
    responses(
        (status = 204, description = "deleted"),
        (status = 403, description = "this needs the admin token", body = ErrorBody),
        (status = 404, description = "no such challenge", body = ErrorBody),
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
    etcd(&app, || app.challenges.delete(&name, expected)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Every stored challenge; a malformed one is listed under `errors`, not hidden.
#[utoipa::path(
    get, path = "/v1/challenges", tag = "challenges", operation_id = "list_challenges",
    responses((status = 200, description = "every challenge, and the stored values that are not one", body = ChallengeList))
)]
pub(super) async fn list(State(app): AppState, _scope: Scope) -> ApiResult {
    let (records, errors) = load_all(&app).await?;
    let challenges = records
        .into_iter()
        .map(|(rec, revision)| challenge(rec, revision))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        ChallengeList { challenges, errors },
    ))
}

/// Every challenge with its revision, and the keys that do not decode.
pub(super) async fn load_all(
    app: &crate::App,
) -> ApiResult<(Vec<(ChallengeRecord, i64)>, Vec<StoredError>)> {
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
            Err(e) => errors.push(StoredError {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                error: e.to_string(),
            }),
        }
    }
    Ok((items, errors))
}
