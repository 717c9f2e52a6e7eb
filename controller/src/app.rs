//! `App`: everything a replica's handlers and background tasks share.

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use etcd_client::Client;
use tidegate_schema::config::{ConfigError, ControllerConfig};
use tidegate_schema::{ChallengeName, Keyspace, TeamId};

use crate::challenges::Challenges;
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::scheduler::LeaderInfo;
use crate::view::SharedView;

/// Everything a replica's handlers and tasks share.
pub struct App {
    pub cfg: ControllerConfig,
    pub client: Client,
    pub ks: Keyspace,
    pub tcp_ports: RangeInclusive<u16>,
    pub challenges: Challenges,
    pub view: SharedView,
    /// The shard elections: which shards this replica schedules, and who
    /// leads the others.
    pub shards: Arc<crate::shards::Shards>,
    /// The revision of this replica's last write to each spawn guard
    /// (`guards/...`), for the guards its view has not caught up with.
    pub guard_writes: Mutex<std::collections::BTreeMap<String, i64>>,
    /// Serialises placement and the spawn Txn on the leader.
    pub spawn_lock: tokio::sync::Mutex<()>,
    /// Prometheus series, status counters, recent refusals, etcd health.
    pub metrics: Metrics,
    /// Policy plugins: the wasmtime host and the artifact store.
    pub policies: Arc<Policies>,
    /// Spawns this replica made in the last hour, for the `team-recent`
    /// count plugins see.
    pub recent_spawns: RecentSpawns,
    /// The platform token's token buckets (`rate_limits`).
    pub rate_limits: crate::ratelimit::RateLimiter,
    /// When a pooled instance last gave its room to a spawn: pools are not
    /// refilled for a while after (a full cluster would churn containers).
    pub pool_yielded: Mutex<Option<std::time::Instant>>,
    /// A standby's client for carrying spawns and renewals to the scheduler.
    pub forwarder: crate::api::Forwarder,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("id", &self.cfg.id)
            .field("ks", &self.ks)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Builds the shared state from a validated config and an etcd client.
    pub fn new(cfg: ControllerConfig, client: Client) -> Result<Self, ConfigError> {
        let ks = Keyspace::new(&cfg.key_root).map_err(|e| ConfigError {
            field: "key_root",
            message: e.to_string(),
        })?;
        let limits = tidegate_plugin_host::Limits {
            deadline: std::time::Duration::from_millis(cfg.plugin_deadline_ms),
            memory_bytes: cfg.plugin_memory_mib * 1024 * 1024,
            ..tidegate_plugin_host::Limits::default()
        };
        let policies = Policies::new(&cfg.artifact_dir, limits).map_err(|e| ConfigError {
            field: "artifact_dir",
            message: format!("{}: {e}", cfg.artifact_dir.display()),
        })?;
        // A forward waits for the scheduler's whole answer, as the caller
        // would have: its turn at the spawn lock, its etcd calls (each
        // bounded by etcd_timeout_ms; a renewal retries up to 4 times),
        // policy plugins.
        let forward_timeout = std::time::Duration::from_millis(10 * cfg.etcd_timeout_ms);
        let idle = std::time::Duration::from_millis(cfg.http_header_timeout_ms / 2);
        let forwarder =
            crate::api::Forwarder::new(forward_timeout, idle).map_err(|message| ConfigError {
                field: "listen",
                message,
            })?;
        let mut metrics = Metrics::default();
        policies.calls.register(metrics.registry_mut());
        Ok(Self {
            policies: Arc::new(policies),
            recent_spawns: RecentSpawns::default(),
            pool_yielded: Mutex::new(None),
            forwarder,
            rate_limits: crate::ratelimit::RateLimiter::new(cfg.rate_limits),
            tcp_ports: cfg.tcp_port_range()?,
            challenges: Challenges::new(client.clone(), ks.clone()),
            view: SharedView::default(),
            shards: Arc::new(
                crate::shards::Shards::new(
                    crate::shards::Member {
                        id: cfg.id.clone(),
                        url: cfg.advertise(),
                        shards: cfg.shards,
                    },
                    cfg.election_ttl_secs,
                    crate::shards::Shards::poll_for(cfg.election_ttl_secs),
                )
                .count_taken_on(metrics.leader_changes.clone()),
            ),
            guard_writes: Mutex::new(Default::default()),
            spawn_lock: tokio::sync::Mutex::new(()),
            metrics,
            ks,
            client,
            cfg,
        })
    }

