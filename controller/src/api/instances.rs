//! `/v1/instances`: spawn, list, get, renew, delete, flag check.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use tidegate_schema::config::planted;
use tidegate_schema::time::unix_secs;
use tidegate_schema::{InstanceId, Resources, TeamId, decode_json};

use super::bodies::{
    ErrorBody, FlagCheck, FlagResult, Instance, InstanceList, ListQuery, PolicyDecision,
    SpawnRequest, TeamQuery,
};
use super::queue;
use super::{
    ApiError, ApiResult, AppState, Scheduler, Scope, etcd, forward, json_response, scheduler,
};
use crate::lifecycle;
use crate::policy::{self, Admission, RefusalKind, Renewal};
use crate::ratelimit::Op;
use crate::spawn::FromQueue;
use crate::view::NoRoom;
use crate::{App, ChallengeError, SpawnError, SpawnPlan};

fn parse_id(id: &str) -> ApiResult<InstanceId> {
    InstanceId::parse(id)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()).field("id"))
}

/// The `?team=` of a request, checked.
fn team_param(q: &TeamQuery) -> ApiResult<Option<TeamId>> {
    q.team
        .as_deref()
        .map(|t| {
            serde_json::from_value::<TeamId>(serde_json::Value::String(t.to_string())).map_err(
                |e| ApiError::new(StatusCode::BAD_REQUEST, format!("team: {e}")).field("team"),
            )
        })
        .transpose()
}

/// The instance when the caller may act on it: with `?team=`, another
/// team's instance is answered exactly as a missing one (no existence leak).
/// A pooled instance (no team yet) is nobody's to act on: missing to all.
fn owned(current: lifecycle::Current, team: Option<&TeamId>) -> ApiResult<Owned> {
    let missing = || lifecycle::LifecycleError::NotFound(current.record.id.to_string()).into();
    let Some(owner) = current.record.team.clone() else {
        // The red team's positive control: a pooled instance is the asker's.
        if let Some(t) = team.filter(|_| planted("team-scope")) {
            return Ok(Owned {
                current,
                owner: t.clone(),
            });
        }
        return Err(missing());
    };
    match team {
        Some(t) if *t != owner && !planted("team-scope") => Err(missing()),
        _ => Ok(Owned { current, owner }),
    }
}

/// An instance a caller may act on, and its team.
struct Owned {
    current: lifecycle::Current,
    owner: TeamId,
}

/// Takes a token of `op` for `team` (the platform token only; the admin
/// token is not limited): past the bucket, 429 with Retry-After.
pub(super) fn rate_limit(app: &App, scope: Scope, op: Op, team: &TeamId) -> ApiResult<()> {
    if scope == Scope::Admin || planted("rate-limit") {
        return Ok(());
    }
    app.rate_limits.check(op, team).map_err(|l| {
        app.metrics.rate_limited(op.as_str(), l.team.as_ref());
        let whose = match &l.team {
            Some(t) => format!(
                "team {:?} made too many {} requests",
                t.as_str(),
                op.as_str()
            ),
            None => "the platform token made too many instance requests".to_string(),
        };
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{whose}; retry after {} s", l.retry_after_secs),
        )
        .header(
            axum::http::header::RETRY_AFTER,
            &l.retry_after_secs.to_string(),
        )
        .reason("rate_limited")
    })
}

/// The challenge a request's `challenge` field names and its revision; a
/// 404 (`unknown_challenge`) naming the field when there is none.
pub(super) async fn challenge_named(
    app: &App,
    name: &tidegate_schema::ChallengeName,
) -> ApiResult<(tidegate_schema::ChallengeRecord, i64)> {
    match etcd(app, || app.challenges.get(name)).await {
        Ok(c) => Ok((c.value, c.revision)),
        Err(e) if e.is_status(StatusCode::NOT_FOUND) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("challenge {:?} does not exist", name.as_str()),
        )
        .field("challenge")
        .reason("unknown_challenge")),
        Err(e) => Err(e),
    }
}

