//! `/v1/instances`: spawn, list, get, renew, delete, flag check.

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;

use tidegate_plugin_host::{InstanceInfo, RenewDecision, SpawnDecision};
use tidegate_schema::spec::MIN_TTL_SECS;
use tidegate_schema::{
    ChallengeName, ChallengeRecord, FieldError, InstanceId, InstanceRecord, PolicyFallback, TeamId,
    Validate, decode_json,
};

use super::{ApiError, ApiResult, AppState, Scope, etcd, json_response, leading, unix_now};
use crate::lifecycle::{self, LifecycleError};
use crate::policy::Decided;
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
        .map(|r| {
            json!({
                "port_name": r.port_name,
                "port": r.port,
                // The SNI for the agents' `tls_tcp_entry`, if they have one.
                "tls_hostname": format!("{}-{}.{}", rec.id, r.port_name, app.cfg.domain),
            })
        })
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
            SpawnError::PortRange(_) => ApiError::unavailable(e.to_string()).reason("port_range"),
        }
    }
}

/// Counts and keeps a refused spawn or renewal (not redirects or bad requests).
fn refused(
    app: &App,
    op: &'static str,
    team: &str,
    challenge: &str,
    instance: Option<&InstanceId>,
    e: &ApiError,
) {
    let Some(reason) = e.refusal() else { return };
    app.telemetry.refused(crate::metrics::Refusal {
        at: unix_now(),
        op,
        team: team.to_string(),
        challenge: challenge.to_string(),
        instance: instance.map(ToString::to_string),
        reason,
        status: e.status().as_u16(),
        message: e.message().to_string(),
    });
}

pub(super) async fn spawn(State(app): AppState, _scope: Scope, body: Bytes) -> ApiResult {
    let req: SpawnRequest = decode_json(&body).map_err(ApiError::bad_request)?;
    let result = spawn_parsed(&app, &req).await;
    if let Err(e) = &result {
        refused(
            &app,
            "spawn",
            req.team.as_str(),
            req.challenge.as_str(),
            None,
            e,
        );
    }
    result
}

