//! The route table every agent keeps: hostname → where to send the request.
//!
//! Fed by one watch per prefix this worker's etcd role may read (instances,
//! workers, challenges' policies, and this worker's own statuses: never
//! the key root, which holds other workers' secrets). The
//! table is an immutable snapshot behind an `ArcSwap`: the request path
//! loads it without a lock; the watch task builds the next one and swaps it
//! in after each batch of events.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;

use arc_swap::ArcSwap;
use etcd_client::Client;
use tidegate_etcd::{EtcdHealth, Event, Kv, Watcher};
use tidegate_schema::config::planted;
use tidegate_schema::spec::HttpMode;
use tidegate_schema::{
    ChallengeRecord, InstanceId, InstanceRecord, InstanceStatus, Key, Keyspace, Kind, ServiceName,
    StatusRecord, WorkerId, WorkerRecord,
};

use crate::metrics::traffic::InstanceTraffic;
use crate::policy::{PolicyFeed, PolicyPointer};

/// Where a hostname's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The instance runs here: its container's address and port.
    Local(SocketAddr),
    /// Another worker owns it: that agent's HTTP entry (it routes locally).
    Remote(SocketAddr),
    /// Known, but not running (yet, or any more).
    NotReady(String),
}

/// One HTTP route.
#[derive(Debug)]
pub struct Route {
    pub instance: InstanceId,
    pub team: String,
    pub challenge: String,
    pub target: Target,
    pub traffic: Arc<InstanceTraffic>,
    /// The challenge's `tcp_idle_timeout_secs`.
    pub tcp_idle: std::time::Duration,
    /// The challenge's `http_mode`, when its spec sets one.
    pub http_mode: Option<HttpMode>,
}

/// An immutable snapshot of every HTTP and TCP route.
#[derive(Debug, Default)]
pub struct RouteTable {
    pub by_host: HashMap<String, Arc<Route>>,
    /// Public TCP port → route; a remote target is the owner's `tcp_host` on the same port.
    pub by_port: HashMap<u16, Arc<Route>>,
    /// `{instance}-{port name}` (the first label of the SNI a player sends
    /// to `tls_tcp_entry`) → the same route as its public port.
    pub by_sni: HashMap<String, Arc<Route>>,
    /// Whether some challenge's spec sets `http_mode = "pinned"`.
    pub pinned_any: bool,
    /// The highest etcd revision its watches had delivered.
    pub revision: i64,
    /// Registered agents' addresses (this one's too), and for two minutes
    /// those of workers that left: hop claims are looked at only from them
    /// (see `tcp::hop`, `crate::hop`); a claim still needs its proof.
    pub agents: std::collections::HashSet<std::net::IpAddr>,
}

impl RouteTable {
    /// The route of a normalised hostname.
    pub fn get(&self, host: &str) -> Option<&Arc<Route>> {
        self.by_host.get(host)
    }
}

/// The shared, swappable table.
pub type SharedRoutes = Arc<ArcSwap<RouteTable>>;

/// The cluster as the watch has told it so far (instances, their status,
/// workers, challenges' policies): the source every route table is built from.
#[derive(Debug, Default)]
struct WatchedCluster {
    instances: HashMap<InstanceId, InstanceRecord>,
    statuses: HashMap<InstanceId, StatusRecord>,
    workers: HashMap<WorkerId, WorkerRecord>,
    /// Per-instance counters survive table rebuilds.
    traffic: HashMap<InstanceId, Arc<InstanceTraffic>>,
    /// Challenges with a policy plugin.
    policies: HashMap<String, PolicyPointer>,
    /// Challenges' `tcp_idle_timeout_secs` and `http_mode`.
    knobs: HashMap<String, Knobs>,
    /// Challenges whose record could not be read (written by hand): what
    /// was known of them is kept, a fresh list included.
    malformed: std::collections::HashSet<String>,
    /// Instances already logged for naming a port outside `tcp_ports`.
    off_range: std::collections::HashSet<InstanceId>,
    /// Addresses of workers that left, and when: still looked at for hop
    /// headers for [`FORMER_AGENT_GRACE`], so a header an agent sent while
    /// its membership lapsed (etcd lost quorum, its lease ran out) is taken
    /// off the stream instead of reaching the instance.
    former_agents: HashMap<std::net::IpAddr, std::time::Instant>,
}

