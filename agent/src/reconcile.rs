//! The reconciler: drives Docker until this worker's containers equal the
//! instance records assigned to it in etcd.
//!
//! One task owns the state. It applies watch events (a relist replaces the
//! whole desired set at `InitDone`; every event already received goes in
//! before one pass for them all, and passes for events start at least
//! `MIN_PASS_GAP` apart) and, after them and every `reconcile_interval_ms`,
//! compares Docker's list with the desired set. Each instance's step (and
//! then its status write) runs as a task of its own, holding the
//! instance's state until it is done, up to `reconcile_concurrency` at
//! once: a slow or hung Docker call (an image pull from a registry that
//! never answers) holds up its own instance only, never a pass nor the
//! instances after it. A step starts what is missing, looks at what it
//! started at once (so an instance is routable in the same step, and
//! services waiting on it are made in the same step), adopts what already
//! runs (same container id, no restart), restarts exited containers with
//! backoff up to `max_restarts`, and writes the instance's status (where
//! its container listens, and how it is doing) under the instance's
//! lease, so it vanishes with it. Orphans (containers and networks of no
//! record, and of no step still running) are removed by the pass.

mod fence;
mod ready;
mod solver;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use futures::FutureExt;
use tidegate_etcd::{Event, Kv, Watcher};
use tidegate_schema::config::planted;
use tidegate_schema::{
    ChallengeName, ChallengeRecord, ContainerSpec, InstanceId, InstanceRecord, InstanceStatus, Key,
    Keyspace, Kind, NetworkUse, Record, SecretRecord, ServiceName, ServiceRecord, ServiceState,
    ServiceStatus, StatusRecord, V1, WorkerId,
};
use tokio::sync::watch;

use crate::hostnet::{Firewall, pin_neighbours};
use crate::metrics::Metrics;
use crate::runtime::{InstanceNetwork, Observed, Runtime, RuntimeError, Unit};

/// What keeps instances off this host: the firewall (None:
/// `allow_host_access`), and why no instance may start at all (an engine
/// running container root as host root), if so.
#[derive(Debug, Default)]
pub struct HostChecks {
    pub firewall: Option<Firewall>,
    pub refusal: Option<String>,
}

/// One container of an instance (of a service, or the only one), keyed by
/// its service (None: the one container of a one-image instance).
type SvcKey = Option<ServiceName>;

#[derive(Debug)]
struct Svc {
    container: Option<String>,
    address: Option<IpAddr>,
    restarts: u32,
    retry_at: Option<Instant>,
    state: ServiceState,
    /// Since when it runs without passing its readiness check (None: ready,
    /// or not running).
    unready_since: Option<Instant>,
    /// Whether it has been ready since it was first started: an instance
    /// whose services were all ready stays running while one of them
    /// restarts (a crashed db does not take the app's route down).
    was_ready: bool,
    /// Why it failed, once it has.
    failed: Option<String>,
}

impl Default for Svc {
    fn default() -> Self {
        Self {
            container: None,
            address: None,
            restarts: 0,
            retry_at: None,
            state: ServiceState::Waiting,
            unready_since: None,
            was_ready: false,
            failed: None,
        }
    }
}

/// One instance this worker should run.
#[derive(Debug)]
struct Tracked {
    record: InstanceRecord,
    lease: i64,
    services: BTreeMap<SvcKey, Svc>,
    status: InstanceStatus,
    /// The instance's secret, once read; its record was checked against
    /// the challenge's spec then.
    secret: Option<SecretRecord>,
    /// When to try again to read the spec and secret, or make the network.
    retry_at: Option<Instant>,
    attempts: u32,
    /// What etcd holds for this instance's status (None: not written yet),
    /// with `updated_at` 0.
    reported: Option<StatusRecord>,
    /// The status key's mod_revision as this agent last wrote or read it (0:
    /// none). Each write expects it, so a write whose outcome was unknown
    /// (etcd recovering) cannot land after a newer one and leave an old
    /// status in force.
    status_rev: i64,
    /// When the record was first seen, for the reconcile latency metric.
    seen: Instant,
    /// The flag last written to the instance's flag file (records with a
    /// `flag_file`): it must be the secret's before the instance is
    /// reported running.
    flag_written: Option<String>,
    /// Failed writes of the flag file in a row, and why it gave up.
    flag_failures: u32,
    flag_error: Option<String>,
    /// Its solver check, while it runs with a team (challenges with a
    /// `solver`): dropped with the instance, which ends the task.
    solver: Option<solver::Checker>,
    /// A rollout rewrote the record with other containers: the next step
    /// vets it against its new spec revision and makes them again.
    upgrade: bool,
}

impl Tracked {
    fn new(record: InstanceRecord, lease: i64) -> Self {
        Self {
            record,
            lease,
            services: BTreeMap::new(),
            status: InstanceStatus::Starting,
            secret: None,
            retry_at: None,
            attempts: 0,
            reported: None,
            status_rev: 0,
            seen: Instant::now(),
            flag_written: None,
            flag_failures: 0,
            flag_error: None,
            solver: None,
            upgrade: false,
        }
    }

    /// Takes a newer record of the instance (a renewal, or a pooled
    /// instance claimed by a team): a claim rewrote the secret with the
    /// team's flag and deleted the status, so both are read and written
    /// afresh (no route until the flag file holds the flag).
    /// True for a claim.
    fn take(&mut self, record: InstanceRecord, lease: i64) -> bool {
        let claimed = self.record.is_pooled() && !record.is_pooled();
        if claimed {
            self.seen = Instant::now();
            self.secret = None;
            self.reported = None;
            self.status_rev = 0;
            if self.status == InstanceStatus::Running {
                self.status = InstanceStatus::Starting;
            }
        }
        // A rollout (or its abort) moved the instance to another spec
        // revision: same id, routes, team, expiry and flag, other containers.
        let upgraded = record.spec_revision != self.record.spec_revision
            || record.container != self.record.container
            || record.services != self.record.services
            || record.solver != self.record.solver
            || record.flag_file != self.record.flag_file;
        // Also when the same change claimed it (one update carried both).
        if upgraded {
            self.upgrade = true;
            // Vetted again, against the new revision's spec.
            self.secret = None;
            self.retry_at = None;
            self.attempts = 0;
            // The old containers' checks say nothing of the new ones.
            self.solver = None;
            self.seen = Instant::now();
            // Failed too: an abort rolls a canary that failed back.
            self.status = InstanceStatus::Starting;
        }
        self.record = record;
        self.lease = lease;
        claimed
    }

    /// The address of the service routes go to first (the only one of a
    /// one-image instance).
    fn routed_address(&self) -> Option<IpAddr> {
        let first = self
            .record
            .http
            .iter()
            .map(|r| &r.service)
            .chain(self.record.tcp.iter().map(|r| &r.service))
            .next()
            .cloned()
            .flatten();
        self.services.get(&first).and_then(|s| s.address)
    }

    /// The instance's state from its services': failed if one failed,
    /// running when every one is ready.
    fn overall(&self) -> InstanceStatus {
        if let Some((key, svc)) = self
            .services
            .iter()
            .find(|(_, s)| s.state == ServiceState::Failed)
        {
            let why = svc.failed.clone().unwrap_or_default();
            return InstanceStatus::Failed {
                reason: match key {
                    Some(name) => format!("service {name}: {why}"),
                    None => why,
                },
            };
        }
        let units = Unit::all(&self.record).len();
        // A one-image instance is starting again while its container
        // restarts, as it always was.
        let multi = self.record.container.is_none();
        let ready = self
            .services
            .values()
            .filter(|s| {
                if multi {
                    s.was_ready
                } else {
                    s.state == ServiceState::Ready
                }
            })
            .count();
        if ready == units && self.routed_address().is_some() {
            InstanceStatus::Running
        } else {
            InstanceStatus::Starting
        }
    }
}

