//! Warm pools (`pool = { min, max }`): the scheduler keeps started,
//! unassigned instances of a challenge (no team, no hostname or port,
//! routed by nothing, counted as no team's) and a spawn claims a running
//! one in one Txn ([`crate::spawn::claim`]) instead of waiting for its
//! containers to start.
//!
//! - The target is the challenge's spawns of the last minute, between
//!   `min` and `max`. The pool is refilled after every claim, after a
//!   pooled instance fails (a crash past its restarts) or its lease runs
//!   out, and replaced when the challenge's spec changes.
//! - `min` is a wish, not a reservation: nothing is added while a spawn
//!   waits for room, and a spawn that finds no room takes the room of a
//!   pooled instance of another challenge (removed), unless the
//!   controller's `pool_yields` is off.
//! - Every write is fenced by the scheduler's token, and a claim compares
//!   the pooled record's mod revision: one pooled instance goes to one
//!   team, across leader changes too (a new leader adopts the pool it
//!   finds in etcd).

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tidegate_schema::records::ContainerSpec;
use tidegate_schema::time::unix_secs;
use tidegate_schema::{
    ChallengeName, ChallengeRecord, InstanceId, InstanceRecord, InstanceStatus, Key, Record,
    SecretRecord, ServiceRecord, TeamId, V1, WorkerId,
};

use super::ApiResult;
use super::instances::{Unplaced, place, secret_env_of, write_spawn};
use super::queue::waiting_for_room;
use crate::App;
use crate::scheduler::LeaderInfo;
use crate::spawn::{FromPool, SpawnPlan, Spawned};
use crate::view::LiveInstance;

/// How often the scheduler looks at its pools.
const KEEP_INTERVAL: Duration = Duration::from_millis(250);

/// A pooled instance's lease: unclaimed this long, it is replaced by a
/// fresh one.
pub(super) const POOL_LEASE_SECS: u64 = 86_400;

/// The spawns of this many last seconds set a pool's target.
const DEMAND_WINDOW_SECS: u64 = 60;

/// A pooled instance not running this long after it was made is replaced
/// (its agent cannot run it: an old agent, a missing image, no firewall).
const START_WITHIN_SECS: u64 = 300;

/// After a pool lost members to failures, it is refilled no sooner than
/// this, doubled per failing round up to [`MAX_BACKOFF`] (a broken image is
/// not recreated four times a second).
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// After a pooled instance gave its room to a spawn, no pool is refilled
/// for this long (well within the chaos checker's 10 s): on a full cluster
/// a refill would only be taken again by the next spawn.
const AFTER_YIELD: Duration = Duration::from_secs(5);

/// Per challenge: failing rounds in a row, and no refill before when.
type Backoff = std::collections::BTreeMap<ChallengeName, (u32, std::time::Instant)>;

/// On the scheduler, keeps every pool at its target, forever.
pub async fn run_pools(app: Arc<App>) {
    let mut backoff = Backoff::new();
    loop {
        tokio::time::sleep(KEEP_INTERVAL).await;
        if !app.leads_any() {
            backoff.clear();
            continue;
        }
        keep(&app, &mut backoff).await;
    }
}

/// How many pooled instances `challenge` wants now: its spawns of the last
/// minute, between `min` and `max`.
fn target(app: &App, challenge: &ChallengeRecord) -> usize {
    let Some(pool) = challenge.spec.pool else {
        return 0;
    };
    let demand =
        app.recent_spawns
            .count_challenge(unix_secs(), &challenge.name, DEMAND_WINDOW_SECS);
    demand.clamp(pool.min, pool.max) as usize
}

/// A pool as the scheduler sees it: what to remove and how many to add.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    remove: Vec<(InstanceId, &'static str)>,
    add: usize,
    /// Members removed because they failed or never ran.
    failing: bool,
}

