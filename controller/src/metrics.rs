//! What the controller measures: Prometheus series for `GET /metrics` (no
//! token: bind the API where only the platform, the organizers and
//! Prometheus reach it), the counters `GET /v1/status` shows, and the
//! recent refusals the organizer dashboard lists.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tidegate_etcd::EtcdHealth;

use crate::view::View;

/// How many refusals the dashboard keeps (per replica).
const RECENT: usize = 100;

/// A spawn or renewal this replica refused, with why.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// Unix seconds.
    pub at: u64,
    /// `spawn` or `renew`.
    pub op: &'static str,
    pub team: String,
    pub challenge: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// A short label: `policy_deny`, `team_limit`, `no_capacity`, ...
    pub reason: &'static str,
    pub status: u16,
    /// What the caller was told.
    pub message: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    op: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RateLabels {
    op: &'static str,
    /// The team, or `*` for the platform token's overall bucket.
    team: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

/// How many minutes of spawn and refusal counts the dashboard charts.
pub const MINUTES: usize = 30;

/// One minute's spawns and refusals on this replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Minute {
    /// Unix seconds at the minute's start.
    pub at: u64,
    pub spawns: u64,
    pub refusals: u64,
}

/// Every instance status the controller's gauge shows (the agent's three,
/// and `pending` before the agent reports).
const STATUSES: [&str; 4] = ["pending", "starting", "running", "failed"];

/// The controller's measures. Counters are Prometheus counters (an atomic
/// add each); the gauges that mirror the view are set when `/metrics` is read.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub spawns: Counter,
    /// Renewals whose etcd answer was lost and that were found committed.
    pub renewals_settled: Counter,
    /// Spawns that failed at the Txn (fenced, contended, etcd).
    pub spawn_refusals: Counter,
    pub renewals: Counter,
    pub deletions: Counter,
    /// Writes etcd refused because this replica's fencing token was stale.
    pub fenced_writes: Counter,
    pub leader_changes: Counter,
    /// Requests this standby carried to the scheduler, and those it could not.
    pub forwarded: Counter,
    pub forward_failed: Counter,
    pub worker_gone_deletions: Counter,
    /// Instances a rollout (or its abort) moved onto another spec revision.
    pub rollout_replacements: Counter,
    /// Spawns and renewals a policy plugin refused (deny, queue, refuse).
    pub policy_denials: Counter,
    /// Plugin calls that trapped, timed out or ran out of memory.
    pub policy_failures: Counter,
    /// Instances expired by an `on-idle` policy.
    pub idle_expirations: Counter,
    /// Flag checks that found another team's instance flag.
    pub shared_flags: Counter,
    /// Spawns that joined the waiting queue (202).
    pub queued: Counter,
    /// Queued spawns the scheduler admitted (each exactly once).
    pub admitted: Counter,
    /// Queued spawns dropped at admission (challenge deleted, the team at
    /// its limit, the policy denying).
    pub queue_dropped: Counter,
    /// Spawns served by a pooled instance (claimed, not started).
    pub pool_claims: Counter,
    /// etcd round trips and watch lag.
    pub etcd: Arc<EtcdHealth>,
    /// etcd's own health, as its members' endpoints say.
    pub etcd_members: Arc<crate::etcd_members::EtcdMembers>,
    refusals: Family<RefusalLabels, Counter>,
    rate_limited: Family<RateLabels, Counter>,
    connections_refused: Family<ReasonLabel, Counter>,
    recent: Mutex<VecDeque<Refusal>>,
    minutes: Mutex<VecDeque<Minute>>,
    leader: Gauge,
    shards_led: Gauge,
    shards: Gauge,
    workers: Gauge,
    capacity: Gauge,
    instances: Family<StatusLabel, Gauge>,
    view_revision: Gauge,
    plugins_compiled: Gauge,
    queue_length: Gauge,
    pooled: Gauge,
    unhealthy: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Self {
            registry: Registry::with_prefix("tidegate_controller"),
            spawns: Counter::default(),
            renewals_settled: Counter::default(),
            spawn_refusals: Counter::default(),
            renewals: Counter::default(),
            deletions: Counter::default(),
            fenced_writes: Counter::default(),
            leader_changes: Counter::default(),
            forwarded: Counter::default(),
            forward_failed: Counter::default(),
            worker_gone_deletions: Counter::default(),
            rollout_replacements: Counter::default(),
            policy_denials: Counter::default(),
            policy_failures: Counter::default(),
            idle_expirations: Counter::default(),
            shared_flags: Counter::default(),
            queued: Counter::default(),
            admitted: Counter::default(),
            queue_dropped: Counter::default(),
            pool_claims: Counter::default(),
            queue_length: Gauge::default(),
            pooled: Gauge::default(),
            unhealthy: Gauge::default(),
            etcd: Arc::default(),
            etcd_members: Arc::default(),
            refusals: Family::default(),
            rate_limited: Family::default(),
            connections_refused: Family::default(),
            recent: Mutex::default(),
            minutes: Mutex::default(),
            leader: Gauge::default(),
            shards_led: Gauge::default(),
            shards: Gauge::default(),
            workers: Gauge::default(),
            capacity: Gauge::default(),
            instances: Family::default(),
            view_revision: Gauge::default(),
            plugins_compiled: Gauge::default(),
        };
        m.register();
        m
    }
}