/// What a challenge's spec sets for its routes.
#[derive(Debug, Clone, Copy)]
struct Knobs {
    tcp_idle_secs: u32,
    http_mode: Option<HttpMode>,
}

/// What players are told about a failed instance.
const FAILED: &str = "it failed; the organizers can see why";

/// How long a departed worker's address stays among [`RouteTable::agents`].
const FORMER_AGENT_GRACE: std::time::Duration = std::time::Duration::from_secs(120);

impl WatchedCluster {
    fn apply(&mut self, ks: &Keyspace, kv: &Kv) {
        match ks.parse(&kv.key) {
            Ok(Key::Instance(id)) => match kv.decode::<InstanceRecord>() {
                Ok(r) if r.id == id => {
                    self.instances.insert(id, r);
                }
                // The reconciler logs malformed records; here they simply route nowhere.
                _ => {
                    self.instances.remove(&id);
                }
            },
            // Only this worker's prefix is watched.
            Ok(Key::Status { instance, .. }) => match kv.decode::<StatusRecord>() {
                Ok(st) => {
                    self.statuses.insert(instance, st);
                }
                Err(_) => {
                    self.statuses.remove(&instance);
                }
            },
            Ok(Key::Worker(id)) => match kv.decode::<WorkerRecord>() {
                Ok(w) => {
                    self.workers.insert(id, w);
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping malformed worker record")
                }
            },
            Ok(Key::Challenge(name)) => match kv.decode::<ChallengeRecord>() {
                Ok(c) => {
                    self.malformed.remove(name.as_str());
                    self.knobs.insert(
                        name.to_string(),
                        Knobs {
                            tcp_idle_secs: c.spec.tcp_idle_timeout_secs,
                            http_mode: c.spec.http_mode,
                        },
                    );
                    match c.policy {
                        Some(p) => {
                            self.policies.insert(
                                name.to_string(),
                                PolicyPointer {
                                    admits: p.hooks.is_empty()
                                        || p.hooks.iter().any(|h| h == "admit-connection"),
                                    digest: p.digest,
                                    fallback: c.spec.policy_fallback,
                                },
                            );
                        }
                        None => {
                            self.policies.remove(name.as_str());
                        }
                    }
                }
                Err(e) => {
                    // Keep what we had: a hand-written bad record must not
                    // switch a challenge's policy off at the edge.
                    self.malformed.insert(name.to_string());
                    tracing::warn!(key = %kv.key, error = %e, "skipping malformed challenge record")
                }
            },
            _ => {}
        }
    }

    fn remove(&mut self, ks: &Keyspace, key: &str) {
        match ks.parse(key) {
            Ok(Key::Instance(id)) => {
                self.instances.remove(&id);
                self.traffic.remove(&id);
            }
            Ok(Key::Status { instance, .. }) => {
                self.statuses.remove(&instance);
            }
            Ok(Key::Worker(id)) => {
                if let Some(w) = self.workers.remove(&id) {
                    self.former_agents
                        .insert(w.address, std::time::Instant::now());
                }
            }
            Ok(Key::Challenge(name)) => {
                self.policies.remove(name.as_str());
                self.knobs.remove(name.as_str());
                self.malformed.remove(name.as_str());
            }
            _ => {}
        }
    }

