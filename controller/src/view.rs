//! Every replica's in-memory view of the cluster, fed by one watch of the
//! whole key root: live workers, instances and their agent-reported status.
//! Placement, listings and sweeps read it; nothing here is authoritative
//! (every write is still a guarded Txn).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use etcd_client::Client;
use tidegate_etcd::{EtcdHealth, Event, Kv, Watcher};
use tidegate_schema::{
    InstanceId, InstanceRecord, InstanceStatus, Key, Keyspace, ServiceName, ServiceState,
    StatusRecord, WorkerId, WorkerRecord,
};

/// An instance as the view holds it.
#[derive(Debug, Clone)]
pub struct LiveInstance {
    pub record: InstanceRecord,
    pub lease: i64,
    pub mod_revision: i64,
}

#[derive(Debug, Default, Clone)]
pub struct View {
    pub workers: BTreeMap<WorkerId, WorkerRecord>,
    pub instances: BTreeMap<InstanceId, LiveInstance>,
    /// Statuses by instance and the worker whose prefix they were written
    /// under (only the record's own worker's counts: [`View::status_of`]).
    pub status: BTreeMap<(InstanceId, WorkerId), InstanceStatus>,
    /// Each service's state, of instances with services (same keys).
    pub services: BTreeMap<(InstanceId, WorkerId), BTreeMap<ServiceName, ServiceState>>,
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
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping malformed instance record")
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
                    self.status.insert(key, st.status);
                }
                Ok(_) => {
                    tracing::debug!(key = %kv.key, "skipping a status not written by the instance's worker")
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping malformed status record")
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
                    self.status.remove(&(id, gone.record.worker));
                }
            }
            Ok(Key::Status { worker, instance }) => {
                self.services.remove(&(instance.clone(), worker.clone()));
                self.status.remove(&(instance, worker));
            }
            _ => {}
        }
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

    /// The worker with the most free slots, preferring the one running the
    /// fewest instances of `challenge` (spreading it), then the lowest id;
    /// with `network` (a challenge with services), only workers with a
    /// free per-instance network.
    pub fn place(&self, challenge: &str, network: bool) -> Option<WorkerId> {
        self.workers
            .values()
            .filter_map(|w| {
                if network && self.networks_free(&w.id) == Some(0) {
                    return None;
                }
                let load = self.load(&w.id);
                let free = (w.capacity as usize).checked_sub(load).filter(|f| *f > 0)?;
                let same = self
                    .instances
                    .values()
                    .filter(|i| i.record.worker == w.id && i.record.challenge.as_str() == challenge)
                    .count();
                Some((std::cmp::Reverse(free), same, w.id.clone()))
            })
            .min()
            .map(|(_, _, id)| id)
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
    pub fn insert_own(&self, record: InstanceRecord, lease: i64, revision: i64) {
        self.lock().instances.insert(
            record.id.clone(),
            LiveInstance {
                record,
                lease,
                mod_revision: revision,
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
