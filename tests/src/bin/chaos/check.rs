//! The invariants of docs/architecture.md (DESIGN's list), checked against a
//! recorded [`History`]:
//!
//! - no hostname or TCP port is ever held by two live instances (replay of
//!   etcd's changes);
//! - every acknowledged spawn reached etcd and ended only by expiry or a
//!   delete request — never silently lost;
//! - no write from a fenced scheduler: an instance is created only with the
//!   token of its challenge's shard's leader at that revision (at most one
//!   active scheduler per shard), and an acknowledged renewal was
//!   committed while the controller that acknowledged it led;
//! - no agent routes an instance more than one watch delay after etcd
//!   deleted it (later only if that agent was cut off at the time);
//! - a pooled instance (no team) is routed by no hostname or port, and an
//!   instance once a team's never becomes another team's;
//! - a pool stays below its `min` no longer than [`POOL_REFILL`] while a
//!   scheduler leads, no spawn waits in the queue and the live workers'
//!   slots have room for the missing pooled instances (counted from
//!   [`CONTROL_RECOVERY`] after a quorum loss or a silent etcd member);
//! - during a slow etcd disk and a quorum loss, the packets the daemons
//!   send to etcd per second stay within [`STORM_FACTOR`] times the
//!   baseline's: clients back off instead of multiplying their retries;
//! - a rollout's rewrite of an instance (its record's `spec_revision`
//!   changed) keeps its id, team, hostnames and ports; no instance is moved
//!   onto a revision it already ran (replaced twice); and its worker reports
//!   it running the new revision within [`SWITCH_WINDOW`] of the rewrite
//!   beyond a usual start of a fresh instance then (later only across a
//!   fault of its worker), the time players cannot reach it;
//! - after each phase, containers = live records on every worker and each
//!   agent's route table matches etcd at its revision (checked by the run,
//!   recorded as [`Settle`]s).
//!
//! A controller whose clock runs ahead (the clock-skew phase) grants
//! expiries that much later than its leases end them: those instances end
//! early by exactly the skew ([`granted_ahead`]), which is no loss.
//!
//! Failed requests are sorted into expected (explained by a fault window)
//! and unexpected.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;
use tidegate_schema::{Keyspace, Kind};

use crate::history::{Call, History, Op, Outcome, Probe, Secs, Target, split_key, status_running};

/// How long an agent may take to apply a change etcd committed.
pub(crate) const WATCH_DELAY: Secs = 2.0;
/// After a controller or etcd fault ends, API failures are still explained
/// this long (a 2 s election TTL, lease expiry, client reconnects).
pub(crate) const CONTROL_RECOVERY: Secs = 8.0;
/// After one etcd member of three is lost, failures are explained this long
/// (the remaining members elect a raft leader: 500 ms election timeout here).
pub(crate) const ETCD_ELECTION: Secs = 2.0;
/// After an agent fault ends, failed probes through or to it are still
/// explained this long (restart, relist, adoption).
pub(crate) const AGENT_RECOVERY: Secs = 6.0;

/// After an etcd member is cut off from the other two, an agent whose
/// watch was on it may lag this long: the member steps down within an
/// election timeout (500 ms here), etcd cancels its require-leader streams
/// after three more without a leader, and the watcher's retry (at most
/// 1 s apart) lands on a member that has one. A loaded 2-core CI run took
/// 5.75 s (2026-12-05: fault at 100.60 s, routes served again at 106.36 s).
pub(crate) const MINORITY_DETECT: Secs = 6.0;

/// How long an agent may be cut from etcd before its worker's lease (6 s
/// here, kept alive every second) can lapse.
pub(crate) const MEMBERSHIP_LAPSE: Secs = 5.0;

/// How long a pool may stay below its `min` with room free and a
/// scheduler elected (its refill runs every 250 ms; a new leader's first
/// round follows its election).
pub(crate) const POOL_REFILL: Secs = 10.0;

/// How many times the baseline's request rate to etcd a fault may bring
/// (retries are expected; a storm of them is not).
pub(crate) const STORM_FACTOR: f64 = 3.0;

/// How long an instance a rollout rewrote may take to run its new
/// revision beyond a usual start of a fresh instance at the time: the
/// agent's watch and removing the old containers (a switch is those and
/// one start; a loaded Docker engine is no fault of the rollout's). See
/// [`switch_window`].
pub(crate) const SWITCH_WINDOW: Secs = 20.0;

/// The fresh instances whose starts tell the engine's pace at a switch:
/// those created this long before it until [`SWITCH_WINDOW`] after.
pub(crate) const START_NEIGHBOURHOOD: Secs = 30.0;

/// A broken invariant.
#[derive(Debug, Clone)]
pub(crate) struct Violation {
    pub(crate) phase: usize,
    pub(crate) kind: &'static str,
    pub(crate) detail: String,
}

/// A failed request, explained by a fault or not.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) phase: usize,
    pub(crate) kind: String,
    pub(crate) expected: bool,
    /// What failed, when and where (shown for unexpected ones).
    pub(crate) detail: String,
}

/// The checker's findings.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) violations: Vec<Violation>,
    pub(crate) failures: Vec<Failure>,
    /// Per phase: probes of live, running instances (served, sent).
    pub(crate) live_probes: BTreeMap<usize, (usize, usize)>,
    /// Requests/s etcd received: the baseline's, then (fault, rate) for
    /// each fault whose rate is checked.
    pub(crate) etcd_rates: Option<(f64, Vec<(String, f64)>)>,
    /// Rollout switches: how many ran the new revision, the longest of
    /// those (s), how many ended by a delete first.
    pub(crate) switches: (usize, Secs, usize),
}

impl Report {
    pub(crate) fn unexpected(&self) -> usize {
        self.failures.iter().filter(|f| !f.expected).count()
    }
}

/// What replaying etcd's changes established.
#[derive(Debug, Default)]
struct Replay {
    /// Revision and time each instance was created.
    created: BTreeMap<String, (i64, Secs)>,
    /// Time, revision and last `expires_at` of each deletion.
    deleted: BTreeMap<String, (Secs, i64, u64)>,
    /// The worker each instance was placed on.
    owner: BTreeMap<String, String>,
    /// When each instance's endpoint first said `running`.
    running: BTreeMap<String, Secs>,
    /// (instance, expires_at) of each put → (revision, id of the leader then).
    puts: BTreeMap<(String, u64), (i64, Option<String>)>,
    /// Each instance's `expires_at` over time.
    expiry: BTreeMap<String, Vec<(Secs, u64)>>,
    /// Each rollout rewrite: instance, when, the revision it moves to, and
    /// when its worker first reported it running that revision.
    switches: Vec<Switch>,
    /// Each fresh instance's creation and how long until its worker first
    /// reported it running (the engine's pace at the time).
    starts: Vec<(Secs, Secs)>,
    /// Pooled instances claimed by a team (their runs after the claim are
    /// no starts).
    claimed: std::collections::BTreeSet<String>,
}

/// One instance moved onto another spec revision by a rollout.
#[derive(Debug, Clone)]
struct Switch {
    id: String,
    at: Secs,
    to: i64,
    running: Option<Secs>,
    /// Deleted before it ran the new revision.
    ended: bool,
}