/// What one challenge's pool needs at `now`: its stale (older spec),
/// failed and never-running members removed, then as many added or
/// removed as make `target` (those not running yet go first).
fn plan_pool(
    members: &[(&LiveInstance, Option<&InstanceStatus>)],
    revision: i64,
    target: usize,
    now: u64,
) -> Plan {
    let mut plan = Plan::default();
    let mut healthy: Vec<(&LiveInstance, bool)> = Vec::new();
    for (m, status) in members {
        let running = matches!(status, Some(InstanceStatus::Running));
        if m.record.spec_revision != revision {
            plan.remove
                .push((m.record.id.clone(), "its challenge's spec changed"));
        } else if matches!(status, Some(InstanceStatus::Failed { .. })) {
            plan.remove.push((m.record.id.clone(), "it failed"));
            plan.failing = true;
        } else if !running && m.record.created_at + START_WITHIN_SECS < now {
            plan.remove
                .push((m.record.id.clone(), "not running 300 s after it was made"));
            plan.failing = true;
        } else {
            healthy.push((m, matches!(status, Some(InstanceStatus::Running))));
        }
    }
    if healthy.len() > target {
        // Keep the running ones, the oldest first.
        healthy.sort_by_key(|(m, running)| (!running, m.record.created_at, m.record.id.clone()));
        for (m, _) in &healthy[target..] {
            plan.remove
                .push((m.record.id.clone(), "more than the pool's target"));
        }
    } else {
        plan.add = target - healthy.len();
    }
    plan
}

/// One round over every pool of a shard this replica leads.
async fn keep(app: &App, backoff: &mut Backoff) {
    let (pools, orphans) = {
        let view = app.view.lock();
        let orphans: Vec<LiveInstance> = view
            .instances
            .values()
            .filter(|i| i.record.is_pooled() && !view.pools.contains_key(&i.record.challenge))
            .cloned()
            .collect();
        (view.pools.clone(), orphans)
    };
    for o in orphans {
        let Some(leader) = app.lead(&o.record.challenge) else {
            continue;
        };
        if remove(app, &leader, &o, "its challenge has no pool now")
            .await
            .is_err()
        {
            return;
        }
    }
    for (name, (challenge, revision)) in pools {
        let Some(leader) = app.lead(&name) else {
            backoff.remove(&name);
            continue;
        };
        let leader = &*leader;
        let target = target(app, &challenge);
        let plan = {
            let view = app.view.lock();
            let members = view.pooled(&name);
            let with_status: Vec<_> = members
                .iter()
                .map(|m| (*m, view.status_of(&m.record.id)))
                .collect();
            let plan = plan_pool(&with_status, revision, target, unix_secs());
            let gone: Vec<LiveInstance> = plan
                .remove
                .iter()
                .filter_map(|(id, _)| view.instances.get(id).cloned())
                .collect();
            (plan, gone)
        };
        let (plan, gone) = plan;
        for (m, (_, why)) in gone.iter().zip(&plan.remove) {
            if remove(app, leader, m, why).await.is_err() {
                return;
            }
        }
        let now = std::time::Instant::now();
        if plan.failing {
            let (rounds, _) = backoff.get(&name).copied().unwrap_or((0, now));
            let wait = (FIRST_BACKOFF * 2u32.saturating_pow(rounds.min(8))).min(MAX_BACKOFF);
            tracing::warn!(challenge = %name, ?wait, "pooled instances failed or never ran; refilling after a pause");
            backoff.insert(name.clone(), (rounds + 1, now + wait));
        }
        if backoff.get(&name).is_some_and(|(_, at)| now < *at) {
            continue;
        }
        // Room a waiting spawn needs is not taken for a wish, nor room a
        // spawn just took from the pool.
        let yielded = app
            .pool_yielded
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at.elapsed() < AFTER_YIELD);
        if plan.add == 0 || yielded || waiting_for_room(app) {
            continue;
        }
        for _ in 0..plan.add {
            match fill(app, leader, &challenge, revision).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(()) => return,
            }
        }
        // A round with the pool whole again ends the backoff.
        if !plan.failing {
            backoff.remove(&name);
        }
    }
}

