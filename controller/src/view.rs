//! Every replica's in-memory view of the cluster, fed by one watch of the
//! whole key root: live workers, instances and their agent-reported status.
//! Placement, listings and sweeps read it; nothing here is authoritative
//! (every write is still a guarded Txn).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use etcd_client::Client;
use tidegate_etcd::{EtcdHealth, Event, Kv, Watcher};
use tidegate_schema::config::Placement;
use tidegate_schema::{
    ChallengeName, ChallengeRecord, InstanceId, InstanceRecord, InstanceStatus, Key, Keyspace,
    QueuedRecord, Resources, ServiceName, ServiceState, Shortfall, SolverHealth, StatusRecord,
    TeamId, WorkerId, WorkerRecord,
};

/// Why no worker can take an instance now, the most telling reason first
/// (a worker with slots but not the memory says more than one without
/// slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NoRoom {
    /// Every worker is at its `capacity`.
    Slots,
    /// Workers with slots have no free per-instance network.
    Network,
    /// Workers with slots lack this resource (the last such worker's).
    Resources(Shortfall),
}

/// How placement ranks a worker (lowest first): memory left (in the
/// order the mode wants), instances of the same challenge, free slots.
type PlaceKey = (u64, usize, std::cmp::Reverse<usize>);

/// An instance as the view holds it.
#[derive(Debug, Clone)]
pub struct LiveInstance {
    pub record: InstanceRecord,
    pub lease: i64,
    pub mod_revision: i64,
    /// The revision that created the key: orders instances made in the
    /// same second.
    pub create_revision: i64,
}

/// A spawn waiting for room, as the view holds it.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub record: QueuedRecord,
    /// Its hold lease (renewed by each poll of its id).
    pub lease: i64,
    /// Its arrival: the etcd revision that created its key.
    pub create_revision: i64,
    pub mod_revision: i64,
}

#[derive(Debug, Default, Clone)]
pub struct View {
    /// Spawns waiting for room, one per challenge and team.
    pub queue: BTreeMap<(ChallengeName, TeamId), Waiting>,
    pub workers: BTreeMap<WorkerId, WorkerRecord>,
    pub instances: BTreeMap<InstanceId, LiveInstance>,
    /// Statuses by instance and the worker whose prefix they were written
    /// under (only the record's own worker's counts: [`View::status_of`]).
    pub status: BTreeMap<(InstanceId, WorkerId), InstanceStatus>,
    /// Each status key's mod revision (same keys): a claim expects the
    /// status it saw.
    pub status_rev: BTreeMap<(InstanceId, WorkerId), i64>,
    /// Each service's state, of instances with services (same keys).
    pub services: BTreeMap<(InstanceId, WorkerId), BTreeMap<ServiceName, ServiceState>>,
    /// The last solver check of each instance whose challenge has a solver
    /// (same keys).
    pub solver: BTreeMap<(InstanceId, WorkerId), SolverHealth>,
    /// The spec revision each status says the instance's containers were
    /// made from (same keys; absent: 0, an agent from before rollouts).
    pub status_spec: BTreeMap<(InstanceId, WorkerId), i64>,
    /// Challenges with a warm pool, and their record's mod revision.
    pub pools: BTreeMap<ChallengeName, (ChallengeRecord, i64)>,
    /// The etcd revision the view reflects.
    pub revision: i64,
}

