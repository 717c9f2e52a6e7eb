//! Rollouts: a challenge's new spec moved onto its live instances, in place
//! (same id, hostnames, ports, team, expiry and flag; other containers).
//!
//! The record (`rollouts/{challenge}`) holds the phase, the organizer's
//! asks (continue, pause, abort) and every instance picked so far. The
//! scheduler moves it on once a second: each of its writes (the record, an
//! instance's record) is fenced by its token and put-if-revision, so a
//! deposed scheduler moves nothing and the next one resumes from the
//! record. An instance is rewritten only while its record is not at the
//! target revision: none is replaced twice.
//!
//! The order: `canary` instances; a gate that opens when the challenge's
//! solver check passes on every canary running the new revision (or an
//! organizer says `continue`); then `batch` at a time, each batch once the
//! last runs. Abort writes the old spec back as the challenge's and moves
//! every instance the rollout replaced onto it; the others are untouched.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use tidegate_schema::records::ContainerSpec;
use tidegate_schema::{
    ChallengeName, ChallengeRecord, ChallengeSpec, InstanceId, InstanceStatus, Key, Keyspace,
    Record, RolloutPhase, RolloutRecord, SecretRecord, ServiceRecord, SolverRecord, V1, Validate,
};

use crate::App;
use crate::scheduler::LeaderInfo;
use crate::view::LiveInstance;

/// Canaries when the request does not say.
pub const DEFAULT_CANARY: u32 = 2;
/// Instances per batch when the request does not say.
pub const DEFAULT_BATCH: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("challenge {0:?} does not exist")]
    NoChallenge(String),
    #[error("challenge {0:?} has no rollout")]
    NoRollout(String),
    /// The request cannot be a rollout (400).
    #[error("{0}")]
    Invalid(String),
    /// Not now (409): another rollout runs, or this one is over.
    #[error("{0}")]
    Conflict(String),
    #[error("stored {key}: {error}")]
    Corrupt { key: String, error: String },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

/// A rollout record and its key's mod revision.
#[derive(Debug, Clone)]
pub struct Stored {
    pub record: RolloutRecord,
    pub revision: i64,
}

/// What an organizer asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Open the gate without waiting for the solver.
    Continue,
    Pause,
    Resume,
    /// Move the replaced instances back onto the old spec.
    Abort,
}

impl Ask {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "continue" => Some(Self::Continue),
            "pause" => Some(Self::Pause),
            "resume" => Some(Self::Resume),
            "abort" => Some(Self::Abort),
            _ => None,
        }
    }
}

fn key(ks: &Keyspace, name: &ChallengeName) -> String {
    ks.key(&Key::Rollout(name.clone()))
}

/// The challenge's rollout (the last one, finished or not).
pub async fn get(
    client: &Client,
    ks: &Keyspace,
    name: &ChallengeName,
) -> Result<Option<Stored>, RolloutError> {
    let key = key(ks, name);
    let resp = client.clone().get(key.as_str(), None).await?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    let record = RolloutRecord::decode(kv.value()).map_err(|e| RolloutError::Corrupt {
        key,
        error: e.to_string(),
    })?;
    Ok(Some(Stored {
        record,
        revision: kv.mod_revision(),
    }))
}

/// The challenge's spec as written at `revision`, and the revision of the
/// write before it (0: none).
pub async fn spec_at(
    client: &Client,
    ks: &Keyspace,
    name: &ChallengeName,
    revision: i64,
) -> Result<(ChallengeSpec, i64), RolloutError> {
    let key = ks.key(&Key::Challenge(name.clone()));
    let mut client = client.clone();
    let at = |r: i64| Some(GetOptions::new().with_revision(r));
    let resp = client.get(key.as_str(), at(revision)).await.map_err(|e| {
        if e.to_string().contains("compacted") {
            RolloutError::Invalid(format!(
                "the spec of {name} at revision {revision} is compacted away in etcd"
            ))
        } else {
            e.into()
        }
    })?;
    let kv = resp
        .kvs()
        .first()
        .filter(|kv| kv.mod_revision() == revision)
        .ok_or_else(|| {
            RolloutError::Invalid(format!(
                "challenge {name} has no spec written at revision {revision}"
            ))
        })?;
    let record = ChallengeRecord::decode(kv.value()).map_err(|e| RolloutError::Corrupt {
        key: key.clone(),
        error: e.to_string(),
    })?;
    // The write before: the key as it was one revision earlier.
    let before = if kv.version() > 1 {
        client
            .get(key.as_str(), at(revision - 1))
            .await
            .ok()
            .and_then(|r| r.kvs().first().map(|kv| kv.mod_revision()))
            .unwrap_or(0)
    } else {
        0
    };
    Ok((record.spec, before))
}