impl Metrics {
    /// Counts an API connection closed at accept (`max_connections`, `max_connections_per_source`).
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts a request refused by a token bucket (`None`: the platform's).
    pub fn rate_limited(&self, op: &'static str, team: Option<&tidegate_schema::TeamId>) {
        let team = team.map_or_else(|| "*".to_string(), |t| t.as_str().to_string());
        self.rate_limited
            .get_or_create(&RateLabels { op, team })
            .inc();
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "leader",
            "1 while this replica is the elected scheduler of any shard",
            self.leader.clone(),
        );
        r.register(
            "shards_led",
            "Shards this replica schedules now",
            self.shards_led.clone(),
        );
        r.register(
            "shards",
            "The shard count this replica runs with",
            self.shards.clone(),
        );
        for (name, help, c) in [
            (
                "leader_changes",
                "Times this replica became the scheduler",
                &self.leader_changes,
            ),
            (
                "forwarded",
                "Spawns and renewals this standby carried to the scheduler and answered with its answer",
                &self.forwarded,
            ),
            (
                "forward_failed",
                "Spawns and renewals this standby could not carry to the scheduler (answered 503)",
                &self.forward_failed,
            ),
            ("spawns", "Instances this replica spawned", &self.spawns),
            (
                "renewals",
                "Renewals this replica committed",
                &self.renewals,
            ),
            (
                "renewals_settled",
                "Renewals whose answer from etcd was lost and that were then found committed (answered 200, not revoked)",
                &self.renewals_settled,
            ),
            (
                "deletions",
                "Deletions this replica committed",
                &self.deletions,
            ),
            (
                "fenced_writes",
                "Writes etcd refused because this replica's fencing token was stale",
                &self.fenced_writes,
            ),
            (
                "worker_gone_deletions",
                "Instances deleted because their worker was gone past worker_grace_secs",
                &self.worker_gone_deletions,
            ),
            (
                "rollout_replacements",
                "Instances a rollout (or its abort) moved onto another spec revision",
                &self.rollout_replacements,
            ),
            (
                "idle_expirations",
                "Instances expired by an on-idle policy",
                &self.idle_expirations,
            ),
            (
                "shared_flags",
                "Flag checks whose flag was another team's instance flag",
                &self.shared_flags,
            ),
            (
                "queued",
                "Spawns that found no room and joined the waiting queue (202)",
                &self.queued,
            ),
            (
                "admitted",
                "Queued spawns the scheduler admitted",
                &self.admitted,
            ),
            (
                "queue_dropped",
                "Queued spawns dropped at admission (challenge deleted, team at its limit, policy denied)",
                &self.queue_dropped,
            ),
            (
                "pool_claims",
                "Spawns served by a pooled instance (claimed, not started)",
                &self.pool_claims,
            ),
        ] {
            r.register(name, help, c.clone());
        }
        r.register(
            "refusals",
            "Spawns and renewals refused, by operation and reason",
            self.refusals.clone(),
        );
        r.register(
            "rate_limited",
            "Platform requests refused by a token bucket, by operation and team (* for the platform's overall bucket)",
            self.rate_limited.clone(),
        );
        r.register(
            "connections_refused",
            "API connections closed at accept, by the cap they hit",
            self.connections_refused.clone(),
        );
        r.register(
            "workers",
            "Workers registered (this replica's view)",
            self.workers.clone(),
        );
        r.register(
            "capacity",
            "Instance slots of all registered workers",
            self.capacity.clone(),
        );
        for status in STATUSES {
            self.instances.get_or_create(&StatusLabel { status }).set(0);
        }
        r.register(
            "instances",
            "Live instances of teams by status (this replica's view)",
            self.instances.clone(),
        );
        r.register(
            "pooled",
            "Instances in warm pools, no team's yet, in any status (this replica's view)",
            self.pooled.clone(),
        );
        r.register(
            "instances_unhealthy",
            "Live instances whose last solver check did not find their flag (this replica's view)",
            self.unhealthy.clone(),
        );
        r.register(
            "queue_length",
            "Spawns waiting in the queue (this replica's view)",
            self.queue_length.clone(),
        );
        r.register(
            "view_revision",
            "The etcd revision this replica's view reflects",
            self.view_revision.clone(),
        );
        r.register(
            "plugins_compiled",
            "Policy plugins compiled and cached by this replica",
            self.plugins_compiled.clone(),
        );
        self.etcd.register(r);
        r.register_collector(Box::new(self.etcd_members.clone()));
    }