    /// Where traffic for `rec`'s container port `target_port` (of
    /// `service`, or its one container) goes from this agent; `remote`
    /// gives the owner's entry for that traffic.
    fn target(
        &self,
        me: &WorkerId,
        id: &InstanceId,
        rec: &InstanceRecord,
        (service, target_port): (Option<&ServiceName>, u16),
        remote: impl Fn(&WorkerRecord) -> SocketAddr,
    ) -> Target {
        if &rec.worker != me {
            return match self.workers.get(&rec.worker) {
                Some(w) => Target::Remote(remote(w)),
                None => Target::NotReady(format!("its worker {} is not connected", rec.worker)),
            };
        }
        // A status written for the instance while it was pooled says
        // nothing of it once a team has it (its flag file may not hold the
        // team's flag yet): the owner reports it again after the claim.
        let status = self.statuses.get(id).filter(|st| st.team == rec.team);
        match status {
            Some(StatusRecord {
                status: InstanceStatus::Running,
                address: Some(addr),
                services,
                ..
            }) => {
                let addr = match service {
                    None => Some(*addr),
                    Some(name) => services.get(name).and_then(|s| s.address),
                };
                match addr {
                    Some(addr) => Target::Local(SocketAddr::new(addr, target_port)),
                    None => Target::NotReady("it is starting".into()),
                }
            }
            Some(StatusRecord {
                // Players see this text (the 503 page): the reason, which
                // may name images, specs and exit codes, stays with the
                // organizers (the API's status, the agent's log).
                status: InstanceStatus::Failed { .. },
                ..
            }) => Target::NotReady(FAILED.into()),
            _ => Target::NotReady("it is starting".into()),
        }
    }

    /// The table of this moment. A TCP port outside `tcp_ports` is not
    /// routed (an instance must never take a daemon's port, and the
    /// controllers only hand out `tcp_ports`): logged once per instance.
    fn build(
        &mut self,
        me: &WorkerId,
        revision: i64,
        tcp_ports: &RangeInclusive<u16>,
    ) -> RouteTable {
        let mut off_range = std::collections::HashSet::new();
        let mut by_host = HashMap::with_capacity(self.instances.len());
        let mut by_port = HashMap::new();
        let mut by_sni = HashMap::new();
        let mut pinned_any = false;
        for (id, rec) in &self.instances {
            // A pooled instance is reached by nothing until a team has it.
            if rec.is_pooled() {
                continue;
            }
            let traffic = self.traffic.entry(id.clone()).or_default().clone();
            let knobs = self.knobs.get(rec.challenge.as_str()).copied();
            pinned_any |= knobs.is_some_and(|k| k.http_mode == Some(HttpMode::Pinned));
            let route = |target| {
                Arc::new(Route {
                    instance: id.clone(),
                    team: rec.team_str().to_string(),
                    challenge: rec.challenge.to_string(),
                    target,
                    traffic: traffic.clone(),
                    tcp_idle: std::time::Duration::from_secs(u64::from(
                        knobs.map_or(tidegate_schema::spec::DEFAULT_TCP_IDLE_SECS, |k| {
                            k.tcp_idle_secs
                        }),
                    )),
                    http_mode: knobs.and_then(|k| k.http_mode),
                })
            };
            for r in &rec.http {
                let target = self.target(me, id, rec, (r.service.as_ref(), r.target_port), |w| {
                    w.http_entry
                });
                by_host.insert(r.hostname.to_string(), route(target));
            }
            for r in &rec.tcp {
                if !tcp_ports.contains(&r.port) && !planted("port-range") {
                    if !self.off_range.contains(id) {
                        tracing::warn!(instance = %id, port = r.port, tcp_ports = ?tcp_ports,
                            "not routing an instance's TCP port outside tcp_ports");
                    }
                    off_range.insert(id.clone());
                    continue;
                }
                let target = self.target(me, id, rec, (r.service.as_ref(), r.target_port), |w| {
                    SocketAddr::new(w.tcp_host, r.port)
                });
                let route = route(target);
                by_sni.insert(format!("{id}-{}", r.port_name), route.clone());
                by_port.insert(r.port, route);
            }
        }
        self.off_range = off_range;
        RouteTable {
            by_host,
            by_port,
            by_sni,
            pinned_any,
            revision,
            agents: {
                self.former_agents
                    .retain(|_, left| left.elapsed() < FORMER_AGENT_GRACE);
                self.workers
                    .values()
                    .map(|w| w.address)
                    .chain(self.former_agents.keys().copied())
                    .collect()
            },
        }
    }
}

/// What one of the route watches covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Instances,
    Workers,
    Policies,
    Statuses,
}

