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
/// How long a place that failed for a reason of its own waits.
const RETRY: Duration = Duration::from_secs(5);

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
    let (position, waiting) = view.position(w);
    Some(accepted(w, position, waiting))
}

/// Whether a place of `challenge` waits.
pub(super) fn waiting_for(app: &App, challenge: &ChallengeName) -> bool {
    app.view.lock().queue.keys().any(|(c, _)| c == challenge)
}

/// Whether spawns wait for room (not for their policy): room that frees
/// is theirs before a newcomer's (who joins the queue, and is admitted in
/// the next pass if nothing ahead of it fits).
pub(super) fn waiting_for_room(app: &App) -> bool {
    app.view
        .lock()
        .queue
        .values()
        .any(|w| w.record.reason != "policy")
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
    let wait = Duration::from_millis(app.cfg.etcd_timeout_ms);
    let sent = std::time::Instant::now();
    let answer = tokio::time::timeout(wait, client.txn(txn)).await;
    app.metrics.etcd.write_took(sent);
    let resp = match answer {
        Ok(Ok(r)) => r,
        answer => {
            // No answer is not no commit: a place on our lease is ours.
            let written = tokio::time::timeout(wait, client.get(key.as_str(), None)).await;
            let ours = matches!(&written, Ok(Ok(r)) if r.kvs().first().is_some_and(|kv| kv.lease() == lease));
            if !ours {
                let _ = tokio::time::timeout(wait, client.lease_revoke(lease)).await;
                let why = match answer {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".into(),
                };
                tracing::warn!(team = %team, challenge = %challenge.name, error = %why, "could not write a queue place");
                return Err(ApiError::unavailable(
                    "the scheduler's store did not take the place; retry shortly",
                )
                .reason("unavailable"));
            }
            tracing::info!(team = %team, challenge = %challenge.name, "etcd's answer to a queue place was lost; it had committed");
            return Err(ApiError::unavailable(
                "this team's place in the queue is being written; ask again shortly",
            )
            .reason("queue_settling"));
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
            "this team's place in the queue is being written; ask again shortly",
        )
        .reason("queue_settling"));
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
    let (position, of_challenge) = view.position(&waiting);
    tracing::info!(instance = %waiting.record.id, team = %team, challenge = %challenge.name, reason, position, "queued a spawn");
    Ok(accepted(&waiting, position, of_challenge))
}

/// A waiting spawn by id, for `GET /v1/instances/{id}` (and `?team=`'s
/// scope): renews its hold and answers its place. `None`: not waiting.
pub(super) async fn get(app: &App, id: &InstanceId, team: Option<&TeamId>) -> Option<Response> {
    let (w, (position, waiting)) = {
        let view = app.view.lock();
        let w = view.waiting(id)?;
        let at = view.position(&w);
        (w, at)
    };
    if team.is_some_and(|t| *t != w.record.team) && !tidegate_schema::config::planted("team-scope")
    {
        return None;
    }
    hold(app, &w).await;
    Some(json_response(StatusCode::OK, body(&w, position, waiting)))
}

/// When each place's hold was last renewed by this replica.
static HELD: std::sync::Mutex<BTreeMap<i64, Instant>> = std::sync::Mutex::new(BTreeMap::new());

/// Renews a place's hold lease once, at most every quarter of its hold
/// per replica (a page polling fast costs etcd no more), bounded by the
/// etcd timeout (a lost renewal costs nothing but the hold it would have
/// given).
async fn hold(app: &App, w: &Waiting) {
    let every = Duration::from_secs(u64::from(w.record.hold_secs) / 4);
    {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if held.get(&w.lease).is_some_and(|at| at.elapsed() < every) {
            return;
        }
        held.retain(|_, at| at.elapsed() < Duration::from_secs(3600));
        held.insert(w.lease, Instant::now());
    }
    let lease = w.lease;
    let renew = async {
        let mut client = app.client.clone();
        let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        stream.message().await?;
        Ok::<_, etcd_client::Error>(())
    };
    let wait = Duration::from_millis(app.cfg.etcd_timeout_ms);
    match tokio::time::timeout(wait, renew).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(lease, error = %e, "could not renew a queue place's hold"),
        Err(_) => tracing::debug!(lease, "renewing a queue place's hold timed out"),
    }
}

/// Leaves the queue (`DELETE /v1/instances/{id}` of a waiting spawn).
/// `None`: not waiting (or not `team`'s).
pub(super) async fn leave(
    app: &App,
    id: &InstanceId,
    team: Option<&TeamId>,
) -> Option<ApiResult<()>> {
    let w = app.view.lock().waiting(id)?;
    if team.is_some_and(|t| *t != w.record.team) && !tidegate_schema::config::planted("team-scope")
    {
        return None;
    }
    match remove(app, &w, None).await {
        Ok(true) => Some(Ok(())),
        // Admitted meanwhile: the caller deletes the instance instead.
        Ok(false) => None,
        Err(e) => Some(Err(e)),
    }
}