/// Starts one pooled instance of `challenge` where placement says.
/// `Ok(false)`: no room; `Err`: this replica cannot write now.
async fn fill(
    app: &App,
    leader: &LeaderInfo,
    challenge: &ChallengeRecord,
    revision: i64,
) -> Result<bool, ()> {
    let _serial = app.spawn_lock.lock().await;
    let seen = app.view.lock().revision;
    let worker = match place(app, challenge) {
        Ok(w) => w,
        Err(Unplaced::Full(..) | Unplaced::Never(_)) => return Ok(false),
    };
    let guards = app.guards(seen, Some(&worker), None);
    let Ok(secret_env) = secret_env_of(app, challenge, revision).await else {
        return Err(());
    };
    let spec = &challenge.spec;
    let now = unix_secs();
    let record = InstanceRecord {
        v: V1,
        id: InstanceId::from_random(rand::random()),
        challenge: challenge.name.clone(),
        team: None,
        worker,
        token: leader.token,
        created_at: now,
        expires_at: now + POOL_LEASE_SECS,
        renewals: 0,
        team_slot: 0,
        http: Vec::new(),
        tcp: Vec::new(),
        container: ContainerSpec::of(spec),
        services: ServiceRecord::all_of(spec),
        spec_revision: revision,
        flag: None,
        flag_file: spec.flag.file.clone(),
        solver: tidegate_schema::SolverRecord::of(spec),
    };
    // A per-instance flag comes at claim; a fixed one is the template.
    let flag = if spec.per_instance_flag() {
        String::new()
    } else {
        spec.flag.template.clone()
    };
    let secret = SecretRecord {
        v: V1,
        instance: record.id.clone(),
        worker: record.worker.clone(),
        flag,
        env: secret_env,
    };
    let ks = &app.ks;
    let key = ks.key(&Key::Instance(record.id.clone()));
    let secret_key = ks.key(&Key::Secret {
        worker: record.worker.clone(),
        instance: record.id.clone(),
    });
    let wait = Duration::from_millis(app.cfg.etcd_timeout_ms);
    let mut client = app.client.clone();
    // The round trip observed: the lease grant and the Txn, both proposals.
    let sent = std::time::Instant::now();
    let written = tokio::time::timeout(wait, async {
        let lease = client.lease_grant(POOL_LEASE_SECS as i64, None).await?.id();
        let opts = || Some(PutOptions::new().with_lease(lease));
        let mut when = vec![
            Compare::create_revision(leader.key.as_str(), CompareOp::Equal, leader.token),
            Compare::version(key.as_str(), CompareOp::Equal, 0),
        ];
        let mut then = vec![
            TxnOp::put(key.as_str(), record.encode(), opts()),
            TxnOp::put(secret_key.as_str(), secret.encode(), opts()),
        ];
        // Another shard's leader placing on the worker meanwhile fails it.
        for (k, at) in &guards {
            when.push(Compare::mod_revision(k.as_str(), CompareOp::Less, at + 1));
            then.push(TxnOp::put(k.as_str(), record.id.as_str(), None));
        }
        let txn = Txn::new().when(when).and_then(then);
        let resp = client.txn(txn).await?;
        if !resp.succeeded() {
            let _ = client.lease_revoke(lease).await;
        }
        Ok::<_, etcd_client::Error>(
            resp.succeeded()
                .then(|| (lease, resp.header().map_or(0, |h| h.revision()))),
        )
    })
    .await;
    app.metrics.etcd.write_took(sent);
    match written {
        Ok(Ok(Some((lease, revision)))) => {
            tracing::info!(instance = %record.id, challenge = %record.challenge, worker = %record.worker, "started a pooled instance");
            app.metrics.etcd.wrote(revision);
            app.guarded(&guards, revision);
            app.view.insert_own(record, lease, revision);
            Ok(true)
        }
        Ok(Ok(None)) => {
            tracing::warn!(challenge = %challenge.name, "a pooled instance was not written: fenced, its id taken, or its worker placed on meanwhile");
            Err(())
        }
        Ok(Err(e)) => {
            tracing::warn!(challenge = %challenge.name, error = %e, "cannot write a pooled instance");
            Err(())
        }
        Err(_) => Err(()),
    }
}

