//! The reconciler: drives Docker until this worker's containers equal the
//! instance records assigned to it in etcd.
//!
//! One task owns the state. It applies watch events (a relist replaces the
//! whole desired set at `InitDone`) and, every `reconcile_interval_ms`,
//! compares Docker's list with the desired set: it starts what is missing,
//! adopts what already runs (same container id, no restart), removes
//! orphans, restarts exited containers with backoff up to `max_restarts`,
//! and writes each instance's status (where its container listens, and
//! how it is doing) under the instance's lease, so it vanishes with it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tidegate_etcd::{Event, Kv, Watcher};
use tidegate_schema::config::planted;
use tidegate_schema::{
    ChallengeRecord, ContainerSpec, InstanceId, InstanceRecord, InstanceStatus, Key, Keyspace,
    Kind, Record, SecretRecord, StatusRecord, V1, WorkerId,
};

use crate::hostnet::{Firewall, pin_neighbours};
use crate::metrics::Metrics;
use crate::runtime::{Observed, Runtime, RuntimeError};

/// What keeps instances off this host: the firewall (None:
/// `allow_host_access`), and why no instance may start at all (an engine
/// running container root as host root), if so.
#[derive(Debug, Default)]
pub struct HostChecks {
    pub firewall: Option<Firewall>,
    pub refusal: Option<String>,
}

/// One instance this worker should run.
#[derive(Debug)]
struct Tracked {
    record: InstanceRecord,
    lease: i64,
    container: Option<String>,
    status: InstanceStatus,
    address: Option<std::net::IpAddr>,
    restarts: u32,
    retry_at: Option<Instant>,
    /// What etcd holds for this instance's status (None: not written yet).
    reported: Option<(InstanceStatus, Option<String>, Option<std::net::IpAddr>)>,
    /// The status key's mod_revision as this agent last wrote or read it (0:
    /// none). Each write expects it, so a write whose outcome was unknown
    /// (etcd recovering) cannot land after a newer one and leave an old
    /// status in force.
    status_rev: i64,
    /// When the record was first seen, for the reconcile latency metric.
    seen: Instant,
}