/// The reconciler's state.
pub struct Reconciler {
    client: Client,
    ks: Keyspace,
    worker: WorkerId,
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
    max_restarts: u32,
    /// The instances this worker should run, but for those whose step is
    /// running (`away`).
    desired: BTreeMap<InstanceId, Tracked>,
    /// Instances whose step runs now, in `jobs`, and what happened to
    /// their record meanwhile (applied when the step hands them back).
    away: BTreeMap<InstanceId, Away>,
    /// The running steps: each owns its instance's state until it is done.
    /// A slow or hung Docker call holds its own instance, not a pass.
    jobs: tokio::task::JoinSet<(InstanceId, Tracked)>,
    /// Which instance each running step is for (to recover from a panic).
    job_ids: std::collections::HashMap<tokio::task::Id, InstanceId>,
    /// `host_safe` as steps read it when they make a container (a step
    /// waiting for its turn sees the firewall's latest state).
    host_safe_now: Arc<std::sync::atomic::AtomicBool>,
    /// Bounds the steps that run at once (`reconcile_concurrency`).
    permits: Arc<tokio::sync::Semaphore>,
    /// When the last pass started (passes for watch events are at least
    /// `MIN_PASS_GAP` apart: a rush's events are not a Docker list each).
    last_pass: Instant,
    /// Records being collected during a (re)list.
    listing: Option<Vec<Kv>>,
    /// Whether a full list has been applied (before that nothing is removed).
    synced: bool,
    /// What the records showed of the newest scheduler, per challenge: a
    /// challenge's records are written by its shard's leader only, while
    /// the leaders of other shards write with their own, older or newer,
    /// tokens at the same time.
    fences: BTreeMap<ChallengeName, fence::Fence>,
    /// Whether the last neighbour pinning failed (logged once).
    pinning_failed: bool,
    /// The host firewall (None: `allow_host_access`), and whether its rules
    /// are in place: no container is created while they are not.
    firewall: Option<Firewall>,
    host_safe: bool,
    /// Why this worker starts no instance at all (its engine), if so.
    refusal: Option<String>,
    firewall_checked: Option<Instant>,
    /// The firewall error last logged.
    firewall_said: Option<String>,
    /// The subnets of `instance_networks` in use (as of the last pass, and
    /// those taken since).
    used_subnets: Arc<std::sync::Mutex<SubnetUse>>,
    /// Networks used and free, for this worker's registration.
    network_use: watch::Sender<Option<NetworkUse>>,
    /// Whether this pass could list the instance networks.
    networks_known: bool,
    /// How many instances a pass moves at once.
    concurrency: usize,
    /// Whether events since the last pass want one now.
    dirty: bool,
    /// Whether one of them is a pooled instance claimed by a team: its
    /// pass does not wait for `MIN_PASS_GAP` (a player waits for it).
    urgent: bool,
    /// Solver runs of this worker at once (shared by every check).
    solver_runs: Arc<tokio::sync::Semaphore>,
    /// When the last sweep of solver containers no check owns ran.
    solvers_swept: Instant,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("worker", &self.worker)
            .field("desired", &self.desired.len())
            .finish_non_exhaustive()
    }
}

/// How long a running service may fail its readiness check before the
/// instance fails, naming it.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Watch events taken at most before a pass (the rest wait for the next).
const MAX_BATCH: usize = 1024;

/// How often solver containers no check owns are looked for.
const SOLVER_SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Passes for watch events start at least this far apart.
const MIN_PASS_GAP: Duration = Duration::from_millis(100);

/// An instance whose step runs, and what happened to its record meanwhile.
#[derive(Debug)]
struct Away {
    /// Its record and lease when the step began (to start over from, if
    /// the step panicked).
    record: InstanceRecord,
    lease: i64,
    /// Its status when the step began (for the state gauge meanwhile).
    status: InstanceStatus,
    /// A newer record and lease (a renewal).
    update: Option<(InstanceRecord, i64)>,
    /// The record is gone: remove its containers once the step is back.
    forgotten: bool,
    /// Set with `forgotten`: a step still waiting for its turn makes nothing.
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

/// The instance subnets in use: what Docker listed at the last pass, and
/// what running steps took since (kept until the step is back, by when
/// Docker lists the network or it was never made).
#[derive(Debug, Default)]
struct SubnetUse {
    used: BTreeSet<u32>,
    claims: BTreeMap<InstanceId, BTreeSet<u32>>,
}

fn backoff(restarts: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << restarts.min(6))).min(Duration::from_secs(30))
}

impl Reconciler {
    pub fn new(
        client: Client,
        ks: Keyspace,
        worker: WorkerId,
        runtime: Runtime,
        metrics: Arc<Metrics>,
        max_restarts: u32,
        host: HostChecks,
    ) -> Self {
        let HostChecks { firewall, refusal } = host;
        Self {
            client,
            ks,
            worker,
            runtime: Arc::new(runtime),
            metrics,
            max_restarts,
            desired: BTreeMap::new(),
            away: BTreeMap::new(),
            jobs: tokio::task::JoinSet::new(),
            job_ids: std::collections::HashMap::new(),
            host_safe_now: Arc::new(std::sync::atomic::AtomicBool::new(firewall.is_none())),
            permits: Arc::new(tokio::sync::Semaphore::new(1)),
            last_pass: Instant::now(),
            listing: None,
            synced: false,
            fences: BTreeMap::new(),
            pinning_failed: false,
            host_safe: firewall.is_none(),
            refusal,
            firewall,
            firewall_checked: None,
            firewall_said: None,
            used_subnets: Arc::default(),
            network_use: watch::channel(None).0,
            networks_known: false,
            concurrency: 1,
            dirty: false,
            urgent: false,
            solver_runs: Arc::new(tokio::sync::Semaphore::new(solver::MAX_CONCURRENT_RUNS)),
            solvers_swept: Instant::now(),
        }
    }