async fn spawn_parsed(app: &Arc<App>, req: &SpawnRequest) -> ApiResult {
    let leader = leading(app, "/v1/instances").await?;
    // One spawn at a time per leader: placement then sees every earlier
    // spawn, so no worker is given more than its capacity.
    let _serial = app.spawn_lock.lock().await;
    let challenge = match etcd(app, || app.challenges.get(&req.challenge)).await {
        Ok(c) => c.value,
        Err(e) if e.is_status(StatusCode::NOT_FOUND) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("challenge {:?} does not exist", req.challenge.as_str()),
            )
            .field("challenge")
            .reason("unknown_challenge"));
        }
        Err(e) => return Err(e),
    };
    // The challenge's policy decides before placement (and under the spawn
    // lock, so the counts it sees include every earlier spawn).
    let mut ttl_secs = challenge.spec.ttl.default_secs;
    let mut fallback_note = None;
    if let Some(policy) = &challenge.policy {
        let request = spawn_request(app, &challenge, &req.team);
        let pinfo = |decision: &str| json!({"digest": policy.digest, "hook": "admit-spawn", "decision": decision});
        match app.policies.admit_spawn(&challenge, &request).await {
            None => {}
            Some(Decided::Plugin(SpawnDecision::Allow(None))) => {}
            Some(Decided::Plugin(SpawnDecision::Allow(Some(t)))) => {
                ttl_secs = u64::from(t).clamp(MIN_TTL_SECS, challenge.spec.ttl.max_secs);
            }
            Some(Decided::Plugin(SpawnDecision::Deny(reason))) => {
                app.counters.policy_denials.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::new(StatusCode::FORBIDDEN, reason)
                    .with("policy", pinfo("deny"))
                    .reason("policy_deny"));
            }
            Some(Decided::Plugin(SpawnDecision::Queue(secs))) => {
                app.counters.policy_denials.fetch_add(1, Ordering::Relaxed);
                let secs = secs.max(1);
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("the challenge's policy asks to retry in {secs} s"),
                )
                .header(axum::http::header::RETRY_AFTER, &secs.to_string())
                .with("policy", pinfo("queue"))
                .reason("policy_queue"));
            }
            Some(Decided::Fallback { fallback, error }) => {
                app.counters.policy_failures.fetch_add(1, Ordering::Relaxed);
                match fallback {
                    PolicyFallback::Deny => {
                        app.counters.policy_denials.fetch_add(1, Ordering::Relaxed);
                        return Err(ApiError::new(
                            StatusCode::FORBIDDEN,
                            format!("{error}; the challenge's policy_fallback is deny"),
                        )
                        .with("policy", pinfo("fallback-deny"))
                        .reason("policy_fallback_deny"));
                    }
                    PolicyFallback::Allow => {
                        fallback_note = Some(json!({
                            "digest": policy.digest, "hook": "admit-spawn",
                            "decision": "fallback-allow", "error": error,
                        }));
                    }
                }
            }
        }
    }
    let worker = {
        let view = app.view.lock();
        if view.workers.is_empty() {
            return Err(
                ApiError::unavailable("no worker is registered: start an agent")
                    .reason("no_worker"),
            );
        }
        view.place(challenge.name.as_str()).ok_or_else(|| {
            ApiError::unavailable("no worker has a free slot; retry when an instance ends")
                .reason("no_capacity")
        })?
    };
    let now = unix_now();
    let plan = SpawnPlan {
        keys: app.ks.clone(),
        leader_key: leader.key.clone(),
        token: leader.token,
        ttl_secs,
        team: req.team.clone(),
        worker,
        domain: app.cfg.domain.clone(),
        tcp_ports: app.tcp_ports.clone(),
        now,
        challenge,
    };
    let secret = app.cfg.flag_secret.as_bytes();
    let spec = plan.challenge.spec.clone();
    let result = etcd(app, || async {
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
    app.telemetry.etcd.wrote(spawned.revision);
    if let Ok(mut recent) = app.recent_spawns.lock() {
        recent.push_back((now, req.team.to_string(), req.challenge.to_string()));
    }
    let mut body = instance_json(app, &spawned.record, "pending".into());
    if let Some(note) = fallback_note {
        body["policy"] = note;
    }
    app.view
        .insert_own(spawned.record, spawned.lease, spawned.revision);
    Ok(json_response(StatusCode::CREATED, body))
}

/// What `admit-spawn` is told: the team's counts and the cluster's room,
/// from this replica's view (the leader's, which places every spawn).
fn spawn_request(
    app: &App,
    challenge: &ChallengeRecord,
    team: &TeamId,
) -> tidegate_plugin_host::SpawnRequest {
    let now = unix_now();
    let view = app.view.lock();
    let mut team_live = 0u32;
    let mut team_live_all = 0u32;
    let mut per_worker: std::collections::BTreeMap<&str, u32> = Default::default();
    for i in view.instances.values() {
        *per_worker.entry(i.record.worker.as_str()).or_default() += 1;
        if i.record.team == *team {
            team_live_all += 1;
            if i.record.challenge == challenge.name {
                team_live += 1;
            }
        }
    }
    let mut capacity = 0u32;
    let mut free = 0u32;
    for w in view.workers.values() {
        capacity = capacity.saturating_add(w.capacity);
        let used = per_worker.get(w.id.as_str()).copied().unwrap_or(0);
        free = free.saturating_add(w.capacity.saturating_sub(used));
    }
    drop(view);
    let team_recent = app.recent_spawns.lock().map_or(0, |mut recent| {
        while recent.front().is_some_and(|(t, _, _)| *t + 3600 < now) {
            recent.pop_front();
        }
        recent
            .iter()
            .filter(|(_, t, c)| t == team.as_str() && c == challenge.name.as_str())
            .count() as u32
    });
    tidegate_plugin_host::SpawnRequest {
        team: team.to_string(),
        challenge: challenge.name.to_string(),
        team_live,
        team_live_all,
        team_recent,
        cluster_free_slots: free,
        cluster_capacity: capacity,
        now_ms: tidegate_plugin_host::unix_ms(),
    }
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
    let current = etcd(&app, || lifecycle::get(&app.client, &app.ks, &id)).await?;
    let status = app.view.lock().status_text(&id);
    Ok(json_response(
        StatusCode::OK,
        instance_json(&app, &current.record, status),
    ))
}

/// How many times a renewal is decided and written before a conflict is
/// the answer.
const RENEW_ATTEMPTS: u32 = 4;

pub(super) async fn renew(
    State(app): AppState,
    _scope: Scope,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id(&id)?;
    let leader = leading(&app, &format!("/v1/instances/{id}/renew")).await?;
    let mut attempt = 1;
    let (current, result) = loop {
        let current = etcd(&app, || lifecycle::get(&app.client, &app.ks, &id)).await?;
        let result = renew_current(&app, &leader, &current).await;
        // The owning agent reports its container's status on the endpoint
        // key (starting → running, restarts) whenever it changes; a
        // renewal that read the instance before such a write fails its
        // compare. Read it again and decide again rather than hand the
        // player a 409 for the agent's bookkeeping.
        match &result {
            Err(e) if e.refusal() == Some("conflict") && attempt < RENEW_ATTEMPTS => {
                tracing::debug!(instance = %id, attempt, "instance changed while renewing; again");
                attempt += 1;
            }
            _ => break (current, result),
        }
    };
    if let Err(e) = &result {
        let r = &current.record;
        refused(
            &app,
            "renew",
            r.team.as_str(),
            r.challenge.as_str(),
            Some(&r.id),
            e,
        );
    }
    result
}

async fn renew_current(
    app: &Arc<App>,
    leader: &crate::scheduler::LeaderInfo,
    current: &lifecycle::Current,
) -> ApiResult {
    let id = &current.record.id;
    let challenge = etcd(app, || async {
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
                )
                .reason("challenge_deleted"),
                e => e.into(),
            })
    })
    .await?;
    let now = unix_now();
    let ttl = &challenge.value.spec.ttl;
    let extend = match renew_policy(app, &challenge.value, &current.record).await? {
        Some(secs) => secs,
        None => ttl.default_secs,
    };
    let expires_at = lifecycle::renewed_expiry(&current.record, ttl, now, extend)?;
    let fence = (leader.key.as_str(), leader.token);
    let record = etcd(app, || {
        lifecycle::renew(&app.client, &app.ks, fence, current, expires_at, now)
    })
    .await?;
    app.counters.renewals.fetch_add(1, Ordering::Relaxed);
    let status = app.view.lock().status_text(id);
    Ok(json_response(
        StatusCode::OK,
        instance_json(app, &record, status),
    ))
}