/// The reconciler's state.
pub struct Reconciler {
    client: Client,
    ks: Keyspace,
    worker: WorkerId,
    runtime: Runtime,
    metrics: Arc<Metrics>,
    max_restarts: u32,
    desired: BTreeMap<InstanceId, Tracked>,
    /// Records being collected during a (re)list.
    listing: Option<Vec<Kv>>,
    /// Whether a full list has been applied (before that nothing is removed).
    synced: bool,
    /// The highest fencing token seen in any record.
    max_token: i64,
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
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("worker", &self.worker)
            .field("desired", &self.desired.len())
            .finish_non_exhaustive()
    }
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
            runtime,
            metrics,
            max_restarts,
            desired: BTreeMap::new(),
            listing: None,
            synced: false,
            max_token: 0,
            pinning_failed: false,
            host_safe: firewall.is_none(),
            refusal,
            firewall,
            firewall_checked: None,
            firewall_said: None,
        }
    }

    /// Runs until `stop` resolves.
    pub async fn run(mut self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        let mut watcher = Watcher::new(self.client.clone(), self.ks.prefix(Kind::Instances));
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                event = watcher.next() => {
                    self.apply(event).await;
                    self.metrics.set_watch_revision(watcher.revision());
                }
                _ = tick.tick() => self.reconcile().await,
                _ = &mut stop => return,
            }
        }
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
                let kvs = self.listing.take().unwrap_or_default();
                let mut keep = BTreeSet::new();
                for kv in kvs {
                    if let Some(id) = self.upsert(&kv) {
                        keep.insert(id);
                    }
                }
                let gone: Vec<InstanceId> = self
                    .desired
                    .keys()
                    .filter(|id| !keep.contains(*id))
                    .cloned()
                    .collect();
                for id in gone {
                    self.forget(&id).await;
                }
                self.synced = true;
                tracing::info!(revision, instances = self.desired.len(), "instances listed");
                self.reconcile().await;
            }
            Event::Apply(kv) => {
                if self.upsert(&kv).is_some() {
                    self.reconcile().await;
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
        // Fencing: a record written after a newer scheduler was elected
        // (its create revision is past that scheduler's token) must carry
        // at least that token. Records of an older, then-legitimate leader
        // keep running.
        if record.token < self.max_token && kv.create_revision > self.max_token {
            self.metrics.fenced();
            tracing::warn!(key = %kv.key, token = record.token, newest_token = self.max_token,
                "refusing a record from a fenced scheduler: its token {} is older than token {} seen before it was written",
                record.token, self.max_token);
            return None;
        }
        self.max_token = self.max_token.max(record.token);
        if record.worker != self.worker {
            return None;
        }
        match self.desired.get_mut(&id) {
            Some(t) => {
                // A renewal: new lease (the status moved with it), new expiry.
                t.record = record;
                t.lease = kv.lease;
            }
            None => {
                self.desired.insert(
                    id.clone(),
                    Tracked {
                        record,
                        lease: kv.lease,
                        container: None,
                        status: InstanceStatus::Starting,
                        address: None,
                        restarts: 0,
                        retry_at: None,
                        reported: None,
                        status_rev: 0,
                        seen: Instant::now(),
                    },
                );
            }
        }
        Some(id)
    }

    /// The record is gone (deleted or expired): remove its container now.
    async fn forget(&mut self, id: &InstanceId) {
        if let Some(c) = self.desired.remove(id).and_then(|t| t.container) {
            {
                match self.runtime.remove(&c).await {
                    Ok(()) => {
                        tracing::info!(instance = %id, container = %c, "removed the container of a deleted instance")
                    }
                    Err(e) => {
                        tracing::warn!(instance = %id, error = %e, "could not remove container; the sweep retries")
                    }
                }
            }
        }
    }

    /// One pass: Docker's view against the desired set.
    async fn reconcile(&mut self) {
        let observed = match self.runtime.list().await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list containers");
                return;
            }
        };
        self.check_firewall().await;
        self.pin_neighbours().await;
        let mut by_instance: BTreeMap<String, Vec<Observed>> = BTreeMap::new();
        for o in observed {
            by_instance.entry(o.instance.clone()).or_default().push(o);
        }
        // Orphans: containers of ours without a record (only once we know all records).
        if self.synced {
            for (instance, containers) in &by_instance {
                let wanted = InstanceId::parse(instance)
                    .ok()
                    .and_then(|id| self.desired.get(&id));
                for c in containers {
                    let ours = wanted
                        .is_some_and(|t| t.container.as_deref().is_none_or(|mine| mine == c.id));
                    if !ours {
                        match self.runtime.remove(&c.id).await {
                            Ok(()) => {
                                self.metrics.orphan_removed();
                                tracing::info!(container = %c.id, instance = %instance, "removed an orphan container");
                            }
                            Err(e) => {
                                tracing::warn!(container = %c.id, error = %e, "could not remove orphan")
                            }
                        }
                    }
                }
            }
        }
        let ids: Vec<InstanceId> = self.desired.keys().cloned().collect();
        for id in ids {
            let seen = by_instance
                .get(id.as_str())
                .and_then(|cs| cs.first().cloned());
            self.step(&id, seen).await;
            self.report(&id).await;
        }
        self.metrics
            .set_states(self.desired.values().map(|t| &t.status));
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

    /// Moves one instance towards running.
    async fn step(&mut self, id: &InstanceId, seen: Option<Observed>) {
        let (max_restarts, host_safe) = (self.max_restarts, self.host_safe);
        let Some(t) = self.desired.get_mut(id) else {
            return;
        };
        if matches!(t.status, InstanceStatus::Failed { .. }) {
            return;
        }
        if t.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        match seen {
            Some(o) if o.running && o.address.is_some() => {
                if t.container.is_none() {
                    tracing::info!(instance = %id, container = %o.id, "adopted a running container");
                }
                t.container = Some(o.id);
                t.address = o.address;
                if t.status != InstanceStatus::Running {
                    self.metrics.reconciled(t.seen.elapsed());
                }
                t.status = InstanceStatus::Running;
                t.retry_at = None;
            }
            Some(o) if o.exited => {
                t.container = Some(o.id.clone());
                let code = self.runtime.exit_code(&o.id).await.unwrap_or(-1);
                if t.restarts >= max_restarts {
                    tracing::warn!(instance = %id, code, restarts = t.restarts, "container keeps exiting; giving up");
                    t.status = InstanceStatus::Failed {
                        reason: format!("exited with code {code} after {} restarts", t.restarts),
                    };
                    return;
                }
                let wait = backoff(t.restarts);
                if t.retry_at.is_none() {
                    // First sight of this exit: wait before restarting.
                    tracing::info!(instance = %id, code, restarts = t.restarts, ?wait, "container exited; restarting after backoff");
                    t.retry_at = Some(Instant::now() + wait);
                    t.status = InstanceStatus::Starting;
                    return;
                }
                t.restarts += 1;
                t.retry_at = None;
                if let Err(e) = self.runtime.start(&o.id).await {
                    tracing::warn!(instance = %id, error = %e, "restart failed");
                }
            }
            Some(o) if o.running => {
                // Running but without an address yet: look again next pass.
                t.container = Some(o.id);
            }
            Some(o) => {
                // Created but not started (e.g. the agent died in between).
                t.container = Some(o.id.clone());
                if let Err(e) = self.runtime.start(&o.id).await {
                    tracing::warn!(instance = %id, error = %e, "start failed");
                    t.retry_at = Some(Instant::now() + backoff(t.restarts));
                }
            }
            None if self.refusal.is_some() => {
                let why = self.refusal.clone().unwrap_or_default();
                t.status = InstanceStatus::Failed {
                    reason: format!("refused by the agent: {why}"),
                };
            }
            None if !host_safe => {
                // Nothing starts until the host firewall is in place.
                t.status = InstanceStatus::Starting;
            }
            None => {
                let mut record = t.record.clone();
                let vetted = match from_spec(&self.client, &self.ks, &record).await {
                    Ok(container) => secret_of(&self.client, &self.ks, &self.worker, &record)
                        .await
                        .map(|secret| (container, secret)),
                    Err(e) => Err(e),
                };
                let secret = match vetted {
                    Ok((container, secret)) => {
                        record.container = container;
                        secret
                    }
                    Err(Vetted::Gone) => {
                        tracing::debug!(instance = %id, "deleted before its container was made");
                        t.retry_at = Some(Instant::now() + backoff(t.restarts));
                        return;
                    }
                    Err(Vetted::Unavailable(e)) => {
                        tracing::warn!(instance = %id, error = %e, "cannot read the challenge's spec or the instance's secret; retrying");
                        t.retry_at = Some(Instant::now() + backoff(t.restarts));
                        t.restarts += 1;
                        return;
                    }
                    Err(refused) => {
                        let why = match refused {
                            Vetted::Refused(why) => {
                                tracing::error!(instance = %id, challenge = %record.challenge, spec_revision = record.spec_revision, %why, "refused: the record's container is not what its challenge's spec makes; no container started");
                                self.metrics.unlike_spec();
                                why
                            }
                            Vetted::NoSecret(why) | Vetted::Unavailable(why) => {
                                tracing::error!(instance = %id, %why, "refused: no container started");
                                why
                            }
                            Vetted::Gone => return,
                        };
                        t.status = InstanceStatus::Failed {
                            reason: format!("refused by the agent: {why}"),
                        };
                        return;
                    }
                };
                t.status = InstanceStatus::Starting;
                match self.runtime.create(&record, &secret).await {
                    Ok(container) => {
                        tracing::info!(instance = %id, %container, image = %record.container.image, "created container");
                        t.container = Some(container.clone());
                        if let Err(e) = self.runtime.start(&container).await {
                            tracing::warn!(instance = %id, error = %e, "start failed");
                            t.retry_at = Some(Instant::now() + backoff(t.restarts));
                            t.restarts += 1;
                        }
                    }
                    Err(RuntimeError::ImageMissing { image, reason }) => {
                        // Not retried: a missing image does not appear by itself.
                        tracing::warn!(instance = %id, %image, %reason, "image missing");
                        t.status = InstanceStatus::Failed {
                            reason: format!(
                                "image {image} is not on this worker and could not be pulled: {reason}"
                            ),
                        };
                    }
                    Err(e @ RuntimeError::NoDiskQuota { .. }) => {
                        // Not retried: the worker's storage does not change by itself.
                        tracing::warn!(instance = %id, error = %e, "cannot bound the writable layer");
                        t.status = InstanceStatus::Failed {
                            reason: e.to_string(),
                        };
                    }
                    Err(e) => {
                        tracing::warn!(instance = %id, error = %e, "create failed");
                        t.retry_at = Some(Instant::now() + backoff(t.restarts));
                        t.restarts += 1;
                    }
                }
            }
        }
    }

    /// Writes the status record when what etcd holds differs.
    async fn report(&mut self, id: &InstanceId) {
        let Some(t) = self.desired.get_mut(id) else {
            return;
        };
        let now = (t.status.clone(), t.container.clone(), t.address);
        if t.reported.as_ref() == Some(&now) || t.lease == 0 {
            return;
        }
        let record = StatusRecord {
            v: V1,
            instance: id.clone(),
            worker: self.worker.clone(),
            container_id: t.container.clone(),
            address: if t.status == InstanceStatus::Running {
                t.address
            } else {
                None
            },
            status: t.status.clone(),
            updated_at: tidegate_schema::time::unix_secs(),
        };
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
        match self.client.txn(txn).await {
            Ok(r) if r.succeeded() => {
                t.reported = Some(now);
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
            SecretRecord::decode(kv.value()).map_err(|e| Vetted::NoSecret(format!("{key}: {e}")))
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
async fn from_spec(
    client: &Client,
    ks: &Keyspace,
    record: &InstanceRecord,
) -> Result<ContainerSpec, Vetted> {
    if planted("spec-derived") {
        return Ok(record.container.clone());
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
    let made = ContainerSpec::of(&challenge.spec);
    let differences = record.container.differences(&made);
    if differences.is_empty() {
        Ok(made)
    } else {
        Err(Vetted::Refused(format!(
            "record vs spec: {}",
            differences.join("; ")
        )))
    }
}