    /// Moves up to `n` instances at once in each pass (their Docker calls
    /// and status writes); each instance's own steps stay in order.
    pub fn with_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self.permits = Arc::new(tokio::sync::Semaphore::new(self.concurrency));
        self
    }

    /// Where each pass publishes the per-instance networks in use and free
    /// (for this worker's registration).
    pub fn reporting_networks_to(mut self, tx: watch::Sender<Option<NetworkUse>>) -> Self {
        self.network_use = tx;
        self
    }

    /// Runs until `stop` resolves.
    pub async fn run(mut self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        // Solver runs an earlier agent left (its checks start again).
        match self.runtime.remove_solvers().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed solver containers of an earlier run"),
            Err(e) => tracing::warn!(error = %e, "could not list solver containers"),
        }
        let mut watcher = Watcher::new(self.client.clone(), self.ks.prefix(Kind::Instances));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            let gap_over = if self.urgent {
                Instant::now()
            } else {
                self.last_pass + MIN_PASS_GAP
            };
            tokio::select! {
                event = watcher.next() => {
                    self.apply(event).await;
                    // Every event already here goes in before one pass for
                    // them all: a rush of records is not a pass each (each
                    // lists Docker's containers and networks).
                    for _ in 0..MAX_BATCH {
                        match watcher.next().now_or_never() {
                            Some(event) => self.apply(event).await,
                            None => break,
                        }
                    }
                    self.metrics.set_watch_revision(watcher.revision());
                }
                // A step is done: its instance is back for the next pass.
                Some(done) = self.jobs.join_next_with_id(), if !self.jobs.is_empty() => {
                    self.finished(done).await;
                    while let Some(done) = self.jobs.try_join_next_with_id() {
                        self.finished(done).await;
                    }
                }
                _ = tokio::time::sleep_until(gap_over.into()), if self.dirty => {
                    self.dirty = false;
                    self.urgent = false;
                    self.reconcile().await;
                }
                _ = tick.tick() => self.reconcile().await,
                _ = &mut stop => {
                    self.jobs.abort_all();
                    // Checks end with the agent; their runs go with them.
                    self.desired.clear();
                    match tokio::time::timeout(Duration::from_secs(10), self.runtime.remove_solvers()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => tracing::warn!(error = %e, "could not remove solver containers; the next start does"),
                        Err(_) => tracing::warn!("removing solver containers took too long; the next start does"),
                    }
                    return;
                }
            }
        }
    }

    /// Takes back an instance whose step is done, with what happened to
    /// its record meanwhile.
    async fn finished(
        &mut self,
        done: Result<(tokio::task::Id, (InstanceId, Tracked)), tokio::task::JoinError>,
    ) {
        let (id, back) = match done {
            Ok((task, (id, t))) => {
                self.job_ids.remove(&task);
                (id, Some(t))
            }
            Err(e) => {
                let Some(id) = self.job_ids.remove(&e.id()) else {
                    return;
                };
                tracing::error!(instance = %id, error = %e, "an instance's step panicked; starting over from its record (running containers are adopted)");
                (id, None)
            }
        };
        self.used_subnets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .claims
            .remove(&id);
        let Some(away) = self.away.remove(&id) else {
            return;
        };
        let mut t = back.unwrap_or_else(|| Tracked::new(away.record.clone(), away.lease));
        if let Some((record, lease)) = away.update {
            self.urgent |= t.take(record, lease);
            self.dirty = true;
        }
        // Running with a team: its solver check starts (once).
        if t.status == InstanceStatus::Running && t.solver.is_none() && !away.forgotten {
            t.solver = solver::Checker::start(self.solver_context(), &t.record);
        }
        self.desired.insert(id.clone(), t);
        if away.forgotten {
            self.forget(&id).await;
        }
        self.publish_states();
    }

    fn solver_context(&self) -> solver::Context {
        solver::Context {
            runtime: self.runtime.clone(),
            client: self.client.clone(),
            ks: self.ks.clone(),
            worker: self.worker.clone(),
            metrics: self.metrics.clone(),
            runs: self.solver_runs.clone(),
        }
    }

    /// Removes solver containers no check owns (a removal that failed when
    /// the instance went), at most once a minute.
    async fn sweep_solvers(&mut self) {
        if self.solvers_swept.elapsed() < SOLVER_SWEEP_EVERY {
            return;
        }
        self.solvers_swept = Instant::now();
        let list = match self.runtime.solver_containers().await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list solver containers; the next sweep does");
                return;
            }
        };
        for (container, instance) in list {
            let id = InstanceId::parse(&instance).ok();
            let owned = id.as_ref().is_some_and(|id| {
                self.away.contains_key(id)
                    || self.desired.get(id).is_some_and(|t| t.solver.is_some())
            });
            if owned {
                continue;
            }
            match self.runtime.remove(&container).await {
                Ok(()) => {
                    self.metrics.orphan_removed();
                    tracing::info!(container = %container, instance = %instance, "removed a solver container no check owns");
                }
                Err(e) => {
                    tracing::warn!(container = %container, error = %e, "could not remove a solver container")
                }
            }
        }
    }

    /// The state gauge, over every instance (those whose step runs at the
    /// status they had when it began).
    fn publish_states(&self) {
        self.metrics.set_states(
            self.desired
                .values()
                .map(|t| &t.status)
                .chain(self.away.values().map(|a| &a.status)),
        );
    }

    async fn apply(&mut self, event: Event) {
        match event {
            Event::Init => self.listing = Some(Vec::new()),
            Event::InitApply(kv) => {
                if let Some(l) = self.listing.as_mut() {
                    l.push(kv);
                }
            }
            Event::InitDone { revision } => {
                let mut kvs = self.listing.take().unwrap_or_default();
                // The fence learns again from this list alone (etcd may
                // have been restored: older revisions, lower tokens), in
                // the order the records were written, as a watch shows them.
                kvs.sort_by_key(|kv| kv.mod_revision);
                self.fences.clear();
                let mut keep = BTreeSet::new();
                for kv in kvs {
                    if let Some(id) = self.upsert(&kv) {
                        keep.insert(id);
                    }
                }
                let gone: Vec<InstanceId> = self
                    .desired
                    .keys()
                    .chain(self.away.keys())
                    .filter(|id| !keep.contains(*id))
                    .cloned()
                    .collect();
                for id in gone {
                    self.forget(&id).await;
                }
                self.synced = true;
                tracing::info!(
                    revision,
                    instances = self.desired.len() + self.away.len(),
                    "instances listed"
                );
                self.dirty = true;
            }
            Event::Apply(kv) => {
                if self.upsert(&kv).is_some() {
                    self.dirty = true;
                }
            }
            Event::Delete { key, .. } => {
                if let Ok(Key::Instance(id)) = self.ks.parse(&key) {
                    self.forget(&id).await;
                }
            }
        }
    }

    /// Takes a record into the desired set if it is ours and acceptable;
    /// returns its id when it is.
    fn upsert(&mut self, kv: &Kv) -> Option<InstanceId> {
        let id = match self.ks.parse(&kv.key) {
            Ok(Key::Instance(id)) => id,
            Ok(_) => return None,
            Err(e) => {
                self.metrics.malformed();
                tracing::warn!(key = %kv.key, error = %e, "skipping a key that is not an instance key");
                return None;
            }
        };
        let record = match kv.decode::<InstanceRecord>() {
            Ok(r) if r.id == id => r,
            Ok(r) => {
                self.metrics.malformed();
                tracing::warn!(key = %kv.key, id = %r.id, "skipping a record whose id differs from its key");
                return None;
            }
            Err(e) => {
                self.metrics.malformed();
                tracing::warn!(key = %kv.key, error = %e, "skipping a malformed instance record");
                return None;
            }
        };
        // Fencing (see `fence`): a record created after a newer scheduler
        // was seen writing came from a deposed one.
        if let Err(r) = self
            .fences
            .entry(record.challenge.clone())
            .or_default()
            .check(record.token, kv.create_revision, kv.mod_revision)
        {
            self.metrics.fenced();
            tracing::warn!(key = %kv.key, token = record.token, created = kv.create_revision,
                "refusing a record from a fenced scheduler: created at revision {} with token {}: {r}",
                kv.create_revision, record.token);
            return None;
        }
        if record.worker != self.worker {
            return None;
        }
        if let Some(away) = self.away.get_mut(&id) {
            away.update = Some((record, kv.lease));
            away.forgotten = false;
            return Some(id);
        }
        match self.desired.get_mut(&id) {
            Some(t) => {
                // A renewal (new lease, the status moved with it; new
                // expiry), or a pooled instance claimed.
                self.urgent |= t.take(record, kv.lease);
            }
            None => {
                self.desired
                    .insert(id.clone(), Tracked::new(record, kv.lease));
            }
        }
        Some(id)
    }

    /// The record is gone (deleted or expired): remove its containers,
    /// then its network, now (what fails here, the next pass sweeps).
    async fn forget(&mut self, id: &InstanceId) {
        if let Some(away) = self.away.get_mut(id) {
            // Its step still runs: removed when it is back.
            away.forgotten = true;
            away.update = None;
            away.cancel
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let Some(mut t) = self.desired.remove(id) else {
            return;
        };
        self.publish_states();
        // Its solver check ends, and a run in progress goes with it.
        if t.solver.take().is_some()
            && let Err(e) = self
                .runtime
                .remove(&crate::runtime::solver_container(id))
                .await
        {
            tracing::warn!(instance = %id, error = %e, "could not remove a solver's container");
        }
        let containers: Vec<String> = t
            .services
            .into_values()
            .filter_map(|s| s.container)
            .collect();
        let runtime = &self.runtime;
        let removed = futures::future::join_all(containers.iter().map(|c| runtime.remove(c))).await;
        for (c, result) in containers.iter().zip(removed) {
            match result {
                Ok(()) => {
                    tracing::info!(instance = %id, container = %c, "removed a container of a deleted instance")
                }
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "could not remove container; the sweep retries")
                }
            }
        }
        if t.record.container.is_none() {
            let network = crate::runtime::network_name(id);
            if let Err(e) = self.runtime.remove_network(&network).await {
                tracing::debug!(instance = %id, error = %e, "network not removed yet; the sweep retries");
            }
        }
        if t.record.flag_file.is_some()
            && let Err(e) = self.runtime.remove_flag(id).await
        {
            tracing::warn!(instance = %id, error = %e, "could not remove the flag file; the sweep retries");
        }
    }

    /// One pass: Docker's view against the desired set.
    async fn reconcile(&mut self) {
        self.last_pass = Instant::now();
        let observed = match self.runtime.list().await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list containers");
                return;
            }
        };
        // Without the list, one-image instances go on; instances with
        // services make no network and the sweep removes none this pass.
        let (networks, taken) = match self.runtime.instance_networks().await {
            Ok(n) => {
                self.networks_known = true;
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the instance networks");
                self.networks_known = false;
                let used = self.used_subnets.lock().unwrap_or_else(|e| e.into_inner());
                (Vec::new(), used.used.clone())
            }
        };
        self.check_firewall().await;
        self.pin_neighbours().await;
        let mut by_instance: BTreeMap<String, Vec<Observed>> = BTreeMap::new();
        for o in observed {
            by_instance.entry(o.instance.clone()).or_default().push(o);
        }
        // Orphans: containers and networks of ours without a record, or a
        // container of a service the record does not have (only once we
        // know all records).
        if self.synced {
            self.remove_orphans(&by_instance, &networks).await;
            self.sweep_solvers().await;
        }
        // Each instance's step and status write, in that order, as a task
        // of its own, up to `concurrency` at once: one slow Docker call
        // holds up its own instance, not the others nor the next pass.
        {
            // Steps still running may hold subnets Docker lists no network of yet.
            let mut subnets = self.used_subnets.lock().unwrap_or_else(|e| e.into_inner());
            let claimed: BTreeSet<u32> = subnets.claims.values().flatten().copied().collect();
            subnets.used = taken.union(&claimed).copied().collect();
        }
        self.host_safe_now
            .store(self.host_safe, std::sync::atomic::Ordering::Relaxed);
        let pass = Arc::new(Pass {
            client: self.client.clone(),
            ks: self.ks.clone(),
            worker: self.worker.clone(),
            runtime: self.runtime.clone(),
            metrics: self.metrics.clone(),
            max_restarts: self.max_restarts,
            host_safe: self.host_safe_now.clone(),
            refusal: self.refusal.clone(),
            networks_known: self.networks_known,
            used_subnets: self.used_subnets.clone(),
        });
        for (id, mut t) in std::mem::take(&mut self.desired) {
            let seen = by_instance.remove(id.as_str()).unwrap_or_default();
            let network = networks.iter().find(|n| n.instance == id.as_str()).cloned();
            let (pass, permits) = (pass.clone(), self.permits.clone());
            let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
            self.away.insert(
                id.clone(),
                Away {
                    record: t.record.clone(),
                    lease: t.lease,
                    status: t.status.clone(),
                    update: None,
                    forgotten: false,
                    cancel: cancel.clone(),
                },
            );
            let task = self.jobs.spawn({
                let id = id.clone();
                async move {
                    // Closed only when the reconciler is dropped.
                    let _permit = permits.acquire_owned().await;
                    // Deleted while it waited for its turn: make nothing.
                    if !cancel.load(std::sync::atomic::Ordering::Relaxed) {
                        pass.step(&id, &mut t, seen, network.as_ref()).await;
                        pass.report(&id, &mut t).await;
                    }
                    (id, t)
                }
            });
            self.job_ids.insert(task.id(), id);
        }
        let subnets = self.runtime.subnets().count();
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let taken = self
            .used_subnets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .used
            .len();
        let (used, taken) = (count(networks.len()), count(taken));
        self.network_use.send_if_modified(|now| {
            let next = Some(NetworkUse {
                used,
                free: subnets.saturating_sub(taken),
            });
            let changed = *now != next;
            *now = next;
            changed
        });
        self.publish_states();
    }

    /// Removes containers no record wants, then networks of instances no
    /// record wants (a crash between making an instance's network and its
    /// containers leaves both; they go here).
    async fn remove_orphans(
        &mut self,
        by_instance: &BTreeMap<String, Vec<Observed>>,
        networks: &[InstanceNetwork],
    ) {
        for (instance, containers) in by_instance {
            let id = InstanceId::parse(instance).ok();
            // A running step owns its instance's containers (it may be making them).
            if id.as_ref().is_some_and(|id| self.away.contains_key(id)) {
                continue;
            }
            let wanted = id.and_then(|id| self.desired.get(&id));
            for c in containers {
                let ours = wanted.is_some_and(|t| {
                    let key: SvcKey = c
                        .service
                        .as_deref()
                        .and_then(|s| ServiceName::parse(s).ok());
                    let in_record = match &key {
                        None => t.record.container.is_some(),
                        Some(name) => t.record.services.contains_key(name),
                    };
                    in_record
                        && t.services
                            .get(&key)
                            .and_then(|s| s.container.as_deref())
                            .is_none_or(|mine| mine == c.id)
                });
                if !ours {
                    match self.runtime.remove(&c.id).await {
                        Ok(()) => {
                            self.metrics.orphan_removed();
                            tracing::info!(container = %c.id, instance = %instance, service = ?c.service, "removed an orphan container");
                        }
                        Err(e) => {
                            tracing::warn!(container = %c.id, error = %e, "could not remove orphan")
                        }
                    }
                }
            }
        }
        for n in networks {
            let id = InstanceId::parse(&n.instance).ok();
            if id.as_ref().is_some_and(|id| self.away.contains_key(id)) {
                continue;
            }
            let wanted = id
                .and_then(|id| self.desired.get(&id))
                .is_some_and(|t| t.record.container.is_none());
            if wanted {
                continue;
            }
            match self.runtime.remove_network(&n.name).await {
                Ok(()) => {
                    tracing::info!(network = %n.name, instance = %n.instance, "removed an orphan instance network")
                }
                Err(e) => {
                    tracing::debug!(network = %n.name, error = %e, "orphan network not removed yet")
                }
            }
        }
        // Flag files of instances no record wants (their removal failed,
        // or the agent was down when they ended).
        for dir in self.runtime.flag_dirs().await {
            let Ok(id) = InstanceId::parse(&dir) else {
                continue;
            };
            if self.away.contains_key(&id) || self.desired.contains_key(&id) {
                continue;
            }
            match self.runtime.remove_flag(&id).await {
                Ok(()) => tracing::info!(instance = %id, "removed an orphan flag file"),
                Err(e) => {
                    tracing::debug!(instance = %id, error = %e, "orphan flag file not removed yet")
                }
            }
        }
    }

    /// Every 10 s, puts back any missing rule of the host firewall; while
    /// that fails, no container is created (said once, and when it clears).
    async fn check_firewall(&mut self) {
        let Some(fw) = &self.firewall else {
            return;
        };
        if self
            .firewall_checked
            .is_some_and(|at| at.elapsed() < Duration::from_secs(10))
        {
            return;
        }
        self.firewall_checked = Some(Instant::now());
        let ok = fw.ensure().await;
        self.metrics.set_host_firewall(ok.is_ok());
        match ok {
            Ok(()) => {
                if !self.host_safe {
                    tracing::info!(bridges = ?fw.bridges, "host firewall in place: instances cannot reach this host; starting instances");
                }
                self.host_safe = true;
                self.firewall_said = None;
            }
            Err(e) => {
                if self.firewall_said.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "cannot keep the host firewall (instances could reach this host's daemons and etcd): starting no instance until it works; fix iptables or set allow_host_access = true");
                }
                self.host_safe = false;
                self.firewall_said = Some(e);
            }
        }
    }

    /// Pins every container's address on the instance bridges
    /// (`hostnet`); a failure is logged once until it clears.
    async fn pin_neighbours(&mut self) {
        let bridges: Vec<String> = self.runtime.bridges().values().cloned().collect();
        let want = if planted("neighbour-pinning") {
            Ok(BTreeSet::new())
        } else {
            self.runtime.endpoints().await.map_err(|e| e.to_string())
        };
        let result = match want {
            Ok(want) => pin_neighbours(&bridges, &want).await,
            Err(e) => Err(e),
        };
        match (result, self.pinning_failed) {
            (Ok(()), true) => {
                tracing::info!("instances' neighbour entries are pinned again");
                self.pinning_failed = false;
            }
            (Err(e), false) => {
                tracing::warn!(error = %e, "cannot pin the instances' neighbour entries (an instance with NET_RAW could claim another's address); retrying");
                self.pinning_failed = true;
            }
            _ => {}
        }
    }
}