/// Whether every instance can keep its hostnames and ports under `to`: a
/// rollout changes what runs, never where players reach it.
/// The error names the spec field at fault.
pub fn check_specs(from: &ChallengeSpec, to: &ChallengeSpec) -> Result<(), (&'static str, String)> {
    if from.ports != to.ports {
        return Err((
            "ports",
            "a rollout keeps every instance's hostnames and ports: the new spec's ports must be the old one's (a new port or protocol needs new instances)"
                .into(),
        ));
    }
    if from.egress != to.egress {
        return Err((
            "egress",
            "a rollout keeps each instance's network: `egress` must stay as it is (changing it needs new instances)"
                .into(),
        ));
    }
    for p in &to.ports {
        if crate::spawn::service_of(from, p) != crate::spawn::service_of(to, p) {
            return Err((
                "ports",
                format!(
                    "port {} would go to another service under the new spec: a rollout keeps every route",
                    p.name
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `record`'s routes all stay where they are under `spec`: each
/// names a port of the spec with the same container port and service.
/// An instance spawned from an older spec whose ports differ is left on it.
fn fits(record: &tidegate_schema::InstanceRecord, spec: &ChallengeSpec) -> bool {
    let port = |name: &tidegate_schema::PortName, target: u16, service: &Option<_>| {
        spec.ports.iter().any(|p| {
            &p.name == name && p.port == target && &crate::spawn::service_of(spec, p) == service
        })
    };
    record
        .http
        .iter()
        .all(|r| port(&r.port_name, r.target_port, &r.service))
        && record
            .tcp
            .iter()
            .all(|r| port(&r.port_name, r.target_port, &r.service))
}

/// Starts a rollout of `name` from `from_revision` to `to_revision` (both
/// written specs, the ports unchanged): refused while another one is
/// active.
pub async fn start(
    client: &Client,
    ks: &Keyspace,
    name: &ChallengeName,
    (from_revision, to_revision): (i64, i64),
    (from_spec, to_spec): (ChallengeSpec, ChallengeSpec),
    (canary, batch): (u32, u32),
    now: u64,
) -> Result<Stored, RolloutError> {
    let existing = get(client, ks, name).await?;
    if let Some(s) = existing.as_ref().filter(|s| s.record.phase.active()) {
        return Err(RolloutError::Conflict(format!(
            "a rollout of {name} to revision {} is {} (abort it or let it finish first)",
            s.record.to_revision,
            phase_name(s.record.phase)
        )));
    }
    let record = RolloutRecord {
        v: V1,
        challenge: name.clone(),
        from_revision,
        to_revision,
        canary,
        batch,
        phase: RolloutPhase::Canary,
        paused: false,
        continued: false,
        abort: false,
        canaries: Vec::new(),
        replaced: Vec::new(),
        skipped: Vec::new(),
        restored_revision: 0,
        detail: "picking canaries".into(),
        started_at: now,
        updated_at: now,
        from_spec: Some(from_spec),
        to_spec: Some(to_spec),
    };
    record
        .validate()
        .map_err(|e| RolloutError::Invalid(e.to_string()))?;
    let key = key(ks, name);
    let seen = existing.map_or(0, |s| s.revision);
    let txn = Txn::new()
        .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, seen)])
        .and_then([TxnOp::put(key.as_str(), record.encode(), None)]);
    let resp = client.clone().txn(txn).await?;
    if !resp.succeeded() {
        return Err(RolloutError::Conflict(format!(
            "the rollout of {name} changed while this one started; look again"
        )));
    }
    Ok(Stored {
        record,
        revision: resp.header().map_or(0, |h| h.revision()),
    })
}

/// Sets an organizer's ask on the rollout, put-if-revision (retried a few
/// times against concurrent asks and the scheduler's progress).
pub async fn ask(
    client: &Client,
    ks: &Keyspace,
    name: &ChallengeName,
    what: Ask,
    now: u64,
) -> Result<Stored, RolloutError> {
    let key = key(ks, name);
    for _ in 0..16 {
        let stored = get(client, ks, name)
            .await?
            .ok_or_else(|| RolloutError::NoRollout(name.to_string()))?;
        let mut r = stored.record.clone();
        if !r.phase.active() {
            return Err(RolloutError::Conflict(format!(
                "the rollout of {name} to revision {} is {}",
                r.to_revision,
                phase_name(r.phase)
            )));
        }
        if r.abort && what != Ask::Abort {
            return Err(RolloutError::Conflict(format!(
                "the rollout of {name} is being aborted"
            )));
        }
        match what {
            Ask::Continue => r.continued = true,
            Ask::Pause => r.paused = true,
            Ask::Resume => r.paused = false,
            Ask::Abort => r.abort = true,
        }
        r.updated_at = now;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                stored.revision,
            )])
            .and_then([TxnOp::put(key.as_str(), r.encode(), None)]);
        let resp = client.clone().txn(txn).await?;
        if resp.succeeded() {
            return Ok(Stored {
                record: r,
                revision: resp.header().map_or(0, |h| h.revision()),
            });
        }
    }
    Err(RolloutError::Conflict(format!(
        "the rollout of {name} kept changing; try again"
    )))
}