/// How many seconds ahead controller `controller`'s wall clock ran at `at`
/// (a clock-skew fault), 0 otherwise.
fn ahead(h: &History, controller: usize, at: Secs) -> u64 {
    h.faults
        .iter()
        .filter_map(|f| match f.target {
            Target::ControllerClock(c, off) if c == controller && f.from <= at && at <= f.to => {
                u64::try_from(off).ok()
            }
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// How far ahead of true time `expires` was granted for `id`: the clock
/// offset of the controller that led when the record first carried it.
/// Its lease (a duration) ends the instance that much earlier.
fn granted_ahead(h: &History, r: &Replay, id: &str, expires: u64) -> u64 {
    let Some((_, Some(leader))) = r.puts.get(&(id.to_string(), expires)) else {
        return 0;
    };
    let Some(controller) = h.controller_ids.iter().position(|c| c == leader) else {
        return 0;
    };
    r.expiry
        .get(id)
        .and_then(|e| e.iter().find(|(_, x)| *x == expires))
        .map_or(0, |&(at, _)| ahead(h, controller, at))
}

fn phase_of(h: &History, at: Secs) -> usize {
    h.phases
        .iter()
        .position(|p| at < p.to)
        .unwrap_or(h.phases.len().saturating_sub(1))
}

fn names(rec: &Value) -> Vec<String> {
    let hosts = rec["http"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["hostname"].as_str())
        .map(|h| format!("hostname {h}"));
    let ports = rec["tcp"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["port"].as_u64())
        .map(|p| format!("port {p}"));
    hosts.chain(ports).collect()
}

fn replay(h: &History, out: &mut Report) -> Replay {
    let mut r = Replay::default();
    let mut live: BTreeMap<String, Value> = BTreeMap::new();
    let mut holders: BTreeMap<String, String> = BTreeMap::new();
    // Shard → (its key's creation revision = token, leader id); the shard
    // count, from the controllers' registrations.
    let mut election: BTreeMap<u16, (i64, String)> = BTreeMap::new();
    let mut shards: u16 = 1;
    let ks = Keyspace::default();
    let (leaders_prefix, controllers_prefix) =
        (ks.prefix(Kind::ShardLeaders), ks.prefix(Kind::Controllers));
    for e in &h.events {
        let phase = phase_of(h, e.at);
        if let Some(shard) = e
            .key
            .strip_prefix(&leaders_prefix)
            .and_then(|n| n.parse::<u16>().ok())
        {
            match &e.value {
                Some(v) => {
                    // The leader's id, inside a JSON value or bare.
                    let id = serde_json::from_slice::<Value>(v)
                        .ok()
                        .and_then(|j| j["id"].as_str().map(String::from))
                        .unwrap_or_else(|| String::from_utf8_lossy(v).into_owned());
                    election.insert(shard, (e.create_revision, id));
                }
                None => {
                    election.remove(&shard);
                }
            }
            continue;
        }
        if e.key.starts_with(&controllers_prefix) {
            if let Some(n) = e
                .value
                .as_ref()
                .and_then(|v| serde_json::from_slice::<Value>(v).ok())
                .and_then(|j| j["shards"].as_u64())
            {
                shards = u16::try_from(n).unwrap_or(1).max(1);
            }
            continue;
        }
        let Some((kind, id)) = split_key(&e.key) else {
            continue;
        };
        match (kind, &e.value) {
            ("instances", Some(v)) => {
                let Ok(rec) = serde_json::from_slice::<Value>(v) else {
                    out.violations.push(Violation {
                        phase,
                        kind: "bad record",
                        detail: format!("{} at revision {} is not JSON", e.key, e.revision),
                    });
                    continue;
                };
                // The leader of the record's challenge's shard.
                let shard = tidegate_schema::shards::shard_of(
                    rec["challenge"].as_str().unwrap_or_default(),
                    shards,
                );
                let leader = election.get(&shard).cloned();
                // A pooled instance claimed by a team is created for it now.
                let claimed = live
                    .get(id)
                    .is_some_and(|old| old.get("team").is_none() && rec.get("team").is_some());
                if claimed {
                    r.running.remove(id);
                    r.claimed.insert(id.to_string());
                }
                if !live.contains_key(id) || claimed {
                    let token = rec["token"].as_i64().unwrap_or(-1);
                    if leader.as_ref().is_none_or(|(t, _)| *t != token) {
                        out.violations.push(Violation {
                            phase,
                            kind: "fenced write",
                            detail: format!(
                                "instance {id} created at revision {} with token {token} while {}",
                                e.revision,
                                leader.as_ref().map_or("nobody led".to_string(), |(t, l)| {
                                    format!("{l} led with token {t}")
                                })
                            ),
                        });
                    }
                    r.created.insert(id.to_string(), (e.revision, e.at));
                    if let Some(w) = rec["worker"].as_str() {
                        r.owner.insert(id.to_string(), w.to_string());
                    }
                }
                for name in names(&rec) {
                    match holders.get(&name) {
                        Some(other) if other != id => out.violations.push(Violation {
                            phase,
                            kind: "held twice",
                            detail: format!(
                                "{name} given to {id} at revision {} while {other} held it",
                                e.revision
                            ),
                        }),
                        _ => {
                            holders.insert(name, id.to_string());
                        }
                    }
                }
                let team = rec["team"].as_str();
                if team.is_none() && !names(&rec).is_empty() {
                    out.violations.push(Violation {
                        phase,
                        kind: "pooled routed",
                        detail: format!(
                            "pooled instance {id} (no team) given {} at revision {}",
                            names(&rec).join(", "),
                            e.revision
                        ),
                    });
                }
                let before = live.get(id).and_then(|old| old["team"].as_str());
                if let (Some(before), Some(after)) = (before, team)
                    && before != after
                {
                    out.violations.push(Violation {
                        phase,
                        kind: "handed twice",
                        detail: format!(
                            "instance {id} of team {before} became team {after}'s at revision {}",
                            e.revision
                        ),
                    });
                }
                if let Some(old) = live.get(id) {
                    rewritten(phase, e, id, old, &rec, &mut r, out);
                }
                let expires = rec["expires_at"].as_u64().unwrap_or_default();
                r.expiry
                    .entry(id.to_string())
                    .or_default()
                    .push((e.at, expires));
                // The first put of an expiry is the write that granted it;
                // a later one with the same expiry is a renewal's settling
                // check (after a lost answer it rewrites the record
                // unchanged, whoever leads then), not a new grant.
                r.puts
                    .entry((id.to_string(), expires))
                    .or_insert((e.revision, leader.map(|(_, l)| l)));
                live.insert(id.to_string(), rec);
            }
            ("instances", None) => {
                if let Some(rec) = live.remove(id) {
                    for name in names(&rec) {
                        if holders.get(&name).is_some_and(|h| h == id) {
                            holders.remove(&name);
                        }
                    }
                    for sw in r.switches.iter_mut().filter(|w| w.id == id) {
                        sw.ended |= sw.running.is_none();
                    }
                    let expires = rec["expires_at"].as_u64().unwrap_or_default();
                    r.deleted
                        .insert(id.to_string(), (e.at, e.revision, expires));
                }
            }
            ("status", Some(v)) if status_running(v) => {
                // Mid-switch, only a status of the new revision counts.
                let revision = serde_json::from_slice::<Value>(v)
                    .ok()
                    .and_then(|s| s["spec_revision"].as_i64())
                    .unwrap_or(0);
                let switching = r
                    .switches
                    .iter_mut()
                    .rev()
                    .find(|w| w.id == id && w.running.is_none() && !w.ended);
                match switching {
                    Some(w) if w.to != revision => continue,
                    Some(w) => w.running = Some(e.at),
                    None => {
                        // A fresh instance's first run: how long the
                        // engine took to start one then.
                        let first = !r.running.contains_key(id)
                            && !r.claimed.contains(id)
                            && !r.switches.iter().any(|w| w.id == id);
                        if let Some((_, created)) = r.created.get(id).filter(|_| first) {
                            r.starts.push((*created, e.at - created));
                        }
                    }
                }
                r.running.entry(id.to_string()).or_insert(e.at);
            }
            _ => {}
        }
    }
    r
}

/// A live instance's record put again: when its spec revision changed (a
/// rollout), it must keep what players hold of it and not be moved onto a
/// revision it already ran; its switch begins (not counted as running until
/// its worker reports the new revision).
fn rewritten(
    phase: usize,
    e: &crate::history::Event,
    id: &str,
    old: &Value,
    rec: &Value,
    r: &mut Replay,
    out: &mut Report,
) {
    let revision = |v: &Value| v["spec_revision"].as_i64().unwrap_or(0);
    let (from, to) = (revision(old), revision(rec));
    // A claim (a pooled instance given its team) is no rollout.
    if from == to || (old["team"].is_null() && !rec["team"].is_null()) {
        return;
    }
    let kept = |v: &Value| (v["team"].clone(), names(v));
    if kept(old) != kept(rec) {
        out.violations.push(Violation {
            phase,
            kind: "replaced changed",
            detail: format!(
                "instance {id} moved from spec revision {from} to {to} at revision {} with team and routes {:?}, not {:?}",
                e.revision,
                kept(rec),
                kept(old)
            ),
        });
    }
    let ran = |w: &&Switch| w.id == id && w.to == to;
    if to != 0 && r.switches.iter().any(|w| ran(&w)) {
        out.violations.push(Violation {
            phase,
            kind: "replaced twice",
            detail: format!(
                "instance {id} moved onto spec revision {to} again at revision {}",
                e.revision
            ),
        });
    }
    r.running.remove(id);
    r.switches.push(Switch {
        id: id.to_string(),
        at: e.at,
        to,
        running: None,
        ended: false,
    });
}

/// Every rollout switch ended within its [`switch_window`] (or by a delete),
/// unless its worker was down or cut off meanwhile.
fn switches(h: &History, r: &Replay, end: Secs, out: &mut Report) {
    for w in &r.switches {
        if w.ended {
            out.switches.2 += 1;
            continue;
        }
        let took = w.running.unwrap_or(end) - w.at;
        if w.running.is_some() {
            out.switches.0 += 1;
            out.switches.1 = out.switches.1.max(took);
        }
        let allowed = switch_window(r, w.at);
        if took <= allowed {
            continue;
        }
        let owner = r
            .owner
            .get(&w.id)
            .and_then(|o| h.workers.iter().position(|x| x == o));
        let explained = h.faults.iter().any(|f| match f.target {
            Target::Agent(a) | Target::AgentEtcdLink(a) => {
                Some(a) == owner && overlaps(w.at, took, f.from, f.to + AGENT_RECOVERY)
            }
            Target::Etcd(_) | Target::EtcdStalled(_) | Target::EtcdMinority(_) => {
                overlaps(w.at, took, f.from, f.to + CONTROL_RECOVERY)
            }
            _ => false,
        });
        if !explained {
            out.violations.push(Violation {
                phase: phase_of(h, w.at),
                kind: "long switch",
                detail: format!(
                    "instance {} rewritten onto spec revision {} at {:.1} s {} ({:.1} s, at most {allowed:.1} s)",
                    w.id,
                    w.to,
                    w.at,
                    if w.running.is_some() { "ran it only after" } else { "never ran it, and was not deleted, in" },
                    took
                ),
            });
        }
    }
}

/// How long a switch begun at `at` may take: [`SWITCH_WINDOW`] beyond the
/// third quartile of the starts of fresh instances created around it
/// ([`START_NEIGHBOURHOOD`]), that quartile counting for at most another
/// [`SWITCH_WINDOW`]. Not the slowest start: a switch put off by 30 s
/// (`slow-switch`) must still show beside one slow neighbour.
fn switch_window(r: &Replay, at: Secs) -> Secs {
    let mut starts: Vec<Secs> = r
        .starts
        .iter()
        .filter(|(created, _)| (at - START_NEIGHBOURHOOD..=at + SWITCH_WINDOW).contains(created))
        .map(|(_, start)| *start)
        .collect();
    starts.sort_by(f64::total_cmp);
    let usual = starts
        .get(starts.len().saturating_sub(1) * 3 / 4)
        .copied()
        .unwrap_or(0.0);
    SWITCH_WINDOW + usual.min(SWITCH_WINDOW)
}

fn acked_spawns(h: &History, r: &Replay, out: &mut Report) {
    for c in h
        .calls
        .iter()
        .filter(|c| c.op == Op::Spawn && c.status == 201)
    {
        let Some(id) = &c.instance else { continue };
        let phase = phase_of(h, c.at);
        if !r.created.contains_key(id) {
            out.violations.push(Violation {
                phase,
                kind: "lost spawn",
                detail: format!(
                    "spawn of {id} acknowledged at {:.1} s never reached etcd",
                    c.at
                ),
            });
            continue;
        }
        let Some(&(d, rev, expires)) = r.deleted.get(id) else {
            continue;
        };
        let ends = expires.saturating_sub(granted_ahead(h, r, id, expires));
        let expired = ends as f64 <= h.start_unix + d + 1.0;
        let asked = h.calls.iter().any(|x| {
            x.op == Op::Delete
                && x.instance.as_ref() == Some(id)
                && x.at <= d
                && ((200..300).contains(&x.status) || x.failed())
        });
        if !expired && !asked {
            out.violations.push(Violation {
                phase: phase_of(h, d),
                kind: "lost spawn",
                detail: format!(
                    "{id} (acknowledged at {:.1} s) was deleted at revision {rev} ({d:.1} s), {:.0} s before its expiry, with no delete request",
                    c.at,
                    ends as f64 - (h.start_unix + d)
                ),
            });
        }
    }
}

/// A delete answered 204 removed the record before it answered (the run's
/// watch may see it up to a second later).
fn acked_deletes(h: &History, r: &Replay, out: &mut Report) {
    for c in h
        .calls
        .iter()
        .filter(|c| c.op == Op::Delete && c.status == 204)
    {
        let Some(id) = &c.instance else { continue };
        // This run's own watch may have been on a paused, cut-off or
        // killed etcd member (or on one left without a leader): what it saw
        // then arrived late, once it was watching again. (A delete answered
        // while two members were killed committed once the first came back,
        // and the watch delivered it 2.7 s later with the rest of the batch.)
        let stalled = |d: Secs| {
            h.faults.iter().any(|f| {
                matches!(
                    f.target,
                    Target::Etcd(_) | Target::EtcdStalled(_) | Target::EtcdMinority(_)
                ) && f.from <= c.at + c.took
                    && d <= f.to + WATCH_DELAY
            })
        };
        let gone = r
            .deleted
            .get(id)
            .is_some_and(|(d, _, _)| *d <= c.at + c.took + 1.0 || stalled(*d));
        if !gone {
            out.violations.push(Violation {
                phase: phase_of(h, c.at),
                kind: "lost delete",
                detail: format!(
                    "delete of {id} answered 204 at {:.1} s but its record was still there a second later",
                    c.at + c.took
                ),
            });
        }
    }
}

fn acked_renewals(h: &History, r: &Replay, out: &mut Report) {
    for c in h
        .calls
        .iter()
        .filter(|c| c.op == Op::Renew && c.status == 200)
    {
        let (Some(id), Some(expires)) = (&c.instance, c.body["expires_at"].as_u64()) else {
            continue;
        };
        let phase = phase_of(h, c.at);
        let by = h.controller_ids.get(c.controller).cloned();
        match r.puts.get(&(id.clone(), expires)) {
            None => out.violations.push(Violation {
                phase,
                kind: "lost renewal",
                detail: format!(
                    "renewal of {id} to {expires} acknowledged at {:.1} s never reached etcd",
                    c.at
                ),
            }),
            Some((rev, leader)) if leader != &by => out.violations.push(Violation {
                phase,
                kind: "fenced write",
                detail: format!(
                    "renewal of {id} acknowledged by {} committed at revision {rev} while {} led",
                    by.unwrap_or_default(),
                    leader.clone().unwrap_or_else(|| "nobody".into())
                ),
            }),
            Some(_) => {}
        }
    }
}

/// No instance lost to a renewal: an instance whose renewal was asked,
/// deleted before the latest expiry it was granted (its record's, or any
/// expiry a spawn or renewal answer promised) with no delete request
/// (answered or not) before. This run installs no policies, so no `expire`
/// decision explains one either.
fn renewed_not_lost(h: &History, r: &Replay, out: &mut Report) {
    for (id, &(d, rev, expires)) in &r.deleted {
        let mine = |c: &&Call| c.instance.as_ref() == Some(id) && c.at <= d;
        let renewals = h
            .calls
            .iter()
            .filter(mine)
            .filter(|c| c.op == Op::Renew)
            .count();
        if renewals == 0 {
            continue;
        }
        let asked = h
            .calls
            .iter()
            .filter(mine)
            .any(|c| c.op == Op::Delete && ((200..300).contains(&c.status) || c.failed()));
        let promised = h
            .calls
            .iter()
            .filter(mine)
            .filter(|c| {
                (c.op == Op::Spawn && c.status == 201) || (c.op == Op::Renew && c.status == 200)
            })
            .filter_map(|c| {
                let promised = c.body["expires_at"].as_u64()?;
                Some(promised.saturating_sub(ahead(h, c.controller, c.at)))
            })
            .fold(
                expires.saturating_sub(granted_ahead(h, r, id, expires)),
                u64::max,
            );
        let early = promised as f64 - (h.start_unix + d);
        if !asked && early > 1.0 {
            out.violations.push(Violation {
                phase: phase_of(h, d),
                kind: "lost to a renewal",
                detail: format!(
                    "{id} ({renewals} renewal(s) asked) was deleted at revision {rev} ({d:.1} s), {early:.0} s before the expiry it was granted, with no delete request"
                ),
            });
        }
    }
}

/// When agent `agent` could first have learnt of a change committed at `d`:
/// the end of a fault that cut it off around then, else `d`.
fn learnable(h: &History, agent: usize, d: Secs) -> Secs {
    h.faults
        .iter()
        .filter_map(|f| match f.target {
            Target::Agent(a) | Target::AgentEtcdLink(a) if a == agent => {
                (f.from <= d + WATCH_DELAY && f.to >= d).then_some(f.to)
            }
            // Any agent's watch may have been on the cut-off member.
            Target::EtcdMinority(_) => {
                let until = f.from + MINORITY_DETECT;
                (f.from <= d + WATCH_DELAY && until >= d).then_some(until)
            }
            _ => None,
        })
        .fold(d, f64::max)
}

fn overlaps(at: Secs, took: Secs, from: Secs, to: Secs) -> bool {
    at <= to && at + took >= from
}

fn api_failure_explained(h: &History, c: &Call) -> bool {
    h.faults.iter().any(|f| match &f.target {
        // One member of three lost: no visible effect, except while the
        // others elect a new raft leader when it led.
        Target::Etcd(members) if members.len() == 1 => {
            overlaps(c.at, c.took, f.from, f.from + ETCD_ELECTION)
        }
        // A silent member: requests that went to it wait until the client
        // declares the connection dead, and a controller whose election
        // keep-alive went there may lose its lead.
        Target::Controller(_)
        | Target::Etcd(_)
        | Target::EtcdStalled(_)
        | Target::EtcdMinority(_) => overlaps(c.at, c.took, f.from, f.to + CONTROL_RECOVERY),
        _ => false,
    })
}

/// Whether a failed probe of a live instance created at `created` is
/// explained: the probing agent or the instance's owner was down or cut
/// off, or the probing agent was cut from etcd when the instance appeared
/// (it could not know its route yet).
fn probe_failure_explained(h: &History, p: &Probe, owner: Option<usize>, created: Secs) -> bool {
    h.faults.iter().any(|f| match f.target {
        Target::Agent(a) => {
            (a == p.agent || Some(a) == owner)
                && overlaps(p.at, p.took, f.from, f.to + AGENT_RECOVERY)
        }
        Target::AgentEtcdLink(a) => {
            (a == p.agent
                && created + WATCH_DELAY >= f.from
                && overlaps(p.at, p.took, f.from, f.to + AGENT_RECOVERY))
                // A cut longer than its lease's TTL less a keep-alive
                // period lapses the worker's registration: the others then
                // see its instances' owner gone until it is back.
                || (Some(a) == owner
                    && overlaps(p.at, p.took, f.from + MEMBERSHIP_LAPSE, f.to + AGENT_RECOVERY))
        }
        // An agent whose watch was on the cut-off member learns late.
        Target::EtcdMinority(_) => {
            created + WATCH_DELAY >= f.from
                && overlaps(p.at, p.took, f.from, f.from + MINORITY_DETECT)
        }
        // A silent member answers nothing, require-leader included: a
        // watch on it is given up when the connection's keep-alive fails
        // (2 s + 2 s), or when the member is back. An instance that appeared
        // meanwhile is not yet routed by an agent whose watch was there.
        Target::EtcdStalled(_) => {
            created + WATCH_DELAY >= f.from && overlaps(p.at, p.took, f.from, f.to + WATCH_DELAY)
        }
        _ => false,
    })
}

fn probes(h: &History, r: &Replay, out: &mut Report) {
    for p in &h.probes {
        let phase = phase_of(h, p.at);
        match r.deleted.get(&p.instance) {
            Some(&(d, _, _)) if p.at + p.took + 1.0 >= d => {
                let routed = matches!(p.outcome, Outcome::Served | Outcome::Routed(_));
                let limit = learnable(h, p.agent, d) + WATCH_DELAY;
                if routed && !p.tcp && p.at > limit {
                    out.violations.push(Violation {
                        phase,
                        kind: "stale route",
                        detail: format!(
                            "{} routed {} ({:?}) at {:.1} s, {:.1} s after etcd deleted it",
                            h.workers.get(p.agent).cloned().unwrap_or_default(),
                            p.instance,
                            p.outcome,
                            p.at,
                            p.at - d
                        ),
                    });
                }
            }
            _ => {
                // A live instance: counted only once it served for a second
                // and while it is not about to expire.
                let running = r.running.get(&p.instance).is_some_and(|t| *t + 1.0 <= p.at);
                let expires = r
                    .expiry
                    .get(&p.instance)
                    .and_then(|v| v.iter().rev().find(|(at, _)| *at <= p.at).map(|(_, e)| *e))
                    .map(|e| e.saturating_sub(granted_ahead(h, r, &p.instance, e)));
                let expiring = expires.is_some_and(|e| e as f64 - (h.start_unix + p.at) < 3.0);
                if !running || expiring {
                    continue;
                }
                let counts = out.live_probes.entry(phase).or_default();
                counts.1 += 1;
                if p.outcome == Outcome::Served {
                    counts.0 += 1;
                    continue;
                }
                let owner = r
                    .owner
                    .get(&p.instance)
                    .and_then(|w| h.workers.iter().position(|x| x == w));
                let created = r.created.get(&p.instance).map_or(0.0, |c| c.1);
                out.failures.push(Failure {
                    phase,
                    kind: format!("probe {}", if p.tcp { "tcp" } else { "http" }),
                    expected: probe_failure_explained(h, p, owner, created),
                    detail: format!(
                        "{} at {:.3} s +{:.3}: {:?} of {} (on {}, created at {created:.1} s)",
                        h.workers.get(p.agent).cloned().unwrap_or_default(),
                        p.at,
                        p.took,
                        p.outcome,
                        p.instance,
                        r.owner.get(&p.instance).cloned().unwrap_or_default(),
                    ),
                });
            }
        }
    }
}

/// Requests/s between `from` and `to` from cumulative `samples`: from the
/// last sample at or before `from` to the first at or after `to`.
fn rate_between(samples: &[(Secs, f64)], from: Secs, to: Secs) -> Option<f64> {
    let start = samples.iter().rev().find(|(t, _)| *t <= from)?;
    let end = samples.iter().find(|(t, _)| *t >= to)?;
    let secs = end.0 - start.0;
    (secs >= 1.0).then(|| (end.1 - start.1) / secs)
}

/// The request rate to etcd during each checked fault (and the recovery
/// after it, when clients reconnect) against the baseline phase's.
fn retry_storms(h: &History, out: &mut Report) {
    if h.rate_checked.is_empty() {
        return;
    }
    let baseline = h
        .phases
        .first()
        .and_then(|p| rate_between(&h.etcd_requests, p.from, p.to));
    let Some(baseline) = baseline.filter(|b| *b > 0.0) else {
        out.violations.push(Violation {
            phase: 0,
            kind: "retry storm",
            detail:
                "no packet rate to etcd was measured in the baseline phase: nothing to compare with"
                    .into(),
        });
        return;
    };
    let mut rates = Vec::new();
    for &i in &h.rate_checked {
        let Some(f) = h.faults.get(i) else { continue };
        let end = h
            .phases
            .get(f.phase)
            .map_or(f.to, |p| p.to)
            .min(f.to + CONTROL_RECOVERY);
        let Some(rate) = rate_between(&h.etcd_requests, f.from, end) else {
            out.violations.push(Violation {
                phase: f.phase,
                kind: "retry storm",
                detail: format!("no packet rate to etcd was measured during {:?}", f.what),
            });
            continue;
        };
        if rate > STORM_FACTOR * baseline {
            out.violations.push(Violation {
                phase: f.phase,
                kind: "retry storm",
                detail: format!(
                    "the daemons sent etcd {rate:.0} packets/s during {:?} and its recovery, {:.1} times the baseline's {baseline:.0} (at most {STORM_FACTOR})",
                    f.what,
                    rate / baseline
                ),
            });
        }
        rates.push((f.what.clone(), rate));
    }
    out.etcd_rates = Some((baseline, rates));
}

/// Checks every invariant against `h`.
pub(crate) fn check(h: &History) -> Report {
    let mut out = Report::default();
    let r = replay(h, &mut out);
    acked_spawns(h, &r, &mut out);
    acked_renewals(h, &r, &mut out);
    renewed_not_lost(h, &r, &mut out);
    acked_deletes(h, &r, &mut out);
    probes(h, &r, &mut out);
    pools_kept(h, &mut out);
    retry_storms(h, &mut out);
    let end = h.events.last().map_or(0.0, |e| e.at);
    switches(h, &r, end, &mut out);
    for c in h.calls.iter().filter(|c| c.failed()) {
        out.failures.push(Failure {
            phase: phase_of(h, c.at),
            kind: format!("api {} {}", c.op.name(), c.status),
            expected: api_failure_explained(h, c),
            detail: format!(
                "c{} at {:.3} s +{:.3}: {} {}",
                c.controller,
                c.at,
                c.took,
                c.instance.as_deref().unwrap_or("-"),
                c.body
            ),
        });
    }
    for s in h.settles.iter().filter(|s| !s.disagreements.is_empty()) {
        out.violations.push(Violation {
            phase: s.phase,
            kind: "diverged",
            detail: s.disagreements.join("; "),
        });
    }
    // A phase without a single probe of a live instance proves nothing
    // about the data plane.
    for (i, p) in h.phases.iter().enumerate() {
        if !out.live_probes.contains_key(&i) {
            out.failures.push(Failure {
                phase: i,
                kind: format!(
                    "harness: no probe reached a live instance during {:?}",
                    p.name
                ),
                expected: false,
                detail: String::new(),
            });
        }
    }
    for e in &h.harness_errors {
        out.failures.push(Failure {
            phase: h.phases.len().saturating_sub(1),
            kind: format!("harness: {e}"),
            expected: false,
            detail: String::new(),
        });
    }
    out
}

/// Replays the pooled challenges' pools against the room the cluster had:
/// a pool below `min` for longer than [`POOL_REFILL`] while a scheduler is
/// elected, nothing waits in the queue and the live workers' slots could
/// hold the missing ones is a violation.
fn pools_kept(h: &History, out: &mut Report) {
    let ks = Keyspace::default();
    let (challenges, workers, queue, election) = (
        ks.prefix(Kind::Challenges),
        ks.prefix(Kind::Workers),
        ks.prefix(Kind::Queue),
        ks.prefix(Kind::ShardLeaders),
    );
    // challenge → pool min; live records: id → (challenge, pooled).
    let mut mins: BTreeMap<String, u64> = BTreeMap::new();
    let mut live: BTreeMap<String, (String, bool)> = BTreeMap::new();
    let mut slots: BTreeMap<String, u64> = BTreeMap::new();
    let mut waiting = 0usize;
    let mut leaders = 0usize;
    // challenge → since when it has been short with room.
    let mut short: BTreeMap<String, Secs> = BTreeMap::new();
    let mut reported: std::collections::BTreeSet<String> = Default::default();
    for e in &h.events {
        let value = e
            .value
            .as_ref()
            .and_then(|v| serde_json::from_slice::<Value>(v).ok());
        if let Some(name) = e.key.strip_prefix(&challenges) {
            match value
                .as_ref()
                .and_then(|v| v["spec"]["pool"]["min"].as_u64())
            {
                Some(min) => mins.insert(name.to_string(), min),
                None => mins.remove(name),
            };
        } else if let Some(w) = e.key.strip_prefix(&workers) {
            match value.as_ref().and_then(|v| v["capacity"].as_u64()) {
                Some(c) => slots.insert(w.to_string(), c),
                None => slots.remove(w),
            };
        } else if e.key.starts_with(&queue) {
            // Places are one key each: count creations and deletions.
            match (&e.value, e.create_revision == e.revision) {
                (Some(_), true) => waiting += 1,
                (None, _) => waiting = waiting.saturating_sub(1),
                _ => {}
            }
        } else if e.key.starts_with(&election) {
            match e.value {
                Some(_) if e.create_revision == e.revision => leaders += 1,
                None => leaders = leaders.saturating_sub(1),
                _ => {}
            }
        } else if let Some(("instances", id)) = split_key(&e.key) {
            match &value {
                Some(rec) => {
                    let challenge = rec["challenge"].as_str().unwrap_or_default().to_string();
                    live.insert(id.to_string(), (challenge, rec.get("team").is_none()));
                }
                None => {
                    live.remove(id);
                }
            }
        }
        let free = slots
            .values()
            .sum::<u64>()
            .saturating_sub(live.len() as u64);
        for (challenge, min) in &mins {
            let pooled = live
                .values()
                .filter(|(c, pooled)| *pooled && c == challenge)
                .count() as u64;
            let room = pooled < *min && free >= min - pooled && waiting == 0 && leaders > 0;
            if !room {
                short.remove(challenge);
                continue;
            }
            let since = *short.entry(challenge.clone()).or_insert(e.at);
            // While etcd had no quorum (or a silent member held writes),
            // nothing could be refilled: the refill time runs from the
            // recovery after it.
            let counted_from = h
                .faults
                .iter()
                .filter(|f| match &f.target {
                    Target::Etcd(members) => members.len() >= 2,
                    Target::EtcdStalled(_) | Target::EtcdMinority(_) => true,
                    _ => false,
                })
                .filter(|f| f.from <= e.at && f.to + CONTROL_RECOVERY >= since)
                .map(|f| f.to + CONTROL_RECOVERY)
                .fold(since, f64::max);
            if e.at - counted_from > POOL_REFILL && reported.insert(format!("{challenge}@{since}"))
            {
                out.violations.push(Violation {
                    phase: phase_of(h, since),
                    kind: "pool below min",
                    detail: format!(
                        "{challenge}'s pool held {pooled} of min {min} from {since:.1} s to {:.1} s with {free} slot(s) free and a scheduler elected",
                        e.at
                    ),
                });
            }
        }
    }
}

fn tally<'a>(kinds: impl Iterator<Item = &'a str>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for k in kinds {
        *counts.entry(k).or_default() += 1;
    }
    if counts.is_empty() {
        return "-".into();
    }
    counts
        .iter()
        .map(|(k, n)| format!("{k} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The per-phase table, the violations, and the closing `violations: N`.
pub(crate) fn render(h: &History, report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| phase | secs | API ops/s | probes/s | live probes served | faults injected | failed, expected | failed, unexpected | violations |\n|---|---:|---:|---:|---:|---|---|---|---:|"
    );
    for (i, p) in h.phases.iter().enumerate() {
        let secs = (p.to - p.from).max(0.001);
        let in_phase = |at: Secs| at >= p.from && at < p.to;
        let ops = h
            .calls
            .iter()
            .filter(|c| in_phase(c.at) && c.status != 599)
            .count();
        let probes = h.probes.iter().filter(|x| in_phase(x.at)).count();
        let faults: Vec<&str> = h
            .faults
            .iter()
            .filter(|f| f.phase == i)
            .map(|f| f.what.as_str())
            .collect();
        let failures = |expected: bool| {
            tally(
                report
                    .failures
                    .iter()
                    .filter(|f| f.phase == i && f.expected == expected)
                    .map(|f| f.kind.as_str()),
            )
        };
        let _ = writeln!(
            s,
            "| {} | {secs:.0} | {:.1} | {:.1} | {}/{} | {} | {} | {} | {} |",
            p.name,
            ops as f64 / secs,
            probes as f64 / secs,
            report.live_probes.get(&i).map_or(0, |c| c.0),
            report.live_probes.get(&i).map_or(0, |c| c.1),
            if faults.is_empty() {
                "-".to_string()
            } else {
                faults.join("; ")
            },
            failures(true),
            failures(false),
            report.violations.iter().filter(|v| v.phase == i).count()
        );
    }
    for v in &report.violations {
        let phase = h.phases.get(v.phase).map_or("?", |p| p.name.as_str());
        let _ = writeln!(s, "VIOLATION [{phase}] {}: {}", v.kind, v.detail);
    }
    if let Some((baseline, rates)) = &report.etcd_rates {
        let _ = write!(
            s,
            "packets/s from the daemons to etcd's client port: baseline {baseline:.0}"
        );
        for (what, rate) in rates {
            let _ = write!(s, "; {what}: {rate:.0} ({:.1}×)", rate / baseline);
        }
        let _ = writeln!(s);
    }
    let (ran, longest, deleted) = report.switches;
    if ran + deleted > 0 {
        let _ = writeln!(
            s,
            "rollout switches: {ran} ran the new revision (the longest {longest:.1} s after its rewrite, at most {SWITCH_WINDOW} s beyond the usual fresh start near it), {deleted} deleted first"
        );
    }
    let _ = writeln!(
        s,
        "calls: {}, probes: {}, etcd changes: {}, unexpected failures: {}",
        h.calls.len(),
        h.probes.len(),
        h.events.len(),
        report.unexpected()
    );
    for f in report.failures.iter().filter(|f| !f.expected).take(20) {
        let _ = writeln!(s, "unexpected: phase {}: {} {}", f.phase, f.kind, f.detail);
    }
    let _ = writeln!(s, "violations: {}", report.violations.len());
    s
}

#[cfg(test)]
mod tests {
    //! The checker on small hand-made histories: each invariant can fail.

    use serde_json::json;

    use super::*;
    use crate::history::{Event, Fault, Phase};

    /// Instance `id`'s key (ids as given: these tests use short ones).
    fn instance_key(id: &str) -> String {
        Keyspace::default().key_of(Kind::Instances, id)
    }

    fn history() -> History {
        History {
            start_unix: 1_000_000.0,
            phases: vec![Phase {
                name: "p".into(),
                from: 0.0,
                to: 100.0,
            }],
            controller_ids: vec!["c0".into(), "c1".into()],
            workers: vec!["w0".into(), "w1".into()],
            ..History::default()
        }
    }

    fn put(h: &mut History, at: Secs, key: &str, create: i64, value: Value) {
        let revision = h.events.len() as i64 + 10;
        h.events.push(Event {
            at,
            revision,
            key: key.into(),
            create_revision: if create == 0 { revision } else { create },
            value: Some(value.to_string().into_bytes()),
        });
    }

    fn delete(h: &mut History, at: Secs, key: &str) {
        let revision = h.events.len() as i64 + 10;
        h.events.push(Event {
            at,
            revision,
            key: key.into(),
            create_revision: 0,
            value: None,
        });
    }

    /// The one shard's leader key (one shard: everything).
    fn shard0() -> String {
        Keyspace::default().key(&tidegate_schema::Key::ShardLeader(0))
    }

    fn elect(h: &mut History, id: &str) -> i64 {
        put(h, 0.0, &shard0(), 0, json!({ "id": id }));
        h.events
            .last()
            .map(|e| e.create_revision)
            .unwrap_or_default()
    }

    /// Puts instance `id`'s record: created by `token`, serving `host`.
    fn instance(h: &mut History, at: Secs, id: &str, token: i64, host: &str, expires: u64) {
        let key = instance_key(id);
        put(h, at, &key, 0, record(id, token, host, expires));
    }

    fn record(id: &str, token: i64, host: &str, expires: u64) -> Value {
        json!({"id": id, "team": "t1", "token": token, "worker": "w1", "expires_at": expires,
               "http": [{"hostname": host}], "tcp": []})
    }

    fn spawned(h: &mut History, at: Secs, id: &str) {
        h.calls.push(Call {
            at,
            took: 0.1,
            op: Op::Spawn,
            controller: 0,
            instance: Some(id.into()),
            status: 201,
            body: json!({"id": id}),
        });
    }

    fn kinds(r: &Report) -> Vec<&'static str> {
        r.violations.iter().map(|v| v.kind).collect()
    }

    #[test]
    fn a_pooled_instance_is_routed_by_nothing_and_goes_to_one_team_only() {
        let mut h = history();
        let token = elect(&mut h, "c0");
        let key = instance_key("p1");
        let pooled = json!({"id": "p1", "token": token, "worker": "w1", "expires_at": 2_000_000,
            "http": [], "tcp": []});
        put(&mut h, 1.0, &key, 0, pooled);
        let create = h.events.last().unwrap().create_revision;
        // Claimed by t1: fine, with its hostname now.
        put(
            &mut h,
            2.0,
            &key,
            create,
            record("p1", token, "p1.ctf", 2_000_000),
        );
        assert!(
            check(&h).violations.is_empty(),
            "{:?}",
            check(&h).violations
        );
        // Then written as t2's: handed out twice.
        let mut twice = record("p1", token, "p1.ctf", 2_000_000);
        twice["team"] = json!("t2");
        put(&mut h, 3.0, &key, create, twice);
        assert_eq!(kinds(&check(&h)), ["handed twice"]);
        // A team-less record with a hostname is routed while pooled.
        let mut h = history();
        let token = elect(&mut h, "c0");
        let mut routed = record("p2", token, "p2.ctf", 2_000_000);
        routed.as_object_mut().unwrap().remove("team");
        put(&mut h, 1.0, &instance_key("p2"), 0, routed);
        assert_eq!(kinds(&check(&h)), ["pooled routed"]);
    }

    #[test]
    fn a_pool_below_min_with_room_free_for_too_long_is_caught() {
        let ks = Keyspace::default();
        let pool = |h: &mut History| {
            elect(h, "c0");
            put(
                h,
                0.0,
                &ks.key_of(Kind::Workers, "w1"),
                0,
                json!({"capacity": 10}),
            );
            put(
                h,
                0.0,
                &ks.key_of(Kind::Challenges, "warm"),
                0,
                json!({"spec": {"pool": {"min": 2, "max": 2}}}),
            );
        };
        // Empty from 0 s to 20 s with 10 slots free and a leader.
        let mut h = history();
        pool(&mut h);
        put(
            &mut h,
            20.0,
            &ks.key_of(Kind::Workers, "w1"),
            1,
            json!({"capacity": 10}),
        );
        assert_eq!(kinds(&check(&h)), ["pool below min"]);
        // The same across a quorum loss from 1 s to 5 s: the refill time
        // runs from its recovery (13 s), so 20 s is within it; 24 s is not.
        h.faults.push(fault(Target::Etcd(vec![0, 1]), 1.0, 5.0));
        assert!(kinds(&check(&h)).is_empty(), "{:?}", check(&h).violations);
        put(
            &mut h,
            24.0,
            &ks.key_of(Kind::Workers, "w1"),
            2,
            json!({"capacity": 10}),
        );
        assert_eq!(kinds(&check(&h)), ["pool below min"]);
        // The same while a spawn waits in the queue: the room is its.
        let mut h = history();
        pool(&mut h);
        put(&mut h, 0.5, &ks.key_of(Kind::Queue, "web/t1"), 0, json!({}));
        put(
            &mut h,
            20.0,
            &ks.key_of(Kind::Workers, "w1"),
            1,
            json!({"capacity": 10}),
        );
        assert!(
            check(&h).violations.is_empty(),
            "{:?}",
            check(&h).violations
        );
        // Refilled within the refill time.
        let mut h = history();
        pool(&mut h);
        for (at, id) in [(3.0, "a"), (4.0, "b")] {
            let rec = json!({"id": id, "challenge": "warm", "token": 1, "worker": "w1",
                "expires_at": 2_000_000, "http": [], "tcp": []});
            put(&mut h, at, &instance_key(id), 0, rec);
        }
        put(
            &mut h,
            20.0,
            &ks.key_of(Kind::Workers, "w1"),
            1,
            json!({"capacity": 10}),
        );
        let found = kinds(&check(&h));
        assert!(!found.contains(&"pool below min"), "{found:?}");
    }

    #[test]
    fn a_clean_history_has_no_violations() {
        let mut h = history();
        let t = elect(&mut h, "c0");
        spawned(&mut h, 1.0, "a");
        instance(&mut h, 1.0, "a", t, "a.x", 1_000_010);
        running(&mut h, 2.0, "a");
        delete(&mut h, 10.5, &instance_key("a"));
        h.probes.push(probe(5.0, "a", Outcome::Served));
        h.probes.push(probe(11.0, "a", Outcome::NotRouted));
        let r = check(&h);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.unexpected(), 0, "{:?}", r.failures);
        assert_eq!(r.live_probes.get(&0), Some(&(1, 1)));
        assert!(render(&h, &r).ends_with("violations: 0\n"));
    }

    #[test]
    fn a_failed_probe_of_a_live_instance_needs_a_fault_and_probes_are_required() {
        let mut h = history();
        let t = elect(&mut h, "c0");
        instance(&mut h, 1.0, "a", t, "a.x", 1_000_100);
        running(&mut h, 2.0, "a");
        let r = check(&h);
        assert_eq!(
            r.unexpected(),
            1,
            "a phase without live probes: {:?}",
            r.failures
        );
        h.probes
            .push(probe(5.0, "a", Outcome::Failed("refused".into())));
        let r = check(&h);
        assert_eq!(r.live_probes.get(&0), Some(&(0, 1)));
        assert_eq!(r.unexpected(), 1, "{:?}", r.failures);
        // Its owner (w1) was down then: explained.
        h.faults.push(fault(Target::Agent(1), 4.0, 4.5));
        assert_eq!(check(&h).unexpected(), 0);
    }

    #[test]
    fn etcd_faults_explain_probes_of_new_instances_for_a_bounded_time() {
        // The instance appeared at 1 s (owner w1), probed through w0.
        let explained = |target: Target, from: Secs, to: Secs, at: Secs| {
            let mut h = history();
            let t = elect(&mut h, "c0");
            instance(&mut h, 1.0, "a", t, "a.x", 1_000_100);
            running(&mut h, 1.5, "a");
            h.probes
                .push(probe(at, "a", Outcome::Failed("refused".into())));
            h.faults.push(fault(target, from, to));
            check(&h).unexpected() == 0
        };
        // A minority partition: only its first seconds.
        assert!(explained(Target::EtcdMinority(0), 2.0, 30.0, 6.0));
        assert!(!explained(
            Target::EtcdMinority(0),
            2.0,
            30.0,
            2.0 + MINORITY_DETECT + 1.0
        ));
        // Nor for an instance routed well before it.
        assert!(!explained(Target::EtcdMinority(0), 10.0, 30.0, 11.0));
        // A silent member: until it is back and the watch caught up.
        assert!(explained(Target::EtcdStalled(0), 2.0, 5.0, 6.5));
        assert!(!explained(
            Target::EtcdStalled(0),
            2.0,
            5.0,
            5.0 + WATCH_DELAY + 1.0
        ));
        // The owner cut from etcd: only once its lease could have lapsed.
        assert!(!explained(Target::AgentEtcdLink(1), 2.0, 6.0, 4.0));
        assert!(explained(Target::AgentEtcdLink(1), 2.0, 8.0, 7.5));
    }

    fn running(h: &mut History, at: Secs, id: &str) {
        let ep = json!({"v": 1, "instance": id, "worker": "w1", "status": {"state": "running"}, "updated_at": 0});
        let key = Keyspace::default().key_of(Kind::Statuses, &format!("w1/{id}"));
        put(h, at, &key, 0, ep);
    }

    fn probe(at: Secs, id: &str, outcome: Outcome) -> Probe {
        Probe {
            at,
            took: 0.01,
            agent: 0,
            instance: id.into(),
            tcp: false,
            outcome,
        }
    }

    #[test]
    fn a_creation_with_a_stale_token_is_a_fenced_write() {
        let mut h = history();
        let old = elect(&mut h, "c0");
        let c0 = shard0();
        delete(&mut h, 1.0, &c0);
        elect(&mut h, "c1");
        instance(&mut h, 2.0, "a", old, "a.x", 1_000_100);
        assert_eq!(kinds(&check(&h)), ["fenced write"]);
    }

    #[test]
    fn a_settling_rewrite_under_the_next_leader_is_not_the_renewal() {
        let mut h = history();
        let c0 = elect(&mut h, "c0");
        instance(&mut h, 1.0, "a", c0, "a.x", 1_000_100);
        let created = h.events.last().map_or(0, |e| e.create_revision);
        // c0 renews to 1_000_200 and answers 200.
        put(
            &mut h,
            2.0,
            &instance_key("a"),
            created,
            record("a", c0, "a.x", 1_000_200),
        );
        h.calls.push(Call {
            at: 1.9,
            took: 0.2,
            op: Op::Renew,
            controller: 0,
            instance: Some("a".into()),
            status: 200,
            body: json!({"id": "a", "expires_at": 1_000_200}),
        });
        // c0's key goes, c1 leads, and a settling check rewrites the
        // record unchanged (chaos, 2026-12-02: reported as c0's renewal
        // committed while c1 led).
        delete(&mut h, 3.0, &shard0());
        elect(&mut h, "c1");
        put(
            &mut h,
            4.0,
            &instance_key("a"),
            created,
            record("a", c0, "a.x", 1_000_200),
        );
        assert!(
            check(&h).violations.is_empty(),
            "{:?}",
            check(&h).violations
        );
        // A renewal whose only write came under c1 is still caught.
        put(
            &mut h,
            5.0,
            &instance_key("a"),
            created,
            record("a", c0, "a.x", 1_000_300),
        );
        h.calls.push(Call {
            at: 4.9,
            took: 0.2,
            op: Op::Renew,
            controller: 0,
            instance: Some("a".into()),
            status: 200,
            body: json!({"id": "a", "expires_at": 1_000_300}),
        });
        assert_eq!(kinds(&check(&h)), ["fenced write"]);
    }

    /// A fault of `target` from `from` to `to`, in the first phase.
    fn fault(target: Target, from: Secs, to: Secs) -> Fault {
        Fault {
            phase: 0,
            what: format!("{target:?}"),
            target,
            from,
            to,
        }
    }

    #[test]
    fn a_delete_answered_204_must_have_deleted() {
        let mut h = history();
        let t = elect(&mut h, "c0");
        instance(&mut h, 1.0, "a", t, "a.x", 1_000_100);
        let deleted = |at| Call {
            at,
            took: 0.1,
            op: Op::Delete,
            controller: 0,
            instance: Some("a".into()),
            status: 204,
            body: Value::Null,
        };
        h.calls.push(deleted(5.0));
        assert_eq!(kinds(&check(&h)), ["lost delete"]);
        delete(&mut h, 5.2, &instance_key("a"));
        assert!(check(&h).violations.is_empty());

        // Answered while etcd members were killed: the run's watch may see
        // it only once it watches again, up to `WATCH_DELAY` after the heal.
        let mut h = history();
        let t = elect(&mut h, "c0");
        instance(&mut h, 1.0, "a", t, "a.x", 1_000_100);
        h.faults.push(fault(Target::Etcd(vec![1, 2]), 3.0, 10.0));
        h.calls.push(deleted(8.0));
        delete(&mut h, 11.0, &instance_key("a"));
        assert!(check(&h).violations.is_empty());
        // Later than that, or never: lost.
        let mut late = history();
        let t = elect(&mut late, "c0");
        instance(&mut late, 1.0, "a", t, "a.x", 1_000_100);
        late.faults = h.faults.clone();
        late.calls.push(deleted(8.0));
        assert_eq!(kinds(&check(&late)), ["lost delete"]);
        delete(&mut late, 12.5, &instance_key("a"));
        assert_eq!(kinds(&check(&late)), ["lost delete"]);
    }

    #[test]
    fn a_hostname_held_twice_is_caught() {
        let mut h = history();
        let t = elect(&mut h, "c0");
        instance(&mut h, 1.0, "a", t, "same.x", 1_000_100);
        instance(&mut h, 2.0, "b", t, "same.x", 1_000_100);
        assert_eq!(kinds(&check(&h)), ["held twice"]);
    }

    #[test]
    fn an_instance_deleted_before_a_granted_renewal_ran_out_was_lost_to_it() {
        let mut h = history();
        let t = elect(&mut h, "c0");
        instance(&mut h, 1.0, "a", t, "a.x", 1_000_030);
        let renew = |at: Secs, status: u16, expires: u64| Call {
            at,
            took: 0.1,
            op: Op::Renew,
            controller: 0,
            instance: Some("a".into()),
            status,
            body: json!({"id": "a", "expires_at": expires}),
        };
        // The renewal's answer was lost (599); the record it wrote was then
        // deleted with its lease, 60 s early.
        h.calls.push(renew(5.0, 599, 0));
        instance(&mut h, 5.1, "a", t, "a.x", 1_000_070);
        delete(&mut h, 9.0, &instance_key("a"));
        assert_eq!(kinds(&check(&h)), ["lost to a renewal"]);

        // One answered 200 promised more than the record the deletion removed.
        let mut h = history();
        let t = elect(&mut h, "c0");
        instance(&mut h, 1.0, "a", t, "a.x", 1_000_030);
        h.calls.push(renew(5.0, 200, 1_000_070));
        delete(&mut h, 9.0, &instance_key("a"));
        assert!(kinds(&check(&h)).contains(&"lost to a renewal"));

        // Deleted at its expiry, or after a delete request: not lost.
        let mut h = history();
        let t = elect(&mut h, "c0");
        instance(&mut h, 1.0, "a", t, "a.x", 1_000_008);
        h.calls.push(renew(5.0, 409, 0));
        delete(&mut h, 8.5, &instance_key("a"));
        assert!(kinds(&check(&h)).is_empty(), "{:?}", kinds(&check(&h)));
        instance(&mut h, 10.0, "b", t, "b.x", 1_000_090);
        h.calls.push(Call {
            instance: Some("b".into()),
            ..renew(11.0, 200, 1_000_090)
        });
        h.calls.push(Call {
            at: 12.0,
            took: 0.1,
            op: Op::Delete,
            controller: 0,
            instance: Some("b".into()),
            status: 204,
            body: Value::Null,
        });
        delete(&mut h, 12.05, &instance_key("b"));
        assert!(kinds(&check(&h)).is_empty(), "{:?}", kinds(&check(&h)));
    }

    #[test]
    fn a_fault_that_multiplies_the_requests_to_etcd_is_a_retry_storm() {
        let mut h = history();
        h.phases = vec![
            Phase {
                name: "baseline".into(),
                from: 0.0,
                to: 10.0,
            },
            Phase {
                name: "quorum loss".into(),
                from: 10.0,
                to: 40.0,
            },
        ];
        h.faults.push(Fault {
            phase: 1,
            what: "quorum loss".into(),
            target: Target::Etcd(vec![0, 1]),
            from: 12.0,
            to: 18.0,
        });
        // 100 requests/s throughout, then 250/s (2.5x) during the fault.
        let mut total = 0.0;
        for t in 0..=40 {
            h.etcd_requests.push((t as f64, total));
            total += if (12..26).contains(&t) { 250.0 } else { 100.0 };
        }
        // Unchecked faults are not compared.
        assert!(kinds(&check(&h)).is_empty());
        h.rate_checked.push(0);
        let r = check(&h);
        assert!(kinds(&r).is_empty(), "{:?}", r.violations);
        let (baseline, rates) = r.etcd_rates.unwrap();
        assert_eq!(baseline, 100.0);
        assert_eq!(rates, [("quorum loss".to_string(), 250.0)]);
        // 400/s: four times the baseline.
        let mut total = 0.0;
        for (t, sample) in h.etcd_requests.iter_mut().enumerate() {
            sample.1 = total;
            total += if (12..26).contains(&t) { 400.0 } else { 100.0 };
        }
        assert_eq!(kinds(&check(&h)), ["retry storm"]);
        // No samples at all: nothing is proved, and that is said.
        h.etcd_requests.clear();
        assert_eq!(kinds(&check(&h)), ["retry storm"]);
    }

    #[test]
    fn an_acknowledged_spawn_deleted_early_without_a_request_is_lost() {
        let mut h = history();
        let t = elect(&mut h, "c0");
        spawned(&mut h, 1.0, "a");
        instance(&mut h, 1.0, "a", t, "a.x", 1_000_100);
        delete(&mut h, 5.0, &instance_key("a"));
        spawned(&mut h, 1.0, "never");
        assert_eq!(kinds(&check(&h)), ["lost spawn", "lost spawn"]);
        // A delete request (even one whose answer was lost) explains it.
        h.calls.push(Call {
            at: 4.0,
            took: 10.0,
            op: Op::Delete,
            controller: 1,
            instance: Some("a".into()),
            status: 599,
            body: Value::Null,
        });
        assert_eq!(kinds(&check(&h)), ["lost spawn"]);
    }

    #[test]
    fn an_expiry_granted_by_a_controller_whose_clock_ran_ahead_ends_that_much_earlier() {
        let mut h = history();
        let t = elect(&mut h, "c0");
        spawned(&mut h, 1.0, "a");
        // Granted 60 s by c0 whose clock says 30 s more than the truth: the
        // lease ends it at 1_000_031, the record says 1_000_061.
        instance(&mut h, 1.0, "a", t, "a.x", 1_000_061);
        delete(&mut h, 31.0, &instance_key("a"));
        // Without the skew on record, that is an early deletion.
        assert_eq!(kinds(&check(&h)), ["lost spawn"]);
        h.faults
            .push(fault(Target::ControllerClock(0, 30), 0.5, 20.0));
        assert!(kinds(&check(&h)).is_empty(), "{:?}", check(&h).violations);
        // The allowance is the skew, not more: 10 s earlier still counts.
        let at = |h: &mut History, t: Secs| {
            if let Some(e) = h.events.last_mut() {
                e.at = t;
            }
        };
        at(&mut h, 21.0);
        assert_eq!(kinds(&check(&h)), ["lost spawn"]);
        at(&mut h, 31.0);
        // A skewed controller that was not the one that granted it changes nothing.
        h.faults[0].target = Target::ControllerClock(1, 30);
        assert_eq!(kinds(&check(&h)), ["lost spawn"]);
    }

    #[test]
    fn a_route_after_the_watch_delay_is_stale_unless_the_agent_was_cut_off() {
        let mut h = history();
        let t = elect(&mut h, "c0");
        instance(&mut h, 1.0, "a", t, "a.x", 1_000_100);
        delete(&mut h, 5.0, &instance_key("a"));
        let probe = |at| Probe {
            at,
            took: 0.01,
            agent: 1,
            instance: "a".into(),
            tcp: false,
            outcome: Outcome::Served,
        };
        h.probes.push(probe(6.0));
        assert!(check(&h).violations.is_empty(), "within one watch delay");
        h.probes.push(probe(9.0));
        assert_eq!(kinds(&check(&h)), ["stale route"]);
        h.faults.push(fault(Target::Agent(1), 4.0, 8.0));
        assert!(check(&h).violations.is_empty(), "cut off until 8 s");
    }

    #[test]
    fn failures_inside_a_fault_window_are_expected_and_others_not() {
        let mut h = history();
        let call = |at| Call {
            at,
            took: 1.5,
            op: Op::Spawn,
            controller: 0,
            instance: None,
            status: 503,
            body: Value::Null,
        };
        h.calls.push(call(3.0));
        h.calls.push(call(50.0));
        h.faults.push(fault(Target::Controller(0), 2.0, 4.0));
        let r = check(&h);
        let expected: Vec<bool> = r
            .failures
            .iter()
            .filter(|f| f.kind.starts_with("api"))
            .map(|f| f.expected)
            .collect();
        assert_eq!(expected, [true, false]);
    }

    /// Instance `id`'s record at spec revision `rev`, then a rollout's
    /// rewrite onto `to` with `host`, and its worker's running status at
    /// `to` at `ran` (if it ran).
    fn switched(h: &mut History, id: &str, to: i64, host: &str, at: Secs, ran: Option<Secs>) {
        let token = elect(h, "c0");
        let mut rec = record(id, token, "a.ctf", 500);
        rec["spec_revision"] = json!(3);
        put(h, 1.0, &instance_key(id), 0, rec.clone());
        running(h, 2.0, id);
        rec["spec_revision"] = json!(to);
        rec["http"][0]["hostname"] = json!(host);
        put(h, at, &instance_key(id), 0, rec);
        if let Some(t) = ran {
            let ep = json!({"v": 1, "instance": id, "worker": "w1", "status": {"state": "running"},
                            "updated_at": 0, "spec_revision": to});
            let key = Keyspace::default().key_of(Kind::Statuses, &format!("w1/{id}"));
            put(h, t, &key, 0, ep);
        }
    }

    #[test]
    fn a_rollout_switch_keeps_routes_ends_in_its_window_and_never_repeats() {
        let mut h = history();
        switched(&mut h, "i1", 9, "a.ctf", 10.0, Some(12.0));
        assert!(
            check(&h).violations.is_empty(),
            "{:?}",
            check(&h).violations
        );

        // Another hostname after the rewrite.
        let mut h = history();
        switched(&mut h, "i1", 9, "b.ctf", 10.0, Some(12.0));
        assert_eq!(kinds(&check(&h)), ["replaced changed"]);

        // Running the new revision only after the window (beyond the 1 s
        // its first start took).
        let mut h = history();
        switched(
            &mut h,
            "i1",
            9,
            "a.ctf",
            10.0,
            Some(10.0 + 1.0 + SWITCH_WINDOW + 1.0),
        );
        assert_eq!(kinds(&check(&h)), ["long switch"]);

        // A loaded engine: fresh instances created around the switch took
        // 12 s to start (one of them 40 s). A switch may take the window
        // beyond the usual (third quartile) start, not beyond the slowest:
        // one put off by 30 s still shows.
        for (took, long) in [(31.0, false), (33.0, true), (12.0 + 30.0 + 2.0, true)] {
            let mut h = history();
            switched(&mut h, "i1", 9, "a.ctf", 10.0, Some(10.0 + took));
            // The leader `switched` elected.
            let token = h.events[0].create_revision;
            for (n, start) in [12.0, 12.0, 12.0, 40.0].into_iter().enumerate() {
                let id = format!("f{n}");
                let host = format!("{id}.ctf");
                put(
                    &mut h,
                    8.0,
                    &instance_key(&id),
                    0,
                    record(&id, token, &host, 500),
                );
                running(&mut h, 8.0 + start, &id);
            }
            h.events.sort_by(|a, b| a.at.total_cmp(&b.at));
            let want: &[&str] = if long { &["long switch"] } else { &[] };
            assert_eq!(kinds(&check(&h)), want, "a switch of {took} s");
        }

        // Never, and not deleted; a status of the old revision does not count.
        let mut h = history();
        switched(&mut h, "i1", 9, "a.ctf", 10.0, None);
        running(&mut h, 11.0, "i1");
        put(&mut h, 40.0, "/unrelated", 0, json!({}));
        assert_eq!(kinds(&check(&h)), ["long switch"]);
        // Deleted mid-switch: no switch to finish.
        delete(&mut h, 12.0, &instance_key("i1"));
        h.events.sort_by(|a, b| a.at.total_cmp(&b.at));
        assert!(
            check(&h).violations.is_empty(),
            "{:?}",
            check(&h).violations
        );

        // Moved back and onto the same revision again: replaced twice.
        let mut h = history();
        switched(&mut h, "i1", 9, "a.ctf", 10.0, Some(11.0));
        let mut rec = record("i1", 10, "a.ctf", 500);
        for (at, rev) in [(20.0, 3), (30.0, 9)] {
            rec["spec_revision"] = json!(rev);
            put(&mut h, at, &instance_key("i1"), 0, rec.clone());
        }
        assert_eq!(
            kinds(&check(&h)),
            ["replaced twice"],
            "{:?}",
            check(&h).violations
        );
    }
}