/// What one pass lends each instance's step: the clients, this worker's
/// settings, and the subnets taken (steps run at once, up to
/// `reconcile_concurrency`, each on its own instance).
struct Pass {
    client: Client,
    ks: Keyspace,
    worker: WorkerId,
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
    max_restarts: u32,
    host_safe: Arc<std::sync::atomic::AtomicBool>,
    refusal: Option<String>,
    networks_known: bool,
    used_subnets: Arc<std::sync::Mutex<SubnetUse>>,
}

impl Pass {
    /// Moves one instance towards running: its network, then each of its
    /// containers once the services it depends on are ready.
    async fn step(
        &self,
        id: &InstanceId,
        t: &mut Tracked,
        seen: Vec<Observed>,
        network: Option<&InstanceNetwork>,
    ) {
        if matches!(t.status, InstanceStatus::Failed { .. })
            || t.retry_at.is_some_and(|at| Instant::now() < at)
        {
            return;
        }
        let record = t.record.clone();
        let units = Unit::all(&record);
        let mut seen = seen;
        // Containers of another revision than the record's: the rollout
        // reached this worker while it was down (or the take was missed).
        let stale = seen
            .iter()
            .any(|o| o.spec_revision.is_some_and(|r| r != record.spec_revision));
        if std::mem::take(&mut t.upgrade) || stale {
            tracing::info!(instance = %id, spec_revision = record.spec_revision, containers = seen.len(), stale, "a rollout moved the instance to another spec revision: making its containers again");
            self.remake(id, t, &seen).await;
            seen = Vec::new();
        } else if t
            .solver
            .as_ref()
            .is_some_and(solver::Checker::take_replacement)
        {
            tracing::warn!(instance = %id, containers = seen.len(), "replacing the containers of an instance its solver check found unhealthy");
            self.metrics.solver_replaced();
            if let Some(checker) = &t.solver {
                checker.replaced();
            }
            self.remake(id, t, &seen).await;
            seen = Vec::new();
        }
        let mut has_network = network.is_some();
        // What was just started is looked at again at once (running with
        // its address: routable in this pass, not the next), and services
        // whose dependencies it made ready are made in the same step.
        for _ in 0..=units.len() {
            match self
                .advance(id, t, &record, &units, &seen, &mut has_network)
                .await
            {
                // Not now: the status says why (or a retry is set).
                None => return,
                Some(false) => break,
                Some(true) => {}
            }
            match self.runtime.list_instance(id).await {
                Ok(now) => seen = now,
                Err(e) => {
                    tracing::debug!(instance = %id, error = %e, "cannot look at the containers just started; the next pass does");
                    break;
                }
            }
        }
        let mut status = t.overall();
        if status == InstanceStatus::Running && !self.flag_in_place(id, t).await {
            // A claimed pooled instance is routed once its file holds the
            // team's flag, not before.
            status = flag_failed(id, t).unwrap_or(InstanceStatus::Starting);
        }
        if status == InstanceStatus::Running && t.status != InstanceStatus::Running {
            self.metrics.reconciled(t.seen.elapsed());
        }
        t.status = status;
    }

