//! The waiting queue: a spawn that finds no room (or whose policy says
//! `queue`) gets `202` and a place instead of a refusal, and the scheduler
//! admits places as room frees, in fair order.
//!
//! The queue is authoritative state in etcd (`queue/{challenge}/{team}`,
//! [`QueuedRecord`]): written by the scheduler with its fence, one place
//! per team and challenge (the key), ordered by the key's create revision,
//! each on a lease of the challenge's `queue.hold_secs` that every `GET` of
//! its id renews, so a team that stops asking loses its place. Admission is
//! the spawn Txn under the promised id, which also deletes the place (and
//! fails when it is gone): a place is admitted at most once, by the one
//! scheduler whose fence holds. A new scheduler reads the queue from its
//! view and goes on in the same order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tidegate_schema::time::unix_secs;
use tidegate_schema::{
    ChallengeName, ChallengeRecord, InstanceId, Key, QueuedRecord, Record, TeamId, V1,
};

use super::bodies::{ListQuery, QueueList, Queued};
use super::instances::{Unplaced, place, secret_env_of, write_spawn};
use super::{ApiError, ApiResult, AppState, Scope, etcd, json_response};
use crate::policy::{self, Admission, RefusalKind};
use crate::scheduler::LeaderInfo;
use crate::spawn::FromQueue;
use crate::view::Waiting;
use crate::{App, ChallengeError, SpawnPlan};

/// How often the scheduler looks for room for waiting spawns.
const ADMIT_INTERVAL: Duration = Duration::from_millis(200);
/// At most this long between asking a place's policy again after it said
/// `queue`.
const POLICY_RETRY: Duration = Duration::from_secs(2);

fn body(w: &Waiting, position: usize, waiting: usize) -> Queued {
    Queued {
        id: w.record.id.clone(),
        challenge: w.record.challenge.clone(),
        team: w.record.team.clone(),
        status: "queued",
        position,
        waiting,
        reason: w.record.reason.clone(),
        detail: w.record.detail.clone(),
        queued_at: w.record.queued_at,
        hold_secs: w.record.hold_secs,
    }
}