    /// This replica's lead of the shard of `challenge`, while it has it:
    /// the key and token its scheduling writes for it are fenced with.
    pub fn lead(&self, challenge: &ChallengeName) -> Option<Arc<LeaderInfo>> {
        self.shards.lead(self.shards.of(challenge.as_str()))
    }

    /// The spawn guards of a spawn onto `worker` (none for a pooled
    /// instance, already placed) for `team` (none for a pool's own), each
    /// with the revision this replica has seen every write of it up to:
    /// `seen`, the view's revision when the decisions began, or its own
    /// later write of that guard.
    pub fn guards(
        &self,
        seen: i64,
        worker: Option<&tidegate_schema::WorkerId>,
        team: Option<&TeamId>,
    ) -> Vec<(String, i64)> {
        let own = self.guard_writes.lock().unwrap_or_else(|e| e.into_inner());
        let keys = worker
            .map(|w| self.ks.key(&tidegate_schema::Key::WorkerGuard(w.clone())))
            .into_iter()
            .chain(team.map(|t| self.ks.key(&tidegate_schema::Key::TeamGuard(t.clone()))));
        keys.map(|k| {
            let at = own.get(&k).copied().unwrap_or(0).max(seen);
            (k, at)
        })
        .collect()
    }

    /// Notes this replica's write of `guards` at `revision`, and forgets
    /// those its view holds now.
    pub fn guarded(&self, guards: &[(String, i64)], revision: i64) {
        let viewed = self.view.lock().revision;
        let mut own = self.guard_writes.lock().unwrap_or_else(|e| e.into_inner());
        own.retain(|_, at| *at > viewed);
        for (k, _) in guards {
            own.insert(k.clone(), revision);
        }
    }

    /// Whether this replica leads any shard.
    pub fn leads_any(&self) -> bool {
        !self.shards.led().is_empty()
    }

    /// `GET /metrics`: the Prometheus text of this replica.
    pub fn render_metrics(&self) -> String {
        self.metrics.observe(
            &self.view.lock(),
            self.shards.led().len(),
            self.shards.count(),
            self.policies.host.cached(),
        );
        self.metrics.render()
    }
}

/// How far back [`RecentSpawns`] counts.
const RECENT_SECS: u64 = 3600;

/// Spawns this replica made in the last hour: (Unix secs, team, challenge).
#[derive(Debug, Default)]
pub struct RecentSpawns(Mutex<VecDeque<(u64, TeamId, ChallengeName)>>);

impl RecentSpawns {
    /// Notes a spawn made at `now`.
    pub fn record(&self, now: u64, team: &TeamId, challenge: &ChallengeName) {
        if let Ok(mut recent) = self.0.lock() {
            recent.push_back((now, team.clone(), challenge.clone()));
        }
    }

    /// How many spawns of `challenge` (any team) were made in the `secs`
    /// before `now` (at most an hour).
    pub fn count_challenge(&self, now: u64, challenge: &ChallengeName, secs: u64) -> u32 {
        let Ok(recent) = self.0.lock() else {
            return 0;
        };
        let n = recent
            .iter()
            .rev()
            .take_while(|(t, _, _)| t + secs >= now)
            .filter(|(_, _, c)| c == challenge)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// How many spawns of `challenge` for `team` were made in the hour
    /// before `now` (older ones are forgotten).
    pub fn count(&self, now: u64, team: &TeamId, challenge: &ChallengeName) -> u32 {
        let Ok(mut recent) = self.0.lock() else {
            return 0;
        };
        while recent
            .front()
            .is_some_and(|(t, _, _)| *t + RECENT_SECS < now)
        {
            recent.pop_front();
        }
        let n = recent
            .iter()
            .filter(|(_, t, c)| t == team && c == challenge)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}