    /// Removes every container of an instance to make them again from its
    /// record in this step (a failed solver check with `replace_unhealthy`,
    /// or a rollout): same id, routes and flag (its flag file written
    /// afresh).
    async fn remake(&self, id: &InstanceId, t: &mut Tracked, seen: &[Observed]) {
        t.seen = Instant::now();
        for o in seen {
            if let Err(e) = self.runtime.remove(&o.id).await {
                tracing::warn!(instance = %id, container = %o.id, error = %e, "could not remove a container to make it again");
            }
        }
        t.services.clear();
        t.status = InstanceStatus::Starting;
    }

    /// Whether an instance with a `flag_file` has the secret's flag in it
    /// (true for one without): reads the secret if this agent has not
    /// (containers made before it: adopted after a restart, or a pooled
    /// instance just claimed), then writes the file if it differs.
    async fn flag_in_place(&self, id: &InstanceId, t: &mut Tracked) -> bool {
        if t.record.flag_file.is_none() {
            return true;
        }
        if t.secret.is_none() {
            match secret_of(&self.client, &self.ks, &self.worker, &t.record).await {
                Ok(secret) => t.secret = Some(secret),
                Err(e) => {
                    tracing::debug!(instance = %id, error = ?e, "cannot read the instance's secret for its flag file; retrying");
                    return false;
                }
            }
        }
        self.write_flag(id, t).await
    }

    /// Writes the secret's flag to the instance's flag file when the file
    /// may not hold it; false when it could not.
    async fn write_flag(&self, id: &InstanceId, t: &mut Tracked) -> bool {
        let Some(secret) = &t.secret else {
            return false;
        };
        if t.record.flag_file.is_none() || t.flag_written.as_ref() == Some(&secret.flag) {
            return true;
        }
        if !t.record.is_pooled() && secret.flag.is_empty() {
            tracing::warn!(instance = %id, "its secret holds no flag yet; retrying");
            return false;
        }
        match self.runtime.write_flag(id, &secret.flag).await {
            Ok(()) => {
                t.flag_written = Some(secret.flag.clone());
                t.flag_failures = 0;
                true
            }
            Err(e) => {
                let path = self.runtime.flag_path(id);
                tracing::warn!(instance = %id, path = %path.display(), error = %e, "cannot write the flag file; retrying");
                t.flag_failures += 1;
                t.flag_written = None;
                if t.flag_failures >= FLAG_WRITE_ATTEMPTS {
                    t.flag_error = Some(format!(
                        "cannot write its flag file {} ({e}): check the agent's flag_dir",
                        path.display()
                    ));
                }
                false
            }
        }
    }