impl View {
    fn apply(&mut self, ks: &Keyspace, kv: &Kv) {
        let Ok(key) = kv.parse_key(ks) else { return };
        match key {
            Key::Worker(id) => match kv.decode::<WorkerRecord>() {
                Ok(w) => {
                    self.workers.insert(id, w);
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping malformed worker record")
                }
            },
            Key::Instance(id) => match kv.decode::<InstanceRecord>() {
                Ok(record) => {
                    self.instances.insert(
                        id,
                        LiveInstance {
                            record,
                            lease: kv.lease,
                            mod_revision: kv.mod_revision,
                            create_revision: kv.create_revision,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping malformed instance record")
                }
            },
            Key::Challenge(name) => match kv.decode::<ChallengeRecord>() {
                Ok(c) if c.name == name && c.spec.pool.is_some() => {
                    self.pools.insert(name, (c, kv.mod_revision));
                }
                Ok(_) => {
                    self.pools.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping malformed challenge record")
                }
            },
            Key::Status { worker, instance } => match kv.decode::<StatusRecord>() {
                // Only the record's own worker's (the record comes first:
                // instances/ sorts before status/, and is written first).
                Ok(st)
                    if self
                        .instances
                        .get(&instance)
                        .is_some_and(|i| i.record.worker == worker) =>
                {
                    let key = (instance, worker);
                    if st.services.is_empty() {
                        self.services.remove(&key);
                    } else {
                        let states = st.services.iter().map(|(n, s)| (n.clone(), s.state));
                        self.services.insert(key.clone(), states.collect());
                    }
                    match st.solver {
                        Some(health) => self.solver.insert(key.clone(), health),
                        None => self.solver.remove(&key),
                    };
                    self.status_rev.insert(key.clone(), kv.mod_revision);
                    self.status_spec.insert(key.clone(), st.spec_revision);
                    self.status.insert(key, st.status);
                }
                Ok(_) => {
                    tracing::debug!(key = %kv.key, "skipping a status not written by the instance's worker")
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping malformed status record")
                }
            },
            Key::Queued { challenge, team } => match kv.decode::<QueuedRecord>() {
                Ok(record) if record.challenge == challenge && record.team == team => {
                    self.queue.insert(
                        (challenge, team),
                        Waiting {
                            record,
                            lease: kv.lease,
                            create_revision: kv.create_revision,
                            mod_revision: kv.mod_revision,
                        },
                    );
                }
                Ok(_) => {
                    tracing::warn!(key = %kv.key, "skipping a queue entry whose challenge or team is not its key's")
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping malformed queue entry")
                }
            },
            _ => {}
        }
    }

    fn remove(&mut self, ks: &Keyspace, key: &str) {
        match ks.parse(key) {
            Ok(Key::Worker(id)) => {
                self.workers.remove(&id);
            }
            Ok(Key::Instance(id)) => {
                if let Some(gone) = self.instances.remove(&id) {
                    self.services
                        .remove(&(id.clone(), gone.record.worker.clone()));
                    self.status_rev
                        .remove(&(id.clone(), gone.record.worker.clone()));
                    self.solver
                        .remove(&(id.clone(), gone.record.worker.clone()));
                    self.status_spec
                        .remove(&(id.clone(), gone.record.worker.clone()));
                    self.status.remove(&(id, gone.record.worker));
                }
            }
            Ok(Key::Status { worker, instance }) => {
                self.services.remove(&(instance.clone(), worker.clone()));
                self.status_rev.remove(&(instance.clone(), worker.clone()));
                self.solver.remove(&(instance.clone(), worker.clone()));
                self.status_spec.remove(&(instance.clone(), worker.clone()));
                self.status.remove(&(instance, worker));
            }
            Ok(Key::Queued { challenge, team }) => {
                self.queue.remove(&(challenge, team));
            }
            Ok(Key::Challenge(name)) => {
                self.pools.remove(&name);
            }
            _ => {}
        }
    }

    /// The queue in the order the scheduler admits it: round-robin across
    /// teams (every team's first place, then every team's second, ...),
    /// then by arrival.
    pub fn fair_order(&self) -> Vec<&Waiting> {
        let mut order: Vec<&Waiting> = self.queue.values().collect();
        order.sort_by_key(|w| (w.record.round, w.create_revision));
        order
    }

    /// The round a new place of `team` joins: 1 + the places it holds and
    /// the instances it runs (a team already served waits behind those
    /// that are not; leaving and joining again gains nothing).
    pub fn next_round(&self, team: &TeamId) -> u32 {
        let held = self
            .queue
            .values()
            .filter(|w| w.record.team == *team)
            .count()
            + self
                .instances
                .values()
                .filter(|i| i.record.is_of(team))
                .count();
        u32::try_from(held).unwrap_or(u32::MAX).saturating_add(1)
    }

    /// A queued spawn by its id.
    pub fn waiting(&self, id: &InstanceId) -> Option<Waiting> {
        self.queue.values().find(|w| &w.record.id == id).cloned()
    }

    /// A place's 1-based position among its challenge's places in the fair
    /// order, and how many places its challenge has (what its team is
    /// told: nothing about other challenges).
    pub fn position(&self, w: &Waiting) -> (usize, usize) {
        let (ranked, totals) = self.ranked();
        let position = ranked
            .iter()
            .find(|(other, _)| other.record.id == w.record.id)
            .map_or(1, |(_, p)| *p);
        (
            position,
            totals.get(&w.record.challenge).copied().unwrap_or(1),
        )
    }

    /// The fair order with each place's position among its challenge's
    /// places, and how many places each challenge has (one sort for all).
    pub fn ranked(&self) -> (Vec<(&Waiting, usize)>, BTreeMap<&ChallengeName, usize>) {
        let mut totals: BTreeMap<&ChallengeName, usize> = BTreeMap::new();
        let ranked = self
            .fair_order()
            .into_iter()
            .map(|w| {
                let n = totals.entry(&w.record.challenge).or_default();
                *n += 1;
                (w, *n)
            })
            .collect();
        (ranked, totals)
    }

    /// The pooled instances of `challenge` (no team yet).
    pub fn pooled(&self, challenge: &ChallengeName) -> Vec<&LiveInstance> {
        self.instances
            .values()
            .filter(|i| i.record.is_pooled() && &i.record.challenge == challenge)
            .collect()
    }

    /// Live instances per worker.
    pub fn load(&self, worker: &WorkerId) -> usize {
        self.instances
            .values()
            .filter(|i| &i.record.worker == worker)
            .count()
    }

    /// Per-instance networks `worker` has left: the total it reports less
    /// the instances with services placed on it (counting spawns it has
    /// not seen yet). None: it has not said (before its first pass).
    pub fn networks_free(&self, worker: &WorkerId) -> Option<usize> {
        let n = self.workers.get(worker)?.networks?;
        let total = n.used as usize + n.free as usize;
        let placed = self
            .instances
            .values()
            .filter(|i| &i.record.worker == worker && i.record.container.is_none())
            .count();
        Some(total.saturating_sub(placed))
    }

    /// What the live instances on `worker` take, summed.
    pub fn committed(&self, worker: &WorkerId) -> Resources {
        self.instances
            .values()
            .filter(|i| &i.record.worker == worker)
            .map(|i| Resources::of_record(&i.record))
            .fold(Resources::default(), Resources::plus)
    }

    /// Where an instance of `challenge` taking `need` goes: among the
    /// workers with a free slot, room for `need` in what they give
    /// instances (`allocatable`; an agent that does not say is placed by
    /// slots alone) and, with `network` (a challenge with services), a
    /// free per-instance network. `Spread` takes the one with the most
    /// memory left (by share of its allocatable), then the fewest of that
    /// challenge, then the most free slots; `Pack` the one with the least
    /// memory left. Ties go to the lowest id. Why none fits otherwise.
    pub fn place(
        &self,
        challenge: &str,
        network: bool,
        need: Resources,
        mode: Placement,
    ) -> Result<WorkerId, NoRoom> {
        let mut why = NoRoom::Slots;
        let mut best: Option<(PlaceKey, WorkerId)> = None;
        for w in self.workers.values() {
            let load = self.load(&w.id);
            let Some(free) = (w.capacity as usize).checked_sub(load).filter(|f| *f > 0) else {
                continue;
            };
            if network && self.networks_free(&w.id) == Some(0) {
                why = why.max(NoRoom::Network);
                continue;
            }
            // Memory left after this instance, in thousandths of the worker's.
            let left = match w.allocatable {
                Some(room) => {
                    let left = room.minus(self.committed(&w.id));
                    if let Some(short) = need.short_of(left) {
                        why = why.max(NoRoom::Resources(short));
                        continue;
                    }
                    // `short_of` checked need <= left; saturating: a worker
                    // may say any amount.
                    (left.memory_mib - need.memory_mib).saturating_mul(1000)
                        / room.memory_mib.max(1)
                }
                // An agent that does not say what it gives: by free slots,
                // as before resources were placed on.
                None => free as u64,
            };
            let same = self
                .instances
                .values()
                .filter(|i| i.record.worker == w.id && i.record.challenge.as_str() == challenge)
                .count();
            let key = match mode {
                Placement::Spread => (u64::MAX - left, same, std::cmp::Reverse(free)),
                Placement::Pack => (left, same, std::cmp::Reverse(free)),
            };
            if best.as_ref().is_none_or(|(k, _)| key < *k) {
                best = Some((key, w.id.clone()));
            }
        }
        best.map(|(_, id)| id).ok_or(why)
    }

    /// The resource no registered worker has enough of for `need` even
    /// empty (the most any of them gives), if so: such an instance can
    /// never be placed. None when one could, or any worker does not say.
    pub fn too_large(&self, need: Resources) -> Option<Shortfall> {
        // An agent that does not say what it gives may take anything.
        if self.workers.values().any(|w| w.allocatable.is_none()) {
            return None;
        }
        let sizes: Vec<Resources> = self
            .workers
            .values()
            .filter_map(|w| w.allocatable)
            .collect();
        if sizes.is_empty() || sizes.iter().any(|room| need.short_of(*room).is_none()) {
            return None;
        }
        let largest = sizes.iter().fold(Resources::default(), |m, r| Resources {
            memory_mib: m.memory_mib.max(r.memory_mib),
            millicpus: m.millicpus.max(r.millicpus),
            pids: m.pids.max(r.pids),
        });
        // The largest worker may fit each resource alone; name one that
        // stops it (of the first worker, when every resource fits somewhere).
        need.short_of(largest)
            .or_else(|| sizes.iter().find_map(|room| need.short_of(*room)))
    }

    /// An instance's status as its own worker wrote it; a status under
    /// another worker's prefix (that worker lying) is not looked at.
    pub fn status_of(&self, id: &InstanceId) -> Option<&InstanceStatus> {
        let owner = self.instances.get(id)?.record.worker.clone();
        self.status.get(&(id.clone(), owner))
    }

    /// Each service's state of an instance with services, as its own
    /// worker wrote it (empty before it did, and for one-image instances).
    pub fn services_of(&self, id: &InstanceId) -> BTreeMap<ServiceName, ServiceState> {
        let Some(i) = self.instances.get(id) else {
            return BTreeMap::new();
        };
        self.services
            .get(&(id.clone(), i.record.worker.clone()))
            .cloned()
            .unwrap_or_default()
    }

    /// The last solver check of an instance, as its own worker wrote it.
    /// The spec revision an instance's own worker says its containers run
    /// (0: not said).
    pub fn running_revision(&self, id: &InstanceId) -> i64 {
        self.instances.get(id).map_or(0, |i| {
            self.status_spec
                .get(&(id.clone(), i.record.worker.clone()))
                .copied()
                .unwrap_or(0)
        })
    }

    pub fn solver_of(&self, id: &InstanceId) -> Option<&SolverHealth> {
        let owner = self.instances.get(id)?.record.worker.clone();
        self.solver.get(&(id.clone(), owner))
    }

    /// The status text of an instance for API answers.
    pub fn status_text(&self, id: &InstanceId) -> String {
        match self.status_of(id) {
            None => "pending".into(),
            Some(InstanceStatus::Starting) => "starting".into(),
            Some(InstanceStatus::Running) => "running".into(),
            Some(InstanceStatus::Failed { reason }) => format!("failed: {reason}"),
        }
    }
}

/// The shared view; updated by [`run`] and by the scheduler after its own writes.
#[derive(Debug, Clone, Default)]
pub struct SharedView(Arc<Mutex<View>>);

impl SharedView {
    pub fn lock(&self) -> MutexGuard<'_, View> {
        // A panic while holding the lock cannot leave the maps half-updated
        // in a way that matters: every entry is replaced whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an instance this replica just wrote, before its watch event arrives.
    /// A pooled instance claimed has no status until its agent writes the
    /// team's flag and reports it again (the claim deleted it).
    pub fn insert_own(&self, record: InstanceRecord, lease: i64, revision: i64) {
        let mut view = self.lock();
        // The watch got there first: it holds this write and what followed.
        if view.revision >= revision {
            return;
        }
        let key = (record.id.clone(), record.worker.clone());
        view.status.remove(&key);
        view.services.remove(&key);
        view.solver.remove(&key);
        view.status_rev.remove(&key);
        view.status_spec.remove(&key);
        let create_revision = view
            .instances
            .get(&record.id)
            .map_or(revision, |i| i.create_revision);
        view.instances.insert(
            record.id.clone(),
            LiveInstance {
                record,
                lease,
                mod_revision: revision,
                create_revision,
            },
        );
    }
}

/// Keeps `view` equal to etcd under the key root, forever.
pub async fn run(client: Client, ks: Keyspace, view: SharedView, etcd: Arc<EtcdHealth>) {
    let prefix = ks.root_prefix();
    let mut watcher = Watcher::new(client, prefix);
    let mut building: Option<View> = None;
    loop {
        match watcher.next().await {
            Event::Init => building = Some(View::default()),
            Event::InitApply(kv) => {
                if let Some(b) = building.as_mut() {
                    b.apply(&ks, &kv);
                }
            }
            Event::InitDone { revision } => {
                if let Some(mut b) = building.take() {
                    b.revision = revision;
                    *view.lock() = b;
                }
                etcd.delivered(revision);
            }
            Event::Apply(kv) => {
                let mut v = view.lock();
                v.apply(&ks, &kv);
                v.revision = v.revision.max(kv.mod_revision);
                etcd.delivered(v.revision);
            }
            Event::Delete { key, revision } => {
                let mut v = view.lock();
                v.remove(&ks, &key);
                v.revision = v.revision.max(revision);
                etcd.delivered(v.revision);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(ks: &Keyspace, key: &Key, value: serde_json::Value) -> Kv {
        Kv {
            key: ks.key(key),
            value: value.to_string().into_bytes(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    #[test]
    fn only_the_records_own_worker_sets_its_status() {
        let ks = Keyspace::default();
        let id = InstanceId::parse("000000000a").unwrap();
        let (w1, w2) = (
            WorkerId::parse("w1").unwrap(),
            WorkerId::parse("w2").unwrap(),
        );
        let mut v = View::default();
        let record = serde_json::json!({"v": 1, "id": "000000000a", "challenge": "web", "team": "t",
            "worker": "w1", "token": 1, "created_at": 0, "expires_at": 10,
            "http": [{"port_name": "web", "hostname": "000000000a.ctf.localhost", "target_port": 8080}],
            "container": {"image": "x", "limits": {"memory_mib": 256, "cpus": 0.5, "pids": 128}}});
        v.apply(&ks, &kv(&ks, &Key::Instance(id.clone()), record));
        let status = |worker: &WorkerId, state: &str| {
            let key = Key::Status {
                worker: worker.clone(),
                instance: id.clone(),
            };
            let value = serde_json::json!({"v": 1, "instance": "000000000a", "worker": worker.as_str(),
                "status": {"state": state, "reason": "x"}, "updated_at": 1});
            kv(&ks, &key, value)
        };
        // Another worker's word (a stolen credential) is not kept at all.
        v.apply(&ks, &status(&w2, "failed"));
        assert_eq!(v.status_text(&id), "pending");
        assert!(v.status.is_empty());
        v.apply(&ks, &status(&w1, "failed"));
        assert_eq!(v.status_text(&id), "failed: x");
        // The instance gone, its status goes too.
        v.remove(&ks, &ks.key(&Key::Instance(id.clone())));
        assert!(v.status.is_empty());
    }
}