/// The extension the challenge's `renew` hook grants (`None`: no hook, or
/// the fallback allows the default), or its refusal as the API error.
async fn renew_policy(
    app: &Arc<App>,
    challenge: &ChallengeRecord,
    record: &InstanceRecord,
) -> ApiResult<Option<u64>> {
    let Some(policy) = &challenge.policy else {
        return Ok(None);
    };
    let pinfo =
        |decision: &str| json!({"digest": policy.digest, "hook": "renew", "decision": decision});
    let info = InstanceInfo {
        instance: record.id.to_string(),
        team: record.team.to_string(),
        challenge: record.challenge.to_string(),
        created_ms: record.created_at * 1000,
        expires_ms: record.expires_at * 1000,
        renewals: record.renewals,
        now_ms: tidegate_plugin_host::unix_ms(),
    };
    let outcome = match app.policies.plugin(policy).await {
        Ok(plugin) => match app.policies.calls.timed("renew", || plugin.renew(&info)) {
            None => return Ok(None),
            Some(Ok(d)) => Decided::Plugin(d),
            Some(Err(e)) => crate::policy::failed(
                challenge,
                "renew",
                challenge.spec.policy_fallback,
                e.to_string(),
            ),
        },
        Err(error) => {
            crate::policy::failed(challenge, "renew", challenge.spec.policy_fallback, error)
        }
    };
    match outcome {
        Decided::Plugin(RenewDecision::Extend(secs)) => Ok(Some(u64::from(secs))),
        Decided::Plugin(RenewDecision::Refuse(reason)) => {
            app.counters.policy_denials.fetch_add(1, Ordering::Relaxed);
            Err(ApiError::new(StatusCode::FORBIDDEN, reason)
                .with("policy", pinfo("refuse"))
                .reason("policy_refuse"))
        }
        Decided::Fallback { fallback, error } => {
            app.counters.policy_failures.fetch_add(1, Ordering::Relaxed);
            match fallback {
                PolicyFallback::Allow => Ok(None),
                PolicyFallback::Deny => {
                    app.counters.policy_denials.fetch_add(1, Ordering::Relaxed);
                    Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        format!("{error}; the challenge's policy_fallback is deny"),
                    )
                    .with("policy", pinfo("fallback-deny"))
                    .reason("policy_fallback_deny"))
                }
            }
        }
    }
}

pub(super) async fn delete(
    State(app): AppState,
    _scope: Scope,
    Path(id): Path<String>,
) -> ApiResult {
    let id = parse_id(&id)?;
    etcd(&app, || lifecycle::delete(&app.client, &app.ks, &id)).await?;
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
    let current = etcd(&app, || lifecycle::get(&app.client, &app.ks, &id)).await?;
    let correct = crate::flag::matches(&current.record.flag, req.flag.trim());
    Ok(json_response(StatusCode::OK, json!({ "correct": correct })))
}