    /// One round of an instance's step: each container as Docker shows it
    /// (`seen`) moved on, and those whose dependencies are ready made and
    /// started together. `Some(true)` when one was started (worth a second
    /// look); `None` when nothing may be made now (`prepare` said why).
    async fn advance(
        &self,
        id: &InstanceId,
        t: &mut Tracked,
        record: &InstanceRecord,
        units: &[Unit<'_>],
        seen: &[Observed],
        has_network: &mut bool,
    ) -> Option<bool> {
        let multi = record.container.is_none();
        let seen_of = |unit: &Unit<'_>| {
            seen.iter()
                .find(|o| o.service.as_deref() == unit.service.map(ServiceName::as_str))
        };
        let missing = units.iter().any(|u| seen_of(u).is_none()) || (multi && !*has_network);
        if missing {
            if !self.prepare(id, t, record, *has_network).await {
                return None;
            }
            *has_network = true;
        }
        let mut create = Vec::new();
        for unit in units {
            let key: SvcKey = unit.service.cloned();
            let deps_ready = unit.service.is_none_or(|name| {
                record.services.get(name).is_none_or(|s| {
                    s.depends_on.iter().all(|d| {
                        t.services
                            .get(&Some(d.clone()))
                            .is_some_and(|d| d.state == ServiceState::Ready)
                    })
                })
            });
            let ready_spec = unit
                .service
                .and_then(|name| record.services.get(name))
                .and_then(|s| s.ready.as_ref());
            let svc = t.services.entry(key).or_default();
            let label = unit.service.map_or(String::new(), |s| format!(" {s}"));
            if svc.state == ServiceState::Failed
                || svc.retry_at.is_some_and(|at| Instant::now() < at)
            {
                continue;
            }
            match seen_of(unit) {
                Some(o) if o.running && o.address.is_some() => {
                    if svc.container.is_none() {
                        tracing::info!(instance = %id, service = ?unit.service, container = %o.id, "adopted a running container");
                    }
                    svc.container = Some(o.id.clone());
                    svc.address = o.address;
                    svc.retry_at = None;
                    if svc.state != ServiceState::Ready {
                        let ok = match (ready_spec, o.address) {
                            (Some(spec), Some(addr)) => ready::probe(addr, spec).await,
                            _ => true,
                        };
                        svc.state = if ok {
                            ServiceState::Ready
                        } else {
                            ServiceState::Starting
                        };
                        svc.was_ready |= ok;
                        let since = *svc.unready_since.get_or_insert_with(Instant::now);
                        if ok {
                            svc.unready_since = None;
                        } else if since.elapsed() > READY_TIMEOUT {
                            tracing::warn!(instance = %id, service = ?unit.service, ready = ?ready_spec, "service never got ready; giving up");
                            svc.state = ServiceState::Failed;
                            svc.failed = Some(format!(
                                "not ready {} s after it started ({})",
                                READY_TIMEOUT.as_secs(),
                                ready_spec.map_or("running".into(), ready::describe)
                            ));
                        }
                    }
                }
                Some(o) if o.exited => {
                    svc.container = Some(o.id.clone());
                    svc.state = ServiceState::Starting;
                    svc.unready_since = None;
                    let code = self.runtime.exit_code(&o.id).await.unwrap_or(-1);
                    if svc.restarts >= self.max_restarts {
                        tracing::warn!(instance = %id, service = ?unit.service, code, restarts = svc.restarts, "container keeps exiting; giving up");
                        svc.state = ServiceState::Failed;
                        svc.failed = Some(format!(
                            "exited with code {code} after {} restarts",
                            svc.restarts
                        ));
                        continue;
                    }
                    if svc.retry_at.is_none() {
                        // First sight of this exit: wait before restarting.
                        let wait = backoff(svc.restarts);
                        tracing::info!(instance = %id, service = ?unit.service, code, restarts = svc.restarts, ?wait, "container{label} exited; restarting after backoff");
                        svc.retry_at = Some(Instant::now() + wait);
                        continue;
                    }
                    svc.restarts += 1;
                    svc.retry_at = None;
                    if let Err(e) = self.runtime.start(&o.id).await {
                        tracing::warn!(instance = %id, service = ?unit.service, error = %e, "restart failed");
                    }
                }
                Some(o) if o.running => {
                    // Running but without an address yet: look again next pass.
                    svc.container = Some(o.id.clone());
                    svc.state = ServiceState::Starting;
                }
                Some(o) => {
                    // Created but not started (e.g. the agent died in between).
                    svc.container = Some(o.id.clone());
                    if !deps_ready {
                        svc.state = ServiceState::Waiting;
                        continue;
                    }
                    svc.state = ServiceState::Starting;
                    if let Err(e) = self.runtime.start(&o.id).await {
                        tracing::warn!(instance = %id, service = ?unit.service, error = %e, "start failed");
                        svc.retry_at = Some(Instant::now() + backoff(svc.restarts));
                    }
                }
                None if deps_ready => {
                    svc.state = ServiceState::Starting;
                    create.push(*unit);
                }
                None => svc.state = ServiceState::Waiting,
            }
        }
        if create.is_empty() {
            return Some(false);
        }
        // The flag file is the bind mount's source: it is written first,
        // whatever this agent wrote before (it may be gone).
        t.flag_written = None;
        if !self.write_flag(id, t).await {
            if let Some(failed) = flag_failed(id, t) {
                t.status = failed;
                return None;
            }
            t.retry_at = Some(Instant::now() + backoff(t.attempts));
            t.attempts += 1;
            return None;
        }
        let mut started = false;
        {
            // Read in `prepare`, which ran before anything is made.
            let secret = t.secret.clone()?;
            // Services whose dependencies are ready are made together.
            let runtime = &self.runtime;
            let made = futures::future::join_all(create.iter().map(|unit| {
                let (record, secret) = (&record, &secret);
                async move {
                    let id = runtime.create(record, *unit, secret).await?;
                    let started = runtime.start(&id).await;
                    Ok::<_, RuntimeError>((id, started))
                }
            }))
            .await;
            for (unit, result) in create.iter().zip(made) {
                let svc = t.services.entry(unit.service.cloned()).or_default();
                match result {
                    Ok((container, start)) => {
                        tracing::info!(instance = %id, service = ?unit.service, %container, image = %unit.container.image, "created container");
                        svc.container = Some(container);
                        started |= start.is_ok();
                        if let Err(e) = start {
                            tracing::warn!(instance = %id, service = ?unit.service, error = %e, "start failed");
                            svc.retry_at = Some(Instant::now() + backoff(svc.restarts));
                            svc.restarts += 1;
                        }
                    }
                    Err(RuntimeError::ImageMissing { image, reason }) => {
                        // Not retried: a missing image does not appear by itself.
                        tracing::warn!(instance = %id, %image, %reason, "image missing");
                        svc.state = ServiceState::Failed;
                        svc.failed = Some(format!(
                            "image {image} is not on this worker and could not be pulled: {reason}"
                        ));
                    }
                    Err(e @ RuntimeError::NoDiskQuota { .. }) => {
                        // Not retried: the worker's storage does not change by itself.
                        tracing::warn!(instance = %id, error = %e, "cannot bound the writable layer");
                        svc.state = ServiceState::Failed;
                        svc.failed = Some(e.to_string());
                    }
                    Err(e) => {
                        tracing::warn!(instance = %id, service = ?unit.service, error = %e, "create failed");
                        svc.retry_at = Some(Instant::now() + backoff(svc.restarts));
                        svc.restarts += 1;
                    }
                }
            }
        }
        Some(started)
    }

