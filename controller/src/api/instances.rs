//! `/v1/instances`: spawn, list, get, renew, delete, flag check.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tidegate_schema::{
    ChallengeName, FieldError, InstanceId, InstanceRecord, TeamId, Validate, decode_json,
};

use super::{ApiError, ApiResult, AppState, Scope, etcd, json_response, leading, unix_now};
use crate::lifecycle::{self, LifecycleError};
use crate::{App, ChallengeError, SpawnError, SpawnPlan};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnRequest {
    challenge: ChallengeName,
    team: TeamId,
}

impl Validate for SpawnRequest {
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagRequest {
    flag: String,
}

impl Validate for FlagRequest {
    fn validate(&self) -> Result<(), FieldError> {
        if self.flag.len() > 1024 {
            return Err(FieldError::new("flag", "at most 1024 bytes"));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    team: Option<String>,
    challenge: Option<String>,
}

fn parse_id(id: &str) -> ApiResult<InstanceId> {
    InstanceId::parse(id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).field("id"))
}

/// The answer shape of every instance endpoint.
pub(super) fn instance_json(app: &App, rec: &InstanceRecord, status: String) -> Value {
    let port = match (
        app.cfg.public_http_scheme.as_str(),
        app.cfg.public_http_port,
    ) {
        ("http", 80) | ("https", 443) => String::new(),
        (_, p) => format!(":{p}"),
    };
    let http: Vec<Value> = rec
        .http
        .iter()
        .map(|r| {
            json!({
                "port_name": r.port_name,
                "hostname": r.hostname,
                "url": format!("{}://{}{port}/", app.cfg.public_http_scheme, r.hostname),
            })
        })
        .collect();
    let tcp: Vec<Value> = rec
        .tcp
        .iter()
        .map(|r| json!({ "port_name": r.port_name, "port": r.port }))
        .collect();
    json!({
        "id": rec.id,
        "challenge": rec.challenge,
        "team": rec.team,
        "worker": rec.worker,
        "created_at": rec.created_at,
        "expires_at": rec.expires_at,
        "renewals": rec.renewals,
        "http": http,
        "tcp": tcp,
        "status": status,
    })
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        let status = match &e {
            LifecycleError::NotFound(_) => StatusCode::NOT_FOUND,
            LifecycleError::MaxRenewals { .. }
            | LifecycleError::MaxLifetime { .. }
            | LifecycleError::TooEarly { .. }
            | LifecycleError::Conflict(_) => StatusCode::CONFLICT,
            LifecycleError::Fenced(_) => return ApiError::unavailable(e.to_string()),
            LifecycleError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            LifecycleError::Etcd(_) => return ApiError::unavailable(e.to_string()),
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<SpawnError> for ApiError {
    fn from(e: SpawnError) -> Self {
        match e {
            SpawnError::TeamLimit { .. } => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            SpawnError::Invalid { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            _ => ApiError::unavailable(e.to_string()),
        }
    }
}

pub(super) async fn spawn(State(app): AppState, _scope: Scope, body: Bytes) -> ApiResult {
    let req: SpawnRequest = decode_json(&body).map_err(ApiError::bad_request)?;
    let leader = leading(&app, "/v1/instances").await?;
    // One spawn at a time per leader: placement then sees every earlier
    // spawn, so no worker is given more than its capacity.
    let _serial = app.spawn_lock.lock().await;
    let challenge = match etcd(&app, app.challenges.get(&req.challenge)).await {
        Ok(c) => c.value,
        Err(e) if e.is_status(StatusCode::NOT_FOUND) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("challenge {:?} does not exist", req.challenge.as_str()),
            )
            .field("challenge"));
        }
        Err(e) => return Err(e),
    };
    let worker = {
        let view = app.view.lock();
        if view.workers.is_empty() {
            return Err(ApiError::unavailable(
                "no worker is registered: start an agent",
            ));
        }
        view.place(challenge.name.as_str()).ok_or_else(|| {
            ApiError::unavailable("no worker has a free slot; retry when an instance ends")
        })?
    };
    let now = unix_now();
    let plan = SpawnPlan {
        keys: app.ks.clone(),
        leader_key: leader.key.clone(),
        token: leader.token,
        ttl_secs: challenge.spec.ttl.default_secs,
        team: req.team.clone(),
        worker,
        domain: app.cfg.domain.clone(),
        tcp_ports: app.tcp_ports.clone(),
        now,
        challenge,
    };
    let secret = app.cfg.flag_secret.as_bytes();
    let spec = plan.challenge.spec.clone();
    let result = etcd(&app, async {
        crate::spawn(&app.client, &plan, |id| {
            crate::flag::render(secret, &spec, req.team.as_str(), req.challenge.as_str(), id)
        })
        .await
        .map_err(|e| {
            if matches!(e, SpawnError::Fenced { .. }) {
                app.counters.fenced_writes.fetch_add(1, Ordering::Relaxed);
            }
            ApiError::from(e)
        })
    })
    .await;
    let spawned = match result {
        Ok(s) => s,
        Err(e) => {
            app.counters.spawn_refusals.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    app.counters.spawns.fetch_add(1, Ordering::Relaxed);
    let body = instance_json(&app, &spawned.record, "pending".into());
    app.view
        .insert_own(spawned.record, spawned.lease, spawned.revision);
    Ok(json_response(StatusCode::CREATED, body))
}

pub(super) async fn list(
    State(app): AppState,
    _scope: Scope,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let view = app.view.lock();
    let items: Vec<Value> = view
        .instances
        .values()
        .filter(|i| {
            q.team
                .as_deref()
                .is_none_or(|t| i.record.team.as_str() == t)
        })
        .filter(|i| {
            q.challenge
                .as_deref()
                .is_none_or(|c| i.record.challenge.as_str() == c)
        })
        .map(|i| instance_json(&app, &i.record, view.status_text(&i.record.id)))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({ "instances": items, "revision": view.revision }),
    ))
}

pub(super) async fn get(State(app): AppState, _scope: Scope, Path(id): Path<String>) -> ApiResult {
    let id = parse_id(&id)?;
    let current = etcd(&app, lifecycle::get(&app.client, &app.ks, &id)).await?;
    let status = app.view.lock().status_text(&id);
    Ok(json_response(
        StatusCode::OK,
        instance_json(&app, &current.record, status),
    ))
}

pub(super) async fn renew(
    State(app): AppState,
    _scope: Scope,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id(&id)?;
    let leader = leading(&app, &format!("/v1/instances/{id}/renew")).await?;
    let current = etcd(&app, lifecycle::get(&app.client, &app.ks, &id)).await?;
    let challenge = etcd(&app, async {
        app.challenges
            .get(&current.record.challenge)
            .await
            .map_err(|e| match e {
                ChallengeError::NotFound(_) => ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "challenge {:?} was deleted; its instances cannot be renewed",
                        current.record.challenge.as_str()
                    ),
                ),
                e => e.into(),
            })
    })
    .await?;
    let now = unix_now();
    let expires_at = lifecycle::renewed_expiry(&current.record, &challenge.value.spec.ttl, now)?;
    let fence = (leader.key.as_str(), leader.token);
    let record = etcd(
        &app,
        lifecycle::renew(&app.client, &app.ks, fence, &current, expires_at, now),
    )
    .await?;
    app.counters.renewals.fetch_add(1, Ordering::Relaxed);
    let status = app.view.lock().status_text(&id);
    Ok(json_response(
        StatusCode::OK,
        instance_json(&app, &record, status),
    ))
}

pub(super) async fn delete(
    State(app): AppState,
    _scope: Scope,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id(&id)?;
    etcd(&app, lifecycle::delete(&app.client, &app.ks, &id)).await?;
    app.counters.deletions.fetch_add(1, Ordering::Relaxed);
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn flag(
    State(app): AppState,
    _scope: Scope,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let req: FlagRequest = decode_json(&body).map_err(ApiError::bad_request)?;
    let current = etcd(&app, lifecycle::get(&app.client, &app.ks, &id)).await?;
    let correct = crate::flag::matches(&current.record.flag, req.flag.trim());
    Ok(json_response(StatusCode::OK, json!({ "correct": correct })))
}