/// Removes a pooled instance as seen (not if a spawn claimed it meanwhile):
/// its record, status and secret, then its lease.
async fn remove(app: &App, leader: &LeaderInfo, m: &LiveInstance, why: &str) -> Result<(), ()> {
    let ks = &app.ks;
    let rec = &m.record;
    let key = ks.key(&Key::Instance(rec.id.clone()));
    let status = ks.key(&Key::Status {
        worker: rec.worker.clone(),
        instance: rec.id.clone(),
    });
    let secret = ks.key(&Key::Secret {
        worker: rec.worker.clone(),
        instance: rec.id.clone(),
    });
    let txn = Txn::new()
        .when([
            Compare::create_revision(leader.key.as_str(), CompareOp::Equal, leader.token),
            Compare::mod_revision(key.as_str(), CompareOp::Equal, m.mod_revision),
        ])
        .and_then([
            TxnOp::delete(key.as_str(), None),
            TxnOp::delete(status.as_str(), None),
            TxnOp::delete(secret.as_str(), None),
        ])
        .or_else([TxnOp::get(leader.key.as_str(), None)]);
    let wait = Duration::from_millis(app.cfg.etcd_timeout_ms);
    let mut client = app.client.clone();
    match tokio::time::timeout(wait, client.txn(txn)).await {
        Ok(Ok(r)) if r.succeeded() => {
            tracing::info!(instance = %rec.id, challenge = %rec.challenge, worker = %rec.worker, %why, "removed a pooled instance");
            app.view.lock().instances.remove(&rec.id);
            let _ = client.lease_revoke(m.lease).await;
            Ok(())
        }
        Ok(Ok(r)) => {
            let current = tidegate_etcd::guard::else_get(&r).map_or(0, |kv| kv.create_revision());
            if current != leader.token {
                return Err(());
            }
            // Claimed or changed meanwhile: the next round sees it.
            Ok(())
        }
        Ok(Err(e)) => {
            tracing::warn!(instance = %rec.id, error = %e, "cannot remove a pooled instance");
            Err(())
        }
        Err(_) => Err(()),
    }
}

