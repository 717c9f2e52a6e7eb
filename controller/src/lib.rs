//! The tidegate control plane: the only writer of desired state in etcd.
//!
//! `api` serves the REST API; `scheduler` keeps the replica in the election
//! and sweeps while it leads; `spawn` and `lifecycle` are the guarded etcd
//! transactions behind spawn, renew and delete; `view` is the replica's
//! watch-fed picture of workers and instances.

pub mod api;
pub mod challenges;
pub mod config;
pub mod election;
pub mod flag;
pub mod lifecycle;
pub mod metrics;
pub mod policy;
pub mod scheduler;
pub mod spawn;
mod txn;
pub mod view;

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use arc_swap::ArcSwapOption;
use etcd_client::Client;
use tidegate_schema::Keyspace;

pub use challenges::{ChallengeError, Challenges, Stored};
pub use config::{Cli, Config, ConfigError};
pub use election::{Leadership, campaign};
pub use spawn::{SpawnError, SpawnPlan, Spawned, spawn};

/// Counters shown in `GET /v1/status` and `GET /metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub spawns: AtomicU64,
    pub spawn_refusals: AtomicU64,
    pub renewals: AtomicU64,
    pub deletions: AtomicU64,
    /// Writes etcd refused because this replica's fencing token was stale.
    pub fenced_writes: AtomicU64,
    pub leader_changes: AtomicU64,
    pub worker_gone_deletions: AtomicU64,
    /// Spawns and renewals a policy plugin refused (deny, queue, refuse).
    pub policy_denials: AtomicU64,
    /// Plugin calls that trapped, timed out or ran out of memory.
    pub policy_failures: AtomicU64,
    /// Instances expired by an `on-idle` policy.
    pub idle_expirations: AtomicU64,
}

/// Everything a replica's handlers and tasks share.
pub struct App {
    pub cfg: Config,
    pub client: Client,
    pub ks: Keyspace,
    pub tcp_ports: RangeInclusive<u16>,
    pub challenges: Challenges,
    pub view: view::SharedView,
    /// Set while this replica is the elected scheduler.
    pub leader: ArcSwapOption<scheduler::LeaderInfo>,
    /// Serialises placement and the spawn Txn on the leader.
    pub spawn_lock: tokio::sync::Mutex<()>,
    pub counters: Counters,
    /// etcd health and refusals, for `/metrics` and the dashboard.
    pub telemetry: metrics::Telemetry,
    /// Policy plugins: the wasmtime host and the artifact store.
    pub policies: Arc<policy::Policies>,
    /// Spawns this replica made in the last hour (Unix secs, team,
    /// challenge), for the `team-recent` count plugins see.
    pub recent_spawns: std::sync::Mutex<std::collections::VecDeque<(u64, String, String)>>,
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
    pub fn new(cfg: Config, client: Client) -> Result<Self, ConfigError> {
        let ks = Keyspace::new(&cfg.key_root).map_err(|e| ConfigError {
            field: "key_root",
            message: e.to_string(),
        })?;
        let limits = tidegate_plugin_host::Limits {
            deadline: std::time::Duration::from_millis(cfg.plugin_deadline_ms),
            memory_bytes: cfg.plugin_memory_mib * 1024 * 1024,
            ..tidegate_plugin_host::Limits::default()
        };
        let policies =
            policy::Policies::new(&cfg.artifact_dir, limits).map_err(|e| ConfigError {
                field: "artifact_dir",
                message: format!("{}: {e}", cfg.artifact_dir.display()),
            })?;
        Ok(Self {
            policies: Arc::new(policies),
            recent_spawns: std::sync::Mutex::default(),
            tcp_ports: cfg.tcp_port_range()?,
            challenges: Challenges::new(client.clone(), ks.clone()),
            view: view::SharedView::default(),
            leader: ArcSwapOption::empty(),
            spawn_lock: tokio::sync::Mutex::new(()),
            counters: Counters::default(),
            telemetry: metrics::Telemetry::default(),
            ks,
            client,
            cfg,
        })
    }
}