/// The 202 for a place: its body and where to ask about it.
fn accepted(w: &Waiting, position: usize, waiting: usize) -> Response {
    let mut r = json_response(StatusCode::ACCEPTED, body(w, position, waiting));
    if let Ok(v) = header::HeaderValue::from_str(&format!("/v1/instances/{}", w.record.id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The team's place for `challenge`, answered as a 202, when it has one.
pub(super) fn already_waiting(
    app: &App,
    challenge: &ChallengeName,
    team: &TeamId,
) -> Option<Response> {
    let view = app.view.lock();
    let w = view.queue.get(&(challenge.clone(), team.clone()))?;
    let (_, position) = view.waiting(&w.record.id)?;
    Some(accepted(w, position, view.queue.len()))
}

/// Whether spawns of `challenge` wait for room (not for their policy):
/// room that frees is theirs before a newcomer's.
pub(super) fn waiting_for_room(app: &App, challenge: &ChallengeName) -> bool {
    app.view
        .lock()
        .queue
        .values()
        .any(|w| w.record.challenge == *challenge && w.record.reason != "policy")
}

/// Gives the team a place for `challenge` (under the spawn lock): 202 with
/// its position, 503 `queue_full` past `queue.max_waiting`.
pub(super) async fn enqueue(
    app: &App,
    leader: &LeaderInfo,
    challenge: &ChallengeRecord,
    team: &TeamId,
    reason: &str,
    detail: &str,
) -> ApiResult {
    let spec = &challenge.spec.queue;
    let (of_challenge, round) = {
        let view = app.view.lock();
        let n = view
            .queue
            .values()
            .filter(|w| w.record.challenge == challenge.name)
            .count();
        (n, view.next_round(team))
    };
    if of_challenge >= spec.max_waiting as usize {
        return Err(ApiError::unavailable(format!(
            "no worker has room and {of_challenge} spawns of {:?} already wait (its queue.max_waiting); retry later",
            challenge.name.as_str()
        ))
        .reason("queue_full"));
    }
    let key = app.ks.key(&Key::Queued {
        challenge: challenge.name.clone(),
        team: team.clone(),
    });
    let record = QueuedRecord {
        v: V1,
        id: InstanceId::from_random(rand::random()),
        challenge: challenge.name.clone(),
        team: team.clone(),
        queued_at: unix_secs(),
        token: leader.token,
        reason: reason.to_string(),
        detail: detail.to_string(),
        hold_secs: spec.hold_secs,
        round,
    };
    let mut client = app.client.clone();
    let lease = etcd(app, || async {
        Ok::<_, etcd_client::Error>(
            client
                .clone()
                .lease_grant(i64::from(spec.hold_secs), None)
                .await?
                .id(),
        )
    })
    .await?;
    let txn = Txn::new()
        .when([
            Compare::create_revision(leader.key.as_str(), CompareOp::Equal, leader.token),
            Compare::version(key.as_str(), CompareOp::Equal, 0),
        ])
        .and_then([TxnOp::put(
            key.as_str(),
            record.encode(),
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(leader.key.as_str(), None)]);
    let resp = match client.txn(txn).await {
        Ok(r) => r,
        Err(e) => {
            let _ = client.lease_revoke(lease).await;
            return Err(ApiError::unavailable(format!("etcd: {e}")));
        }
    };
    if !resp.succeeded() {
        let _ = client.lease_revoke(lease).await;
        let current = tidegate_etcd::guard::else_get(&resp).map_or(0, |kv| kv.create_revision());
        if current != leader.token {
            app.metrics.fenced_writes.inc();
            return Err(ApiError::unavailable(format!(
                "not the scheduler any more: fencing token {} is stale",
                leader.token
            ))
            .reason("fenced"));
        }
        // The team's place was written meanwhile (by an earlier scheduler
        // term): answer about it once the view has it.
        return Err(ApiError::unavailable(
            "this team's place in the queue is being written; retry shortly",
        ));
    }
    let revision = resp.header().map_or(0, |h| h.revision());
    app.metrics.queued.inc();
    app.metrics.etcd.wrote(revision);
    let waiting = Waiting {
        record,
        lease,
        create_revision: revision,
        mod_revision: revision,
    };
    let mut view = app.view.lock();
    view.queue
        .entry((challenge.name.clone(), team.clone()))
        .or_insert(waiting.clone());
    let position = view
        .waiting(&waiting.record.id)
        .map_or(view.queue.len(), |(_, p)| p);
    tracing::info!(instance = %waiting.record.id, team = %team, challenge = %challenge.name, reason, position, "queued a spawn");
    Ok(accepted(&waiting, position, view.queue.len()))
}

/// A waiting spawn by id, for `GET /v1/instances/{id}` (and `?team=`'s
/// scope): renews its hold and answers its place. `None`: not waiting.
pub(super) async fn get(app: &App, id: &InstanceId, team: Option<&TeamId>) -> Option<Response> {
    let (w, position, waiting) = {
        let view = app.view.lock();
        let (w, position) = view.waiting(id)?;
        (w, position, view.queue.len())
    };
    if team.is_some_and(|t| *t != w.record.team) && !tidegate_schema::config::planted("team-scope")
    {
        return None;
    }
    hold(app, w.lease).await;
    Some(json_response(StatusCode::OK, body(&w, position, waiting)))
}

/// Renews a place's hold lease once (a lost renewal costs nothing but
/// the hold it would have given).
async fn hold(app: &App, lease: i64) {
    let mut client = app.client.clone();
    match client.lease_keep_alive(lease).await {
        Ok((mut keeper, mut stream)) => {
            if keeper.keep_alive().await.is_ok() {
                let _ = stream.message().await;
            }
        }
        Err(e) => tracing::debug!(lease, error = %e, "could not renew a queue place's hold"),
    }
}

/// Leaves the queue (`DELETE /v1/instances/{id}` of a waiting spawn).
/// `None`: not waiting (or not `team`'s).
pub(super) async fn leave(
    app: &App,
    id: &InstanceId,
    team: Option<&TeamId>,
) -> Option<ApiResult<()>> {
    let w = app.view.lock().waiting(id).map(|(w, _)| w)?;
    if team.is_some_and(|t| *t != w.record.team) && !tidegate_schema::config::planted("team-scope")
    {
        return None;
    }
    Some(remove(app, &key_of(app, &w.record), &w).await)
}

/// Deletes a place if it is still the one `w` saw, and its hold lease.
async fn remove(app: &App, key: &str, w: &Waiting) -> ApiResult<()> {
    let mut client = app.client.clone();
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, w.mod_revision)])
        .and_then([TxnOp::delete(key, None)]);
    client
        .txn(txn)
        .await
        .map_err(|e| ApiError::unavailable(format!("etcd: {e}")))?;
    let _ = client.lease_revoke(w.lease).await;
    app.view
        .lock()
        .queue
        .remove(&(w.record.challenge.clone(), w.record.team.clone()));
    Ok(())
}

/// The waiting queue, in admission order.
#[utoipa::path(
    get, path = "/v1/queue", tag = "instances", operation_id = "list_queue",
    params(ListQuery),
    responses((status = 200, description = "spawns waiting for room, first to be admitted first", body = QueueList))
)]
pub(super) async fn list(
    State(app): AppState,
    _scope: Scope,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let view = app.view.lock();
    let order = view.fair_order();
    let total = order.len();
    let queued = order
        .into_iter()
        .enumerate()
        .filter(|(_, w)| {
            q.team
                .as_deref()
                .is_none_or(|t| w.record.team.as_str() == t)
        })
        .filter(|(_, w)| {
            q.challenge
                .as_deref()
                .is_none_or(|c| w.record.challenge.as_str() == c)
        })
        .map(|(i, w)| body(w, i + 1, total))
        .collect();
    Ok(json_response(
        StatusCode::OK,
        QueueList {
            queued,
            revision: view.revision,
        },
    )
    .into_response())
}

/// The etcd key of a place.
fn key_of(app: &App, record: &QueuedRecord) -> String {
    app.ks.key(&Key::Queued {
        challenge: record.challenge.clone(),
        team: record.team.clone(),
    })
}