    /// The registry, for parts that measure themselves (plugin calls).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Counts a refusal by operation and reason and keeps it for the dashboard.
    /// Counts a spawn this replica made, in its minute.
    pub fn spawned(&self) {
        self.spawns.inc();
        self.count_minute(tidegate_schema::time::unix_secs(), |m| m.spawns += 1);
    }

    fn count_minute(&self, now: u64, add: impl FnOnce(&mut Minute)) {
        let minute = now / 60 * 60;
        let mut minutes = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        if minutes.front().is_none_or(|m| m.at != minute) {
            minutes.push_front(Minute {
                at: minute,
                spawns: 0,
                refusals: 0,
            });
            minutes.truncate(MINUTES);
        }
        if let Some(m) = minutes.front_mut() {
            add(m);
        }
    }

    /// Spawns and refusals of the last [`MINUTES`] minutes, oldest first,
    /// one entry per minute up to `now` (minutes without any are zeros).
    pub fn per_minute(&self, now: u64) -> Vec<Minute> {
        let minutes = self.minutes.lock().unwrap_or_else(|e| e.into_inner());
        let last = now / 60 * 60;
        (0..MINUTES as u64)
            .rev()
            .map(|back| last.saturating_sub(back * 60))
            .map(|at| {
                minutes
                    .iter()
                    .find(|m| m.at == at)
                    .copied()
                    .unwrap_or(Minute {
                        at,
                        spawns: 0,
                        refusals: 0,
                    })
            })
            .collect()
    }

    pub fn refused(&self, r: Refusal) {
        self.count_minute(r.at, |m| m.refusals += 1);
        tracing::info!(op = r.op, team = %r.team, challenge = %r.challenge, reason = r.reason,
            status = r.status, message = %r.message, "refused");
        self.refusals
            .get_or_create(&RefusalLabels {
                op: r.op,
                reason: r.reason,
            })
            .inc();
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_back();
        }
        recent.push_front(r);
    }

    /// The latest refusals, newest first.
    pub fn recent(&self) -> Vec<Refusal> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Sets the gauges that mirror `view`, leadership (`led` of `shards`
    /// shards) and the plugin cache.
    pub fn observe(&self, view: &View, led: usize, shards: u16, plugins_compiled: usize) {
        self.leader.set(i64::from(led > 0));
        self.shards_led.set(gauge_value(led));
        self.shards.set(i64::from(shards));
        self.workers.set(gauge_value(view.workers.len()));
        self.queue_length.set(gauge_value(view.queue.len()));
        self.capacity
            .set(view.workers.values().map(|w| i64::from(w.capacity)).sum());
        let mut counts = [0usize; STATUSES.len()];
        let mut pooled = 0;
        for (id, live) in &view.instances {
            // A pool's instances are no team's: counted apart.
            if live.record.is_pooled() {
                pooled += 1;
                continue;
            }
            let status = view.status_of(id).map_or("pending", |s| s.name());
            if let Some(i) = STATUSES.iter().position(|s| *s == status) {
                counts[i] += 1;
            }
        }
        for (status, n) in STATUSES.into_iter().zip(counts) {
            self.instances
                .get_or_create(&StatusLabel { status })
                .set(gauge_value(n));
        }
        self.pooled.set(gauge_value(pooled));
        let unhealthy = view
            .instances
            .keys()
            .filter(|id| view.solver_of(id).is_some_and(|h| !h.healthy))
            .count();
        self.unhealthy.set(gauge_value(unhealthy));
        self.view_revision.set(view.revision);
        self.plugins_compiled.set(gauge_value(plugins_compiled));
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(at: u64) -> Refusal {
        Refusal {
            at,
            op: "spawn",
            team: "t1".into(),
            challenge: "web".into(),
            instance: None,
            reason: "team_limit",
            status: 409,
            message: "at the limit".into(),
        }
    }

    #[test]
    fn per_minute_counts_land_in_their_minute_and_gaps_are_zero() {
        let m = Metrics::default();
        let t0 = 1_800_000_000 / 60 * 60;
        m.refused(refusal(t0 + 5));
        m.refused(refusal(t0 + 59));
        m.refused(refusal(t0 + 125));
        let minutes = m.per_minute(t0 + 130);
        assert_eq!(minutes.len(), MINUTES);
        let last = minutes[MINUTES - 1];
        assert_eq!((last.at, last.refusals), (t0 + 120, 1));
        assert_eq!(minutes[MINUTES - 2].refusals, 0, "{minutes:?}");
        assert_eq!(
            (minutes[MINUTES - 3].at, minutes[MINUTES - 3].refusals),
            (t0, 2)
        );
        assert!(minutes.windows(2).all(|w| w[1].at == w[0].at + 60));
        // Older than the window: gone.
        assert!(
            m.per_minute(t0 + 60 * MINUTES as u64 + 200)
                .iter()
                .all(|x| x.refusals == 0)
        );
    }
}
