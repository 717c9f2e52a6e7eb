//! `/v1/challenges`: organizers' challenge specs, written put-if-revision.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use etcd_client::GetOptions;
use tidegate_schema::{ChallengeName, ChallengeRecord, ChallengeSpec, Kind, Record, decode_json};

use super::bodies::{
    Challenge, ChallengeList, ChallengeWritten, ErrorBody, Rollout, RolloutQuery, RolloutRequest,
    StoredError,
};
use super::{ApiError, ApiResult, AppState, Scope, etcd, json_response};
use crate::rollout::{self, Ask};

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
        RolloutQuery,
    ),
    request_body = ChallengeSpec,
    security(("admin" = [])),
    responses(
        (status = 200, description = "replaced", body = ChallengeWritten, headers(("ETag" = String, description = "the new revision"))),
        (status = 201, description = "created", body = ChallengeWritten, headers(("ETag" = String, description = "the new revision"))),
        (status = 400, description = "an invalid spec, naming the field; a rollout that would change the ports", body = ErrorBody),
        (status = 403, description = "this needs the admin token", body = ErrorBody),
        (status = 404, description = "`?rollout` of a challenge that does not exist", body = ErrorBody),
        (status = 409, description = "`?rollout` while another rollout of it is active (nothing written)", body = ErrorBody),
        (status = 412, description = "the challenge is at another revision", body = ErrorBody),
        (status = 413, description = "the body is over 1 MiB", body = ErrorBody),
    )
)]
pub(super) async fn put(
    State(app): AppState,
    scope: Scope,
    Path(name): Path<String>,
    Query(q): Query<RolloutQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    scope.require_admin()?;
    let name = parse_name(&name)?;
    let mut expected = if_match(&headers)?;
    let spec: ChallengeSpec = decode_json(&body).map_err(ApiError::bad_request)?;
    let steps = rollout_steps(q.rollout.as_deref(), q.canary, q.batch)?;
    // A rollout is checked before anything is written: the spec it
    // replaces, its ports, no other rollout active.
    let from = match steps {
        None => None,
        Some(_) => {
            let current = etcd(&app, || app.challenges.get(&name)).await?;
            if expected.is_some_and(|e| e != current.revision) {
                return Err(crate::challenges::ChallengeError::RevisionMismatch {
                    name: name.to_string(),
                    expected: expected.unwrap_or_default(),
                    current: current.revision,
                }
                .into());
            }
            rollout::check_specs(&current.value.spec, &spec)
                .map_err(|(field, e)| ApiError::new(StatusCode::BAD_REQUEST, e).field(field))?;
            refuse_if_active(&app, &name).await?;
            expected = Some(current.revision);
            Some((current.revision, current.value.spec))
        }
    };
    let (revision, created) =
        etcd(&app, || app.challenges.put(&name, spec.clone(), expected)).await?;
    let rollout = match (from, steps) {
        (Some((from, from_spec)), Some(steps)) => {
            let now = tidegate_schema::time::unix_secs();
            let specs = (from_spec, spec.clone());
            let started = etcd(&app, || {
                rollout::start(
                    &app.client,
                    &app.ks,
                    &name,
                    (from, revision),
                    specs.clone(),
                    steps,
                    now,
                )
            })
            .await
            .map_err(|e| {
                ApiError::unavailable(format!(
                    "the spec is written at revision {revision}, but its rollout did not start: {}; POST /v1/challenges/{name}/rollout to start it",
                    e.message()
                ))
            })?;
            Some(rollout_body(&app, started))
        }
        _ => None,
    };
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
        rollout,
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

/// The canary and batch sizes of `?rollout=` (None: no rollout asked).
fn rollout_steps(
    strategy: Option<&str>,
    canary: Option<u32>,
    batch: Option<u32>,
) -> ApiResult<Option<(u32, u32)>> {
    match strategy {
        None if canary.is_some() || batch.is_some() => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "canary and batch go with rollout=gated",
        )
        .field("rollout")),
        None => Ok(None),
        Some("gated") => {
            let max = tidegate_schema::RolloutRecord::MAX_STEP;
            let check = |field: &'static str, v: Option<u32>, default: u32| {
                let v = v.unwrap_or(default);
                if (1..=max).contains(&v) {
                    Ok(v)
                } else {
                    Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("{field} must be 1 to {max}, not {v}"),
                    )
                    .field(field))
                }
            };
            Ok(Some((
                check("canary", canary, rollout::DEFAULT_CANARY)?,
                check("batch", batch, rollout::DEFAULT_BATCH)?,
            )))
        }
        Some(other) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{other:?} is not a rollout strategy: the one there is is \"gated\""),
        )
        .field("rollout")),
    }
}

async fn refuse_if_active(app: &crate::App, name: &ChallengeName) -> ApiResult<()> {
    let existing = etcd(app, || rollout::get(&app.client, &app.ks, name)).await?;
    match existing.filter(|s| s.record.phase.active()) {
        Some(s) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "a rollout of {name} to revision {} is {} (abort it or let it finish first); nothing was written",
                s.record.to_revision,
                rollout::phase_name(s.record.phase)
            ),
        )),
        None => Ok(()),
    }
}