/// Hands `team` a running pooled instance of `challenge` (made from the
/// spec at `revision`), if there is one: `Ok(None)` when none is ready.
pub(super) async fn claim(
    app: &App,
    leader: &LeaderInfo,
    (challenge, revision): (&ChallengeRecord, i64),
    secret_env: &std::collections::BTreeMap<String, String>,
    team: &TeamId,
    ttl_secs: u64,
    seen: i64,
) -> ApiResult<Option<Spawned>> {
    let candidates: Vec<(FromPool, WorkerId)> = {
        let view = app.view.lock();
        let mut ready: Vec<&LiveInstance> = view
            .pooled(&challenge.name)
            .into_iter()
            .filter(|m| {
                m.record.spec_revision == revision
                    && view.workers.contains_key(&m.record.worker)
                    && view.status_of(&m.record.id) == Some(&InstanceStatus::Running)
            })
            .collect();
        // The oldest first: each has waited longest.
        ready.sort_by_key(|m| (m.record.created_at, m.mod_revision));
        ready
            .into_iter()
            .map(|m| {
                (
                    FromPool {
                        id: m.record.id.clone(),
                        mod_revision: m.mod_revision,
                        lease: m.lease,
                        status_revision: view
                            .status_rev
                            .get(&(m.record.id.clone(), m.record.worker.clone()))
                            .copied()
                            .unwrap_or(0),
                    },
                    m.record.worker.clone(),
                )
            })
            .collect()
    };
    for (pooled, worker) in candidates {
        let plan = SpawnPlan {
            keys: app.ks.clone(),
            leader_key: leader.key.clone(),
            token: leader.token,
            ttl_secs,
            team: team.clone(),
            // Already placed: only what the team's policy counted.
            guards: app.guards(seen, None, Some(team)),
            worker,
            domain: app.cfg.domain.clone(),
            tcp_ports: app.tcp_ports.clone(),
            now: unix_secs(),
            challenge: challenge.clone(),
            challenge_revision: revision,
            secret_env: secret_env.clone(),
        };
        match write_spawn(app, &plan, None, Some(&pooled)).await {
            Ok(s) => {
                app.metrics.pool_claims.inc();
                tracing::info!(instance = %s.record.id, %team, challenge = %challenge.name, "handed a pooled instance to a team");
                return Ok(Some(s));
            }
            Err(e) if e.refusal() == Some("pool_taken") => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Frees room for a spawn of `challenge` that found none by removing one
/// pooled instance whose room makes it fit (the largest pool first; of
/// another challenge, or of its own with `own`: a queued place is
/// admitted under the id it was promised, not into a pooled instance),
/// when the controller's `pool_yields` allows: true when one was removed.
pub(super) async fn yield_room(app: &App, challenge: &ChallengeRecord, own: bool) -> bool {
    if !app.cfg.pool_yields {
        return false;
    }
    let victim = {
        let view = app.view.lock();
        let mut sizes: std::collections::BTreeMap<&ChallengeName, usize> = Default::default();
        for i in view.instances.values().filter(|i| i.record.is_pooled()) {
            *sizes.entry(&i.record.challenge).or_default() += 1;
        }
        let mut candidates: Vec<&LiveInstance> = view
            .instances
            .values()
            .filter(|i| i.record.is_pooled() && (own || i.record.challenge != challenge.name))
            // Only pools of shards led here: another shard's pool is its
            // leader's to keep.
            .filter(|i| app.lead(&i.record.challenge).is_some())
            .collect();
        candidates.sort_by_key(|i| {
            (
                std::cmp::Reverse(sizes.get(&i.record.challenge).copied()),
                std::cmp::Reverse(i.record.created_at),
            )
        });
        // No pooled instance to give: no copy of the view (a full cluster
        // asks at every queue pass).
        if candidates.is_empty() {
            return false;
        }
        // Only a removal after which the spawn fits.
        let need = tidegate_schema::Resources::of_spec(&challenge.spec);
        let network = !challenge.spec.services.is_empty();
        let mut trial = view.clone();
        candidates
            .into_iter()
            .find(|c| {
                let Some(out) = trial.instances.remove(&c.record.id) else {
                    return false;
                };
                let fits = trial
                    .place(challenge.name.as_str(), network, need, app.cfg.placement)
                    .is_ok();
                trial.instances.insert(c.record.id.clone(), out);
                fits
            })
            .cloned()
    };
    let Some(victim) = victim else {
        return false;
    };
    // Fenced by the victim's own shard's lead.
    let Some(victim_lead) = app.lead(&victim.record.challenge) else {
        return false;
    };
    let removed = remove(app, &victim_lead, &victim, "a spawn needs its room")
        .await
        .is_ok();
    if removed && let Ok(mut at) = app.pool_yielded.lock() {
        *at = Some(std::time::Instant::now());
    }
    removed
}

/// One challenge's pool as `GET /v1/pools` shows it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct PoolBody {
    challenge: ChallengeName,
    min: u32,
    max: u32,
    /// What the scheduler keeps now: the last minute's spawns, between min and max.
    target: usize,
    /// Running and ready to be claimed.
    ready: usize,
    /// Pooled instances not running yet (or failed, about to be replaced).
    starting: usize,
    instances: Vec<PooledBody>,
}

/// One pooled instance (no team, no hostname or port).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct PooledBody {
    id: InstanceId,
    worker: WorkerId,
    /// Unix seconds.
    created_at: u64,
    status: String,
}

/// `GET /v1/pools`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct PoolList {
    pools: Vec<PoolBody>,
    revision: i64,
}