/// Deletes a place if it is still the one `w` saw (and, for the
/// scheduler, while its fence holds), then its hold lease. False: it was
/// not there any more (admitted, lapsed or left).
async fn remove(app: &App, w: &Waiting, fence: Option<&LeaderInfo>) -> ApiResult<bool> {
    let key = key_of(app, &w.record);
    let mut when = vec![Compare::create_revision(
        key.as_str(),
        CompareOp::Equal,
        w.create_revision,
    )];
    when.extend(fence.map(|l| Compare::create_revision(l.key.as_str(), CompareOp::Equal, l.token)));
    let txn = Txn::new()
        .when(when)
        .and_then([TxnOp::delete(key.as_str(), None)]);
    let mut client = app.client.clone();
    let wait = Duration::from_millis(app.cfg.etcd_timeout_ms);
    let removed = match tokio::time::timeout(wait, client.txn(txn)).await {
        Ok(Ok(r)) => r.succeeded(),
        _ => {
            return Err(ApiError::unavailable(
                "the scheduler's store did not answer; retry shortly",
            ));
        }
    };
    if removed {
        let _ = tokio::time::timeout(wait, client.lease_revoke(w.lease)).await;
        app.view
            .lock()
            .queue
            .remove(&(w.record.challenge.clone(), w.record.team.clone()));
    }
    Ok(removed)
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
    let (ranked, totals) = view.ranked();
    let queued = ranked
        .into_iter()
        .filter(|(w, _)| {
            q.team
                .as_deref()
                .is_none_or(|t| w.record.team.as_str() == t)
        })
        .filter(|(w, _)| {
            q.challenge
                .as_deref()
                .is_none_or(|c| w.record.challenge.as_str() == c)
        })
        .map(|(w, position)| {
            let waiting = totals.get(&w.record.challenge).copied().unwrap_or(1);
            body(w, position, waiting)
        })
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
        if !app.leads_any() {
            not_before.clear();
            continue;
        }
        let order: Vec<Waiting> = app.view.lock().fair_order().into_iter().cloned().collect();
        not_before.retain(|id, _| order.iter().any(|w| &w.record.id == id));
        if order.is_empty() {
            continue;
        }
        let mut full: BTreeSet<ChallengeName> = BTreeSet::new();
        for w in order {
            // Each shard's leader admits its own challenges' places.
            let Some(leader) = app.lead(&w.record.challenge) else {
                continue;
            };
            if full.contains(&w.record.challenge)
                || not_before
                    .get(&w.record.id)
                    .is_some_and(|at| Instant::now() < *at)
            {
                continue;
            }
            // The spawn lock per place, not per pass: direct spawns are
            // not held up by a long queue.
            let outcome = {
                let _serial = app.spawn_lock.lock().await;
                admit(&app, &leader, &w).await
            };
            match outcome {
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
                    let _ = remove(&app, &w, Some(&leader)).await;
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
    let wait = Duration::from_millis(app.cfg.etcd_timeout_ms);
    let seen = app.view.lock().revision;
    let (challenge, revision) =
        match tokio::time::timeout(wait, app.challenges.get(&w.record.challenge)).await {
            Ok(Ok(c)) => (c.value, c.revision),
            Ok(Err(ChallengeError::NotFound(_))) => {
                return Outcome::Dropped("its challenge was deleted".into());
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read a queued spawn's challenge");
                return Outcome::Stop;
            }
            Err(_) => return Outcome::Stop,
        };
    let Ok(secret_env) = secret_env_of(app, &challenge, revision).await else {
        return Outcome::Later(RETRY);
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
                // A failing plugin (deadline, trap) may pass next time.
                RefusalKind::FallbackDeny => Outcome::Later(RETRY),
                _ => Outcome::Dropped(format!("its policy refused it: {}", r.message)),
            };
        }
    };
    let mut placed = place(app, &challenge);
    if matches!(placed, Err(Unplaced::Full(..)))
        && super::pool::yield_room(app, &challenge, true).await
    {
        placed = place(app, &challenge);
    }
    let worker = match placed {
        Ok(w) => w,
        // No worker registered, or none large enough right now: workers
        // come back (an agent restarting, a lease lapsing); wait for them.
        Err(Unplaced::Full(..) | Unplaced::Never(_)) => return Outcome::NoRoom,
    };
    let plan = SpawnPlan {
        keys: app.ks.clone(),
        leader_key: leader.key.clone(),
        token: leader.token,
        ttl_secs,
        team: w.record.team.clone(),
        guards: app.guards(seen, Some(&worker), Some(&w.record.team)),
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
        create_revision: w.create_revision,
    };
    match write_spawn(app, &plan, Some(&from), None).await {
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
        // Fenced, or etcd not answering: nothing else will land either.
        Err(e) if matches!(e.refusal(), Some("fenced" | "unavailable")) => {
            tracing::warn!(instance = %w.record.id, error = %e.message(), "could not admit a queued spawn; stopping this pass");
            Outcome::Stop
        }
        // This place only (ports contended, ...): the others go on.
        Err(e) => {
            tracing::warn!(instance = %w.record.id, error = %e.message(), "could not admit a queued spawn; retrying it later");
            Outcome::Later(RETRY)
        }
    }
}