/// Counts and keeps a refused spawn or renewal (not bad requests).
fn refused(
    app: &App,
    op: &'static str,
    team: &str,
    challenge: &str,
    instance: Option<&InstanceId>,
    e: &ApiError,
) {
    let Some(reason) = e.refusal() else { return };
    app.metrics.refused(crate::metrics::Refusal {
        at: unix_secs(),
        op,
        team: team.to_string(),
        challenge: challenge.to_string(),
        instance: instance.map(ToString::to_string),
        reason,
        status: e.status().as_u16(),
        message: e.message().to_string(),
    });
}

/// Spawns an instance for a team. A standby forwards the request to the
/// scheduler (with the caller's token) and answers with its answer.
/// A policy's denial is a 403 whose `error` is its reason and whose
/// `policy` names digest, hook and decision; `queue` is a 429 with
/// Retry-After.
#[utoipa::path(
    post, path = "/v1/instances", tag = "instances", operation_id = "spawn_instance",
    request_body = SpawnRequest,
    responses(
        (status = 201, description = "the new instance", body = Instance),
        (status = 202, description = "no worker has room (or the policy said queue): a place in the waiting queue, whose id becomes the instance's; GET /v1/instances/{id} answers it (and holds the place) until admitted", body = super::bodies::Queued, headers(("Location" = String, description = "/v1/instances/{id}"))),
        (status = 400, description = "an invalid request, naming the field", body = ErrorBody),
        (status = 403, description = "denied by the challenge's policy (or its failure under policy_fallback deny)", body = ErrorBody),
        (status = 404, description = "no such challenge", body = ErrorBody),
        (status = 409, description = "the team is at its per_team_max (`team_limit`), or the instance is larger than any worker's allocatable resources (`too_large`, naming the resource)", body = ErrorBody),
        (status = 429, description = "the policy asks to retry after Retry-After seconds, or the team's (or the platform's) spawn bucket is empty", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
        (status = 503, description = "etcd has no quorum, no scheduler is elected, or this standby could not forward to the scheduler (`leader` is its URL; when the hop failed after sending, the spawn may have been made)", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
    )
)]
pub(super) async fn spawn(
    State(app): AppState,
    scope: Scope,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let req: SpawnRequest = decode_json(&body).map_err(ApiError::bad_request)?;
    let result = match scheduler(&app, &req.challenge).await {
        Ok(Scheduler::Here(leader)) => spawn_parsed(&app, scope, &req, leader).await,
        // The scheduler counts its own refusals; only a failed hop is ours.
        Ok(Scheduler::There(to)) => {
            forward(&app, &to, Method::POST, "/v1/instances", &headers, body).await
        }
        Err(e) => Err(e),
    };
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

async fn spawn_parsed(
    app: &Arc<App>,
    scope: Scope,
    req: &SpawnRequest,
    leader: Arc<crate::scheduler::LeaderInfo>,
) -> ApiResult {
    // Counted where spawns are made (standbys forward), and before the
    // spawn lock: a refused request never holds it.
    rate_limit(app, scope, Op::Spawn, &req.team)?;
    let (challenge, challenge_revision) = challenge_named(app, &req.challenge).await?;
    let secret_env = secret_env_of(app, &challenge, challenge_revision).await?;
    // A plugin met for the first time is compiled now, not under the lock
    // (a failure is decided under it, with the challenge's fallback).
    if let Some(p) = &challenge.policy {
        let _ = app.policies.plugin(p).await;
    }
    // One spawn at a time per leader: placement then sees every earlier
    // spawn, so no worker is given more than its capacity.
    let _serial = app.spawn_lock.lock().await;
    // Another shard's leader may spawn onto the same worker, or for the
    // same team, meanwhile: the spawn Txn then fails its guard and the
    // decisions are made again on a view that holds that spawn.
    let mut attempt = 1;
    let patience = std::time::Instant::now() + GUARD_PATIENCE;
    loop {
        let seen = app.view.lock().revision;
        let result = spawn_locked(
            app,
            req,
            &leader,
            (&challenge, challenge_revision),
            &secret_env,
            (seen, attempt),
        )
        .await;
        match result {
            // write_spawn waited for the view to hold the other write.
            // Each lost round is another spawn made, so this ends; a
            // pause of a few ms, random, keeps the same leaders from
            // colliding round after round.
            Err(e) if e.refusal() == Some("guarded") && std::time::Instant::now() < patience => {
                tracing::debug!(attempt, error = %e.message(), "spawn guard moved; deciding again");
                attempt += 1;
                let pause = rand::random::<u64>() % (2 * u64::from(attempt.min(10)) + 1);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            other => return other,
        }
    }
}

/// How long a spawn goes on deciding again while other shards' leaders
/// keep writing the same guards (the same worker, mostly) before it is
/// answered 503 `guarded`.
const GUARD_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits (up to 2 s) for the view to move past `revision`.
async fn wait_for_view(app: &App, revision: i64) {
    for _ in 0..200 {
        if app.view.lock().revision > revision {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Under the spawn lock: the queue, the policy, the pool, placement and
/// the spawn Txn, guarded at `seen` (the view's revision before them);
/// `attempt` counts the guard retries.
async fn spawn_locked(
    app: &Arc<App>,
    req: &SpawnRequest,
    leader: &Arc<crate::scheduler::LeaderInfo>,
    (challenge, challenge_revision): (&tidegate_schema::ChallengeRecord, i64),
    secret_env: &std::collections::BTreeMap<String, String>,
    (seen, attempt): (i64, u32),
) -> ApiResult {
    // A team already waiting keeps its place: asking again is an answer
    // about that place, never a second one nor a jump ahead.
    if let Some(answer) = queue::already_waiting(app, &challenge.name, &req.team) {
        return Ok(answer);
    }
    let queueing = challenge.spec.queue.enabled && !planted("queue-off");
    // The challenge's policy decides before placement (and under the spawn
    // lock, so the counts it sees include every earlier spawn).
    let (ttl_secs, fallback_note) = match policy::admit_spawn(app, challenge, &req.team).await {
        Admission::Admit { ttl_secs, note } => (ttl_secs, note),
        Admission::Refused(r) if queueing && matches!(r.kind, RefusalKind::Queue { .. }) => {
            team_under_limit(app, challenge, &req.team)?;
            return queue::enqueue(app, leader, challenge, &req.team, "policy", &r.message).await;
        }
        Admission::Refused(r) => return Err(r.into()),
    };
    // A pooled instance, started before anyone asked: no container to
    // start, and no room taken that others wait for.
    // Not while teams wait for this challenge: they come first.
    if challenge.spec.pool.is_some() && !queue::waiting_for(app, &challenge.name) {
        let claimed = super::pool::claim(
            app,
            leader,
            (challenge, challenge_revision),
            secret_env,
            &req.team,
            ttl_secs,
            seen,
        )
        .await?;
        if let Some(spawned) = claimed {
            return Ok(created(app, &spawned, fallback_note));
        }
    }
    // Room that frees while others wait is theirs first.
    let waiting = queue::waiting_for_room(app);
    let mut placed = place(app, challenge);
    if matches!(placed, Err(Unplaced::Full(..)))
        && !waiting
        // Once per spawn: a guard retry does not take another pooled one.
        && attempt == 1
        && super::pool::yield_room(app, challenge, false).await
    {
        placed = place(app, challenge);
    }
    let worker = match placed {
        Ok(_) | Err(Unplaced::Full(..)) if queueing && waiting => {
            team_under_limit(app, challenge, &req.team)?;
            let detail = "others are waiting for room; room that frees is theirs first";
            return queue::enqueue(app, leader, challenge, &req.team, "no_capacity", detail).await;
        }
        Ok(w) => w,
        Err(Unplaced::Full(e, reason)) if queueing => {
            team_under_limit(app, challenge, &req.team)?;
            return queue::enqueue(app, leader, challenge, &req.team, reason, e.message()).await;
        }
        Err(Unplaced::Full(e, _) | Unplaced::Never(e)) => return Err(e),
    };
    let plan = SpawnPlan {
        keys: app.ks.clone(),
        leader_key: leader.key.clone(),
        token: leader.token,
        ttl_secs,
        team: req.team.clone(),
        guards: app.guards(seen, Some(&worker), Some(&req.team)),
        worker,
        domain: app.cfg.domain.clone(),
        tcp_ports: app.tcp_ports.clone(),
        now: unix_secs(),
        challenge: challenge.clone(),
        challenge_revision,
        secret_env: secret_env.clone(),
    };
    let spawned = write_spawn(app, &plan, None, None).await?;
    Ok(created(app, &spawned, fallback_note))
}

/// The 201 answer of a spawn.
fn created(
    app: &App,
    spawned: &crate::Spawned,
    fallback_note: Option<crate::policy::PolicyNote>,
) -> axum::response::Response {
    let mut body = Instance::new(app, &spawned.record, "pending".into());
    body.policy = fallback_note.map(|note| PolicyDecision {
        digest: note.digest,
        hook: note.hook.into(),
        decision: "fallback-allow".into(),
        error: Some(note.error),
    });
    json_response(StatusCode::CREATED, body)
}

/// The challenge's `secret_env` values at `revision` (none read when it
/// has none).
pub(super) async fn secret_env_of(
    app: &App,
    challenge: &tidegate_schema::ChallengeRecord,
    revision: i64,
) -> ApiResult<std::collections::BTreeMap<String, String>> {
    if challenge.spec.secret_env.is_empty() {
        return Ok(Default::default());
    }
    etcd(app, || app.challenges.secret_env(&challenge.name, revision)).await
}

/// Runs the spawn Txn of `plan` (admitting `queued` when given) and
/// records what it wrote in the view and the counters.
pub(super) async fn write_spawn(
    app: &App,
    plan: &SpawnPlan,
    queued: Option<&FromQueue>,
    pooled: Option<&crate::spawn::FromPool>,
) -> ApiResult<crate::Spawned> {
    let secret = app.cfg.flag_secret.as_bytes();
    let (spec, team, name) = (
        &plan.challenge.spec,
        plan.team.as_str(),
        plan.challenge.name.as_str(),
    );
    let sent = std::time::Instant::now();
    // The revision of a guard another shard's leader wrote first.
    let guarded = std::sync::atomic::AtomicI64::new(0);
    let result = etcd(app, || async {
        let flag =
            |id: &tidegate_schema::InstanceId| crate::flag::render(secret, spec, team, name, id);
        match pooled {
            Some(p) => crate::spawn::claim(&app.client, plan, p, flag).await,
            None => crate::spawn::spawn_from(&app.client, plan, queued, flag).await,
        }
        .map_err(|e| {
            if matches!(e, SpawnError::Fenced { .. }) {
                app.metrics.fenced_writes.inc();
            }
            if let SpawnError::Guarded { revision, .. } = e {
                guarded.store(revision, std::sync::atomic::Ordering::Relaxed);
            }
            ApiError::from(e)
        })
    })
    .await;
    app.metrics.etcd.write_took(sent);
    let spawned = match result {
        Ok(s) => s,
        // Another pooled instance (or a fresh spawn) is tried.
        Err(e) if e.refusal() == Some("pool_taken") => return Err(e),
        // Decided again by the caller, on a view that holds that write.
        Err(e) if e.refusal() == Some("guarded") => {
            let revision = guarded.load(std::sync::atomic::Ordering::Relaxed);
            wait_for_view(app, revision.saturating_sub(1)).await;
            return Err(e);
        }
        Err(e) => {
            app.metrics.spawn_refusals.inc();
            return Err(e);
        }
    };
    app.metrics.spawned();
    app.metrics.etcd.wrote(spawned.revision);
    app.recent_spawns
        .record(plan.now, &plan.team, &plan.challenge.name);
    app.guarded(&plan.guards, spawned.revision);
    app.view
        .insert_own(spawned.record.clone(), spawned.lease, spawned.revision);
    Ok(spawned)
}

/// Why an instance has no worker now.
pub(super) enum Unplaced {
    /// Every worker is full (waiting can help): the answer, and the reason
    /// a queue entry records (`no_capacity` or `no_network`).
    Full(ApiError, &'static str),
    /// No worker could ever take it, or none is registered.
    Never(ApiError),
}

/// The worker an instance of `challenge` goes to now, or why none.
pub(super) fn place(
    app: &App,
    challenge: &tidegate_schema::ChallengeRecord,
) -> Result<tidegate_schema::WorkerId, Unplaced> {
    let view = app.view.lock();
    if view.workers.is_empty() {
        return Err(Unplaced::Never(
            ApiError::unavailable("no worker is registered: start an agent").reason("no_worker"),
        ));
    }
    let network = !challenge.spec.services.is_empty();
    let need = Resources::of_spec(&challenge.spec);
    if let Some(short) = view.too_large(need) {
        return Err(Unplaced::Never(
            ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "an instance of {:?} is larger than any worker: {short}; lower the challenge's limits or give a worker more (allocatable_*)",
                    challenge.name.as_str()
                ),
            )
            .reason("too_large"),
        ));
    }
    view.place(challenge.name.as_str(), network, need, app.cfg.placement)
        .map_err(|no| match no {
            NoRoom::Network => Unplaced::Full(
                ApiError::unavailable(
                    "no worker has a free network for this challenge's services (each instance with services takes one of a worker's instance_networks); retry when an instance ends",
                )
                .reason("no_network"),
                "no_network",
            ),
            NoRoom::Resources(short) => Unplaced::Full(
                ApiError::unavailable(format!(
                    "no worker has room for this instance (one with a free slot lacks {short}); retry when an instance ends"
                ))
                .reason("no_capacity"),
                "no_capacity",
            ),
            NoRoom::Slots => Unplaced::Full(
                ApiError::unavailable("no worker has a free slot; retry when an instance ends")
                    .reason("no_capacity"),
                "no_capacity",
            ),
        })
}

/// 409 `team_limit` when the team already has `per_team_max` live
/// instances of the challenge (waiting would never end in one).
fn team_under_limit(
    app: &App,
    challenge: &tidegate_schema::ChallengeRecord,
    team: &TeamId,
) -> ApiResult<()> {
    let live = app
        .view
        .lock()
        .instances
        .values()
        .filter(|i| i.record.is_of(team) && i.record.challenge == challenge.name)
        .count();
    if live >= challenge.spec.per_team_max as usize {
        return Err(SpawnError::TeamLimit {
            team: team.to_string(),
            challenge: challenge.name.to_string(),
            max: challenge.spec.per_team_max,
        }
        .into());
    }
    Ok(())
}

/// Live instances, as this replica's view holds them.
#[utoipa::path(
    get, path = "/v1/instances", tag = "instances", operation_id = "list_instances",
    params(ListQuery),
    responses((status = 200, description = "live instances", body = InstanceList))
)]
pub(super) async fn list(
    State(app): AppState,
    scope: Scope,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let view = app.view.lock();
    let instances = view
        .instances
        .values()
        // Pooled instances are no team's: `GET /v1/pools` lists them.
        .filter(|i| !i.record.is_pooled())
        .filter(|i| q.team.as_deref().is_none_or(|t| i.record.team_str() == t))
        .filter(|i| {
            q.challenge
                .as_deref()
                .is_none_or(|c| i.record.challenge.as_str() == c)
        })
        .map(|i| {
            Instance::new(&app, &i.record, view.status_text(&i.record.id))
                .with_services(view.services_of(&i.record.id))
                .with_solver(view.solver_of(&i.record.id), scope == Scope::Admin)
        })
        .collect();
    let revision = view.revision;
    Ok(json_response(
        StatusCode::OK,
        InstanceList {
            instances,
            revision,
        },
    ))
}

/// One instance.
#[utoipa::path(
    get, path = "/v1/instances/{id}", tag = "instances", operation_id = "get_instance",
    params(("id" = String, Path, description = "the instance's id: 10 lowercase hex characters"), TeamQuery),
    responses(
        (status = 200, description = "the instance, or its place while it waits in the queue (`status` queued; each GET holds the place for another hold_secs)", body = Instance),
        (status = 400, description = "not an instance id", body = ErrorBody),
        (status = 404, description = "no such instance", body = ErrorBody),
    )
)]
pub(super) async fn get(
    State(app): AppState,
    scope: Scope,
    Path(id): Path<String>,
    Query(q): Query<TeamQuery>,
) -> ApiResult {
    let id = parse_id(&id)?;
    let team = team_param(&q)?;
    let current = match etcd(&app, || lifecycle::get(&app.client, &app.ks, &id)).await {
        Err(e) if e.is_status(StatusCode::NOT_FOUND) => {
            if let Some(answer) = queue::get(&app, &id, team.as_ref()).await {
                return Ok(answer);
            }
            // Admitted between the two reads: the instance is there now.
            etcd(&app, || lifecycle::get(&app.client, &app.ks, &id)).await?
        }
        other => other?,
    };
    let current = owned(current, team.as_ref())?.current;
    let (status, services, solver) = {
        let view = app.view.lock();
        (
            view.status_text(&id),
            view.services_of(&id),
            view.solver_of(&id).cloned(),
        )
    };
    Ok(json_response(
        StatusCode::OK,
        Instance::new(&app, &current.record, status)
            .with_services(services)
            .with_solver(solver.as_ref(), scope == Scope::Admin),
    ))
}