/// How a phase reads in messages.
pub fn phase_name(p: RolloutPhase) -> &'static str {
    match p {
        RolloutPhase::Canary => "replacing canaries",
        RolloutPhase::Gate => "at the gate",
        RolloutPhase::Batches => "replacing in batches",
        RolloutPhase::Done => "done",
        RolloutPhase::Aborting => "being aborted",
        RolloutPhase::Aborted => "aborted",
    }
}

/// While leading shards: moves every active rollout of their challenges
/// on, once a second.
pub async fn run(app: Arc<App>) {
    let mut warned = std::collections::BTreeSet::new();
    let mut steady = Steady::default();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !app.leads_any() {
            continue;
        }
        let prefix = app.ks.prefix(tidegate_schema::Kind::Rollouts);
        let resp = match app
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list rollouts; next second");
                continue;
            }
        };
        // The view must hold at least what etcd held when the rollouts
        // were read: a scheduler just elected may not have listed yet.
        let listed = resp.header().map_or(0, |h| h.revision());
        if app.view.lock().revision < listed {
            continue;
        }
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let record = match RolloutRecord::decode(kv.value()) {
                Ok(r) if self::key(&app.ks, &r.challenge) == key => r,
                Ok(r) => {
                    warn_once(
                        &mut warned,
                        &key,
                        kv.mod_revision(),
                        &format!("it names challenge {}, not its key's", r.challenge),
                    );
                    continue;
                }
                Err(e) => {
                    warn_once(&mut warned, &key, kv.mod_revision(), &e.to_string());
                    continue;
                }
            };
            if !record.phase.active() {
                continue;
            }
            // Its shard's leader moves it (and fences every write with its token).
            let Some(leader) = app.lead(&record.challenge) else {
                continue;
            };
            let stored = Stored {
                record,
                revision: kv.mod_revision(),
            };
            let name = stored.record.challenge.clone();
            if let Err(e) = step(&app, &leader, stored, &mut steady).await {
                tracing::warn!(challenge = %name, error = %e, "rollout step failed; retrying");
            }
        }
    }
}

/// Logs a rollout record the scheduler skips, once per write of it.
fn warn_once(
    warned: &mut std::collections::BTreeSet<(String, i64)>,
    key: &str,
    revision: i64,
    why: &str,
) {
    if warned.len() > 1024 {
        warned.clear();
    }
    if warned.insert((key.to_string(), revision)) {
        tracing::warn!(
            key,
            revision,
            error = why,
            "skipping a rollout record: it moves nothing until written again"
        );
    }
}