fn rollout_body(app: &crate::App, stored: rollout::Stored) -> Rollout {
    let r = stored.record;
    let (live, running_new) = {
        let view = app.view.lock();
        let mine: Vec<_> = view
            .instances
            .values()
            .filter(|i| i.record.challenge == r.challenge)
            .map(|i| i.record.id.clone())
            .collect();
        let new = mine
            .iter()
            .filter(|id| {
                matches!(
                    view.status_of(id),
                    Some(tidegate_schema::InstanceStatus::Running)
                ) && view.running_revision(id) == r.to_revision
            })
            .count();
        (mine.len(), new)
    };
    Rollout {
        challenge: r.challenge,
        from_revision: r.from_revision,
        to_revision: r.to_revision,
        canary: r.canary,
        batch: r.batch,
        phase: r.phase,
        paused: r.paused,
        continued: r.continued,
        abort: r.abort,
        canaries: r.canaries,
        replaced: r.replaced,
        skipped: r.skipped,
        restored_revision: r.restored_revision,
        detail: r.detail,
        started_at: r.started_at,
        updated_at: r.updated_at,
        live,
        running_new,
        revision: stored.revision,
    }
}

/// The challenge's rollout (the last one, finished or not).
#[utoipa::path(
    get, path = "/v1/challenges/{name}/rollout", tag = "challenges", operation_id = "get_rollout",
    params(("name" = String, Path, description = "the challenge's name")),
    responses(
        (status = 200, description = "the rollout", body = Rollout),
        (status = 404, description = "no rollout of this challenge", body = ErrorBody),
    )
)]
pub(super) async fn rollout_get(
    State(app): AppState,
    _scope: Scope,
    Path(name): Path<String>,
) -> ApiResult {
    let name = parse_name(&name)?;
    let stored = etcd(&app, || rollout::get(&app.client, &app.ks, &name))
        .await?
        .ok_or_else(|| ApiError::from(rollout::RolloutError::NoRollout(name.to_string())))?;
    Ok(json_response(StatusCode::OK, rollout_body(&app, stored)))
}

/// Rolls the challenge's current spec out to its live instances (from the
/// spec written before it).
#[utoipa::path(
    post, path = "/v1/challenges/{name}/rollout", tag = "challenges", operation_id = "start_rollout",
    params(("name" = String, Path, description = "the challenge's name")),
    request_body = RolloutRequest,
    security(("admin" = [])),
    responses(
        (status = 201, description = "started", body = Rollout),
        (status = 400, description = "a bad strategy or size; the ports changed; no earlier spec", body = ErrorBody),
        (status = 403, description = "this needs the admin token", body = ErrorBody),
        (status = 404, description = "no such challenge", body = ErrorBody),
        (status = 409, description = "another rollout of it is active", body = ErrorBody),
    )
)]
pub(super) async fn rollout_start(
    State(app): AppState,
    scope: Scope,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    scope.require_admin()?;
    let name = parse_name(&name)?;
    let req: RolloutRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RolloutRequest::default()
    } else {
        decode_json(&body).map_err(ApiError::bad_request)?
    };
    let steps = rollout_steps(
        Some(req.strategy.as_deref().unwrap_or("gated")),
        req.canary,
        req.batch,
    )?
    .unwrap_or((rollout::DEFAULT_CANARY, rollout::DEFAULT_BATCH));
    let current = etcd(&app, || app.challenges.get(&name)).await?;
    let (to_spec, from) = etcd(&app, || {
        rollout::spec_at(&app.client, &app.ks, &name, current.revision)
    })
    .await?;
    if from == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("challenge {name} has had one spec only: there is nothing to roll out"),
        ));
    }
    let (from_spec, _) = etcd(&app, || rollout::spec_at(&app.client, &app.ks, &name, from)).await?;
    rollout::check_specs(&from_spec, &to_spec)
        .map_err(|(field, e)| ApiError::new(StatusCode::BAD_REQUEST, e).field(field))?;
    let now = tidegate_schema::time::unix_secs();
    let started = etcd(&app, || {
        rollout::start(
            &app.client,
            &app.ks,
            &name,
            (from, current.revision),
            (from_spec.clone(), to_spec.clone()),
            steps,
            now,
        )
    })
    .await?;
    Ok(json_response(
        StatusCode::CREATED,
        rollout_body(&app, started),
    ))
}

/// An organizer's ask: `continue` (open the gate), `pause`, `resume` or
/// `abort` (the old spec back, the replaced instances onto it).
#[utoipa::path(
    post, path = "/v1/challenges/{name}/rollout/{action}", tag = "challenges", operation_id = "ask_rollout",
    params(
        ("name" = String, Path, description = "the challenge's name"),
        ("action" = String, Path, description = "continue, pause, resume or abort"),
    ),
    security(("admin" = [])),
    responses(
        (status = 200, description = "asked; the scheduler acts within a second", body = Rollout),
        (status = 400, description = "not one of the four actions", body = ErrorBody),
        (status = 403, description = "this needs the admin token", body = ErrorBody),
        (status = 404, description = "no rollout of this challenge", body = ErrorBody),
        (status = 409, description = "the rollout is over, or being aborted", body = ErrorBody),
    )
)]
pub(super) async fn rollout_ask(
    State(app): AppState,
    scope: Scope,
    Path((name, action)): Path<(String, String)>,
) -> ApiResult {
    scope.require_admin()?;
    let name = parse_name(&name)?;
    let what = Ask::parse(&action).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{action:.32?} is not continue, pause, resume or abort"),
        )
        .field("action")
    })?;
    let now = tidegate_schema::time::unix_secs();
    let stored = etcd(&app, || {
        rollout::ask(&app.client, &app.ks, &name, what, now)
    })
    .await?;
    Ok(json_response(StatusCode::OK, rollout_body(&app, stored)))
}