impl WatchedCluster {
    /// Takes `part` from `listed` (a fresh list of that part's prefix).
    fn replace(&mut self, part: Part, listed: WatchedCluster) {
        match part {
            Part::Instances => self.instances = listed.instances,
            Part::Workers => {
                for w in self.workers.values() {
                    if !listed.workers.values().any(|n| n.address == w.address) {
                        self.former_agents
                            .insert(w.address, std::time::Instant::now());
                    }
                }
                self.workers = listed.workers;
            }
            Part::Policies => {
                let mut listed = listed;
                // A record unreadable in the fresh list keeps the policy
                // this agent knew for it (a relist must not open it up).
                for name in &listed.malformed {
                    if let Some(p) = self.policies.get(name) {
                        listed.policies.entry(name.clone()).or_insert(p.clone());
                    }
                    if let Some(k) = self.knobs.get(name) {
                        listed.knobs.entry(name.clone()).or_insert(*k);
                    }
                }
                self.policies = listed.policies;
                self.knobs = listed.knobs;
                self.malformed = listed.malformed;
            }
            Part::Statuses => self.statuses = listed.statuses,
        }
    }
}

/// Keeps `routes` equal to etcd, forever: one watch per prefix this
/// worker may read, merged here; a table is built once every watch has
/// listed and none is relisting. TCP ports outside `tcp_ports` are left out.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    ks: Keyspace,
    me: WorkerId,
    tcp_ports: RangeInclusive<u16>,
    routes: SharedRoutes,
    builds: tokio::sync::watch::Sender<u64>,
    policies: PolicyFeed,
    etcd: Arc<EtcdHealth>,
) {
    let parts = [
        (Part::Instances, ks.prefix(Kind::Instances)),
        (Part::Workers, ks.prefix(Kind::Workers)),
        (Part::Policies, ks.prefix(Kind::Challenges)),
        (Part::Statuses, ks.worker_prefix(Kind::Statuses, &me)),
    ];
    // Each watch runs in its own task (a watcher's next() is only
    // cancel-safe between events) and sends (part, event, revision).
    // Held here: the tasks end when `run` does.
    let mut tasks = tokio::task::JoinSet::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    for (i, (_, prefix)) in parts.iter().enumerate() {
        let (tx, mut watcher) = (tx.clone(), Watcher::new(client.clone(), prefix.clone()));
        tasks.spawn(async move {
            loop {
                let event = watcher.next().await;
                if tx.send((i, event, watcher.revision())).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut known = WatchedCluster::default();
    let mut building: [Option<WatchedCluster>; 4] = Default::default();
    let mut listed = [false; 4];
    // Each watch's revision as it last said (lower after a relist of a
    // restored etcd: stored, not maximised).
    let mut revisions = [0i64; 4];
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut changed = false;
        // Apply every event already received before building one table.
        while let Some((i, e, rev)) = next.take() {
            revisions[i] = rev;
            match e {
                Event::Init => building[i] = Some(WatchedCluster::default()),
                Event::InitApply(kv) => {
                    if let Some(b) = building[i].as_mut() {
                        b.apply(&ks, &kv);
                    }
                }
                Event::InitDone { .. } => {
                    if let Some(b) = building[i].take() {
                        known.replace(parts[i].0, b);
                        listed[i] = true;
                        changed = true;
                    }
                }
                Event::Apply(kv) if building[i].is_none() => {
                    known.apply(&ks, &kv);
                    changed = true;
                }
                Event::Delete { key, .. } if building[i].is_none() => {
                    known.remove(&ks, &key);
                    changed = true;
                }
                _ => {}
            }
            next = rx.try_recv().ok();
        }
        let settled = listed.iter().all(|l| *l) && building.iter().all(Option::is_none);
        if changed && settled {
            let revision = revisions.iter().copied().max().unwrap_or(0);
            // Policies before the routes that use them: the edge applies a
            // named policy's fallback until its plugin is compiled, and a
            // route must never be served before its policy is named.
            policies.publish(&known.policies);
            let table = known.build(&me, revision, &tcp_ports);
            routes.store(Arc::new(table));
            builds.send_modify(|n| *n += 1);
            // The watch lag compares this agent's own writes (its statuses)
            // with what came back: that is the statuses watch.
            let statuses = parts.iter().position(|(p, _)| *p == Part::Statuses);
            etcd.delivered(statuses.map_or(revision, |i| revisions[i]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: serde_json::Value) -> Kv {
        Kv {
            key: key.into(),
            value: value.to_string().into_bytes(),
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        }
    }

    fn instance(id: &str, worker: &str) -> serde_json::Value {
        serde_json::json!({"v": 1, "id": id, "challenge": "web", "team": "t", "worker": worker, "token": 1,
            "created_at": 0, "expires_at": 10,
            "http": [{"port_name": "web", "hostname": format!("{id}.ctf.localhost"), "target_port": 8080}],
            "container": {"image": "x", "limits": {"memory_mib": 256, "cpus": 0.5, "pids": 128}}})
    }

    fn key(ks: &Keyspace, key: Key) -> String {
        ks.key(&key)
    }

    const PORTS: RangeInclusive<u16> = 20000..=29999;

    fn id(s: &str) -> InstanceId {
        InstanceId::parse(s).unwrap()
    }

    #[test]
    fn local_remote_and_not_ready() {
        let ks = Keyspace::default();
        let me = WorkerId::parse("a").unwrap();
        let mut k = WatchedCluster::default();
        for (i, worker) in [
            ("000000000a", "a"),
            ("000000000b", "b"),
            ("000000000c", "gone"),
        ] {
            k.apply(
                &ks,
                &kv(&key(&ks, Key::Instance(id(i))), instance(i, worker)),
            );
        }
        let b = Key::Worker(WorkerId::parse("b").unwrap());
        k.apply(&ks, &kv(&key(&ks, b), serde_json::json!({"v": 1, "id": "b", "address": "127.0.0.3",
            "http_entry": "127.0.0.3:8080", "tcp_host": "127.0.0.3", "capacity": 1, "version": "0", "started_at": 0})));
        let t = k.build(&me, 1, &PORTS);
        assert_eq!(
            t.get("000000000a.ctf.localhost").unwrap().target,
            Target::NotReady("it is starting".into())
        );
        assert_eq!(
            t.get("000000000b.ctf.localhost").unwrap().target,
            Target::Remote("127.0.0.3:8080".parse().unwrap())
        );
        assert!(matches!(
            t.get("000000000c.ctf.localhost").unwrap().target,
            Target::NotReady(_)
        ));
        let status = key(
            &ks,
            Key::Status {
                worker: me.clone(),
                instance: id("000000000a"),
            },
        );
        // A status written while the instance had no team (pooled) does
        // not route it once it has one: its owner reports it again.
        k.apply(&ks, &kv(&status, serde_json::json!({"v": 1, "instance": "000000000a",
            "worker": "a", "address": "198.19.0.9", "status": {"state": "running"}, "updated_at": 1})));
        assert!(matches!(
            k.build(&me, 2, &PORTS)
                .get("000000000a.ctf.localhost")
                .unwrap()
                .target,
            Target::NotReady(_)
        ));
        k.apply(&ks, &kv(&status, serde_json::json!({"v": 1, "instance": "000000000a",
            "worker": "a", "team": "t", "address": "198.19.0.9", "status": {"state": "running"}, "updated_at": 1})));
        let t = k.build(&me, 2, &PORTS);
        assert_eq!(
            t.get("000000000a.ctf.localhost").unwrap().target,
            Target::Local("198.19.0.9:8080".parse().unwrap())
        );
        // A failed instance: the players' text does not carry the reason.
        k.apply(&ks, &kv(&status, serde_json::json!({"v": 1, "instance": "000000000a",
            "worker": "a", "team": "t", "status": {"state": "failed", "reason": "record vs spec: image"}, "updated_at": 1})));
        assert_eq!(
            k.build(&me, 3, &PORTS)
                .get("000000000a.ctf.localhost")
                .unwrap()
                .target,
            Target::NotReady(FAILED.into())
        );
        k.apply(&ks, &kv(&status, serde_json::json!({"v": 1, "instance": "000000000a",
            "worker": "a", "team": "t", "address": "198.19.0.9", "status": {"state": "running"}, "updated_at": 2})));
        // Traffic counters survive rebuilds; deletes drop the route.
        let s1 = t.get("000000000a.ctf.localhost").unwrap().traffic.clone();
        let t2 = k.build(&me, 3, &PORTS);
        assert!(Arc::ptr_eq(
            &s1,
            &t2.get("000000000a.ctf.localhost").unwrap().traffic
        ));
        k.remove(&ks, &key(&ks, Key::Instance(id("000000000a"))));
        assert!(
            k.build(&me, 4, &PORTS)
                .get("000000000a.ctf.localhost")
                .is_none()
        );
    }

    /// A challenge record made unreadable by hand keeps the policy the
    /// agent knew for it, through a fresh list too: a relist must not
    /// switch its policy off at the edge.
    #[test]
    fn an_unreadable_challenge_record_keeps_its_policy_through_a_relist() {
        let ks = Keyspace::default();
        let name = tidegate_schema::ChallengeName::parse("web").unwrap();
        let at = key(&ks, Key::Challenge(name));
        let digest = format!("sha256:{}", "a".repeat(64));
        let mut k = WatchedCluster::default();
        k.apply(
            &ks,
            &kv(
                &at,
                serde_json::json!({"v": 1, "name": "web",
            "spec": {"image": "x", "ports": [{"name": "web", "port": 8080, "protocol": "http"}],
                     "policy_fallback": "deny"},
            "policy": {"digest": digest}}),
            ),
        );
        assert_eq!(k.policies["web"].digest, digest);
        let bad = kv(
            &at,
            serde_json::json!({"v": 1, "name": "web", "spec": "not a spec"}),
        );
        k.apply(&ks, &bad);
        assert_eq!(k.policies["web"].digest, digest);
        // The watch fell behind and lists again: the record is still bad.
        let mut listed = WatchedCluster::default();
        listed.apply(&ks, &bad);
        k.replace(Part::Policies, listed);
        assert_eq!(k.policies["web"].digest, digest);
        assert_eq!(
            k.policies["web"].fallback,
            tidegate_schema::PolicyFallback::Deny
        );
        // Deleted: gone.
        k.remove(&ks, &at);
        assert!(k.policies.is_empty());
    }

    #[test]
    fn a_worker_that_left_stays_among_the_agents_for_a_while() {
        let ks = Keyspace::default();
        let me = WorkerId::parse("a").unwrap();
        let mut k = WatchedCluster::default();
        let b = key(&ks, Key::Worker(WorkerId::parse("b").unwrap()));
        k.apply(&ks, &kv(&b, serde_json::json!({"v": 1, "id": "b", "address": "127.0.0.3",
            "http_entry": "127.0.0.3:8080", "tcp_host": "127.0.0.3", "capacity": 1, "version": "0", "started_at": 0})));
        let addr: std::net::IpAddr = "127.0.0.3".parse().unwrap();
        assert!(k.build(&me, 1, &PORTS).agents.contains(&addr));
        // Its lease ran out (etcd lost quorum): a header it sent just now
        // must still be taken off the stream.
        k.remove(&ks, &b);
        assert!(k.build(&me, 2, &PORTS).agents.contains(&addr));
        k.former_agents
            .insert(addr, std::time::Instant::now() - FORMER_AGENT_GRACE);
        assert!(!k.build(&me, 3, &PORTS).agents.contains(&addr));
    }

    #[test]
    fn a_port_outside_tcp_ports_is_not_routed() {
        let ks = Keyspace::default();
        let me = WorkerId::parse("a").unwrap();
        let mut k = WatchedCluster::default();
        for (i, port) in [
            ("000000000a", 20001),
            ("000000000b", 2379),
            ("000000000c", 40000),
        ] {
            let mut rec = instance(i, "a");
            rec["tcp"] =
                serde_json::json!([{"port_name": "nc", "port": port, "target_port": 1337}]);
            k.apply(&ks, &kv(&key(&ks, Key::Instance(id(i))), rec));
        }
        let t = k.build(&me, 1, &PORTS);
        let ports: Vec<u16> = t.by_port.keys().copied().collect();
        assert_eq!(ports, vec![20001]);
        assert!(t.by_sni.contains_key("000000000a-nc"));
        assert!(!t.by_sni.contains_key("000000000b-nc"));
        assert_eq!(k.off_range.len(), 2);
    }
}