    /// Before a container of `record` is made: the host is safe, the record
    /// is what its challenge's spec makes, its secret is read, and (for an
    /// instance with services) its network exists. False: not now (the
    /// status says why, or a retry is set).
    async fn prepare(
        &self,
        id: &InstanceId,
        t: &mut Tracked,
        record: &InstanceRecord,
        has_network: bool,
    ) -> bool {
        let host_safe = self.host_safe.load(std::sync::atomic::Ordering::Relaxed);
        let refusal = self.refusal.as_deref();
        if let Some(why) = refusal {
            t.status = InstanceStatus::Failed {
                reason: format!("refused by the agent: {why}"),
            };
            return false;
        }
        if !host_safe {
            // Nothing starts until the host firewall is in place.
            t.status = InstanceStatus::Starting;
            return false;
        }
        if t.secret.is_none() {
            let vetted = match from_spec(&self.client, &self.ks, record).await {
                Ok(()) => secret_of(&self.client, &self.ks, &self.worker, record).await,
                Err(e) => Err(e),
            };
            match vetted {
                Ok(secret) => t.secret = Some(secret),
                Err(Vetted::Gone) => {
                    tracing::debug!(instance = %id, "deleted before its containers were made");
                    t.retry_at = Some(Instant::now() + backoff(t.attempts));
                    return false;
                }
                Err(Vetted::Unavailable(e)) => {
                    tracing::warn!(instance = %id, error = %e, "cannot read the challenge's spec or the instance's secret; retrying");
                    t.retry_at = Some(Instant::now() + backoff(t.attempts));
                    t.attempts += 1;
                    return false;
                }
                Err(refused) => {
                    let why = match refused {
                        Vetted::Refused(why) => {
                            tracing::error!(instance = %id, challenge = %record.challenge, spec_revision = record.spec_revision, %why, "refused: the record's containers are not what its challenge's spec makes; no container started");
                            self.metrics.unlike_spec();
                            why
                        }
                        Vetted::NoSecret(why) | Vetted::Unavailable(why) => {
                            tracing::error!(instance = %id, %why, "refused: no container started");
                            why
                        }
                        Vetted::Gone => return false,
                    };
                    t.status = InstanceStatus::Failed {
                        reason: format!("refused by the agent: {why}"),
                    };
                    return false;
                }
            }
        }
        if record.container.is_some() || has_network {
            return true;
        }
        if !self.networks_known {
            // Docker did not list the networks this pass: make none blind.
            return false;
        }
        let subnets = self.runtime.subnets();
        let egress = record.services.values().any(|s| s.container.egress);
        // A subnet another user of the engine holds (another agent on it,
        // a network made by hand) is refused by Docker: skip it and take
        // the next, a few times in one pass.
        for _ in 0..16 {
            // Taken under the lock, so instances made at once get distinct subnets.
            let free = {
                let mut subnets_now = self.used_subnets.lock().unwrap_or_else(|e| e.into_inner());
                let free = subnets.first_free(&subnets_now.used);
                if let Some(index) = free {
                    subnets_now.used.insert(index);
                    subnets_now
                        .claims
                        .entry(id.clone())
                        .or_default()
                        .insert(index);
                }
                free
            };
            let Some(index) = free else {
                tracing::warn!(instance = %id, networks = subnets.count(), "no free instance network on this worker");
                t.status = InstanceStatus::Failed {
                    reason: format!(
                        "no free network on this worker: all {} of its instance_networks are in use",
                        subnets.count()
                    ),
                };
                return false;
            };
            match self
                .runtime
                .create_instance_network(record, index, egress)
                .await
            {
                Ok(()) => return true,
                Err(bollard::errors::Error::DockerResponseServerError { message, .. })
                    if message.contains("overlaps") =>
                {
                    tracing::debug!(instance = %id, index, "subnet taken outside this agent; trying the next");
                }
                Err(e) => {
                    tracing::warn!(instance = %id, error = %e, "cannot create the instance's network; retrying");
                    break;
                }
            }
        }
        t.retry_at = Some(Instant::now() + backoff(t.attempts));
        t.attempts += 1;
        false
    }

    /// Writes the status record when what etcd holds differs.
    async fn report(&self, id: &InstanceId, t: &mut Tracked) {
        let running = t.status == InstanceStatus::Running;
        let multi = t.record.container.is_none();
        let mut record = StatusRecord {
            v: V1,
            instance: id.clone(),
            worker: self.worker.clone(),
            team: t.record.team.clone(),
            container_id: t.services.get(&None).and_then(|s| s.container.clone()),
            address: if running { t.routed_address() } else { None },
            status: t.status.clone(),
            updated_at: 0,
            services: if multi {
                t.services
                    .iter()
                    .filter_map(|(k, s)| {
                        Some((
                            k.clone()?,
                            ServiceStatus {
                                state: s.state,
                                container_id: s.container.clone(),
                                address: s.address,
                                restarts: s.restarts,
                            },
                        ))
                    })
                    .collect()
            } else {
                BTreeMap::new()
            },
            solver: t.solver.as_ref().and_then(solver::Checker::health),
            spec_revision: t.record.spec_revision,
        };
        if t.reported.as_ref() == Some(&record) || t.lease == 0 {
            return;
        }
        let unstamped = record.clone();
        record.updated_at = tidegate_schema::time::unix_secs();
        let key = self.ks.key(&Key::Status {
            worker: self.worker.clone(),
            instance: id.clone(),
        });
        let instance_key = self.ks.key(&Key::Instance(id.clone()));
        // Only while the instance is still on the lease this agent knows: a
        // renewal that moved it to a new lease is about to revoke the old
        // one, and a status written on it would vanish with it (players
        // then got 503 for a running instance until it expired). If the
        // compare fails, the watch brings the new lease and the next pass
        // writes again.
        let txn = Txn::new()
            .when([
                Compare::lease(instance_key.as_str(), CompareOp::Equal, t.lease),
                Compare::mod_revision(key.as_str(), CompareOp::Equal, t.status_rev),
            ])
            .and_then([TxnOp::put(
                key.as_str(),
                record.encode(),
                Some(PutOptions::new().with_lease(t.lease)),
            )])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let sent = std::time::Instant::now();
        let answer = self.client.clone().txn(txn).await;
        self.metrics.etcd.write_took(sent);
        match answer {
            Ok(r) if r.succeeded() => {
                t.reported = Some(unstamped);
                if let Some(h) = r.header() {
                    t.status_rev = h.revision();
                    self.metrics.etcd.wrote(h.revision());
                }
            }
            Ok(r) => {
                // Moved by a renewal, written by an earlier run of this
                // agent, or an earlier write of ours landed late: expect
                // what is there now, and write again on the next pass.
                t.status_rev = tidegate_etcd::guard::else_get(&r).map_or(0, |kv| kv.mod_revision());
                tracing::debug!(instance = %id, lease = t.lease, status_rev = t.status_rev, "instance moved to another lease or status changed; status written on the next pass")
            }
            // A refusal does not heal by itself: say so (an etcd that checks
            // every key of the instance's lease refuses a worker's role).
            Err(e) if e.to_string().contains("permission denied") => {
                tracing::warn!(instance = %id, error = %e, "etcd refused this worker's status write: check its etcd role")
            }
            Err(e) => tracing::debug!(instance = %id, error = %e, "could not write the status"),
        }
    }
}

/// Writes of an instance's flag file that fail in a row before it fails.
const FLAG_WRITE_ATTEMPTS: u32 = 5;

/// The instance's failure once its flag file could not be written
/// [`FLAG_WRITE_ATTEMPTS`] times (said once).
fn flag_failed(id: &InstanceId, t: &mut Tracked) -> Option<InstanceStatus> {
    let reason = t.flag_error.clone()?;
    tracing::error!(instance = %id, %reason, "giving up on the instance");
    Some(InstanceStatus::Failed { reason })
}

/// Why a record's container was not made.
#[derive(Debug)]
enum Vetted {
    /// etcd could not say (retried).
    Unavailable(String),
    /// The record says another container than its spec makes.
    Refused(String),
    /// The instance has no secret (its record was not written by a
    /// scheduler), or an unreadable one.
    NoSecret(String),
    /// The record is gone from etcd (deleted or expired since the watch
    /// said it): its delete is on the way.
    Gone,
}

/// The instance's secret (its flag, the challenge's `secret_env` values),
/// from `secrets/{this worker}/{id}` (written with the record in the spawn
/// Txn, so present whenever the record is), or the flag inline in a record
/// written before secrets/ existed. A record with neither was not written
/// by a scheduler.
async fn secret_of(
    client: &Client,
    ks: &Keyspace,
    worker: &WorkerId,
    record: &InstanceRecord,
) -> Result<SecretRecord, Vetted> {
    let key = ks.key(&Key::Secret {
        worker: worker.clone(),
        instance: record.id.clone(),
    });
    // Both in one snapshot: a secret missing because the instance was just
    // deleted (its lease revoked) is not a record written by hand.
    let record_key = ks.key(&Key::Instance(record.id.clone()));
    let txn = Txn::new().and_then([
        TxnOp::get(record_key.as_str(), None),
        TxnOp::get(key.as_str(), None),
    ]);
    let resp = client
        .clone()
        .txn(txn)
        .await
        .map_err(|e| Vetted::Unavailable(format!("{key}: {e}")))?;
    let responses = resp.op_responses();
    let found: Vec<Option<&etcd_client::KeyValue>> = responses
        .iter()
        .filter_map(|r| match r {
            etcd_client::TxnOpResponse::Get(g) => Some(g.kvs().first()),
            _ => None,
        })
        .collect();
    let (Some(Some(_)), Some(secret)) = (found.first(), found.get(1)) else {
        return Err(Vetted::Gone);
    };
    match (secret, &record.flag) {
        (Some(kv), _) => {
            let secret = SecretRecord::decode(kv.value())
                .map_err(|e| Vetted::NoSecret(format!("{key}: {e}")))?;
            // Only a pooled instance waits for its flag (its claim writes it
            // with the record).
            if secret.flag.is_empty() && !record.is_pooled() {
                return Err(Vetted::NoSecret(format!("{key}: holds no flag")));
            }
            Ok(secret)
        }
        (None, Some(legacy)) => Ok(SecretRecord {
            v: V1,
            instance: record.id.clone(),
            worker: worker.clone(),
            flag: legacy.clone(),
            env: Default::default(),
        }),
        (None, None) => Err(Vetted::NoSecret(format!(
            "no secret at {key}: the record was not written by a scheduler"
        ))),
    }
}