/// How many times a renewal is decided and written before a conflict is
/// the answer.
const RENEW_ATTEMPTS: u32 = 4;

/// Extends an instance's life per its challenge's ttl rules (and its
/// policy's `renew` hook). A standby forwards it to the scheduler.
#[utoipa::path(
    post, path = "/v1/instances/{id}/renew", tag = "instances", operation_id = "renew_instance",
    params(("id" = String, Path, description = "the instance's id"), TeamQuery),
    responses(
        (status = 200, description = "the instance with its new expires_at", body = Instance),
        (status = 403, description = "refused by the challenge's policy", body = ErrorBody),
        (status = 404, description = "no such instance", body = ErrorBody),
        (status = 409, description = "max renewals or max lifetime reached, too early to extend it, or its challenge was deleted", body = ErrorBody),
        (status = 429, description = "the team's (or the platform's) renew bucket is empty", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
        (status = 503, description = "etcd has no quorum, no scheduler is elected, or this standby could not forward to the scheduler (`leader` is its URL)", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
    )
)]
pub(super) async fn renew(
    State(app): AppState,
    scope: Scope,
    Path(id): Path<String>,
    Query(q): Query<TeamQuery>,
    headers: HeaderMap,
) -> ApiResult {
    let id = parse_id(&id)?;
    let team = team_param(&q)?;
    // The instance's shard decides who renews it: its challenge, from the
    // view (or etcd, for one the view has not seen yet).
    let known = app
        .view
        .lock()
        .instances
        .get(&id)
        .map(|i| i.record.challenge.clone());
    let challenge = match known {
        Some(c) => c,
        None => {
            etcd(&app, || lifecycle::get(&app.client, &app.ks, &id))
                .await?
                .record
                .challenge
        }
    };
    let leader = match scheduler(&app, &challenge).await? {
        Scheduler::Here(leader) => leader,
        Scheduler::There(to) => {
            let path = match &team {
                Some(t) => format!("/v1/instances/{id}/renew?team={}", t.as_str()),
                None => format!("/v1/instances/{id}/renew"),
            };
            return forward(&app, &to, Method::POST, &path, &headers, Bytes::new()).await;
        }
    };
    if let Some(t) = &team {
        rate_limit(&app, scope, Op::Renew, t)?;
    }
    let mut attempt = 1;
    let (current, result) = loop {
        let current = etcd(&app, || lifecycle::get(&app.client, &app.ks, &id)).await?;
        let Owned { current, owner } = owned(current, team.as_ref())?;
        if team.is_none() && attempt == 1 {
            rate_limit(&app, scope, Op::Renew, &owner)?;
        }
        let result = renew_current(&app, &leader, &current).await;
        // The owning agent reports its container's status on the status
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
            r.team_str(),
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
    let now = unix_secs();
    let ttl = &challenge.value.spec.ttl;
    let extend = match policy::renew(app, &challenge.value, &current.record).await {
        Renewal::Extend(secs) => secs.unwrap_or(ttl.default_secs),
        Renewal::Refused(r) => return Err(r.into()),
    };
    let expires_at = lifecycle::renewed_expiry(&current.record, ttl, now, extend)?;
    let fence = (leader.key.as_str(), leader.token);
    let renewed = etcd(app, || {
        lifecycle::renew(&app.client, &app.ks, fence, current, expires_at, now)
    })
    .await?;
    app.metrics.renewals.inc();
    if renewed.settled {
        app.metrics.renewals_settled.inc();
    }
    let record = renewed.record;
    let status = app.view.lock().status_text(id);
    Ok(json_response(
        StatusCode::OK,
        Instance::new(app, &record, status),
    ))
}

/// Deletes an instance (revokes its lease: every key goes at once).
#[utoipa::path(
    delete, path = "/v1/instances/{id}", tag = "instances", operation_id = "delete_instance",
    params(("id" = String, Path, description = "the instance's id"), TeamQuery),
    responses(
        (status = 204, description = "deleted"),
        (status = 404, description = "no such instance (or, with ?team=, not that team's)", body = ErrorBody),
        (status = 429, description = "the team's (or the platform's) delete bucket is empty", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
    )
)]
pub(super) async fn delete(
    State(app): AppState,
    scope: Scope,
    Path(id): Path<String>,
    Query(q): Query<TeamQuery>,
) -> ApiResult {
    let id = parse_id(&id)?;
    let team = team_param(&q)?;
    let owner = match &team {
        Some(t) => t.clone(),
        None => match etcd(&app, || lifecycle::get(&app.client, &app.ks, &id)).await {
            Ok(c) => owned(c, None)?.owner,
            Err(e) if e.is_status(StatusCode::NOT_FOUND) => {
                let waiting = app.view.lock().waiting(&id).map(|w| w.record.team);
                waiting.ok_or(e)?
            }
            Err(e) => return Err(e),
        },
    };
    rate_limit(&app, scope, Op::Delete, &owner)?;
    // A spawn still waiting leaves the queue.
    if let Some(left) = queue::leave(&app, &id, team.as_ref()).await {
        left?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let team = team.filter(|_| !planted("team-scope"));
    etcd(&app, || {
        lifecycle::delete(&app.client, &app.ks, &id, team.as_ref())
    })
    .await?;
    app.metrics.deletions.inc();
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Checks a flag against the instance's (in constant time).
#[utoipa::path(
    post, path = "/v1/instances/{id}/flag", tag = "instances", operation_id = "check_flag",
    params(("id" = String, Path, description = "the instance's id"), TeamQuery),
    request_body = FlagCheck,
    responses(
        (status = 200, description = "whether the flag is the instance's", body = FlagResult),
        (status = 400, description = "an invalid request, naming the field", body = ErrorBody),
        (status = 404, description = "no such instance (or, with ?team=, not that team's)", body = ErrorBody),
        (status = 429, description = "the team's (or the platform's) flag bucket is empty", body = ErrorBody, headers(("Retry-After" = u64, description = "seconds"))),
    )
)]
pub(super) async fn flag(
    State(app): AppState,
    scope: Scope,
    Path(id): Path<String>,
    Query(q): Query<TeamQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let team = team_param(&q)?;
    let req: FlagCheck = decode_json(&body).map_err(ApiError::bad_request)?;
    if let Some(t) = &team {
        rate_limit(&app, scope, Op::Flag, t)?;
    }
    let current = etcd(&app, || lifecycle::get(&app.client, &app.ks, &id)).await?;
    let Owned { current, owner } = owned(current, team.as_ref())?;
    if team.is_none() {
        rate_limit(&app, scope, Op::Flag, &owner)?;
    }
    let stored = etcd(&app, || {
        lifecycle::flag(&app.client, &app.ks, &current.record)
    })
    .await?;
    // An instance with no flag stored (a record written by hand) matches nothing.
    let correct = stored.is_some_and(|f| crate::flag::matches(&f, req.flag.trim()));
    Ok(json_response(StatusCode::OK, FlagResult { correct }))
}