/// What became of one place in an admission pass.
enum Outcome {
    Admitted,
    /// No worker has room for its challenge now.
    NoRoom,
    /// Its policy said `queue` again: ask no sooner than this.
    Later(Duration),
    /// It can never be admitted: removed, with why.
    Dropped(String),
    /// Gone meanwhile (its hold lapsed, it was left).
    Gone,
    /// This replica cannot write now (fenced, etcd down): stop the pass.
    Stop,
}

/// On the scheduler, admits waiting spawns as room frees, forever.
pub async fn run_admissions(app: Arc<App>) {
    let mut not_before: BTreeMap<InstanceId, Instant> = BTreeMap::new();
    loop {
        tokio::time::sleep(ADMIT_INTERVAL).await;
        let Some(leader) = app.leader.load_full() else {
            not_before.clear();
            continue;
        };
        let order: Vec<Waiting> = app.view.lock().fair_order().into_iter().cloned().collect();
        not_before.retain(|id, _| order.iter().any(|w| &w.record.id == id));
        if order.is_empty() {
            continue;
        }
        let _serial = app.spawn_lock.lock().await;
        let mut full: BTreeSet<ChallengeName> = BTreeSet::new();
        for w in order {
            if full.contains(&w.record.challenge)
                || not_before
                    .get(&w.record.id)
                    .is_some_and(|at| Instant::now() < *at)
            {
                continue;
            }
            match admit(&app, &leader, &w).await {
                Outcome::Admitted => {
                    let waited = unix_secs().saturating_sub(w.record.queued_at);
                    tracing::info!(instance = %w.record.id, team = %w.record.team, challenge = %w.record.challenge, waited_secs = waited, "admitted a queued spawn");
                    app.metrics.admitted.inc();
                }
                Outcome::NoRoom => {
                    full.insert(w.record.challenge.clone());
                }
                Outcome::Later(wait) => {
                    not_before.insert(w.record.id.clone(), Instant::now() + wait);
                }
                Outcome::Dropped(why) => {
                    tracing::warn!(instance = %w.record.id, team = %w.record.team, challenge = %w.record.challenge, %why, "dropped a queued spawn");
                    app.metrics.queue_dropped.inc();
                    let _ = remove(&app, &key_of(&app, &w.record), &w).await;
                }
                Outcome::Gone => {}
                Outcome::Stop => break,
            }
        }
    }
}

/// Tries to admit one place: the policy again, placement, then the spawn
/// Txn that deletes the place.
async fn admit(app: &App, leader: &LeaderInfo, w: &Waiting) -> Outcome {
    let (challenge, revision) = match app.challenges.get(&w.record.challenge).await {
        Ok(c) => (c.value, c.revision),
        Err(ChallengeError::NotFound(_)) => {
            return Outcome::Dropped("its challenge was deleted".into());
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a queued spawn's challenge");
            return Outcome::Stop;
        }
    };
    let Ok(secret_env) = secret_env_of(app, &challenge, revision).await else {
        return Outcome::Stop;
    };
    let ttl_secs = match policy::admit_spawn(app, &challenge, &w.record.team).await {
        Admission::Admit { ttl_secs, .. } => ttl_secs,
        Admission::Refused(r) => {
            return match r.kind {
                // Asked again soon (its Retry-After is the caller's hint,
                // not a wait imposed on a place already held).
                RefusalKind::Queue { retry_after_secs } => Outcome::Later(
                    Duration::from_secs(u64::from(retry_after_secs)).min(POLICY_RETRY),
                ),
                _ => Outcome::Dropped(format!("its policy refused it: {}", r.message)),
            };
        }
    };
    let worker = match place(app, &challenge) {
        Ok(w) => w,
        Err(Unplaced::Full(..)) => return Outcome::NoRoom,
        Err(Unplaced::Never(e)) => return Outcome::Dropped(e.message().to_string()),
    };
    let plan = SpawnPlan {
        keys: app.ks.clone(),
        leader_key: leader.key.clone(),
        token: leader.token,
        ttl_secs,
        team: w.record.team.clone(),
        worker,
        domain: app.cfg.domain.clone(),
        tcp_ports: app.tcp_ports.clone(),
        now: unix_secs(),
        challenge,
        challenge_revision: revision,
        secret_env,
    };
    let from = FromQueue {
        id: w.record.id.clone(),
        key: key_of(app, &w.record),
    };
    match write_spawn(app, &plan, Some(&from)).await {
        Ok(_) => {
            app.view
                .lock()
                .queue
                .remove(&(w.record.challenge.clone(), w.record.team.clone()));
            // The place is deleted; its hold lease holds nothing now.
            let _ = app.client.clone().lease_revoke(w.lease).await;
            Outcome::Admitted
        }
        Err(e) if e.is_status(StatusCode::NOT_FOUND) => Outcome::Gone,
        Err(e) if e.is_status(StatusCode::CONFLICT) => Outcome::Dropped(e.message().to_string()),
        Err(e) => {
            tracing::warn!(instance = %w.record.id, error = %e.message(), "could not admit a queued spawn; retrying");
            Outcome::Stop
        }
    }
}