/// The container of `record`, made from its challenge's spec at the
/// revision the record names (the current one when the record names none,
/// or when etcd has compacted that revision away). A record whose own
/// container differs (image, caps, limits, networks, env) is refused:
/// whoever wrote it is not the scheduler, or the scheduler is not ours.
async fn from_spec(client: &Client, ks: &Keyspace, record: &InstanceRecord) -> Result<(), Vetted> {
    if planted("spec-derived") {
        return Ok(());
    }
    let key = ks.key(&Key::Challenge(record.challenge.clone()));
    let mut client = client.clone();
    let at = (record.spec_revision > 0)
        .then(|| etcd_client::GetOptions::new().with_revision(record.spec_revision));
    let resp = match client.get(key.as_str(), at).await {
        Err(e) if record.spec_revision > 0 && e.to_string().contains("compacted") => {
            client.get(key.as_str(), None).await
        }
        other => other,
    }
    .map_err(|e| Vetted::Unavailable(format!("{key}: {e}")))?;
    let kv = resp.kvs().first().ok_or_else(|| {
        Vetted::Refused(format!(
            "challenge {} has no spec at revision {}",
            record.challenge, record.spec_revision
        ))
    })?;
    let challenge =
        ChallengeRecord::decode(kv.value()).map_err(|e| Vetted::Refused(format!("{key}: {e}")))?;
    let differences = differences(record, &challenge.spec);
    if differences.is_empty() {
        Ok(())
    } else {
        Err(Vetted::Refused(format!(
            "record vs spec: {}",
            differences.join("; ")
        )))
    }
}

/// Where a record's containers differ from what `spec` makes (the one
/// container, or each service by name).
fn differences(record: &InstanceRecord, spec: &tidegate_schema::ChallengeSpec) -> Vec<String> {
    let mut out = containers_differ(record, spec);
    if record.flag_file != spec.flag.file {
        out.push(format!(
            "flag_file: {:?} vs {:?}",
            record.flag_file, spec.flag.file
        ));
    }
    // The solver runs on the instance's network: a forged one is a
    // container of the writer's choosing there.
    let solver = tidegate_schema::SolverRecord::of(spec);
    if record.solver != solver {
        out.push(format!("solver: {:?} vs {:?}", record.solver, solver));
    }
    out
}

fn containers_differ(
    record: &InstanceRecord,
    spec: &tidegate_schema::ChallengeSpec,
) -> Vec<String> {
    match (&record.container, ContainerSpec::of(spec)) {
        (Some(mine), Some(made)) => mine.differences(&made),
        (None, None) => {
            let made = ServiceRecord::all_of(spec);
            let mut out = Vec::new();
            for name in made
                .keys()
                .chain(record.services.keys())
                .collect::<BTreeSet<_>>()
            {
                match (record.services.get(name), made.get(name)) {
                    (Some(mine), Some(made)) => out.extend(
                        mine.differences(made)
                            .into_iter()
                            .map(|d| format!("services.{name}.{d}")),
                    ),
                    (Some(_), None) => out.push(format!("services.{name}: not in the spec")),
                    (None, _) => out.push(format!("services.{name}: missing from the record")),
                }
            }
            out
        }
        (Some(_), None) => vec!["container: the spec lists services".into()],
        (None, Some(_)) => vec!["services: the spec has one image".into()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> tidegate_schema::ChallengeSpec {
        tidegate_schema::decode_json(json.to_string().as_bytes()).unwrap()
    }

    fn record_of(s: &tidegate_schema::ChallengeSpec) -> InstanceRecord {
        let mut r: InstanceRecord = serde_json::from_value(serde_json::json!({
            "v": 1, "id": "00000000aa", "challenge": "c", "team": "t", "worker": "w",
            "token": 1, "created_at": 1, "expires_at": 2,
            "http": [{"port_name": "web", "hostname": "x.ctf.localhost", "target_port": 8080}],
        }))
        .unwrap();
        r.container = ContainerSpec::of(s);
        r.services = ServiceRecord::all_of(s);
        r.solver = tidegate_schema::SolverRecord::of(s);
        r
    }

    #[test]
    fn a_record_must_hold_the_solver_its_spec_makes() {
        let solved = spec(serde_json::json!({
            "image": "a:1",
            "ports": [{"name": "web", "port": 8080, "protocol": "http"}],
            "solver": {"image": "solve:1", "interval_secs": 60}
        }));
        let mut r = record_of(&solved);
        assert!(differences(&r, &solved).is_empty());
        assert_eq!(r.solver.as_ref().map(|s| s.target_port), Some(8080));
        r.solver.as_mut().unwrap().image = "evil:1".into();
        assert!(differences(&r, &solved)[0].starts_with("solver:"));
        r.solver = None;
        assert!(!differences(&r, &solved).is_empty());
    }

    #[test]
    fn a_record_must_hold_the_services_its_spec_makes() {
        let two = spec(serde_json::json!({
            "services": {"app": {"image": "a:1", "depends_on": ["db"]}, "db": {"image": "d:1"}},
            "ports": [{"name": "web", "port": 8080, "protocol": "http", "service": "app"}],
            "flag": {"services": ["app"]}
        }));
        let mut r = record_of(&two);
        assert!(differences(&r, &two).is_empty());
        // Only app gets the flag.
        assert!(r.services.values().filter(|s| s.secrets).count() == 1);

        // A writer giving db the flag, another image, or an extra service.
        let db = ServiceName::parse("db").unwrap();
        r.services.get_mut(&db).unwrap().secrets = true;
        r.services.get_mut(&db).unwrap().container.image = "evil:1".into();
        let extra = r.services[&db].clone();
        r.services
            .insert(ServiceName::parse("miner").unwrap(), extra);
        let d = differences(&r, &two).join("; ");
        assert!(d.contains("services.db.secrets: true vs false"), "{d}");
        assert!(d.contains("services.db.image"), "{d}");
        assert!(d.contains("services.miner: not in the spec"), "{d}");

        // One-image record against a spec with services, and the reverse.
        let one = spec(serde_json::json!({"image": "a:1",
            "ports": [{"name": "web", "port": 8080, "protocol": "http"}]}));
        assert_eq!(
            differences(&record_of(&one), &two),
            ["container: the spec lists services"]
        );
        assert_eq!(
            differences(&record_of(&two), &one),
            ["services: the spec has one image"]
        );
        assert!(differences(&record_of(&one), &one).is_empty());
    }

    #[test]
    fn services_come_in_dependency_order() {
        let three = spec(serde_json::json!({
            "services": {
                "app": {"image": "a:1", "depends_on": ["db"]},
                "bot": {"image": "b:1", "depends_on": ["app"]},
                "db": {"image": "d:1"},
                "cache": {"image": "c:1"}
            },
            "ports": [{"name": "web", "port": 8080, "protocol": "http", "service": "app"}]
        }));
        let r = record_of(&three);
        let order: Vec<&str> = Unit::all(&r)
            .iter()
            .filter_map(|u| u.service.map(ServiceName::as_str))
            .collect();
        assert_eq!(order, ["cache", "db", "app", "bot"]);
    }
}