/// The rollout's spec at its start (`to`) or before it, from its record
/// or, for a record from before specs were kept in it, from etcd.
async fn spec_of(app: &App, r: &RolloutRecord, to: bool) -> Result<ChallengeSpec, RolloutError> {
    let (kept, revision) = if to {
        (&r.to_spec, r.to_revision)
    } else {
        (&r.from_spec, r.from_revision)
    };
    match kept {
        Some(spec) => Ok(spec.clone()),
        None => Ok(spec_at(&app.client, &app.ks, &r.challenge, revision)
            .await?
            .0),
    }
}

/// What the scheduler knows of one live instance of the challenge.
#[derive(Debug, Clone)]
struct Seen {
    live: LiveInstance,
    /// Running, and its worker says on which spec revision.
    running_at: Option<i64>,
    failed: Option<String>,
    solver_healthy: Option<bool>,
}

fn instances_of(app: &App, name: &ChallengeName) -> Vec<Seen> {
    let view = app.view.lock();
    let mut out: Vec<Seen> = view
        .instances
        .values()
        .filter(|i| &i.record.challenge == name)
        .map(|i| {
            let status = view.status_of(&i.record.id);
            Seen {
                running_at: matches!(status, Some(InstanceStatus::Running))
                    .then(|| view.running_revision(&i.record.id)),
                failed: match status {
                    Some(InstanceStatus::Failed { reason }) => Some(reason.clone()),
                    _ => None,
                },
                solver_healthy: view.solver_of(&i.record.id).map(|h| h.healthy),
                live: i.clone(),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        (a.live.record.created_at, a.live.create_revision)
            .cmp(&(b.live.record.created_at, b.live.create_revision))
    });
    out
}

/// One move of one rollout.
/// Instance → the revision it was first seen running at, and when: a
/// crashing container reports running for a moment before it fails.
type Steady = std::collections::BTreeMap<InstanceId, (i64, std::time::Instant)>;

/// How long a replaced instance must have run the new revision before it
/// counts as replaced (its container did not crash at once).
const STEADY_FOR: Duration = Duration::from_secs(3);

async fn step(
    app: &App,
    leader: &LeaderInfo,
    stored: Stored,
    steady: &mut Steady,
) -> Result<(), RolloutError> {
    let mut r = stored.record.clone();
    let name = r.challenge.clone();
    if r.abort {
        return abort_step(app, leader, stored).await;
    }
    if r.paused {
        return Ok(());
    }
    let to_spec = spec_of(app, &r, true).await?;
    let seen = instances_of(app, &name);
    // Whatever was picked and is not rewritten yet (a scheduler that died
    // between writing the record and the instances).
    rewrite_all(app, leader, &seen, &r.replaced, &to_spec, r.to_revision).await?;
    let now = std::time::Instant::now();
    for s in &seen {
        let id = &s.live.record.id;
        match s.running_at {
            Some(rev) if steady.get(id).is_some_and(|(r, _)| *r == rev) => {}
            Some(rev) => {
                steady.insert(id.clone(), (rev, now));
            }
            None => {
                steady.remove(id);
            }
        }
    }
    if steady.len() > 100_000 {
        steady.clear();
    }
    let steady_at = |s: &Seen| {
        steady
            .get(&s.live.record.id)
            .filter(|(_, since)| since.elapsed() >= STEADY_FOR)
            .map(|(rev, _)| *rev)
    };
    let at_new =
        |s: &Seen| s.running_at == Some(r.to_revision) && steady_at(s) == Some(r.to_revision);
    let picked = |s: &Seen| r.replaced.contains(&s.live.record.id);
    // Teams' instances on an earlier revision whose routes the new spec
    // keeps (a pooled one is replaced by its pool, not moved).
    let older = |s: &&Seen| s.live.record.spec_revision < r.to_revision && !picked(s);
    let owned = |s: &&Seen| s.live.record.team.is_some();
    let candidates: Vec<InstanceId> = seen
        .iter()
        .filter(older)
        .filter(owned)
        .filter(|s| fits(&s.live.record, &to_spec))
        .map(|s| s.live.record.id.clone())
        .collect();
    let unfit = seen
        .iter()
        .filter(older)
        .filter(owned)
        .filter(|s| !fits(&s.live.record, &to_spec))
        .count();
    let mut pick = Vec::new();
    match r.phase {
        RolloutPhase::Canary => {
            pick = candidates.into_iter().take(r.canary as usize).collect();
            r.canaries = pick.clone();
            r.replaced.extend(pick.iter().cloned());
            r.phase = RolloutPhase::Gate;
            r.detail = if pick.is_empty() {
                "no live instance to replace: the gate waits for `continue`".into()
            } else {
                format!("replacing {} canaries", pick.len())
            };
        }
        RolloutPhase::Gate => {
            let canaries: Vec<&Seen> = seen
                .iter()
                .filter(|s| r.canaries.contains(&s.live.record.id))
                .collect();
            let waiting = if r.continued {
                None
            } else if to_spec.solver.is_none() {
                Some("the challenge has no solver: the gate waits for `continue`".to_string())
            } else if canaries.is_empty() {
                Some("no canary is live any more: the gate waits for `continue`".to_string())
            } else {
                canaries.iter().find_map(|c| {
                    let id = &c.live.record.id;
                    if let Some(why) = &c.failed {
                        return Some(format!("canary {id} failed: {why}"));
                    }
                    if !at_new(c) {
                        return Some(format!("canary {id} is not running the new revision yet"));
                    }
                    match c.solver_healthy {
                        Some(true) => None,
                        Some(false) => {
                            Some(format!("canary {id}: the solver did not find the flag"))
                        }
                        None => Some(format!("canary {id}: no solver check yet")),
                    }
                })
            };
            match waiting {
                Some(why) => r.detail = why,
                None => {
                    r.phase = RolloutPhase::Batches;
                    // Spent: a later `continue` is about the batches.
                    let continued = std::mem::take(&mut r.continued);
                    r.detail = if continued {
                        "the gate was opened by an organizer".into()
                    } else {
                        format!(
                            "the gate opened: the solver found the flag on {} canaries",
                            canaries.len()
                        )
                    };
                }
            }
        }
        RolloutPhase::Batches => {
            // An organizer's `continue` leaves the instances failed now
            // behind (once: a later failure holds the batches again).
            if std::mem::take(&mut r.continued) {
                let failed = seen
                    .iter()
                    .filter(|s| picked(s) && !at_new(s) && s.failed.is_some());
                let left: Vec<InstanceId> = failed.map(|s| s.live.record.id.clone()).collect();
                for id in left {
                    if !r.skipped.contains(&id) {
                        r.skipped.push(id);
                    }
                }
            }
            let pending: Vec<&Seen> = seen
                .iter()
                .filter(|s| picked(s) && !at_new(s) && !r.skipped.contains(&s.live.record.id))
                .collect();
            if let Some(s) = pending.first() {
                r.detail = match &s.failed {
                    Some(why) => format!(
                        "instance {} failed on the new revision: {why} (`continue` leaves it behind and goes on; or pause, or abort)",
                        s.live.record.id
                    ),
                    None => format!("waiting for {} replaced instances to run", pending.len()),
                };
            } else if candidates.is_empty() {
                r.phase = RolloutPhase::Done;
                r.detail = format!("{} instances replaced", r.replaced.len());
                if !r.skipped.is_empty() {
                    r.detail += &format!(
                        "; {} failed on the new revision and were left behind by `continue`",
                        r.skipped.len()
                    );
                }
                if unfit > 0 {
                    r.detail += &format!(
                        "; {unfit} spawned from an older spec whose ports the new one does not have are left as they are"
                    );
                }
            } else {
                pick = candidates.into_iter().take(r.batch as usize).collect();
                r.replaced.extend(pick.iter().cloned());
                r.detail = format!(
                    "replacing a batch of {} ({} replaced so far)",
                    pick.len(),
                    r.replaced.len()
                );
            }
        }
        RolloutPhase::Done | RolloutPhase::Aborting | RolloutPhase::Aborted => return Ok(()),
    }
    if r == stored.record {
        return Ok(());
    }
    r.detail
        .truncate(floor_char_boundary(&r.detail, RolloutRecord::MAX_DETAIL));
    if r.phase != stored.record.phase {
        tracing::info!(challenge = %name, phase = phase_name(r.phase), detail = %r.detail, "rollout moved on");
    }
    // The record first: a scheduler that dies now leaves the picks in it,
    // and the next one rewrites them.
    save(app, leader, &stored, r).await?;
    rewrite_all(
        app,
        leader,
        &seen,
        &pick,
        &to_spec,
        stored.record.to_revision,
    )
    .await
}

/// The abort: the old spec written back as the challenge's, then every
/// instance the rollout replaced moved onto it.
async fn abort_step(app: &App, leader: &LeaderInfo, stored: Stored) -> Result<(), RolloutError> {
    let mut r = stored.record.clone();
    let name = r.challenge.clone();
    let from_spec = spec_of(app, &r, false).await?;
    if r.restored_revision == 0 {
        let restored = match restore(app, leader, &stored, &from_spec).await {
            Ok(revision) => revision,
            Err(RolloutError::NoChallenge(_)) => {
                r.phase = RolloutPhase::Aborted;
                r.detail = "aborted: the challenge is deleted, nothing to restore".into();
                save(app, leader, &stored, r).await?;
                return Ok(());
            }
            Err(RolloutError::Invalid(why)) => {
                r.phase = RolloutPhase::Aborted;
                r.detail = format!("aborted without restoring: {why}");
                r.detail
                    .truncate(floor_char_boundary(&r.detail, RolloutRecord::MAX_DETAIL));
                tracing::warn!(challenge = %name, detail = %r.detail, "rollout aborted");
                save(app, leader, &stored, r).await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        r.restored_revision = restored;
        r.phase = RolloutPhase::Aborting;
        r.detail = format!(
            "the old spec is back at revision {restored}; moving the replaced instances onto it"
        );
        tracing::warn!(challenge = %name, restored, "rollout aborted: the old spec is written back");
        save(app, leader, &stored, r).await?;
        return Ok(());
    }
    let seen = instances_of(app, &name);
    // Every team's instance on the new revision: those the rollout moved
    // and those spawned from it meanwhile (a pick it never rewrote stays
    // as it is).
    let moved: Vec<InstanceId> = seen
        .iter()
        .filter(|s| s.live.record.team.is_some())
        .filter(|s| s.live.record.spec_revision == r.to_revision)
        .map(|s| s.live.record.id.clone())
        .collect();
    rewrite_all(app, leader, &seen, &moved, &from_spec, r.restored_revision).await?;
    let left = moved.len();
    if left == 0 {
        r.phase = RolloutPhase::Aborted;
        r.detail = format!(
            "aborted: the instances on the new spec moved back onto the old one (revision {}; {} had been replaced)",
            r.restored_revision,
            r.replaced.len()
        );
        save(app, leader, &stored, r).await?;
    }
    Ok(())
}

/// Writes `spec` (as stored at the rollout's start) back as the challenge's,
/// keeping its policy and secret env, fenced and only while the rollout
/// record is as seen. The new revision. (A scheduler that dies before it
/// records the revision leaves the next one to write the same spec again.)
async fn restore(
    app: &App,
    leader: &LeaderInfo,
    stored: &Stored,
    spec: &ChallengeSpec,
) -> Result<i64, RolloutError> {
    let name = &stored.record.challenge;
    let current = app.challenges.get(name).await.map_err(|e| match e {
        crate::challenges::ChallengeError::NotFound(n) => RolloutError::NoChallenge(n),
        other => RolloutError::Invalid(other.to_string()),
    })?;
    if current.revision != stored.record.to_revision {
        return Err(RolloutError::Invalid(format!(
            "{name}'s spec was written again (revision {}) after the rollout's (revision {}): it is left as it is",
            current.revision, stored.record.to_revision
        )));
    }
    let record = ChallengeRecord {
        spec: spec.clone(),
        ..current.value
    };
    let challenge_key = app.ks.key(&Key::Challenge(name.clone()));
    let rollout_key = key(&app.ks, name);
    let txn = Txn::new()
        .when([
            Compare::create_revision(leader.key.as_str(), CompareOp::Equal, leader.token),
            Compare::mod_revision(rollout_key.as_str(), CompareOp::Equal, stored.revision),
            Compare::mod_revision(challenge_key.as_str(), CompareOp::Equal, current.revision),
        ])
        .and_then([TxnOp::put(challenge_key.as_str(), record.encode(), None)]);
    let resp = app.client.clone().txn(txn).await?;
    if !resp.succeeded() {
        return Err(RolloutError::Conflict(format!(
            "restoring {name}'s spec: the scheduler, the rollout or the challenge changed meanwhile"
        )));
    }
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// Writes the rollout record, fenced and put-if-revision.
async fn save(
    app: &App,
    leader: &LeaderInfo,
    stored: &Stored,
    mut r: RolloutRecord,
) -> Result<Stored, RolloutError> {
    r.updated_at = tidegate_schema::time::unix_secs();
    let key = key(&app.ks, &r.challenge);
    let txn = Txn::new()
        .when([
            Compare::create_revision(leader.key.as_str(), CompareOp::Equal, leader.token),
            Compare::mod_revision(key.as_str(), CompareOp::Equal, stored.revision),
        ])
        .and_then([TxnOp::put(key.as_str(), r.encode(), None)]);
    let resp = app.client.clone().txn(txn).await?;
    if !resp.succeeded() {
        return Err(RolloutError::Conflict(format!(
            "the rollout of {} changed (an organizer's ask, or another scheduler); next second",
            r.challenge
        )));
    }
    Ok(Stored {
        record: r,
        revision: resp.header().map_or(0, |h| h.revision()),
    })
}

/// Rewrites each of `ids` still live and not at `revision` onto `spec`.
async fn rewrite_all(
    app: &App,
    leader: &LeaderInfo,
    seen: &[Seen],
    ids: &[InstanceId],
    spec: &ChallengeSpec,
    revision: i64,
) -> Result<(), RolloutError> {
    for s in seen.iter().filter(|s| ids.contains(&s.live.record.id)) {
        // Already there, or past it (a later rollout or an abort's restore).
        if s.live.record.spec_revision >= revision {
            continue;
        }
        if rewrite(app, leader, &s.live, spec, revision).await? {
            app.metrics.rollout_replacements.inc();
            tracing::info!(instance = %s.live.record.id, from = s.live.record.spec_revision, to = revision, "instance moved to another spec revision");
        }
    }
    Ok(())
}

/// The instance's record with its containers made from `spec` at
/// `revision`: same id, routes, team, expiry, lease and flag.
pub fn upgraded(
    record: &tidegate_schema::InstanceRecord,
    spec: &ChallengeSpec,
    revision: i64,
) -> tidegate_schema::InstanceRecord {
    let mut r = record.clone();
    r.container = ContainerSpec::of(spec);
    r.services = ServiceRecord::all_of(spec);
    r.spec_revision = revision;
    r.flag_file = spec.flag.file.clone();
    r.solver = SolverRecord::of(spec);
    r
}

/// One instance's rewrite, fenced and put-if-revision (on its lease).
/// False when its record moved on meanwhile (the next second looks again).
async fn rewrite(
    app: &App,
    leader: &LeaderInfo,
    live: &LiveInstance,
    spec: &ChallengeSpec,
    revision: i64,
) -> Result<bool, RolloutError> {
    let record = upgraded(&live.record, spec, revision);
    let key = app.ks.key(&Key::Instance(record.id.clone()));
    let mut when = vec![
        Compare::create_revision(leader.key.as_str(), CompareOp::Equal, leader.token),
        Compare::mod_revision(key.as_str(), CompareOp::Equal, live.mod_revision),
    ];
    let mut then = vec![TxnOp::put(
        key.as_str(),
        record.encode(),
        Some(PutOptions::new().with_ignore_lease()),
    )];
    // The `secret_env` values of that revision go into the instance's
    // secret in the same Txn (same flag): the agent reads the secret again
    // when it makes the new containers.
    let secret_key = app.ks.key(&Key::Secret {
        worker: record.worker.clone(),
        instance: record.id.clone(),
    });
    let mut client = app.client.clone();
    let current = client.get(secret_key.as_str(), None).await?;
    if let Some(kv) = current.kvs().first() {
        let mut secret = SecretRecord::decode(kv.value()).map_err(|e| RolloutError::Corrupt {
            key: secret_key.clone(),
            error: e.to_string(),
        })?;
        let env = if spec.secret_env.is_empty() {
            Default::default()
        } else {
            app.challenges
                .secret_env(&record.challenge, revision)
                .await
                .map_err(|e| RolloutError::Corrupt {
                    key: app.ks.key(&Key::ChallengeSecret(record.challenge.clone())),
                    error: e.to_string(),
                })?
        };
        if secret.env != env {
            secret.env = env;
            when.push(Compare::mod_revision(
                secret_key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            ));
            then.push(TxnOp::put(
                secret_key.as_str(),
                secret.encode(),
                Some(PutOptions::new().with_ignore_lease()),
            ));
        }
    }
    let txn = Txn::new().when(when).and_then(then);
    Ok(client.txn(txn).await?.succeeded())
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut i = max;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> ChallengeSpec {
        tidegate_schema::decode_json(json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_rollout_keeps_ports_and_routes_and_changes_the_rest() {
        let from = spec(
            serde_json::json!({"image": "web:1", "ports": [{"name": "web", "port": 80, "protocol": "http"}]}),
        );
        let to = spec(
            serde_json::json!({"image": "web:2", "env": {"V": "2"}, "ports": [{"name": "web", "port": 80, "protocol": "http"}]}),
        );
        assert_eq!(check_specs(&from, &to), Ok(()));
        let moved = spec(
            serde_json::json!({"image": "web:2", "ports": [{"name": "web", "port": 8080, "protocol": "http"}]}),
        );
        assert_eq!(check_specs(&from, &moved).unwrap_err().0, "ports");
        let mut open = to.clone();
        open.egress = !to.egress;
        assert_eq!(check_specs(&from, &open).unwrap_err().0, "egress");
    }

    #[test]
    fn an_instance_fits_a_spec_that_keeps_its_routes_name_port_and_service() {
        let v1 = spec(
            serde_json::json!({"image": "web:1", "ports": [{"name": "web", "port": 80, "protocol": "http"}]}),
        );
        let record = |target: u16| -> tidegate_schema::InstanceRecord {
            serde_json::from_value(serde_json::json!({
                "v": 1, "id": "0123456789", "challenge": "web", "worker": "w1", "token": 5,
                "team": "t1", "created_at": 1, "expires_at": 100,
                "container": {"image": "web:1", "limits": {}}, "spec_revision": 3,
                "http": [{"port_name": "web", "hostname": "a.ctf.example", "target_port": target}],
            }))
            .unwrap()
        };
        assert!(fits(&record(80), &v1));
        // Spawned when the spec said 8080: the new spec would strand it.
        assert!(!fits(&record(8080), &v1));
        let renamed = spec(
            serde_json::json!({"image": "web:1", "ports": [{"name": "www", "port": 80, "protocol": "http"}]}),
        );
        assert!(!fits(&record(80), &renamed));
    }

    #[test]
    fn an_ask_is_one_of_four_words() {
        assert_eq!(Ask::parse("continue"), Some(Ask::Continue));
        assert_eq!(Ask::parse("abort"), Some(Ask::Abort));
        assert_eq!(Ask::parse("Abort"), None);
        assert_eq!(Ask::parse("rollback"), None);
    }

    #[test]
    fn a_detail_is_cut_on_a_character_boundary() {
        let s = "é".repeat(300);
        let at = floor_char_boundary(&s, 511);
        assert!(at <= 511 && s.is_char_boundary(at));
    }
}