/// The warm pools: each pooled challenge's target and its unassigned
/// instances.
#[utoipa::path(
    get, path = "/v1/pools", tag = "instances", operation_id = "list_pools",
    responses((status = 200, description = "each pooled challenge's target and its started, unassigned instances", body = PoolList))
)]
pub(super) async fn list(
    axum::extract::State(app): super::AppState,
    scope: super::Scope,
) -> ApiResult {
    if scope != super::Scope::Admin {
        return Err(super::ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "the pools are the organizers': use the admin token",
        ));
    }
    let view = app.view.lock();
    let pools = view
        .pools
        .iter()
        .map(|(name, (challenge, _))| {
            let instances: Vec<PooledBody> = view
                .pooled(name)
                .into_iter()
                .map(|m| PooledBody {
                    id: m.record.id.clone(),
                    worker: m.record.worker.clone(),
                    created_at: m.record.created_at,
                    status: view.status_text(&m.record.id),
                })
                .collect();
            let ready = instances.iter().filter(|i| i.status == "running").count();
            let pool = challenge
                .spec
                .pool
                .unwrap_or(tidegate_schema::spec::PoolSpec { min: 0, max: 0 });
            PoolBody {
                challenge: name.clone(),
                min: pool.min,
                max: pool.max,
                target: target(&app, challenge),
                ready,
                starting: instances.len() - ready,
                instances,
            }
        })
        .collect();
    Ok(super::json_response(
        axum::http::StatusCode::OK,
        PoolList {
            pools,
            revision: view.revision,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, rev: i64, created: u64) -> LiveInstance {
        let json = serde_json::json!({
            "v": 1, "id": id, "challenge": "web", "worker": "w1", "token": 5,
            "created_at": created, "expires_at": created + 100,
            "container": {"image": "x", "limits": {}}, "spec_revision": rev,
        });
        LiveInstance {
            record: serde_json::from_value(json).unwrap(),
            lease: 1,
            mod_revision: 10,
            create_revision: 10,
        }
    }

    #[test]
    fn a_pool_fills_to_its_target_and_sheds_stale_failed_and_extra_members() {
        let (a, b, c) = (
            member("aaaaaaaaaa", 7, 1),
            member("bbbbbbbbbb", 6, 2),
            member("cccccccccc", 7, 3),
        );
        let running = InstanceStatus::Running;
        let failed = InstanceStatus::Failed { reason: "x".into() };
        // One stale, one running: two more make three.
        let plan = plan_pool(&[(&a, Some(&running)), (&b, Some(&running))], 7, 3, 10);
        assert_eq!(
            plan.remove,
            vec![(b.record.id.clone(), "its challenge's spec changed")]
        );
        assert_eq!(plan.add, 2);
        // A failed member goes and is replaced.
        let plan = plan_pool(&[(&a, Some(&running)), (&c, Some(&failed))], 7, 2, 10);
        assert_eq!(plan.remove, vec![(c.record.id.clone(), "it failed")]);
        assert_eq!(plan.add, 1);
        assert!(plan.failing);
        // Above target: the one not running yet goes first.
        let plan = plan_pool(&[(&a, None), (&c, Some(&running))], 7, 1, 10);
        assert_eq!(
            plan.remove,
            vec![(a.record.id.clone(), "more than the pool's target")]
        );
        assert_eq!(plan.add, 0);
        assert!(!plan.failing);
        // One that never ran goes after 300 s, as a failure.
        let plan = plan_pool(&[(&a, Some(&InstanceStatus::Starting))], 7, 1, 1 + 301);
        assert_eq!(
            plan.remove,
            vec![(a.record.id.clone(), "not running 300 s after it was made")]
        );
        assert!(plan.failing);
    }
}
