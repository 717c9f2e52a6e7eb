//! The edge admission hook: asked for every HTTP request and TCP connection
//! before it reaches an instance. [`PluginPolicy`] runs the challenge's
//! WebAssembly policy (`admit-connection`), loaded by digest from the
//! artifact store; challenges without one (or whose plugin does not
//! implement the hook) admit everything.

mod pool;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tidegate_plugin_host::{ArtifactStore, Digest, Host, Plugin};
use tidegate_schema::PolicyFallback;

/// What the policy sees of a connection.
#[derive(Debug, Clone)]
pub struct Connection<'a> {
    pub instance: &'a str,
    pub team: &'a str,
    pub challenge: &'a str,
    pub source: Option<IpAddr>,
    /// `http` or `tcp`.
    pub protocol: &'a str,
    /// The Host (HTTP) or SNI, when there is one.
    pub host: &'a str,
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused, with the reason shown to the player.
    Reject(String),
}

pub use pool::{DecisionCache, DecisionKey, DecisionPool};

/// An edge admission policy.
#[async_trait::async_trait]
pub trait EdgePolicy: Send + Sync {
    async fn admit(&self, conn: &Connection<'_>) -> Verdict;
}

/// Admits everything.
#[derive(Debug, Default)]
pub struct AllowAll;

#[async_trait::async_trait]
impl EdgePolicy for AllowAll {
    async fn admit(&self, _conn: &Connection<'_>) -> Verdict {
        Verdict::Allow
    }
}

/// A challenge's policy as etcd names it (the digest of its plugin and its
/// fallback): what the edge should apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyPointer {
    pub digest: String,
    pub fallback: PolicyFallback,
    /// Whether the plugin decides connections (`admit-connection` among
    /// the hooks it declared at upload; true when it declared none, which
    /// says nothing). One that does not is never waited for at the edge.
    pub admits: bool,
}

/// Challenge name → its policy, as the route watch last saw it.
pub type PolicyPointers = Arc<HashMap<String, PolicyPointer>>;

/// Where the route watch publishes the policies etcd names: the edge reads
/// them lock-free, and a change wakes the loader.
#[derive(Debug, Clone)]
pub struct PolicyFeed {
    now: Arc<ArcSwap<HashMap<String, PolicyPointer>>>,
    changed: tokio::sync::watch::Sender<()>,
}

impl Default for PolicyFeed {
    fn default() -> Self {
        Self {
            now: Arc::default(),
            changed: tokio::sync::watch::channel(()).0,
        }
    }
}

impl PolicyFeed {
    /// Publishes `pointers` if they differ from the last ones. Call it
    /// before storing the routes built with them.
    pub fn publish(&self, pointers: &HashMap<String, PolicyPointer>) {
        if **self.now.load() == *pointers {
            return;
        }
        self.now.store(Arc::new(pointers.clone()));
        self.changed.send_replace(());
    }

    fn get(&self) -> PolicyPointers {
        self.now.load_full()
    }
}

/// A challenge's policy as the edge applies it now.
#[derive(Debug)]
enum AppliedPolicy {
    Loaded {
        plugin: Arc<Plugin>,
        fallback: PolicyFallback,
    },
    /// The blob could not be fetched or compiled: the fallback applies.
    Broken {
        digest: String,
        error: String,
        fallback: PolicyFallback,
    },
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// The edge's measures (`tidegate_policy_*`); the request path adds to
/// counter handles taken once, so each decision costs one atomic add.
#[derive(Debug)]
pub struct EdgeMetrics {
    decisions: Family<DecisionLabel, Counter>,
    pub allowed: Counter,
    pub rejected: Counter,
    pub failed_allowed: Counter,
    pub failed_rejected: Counter,
    /// The pool was full: the fallback applied without a call.
    pub saturated_allowed: Counter,
    pub saturated_rejected: Counter,
    /// The policy is named but not compiled here yet (an agent start, a
    /// first policy): the fallback applied, and nothing failed.
    pub loading_allowed: Counter,
    pub loading_rejected: Counter,
    /// Answered from the decision cache.
    pub cached: Counter,
    /// Calls into plugins, and their total time in seconds.
    pub calls: Counter,
    pub call_seconds: Counter<f64, AtomicU64>,
    plugins: Family<StateLabel, Gauge>,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        let decisions = Family::<DecisionLabel, Counter>::default();
        let handle = |decision| decisions.get_or_create_owned(&DecisionLabel { decision });
        let plugins = Family::<StateLabel, Gauge>::default();
        for state in ["loaded", "broken"] {
            plugins.get_or_create(&StateLabel { state }).set(0);
        }
        Self {
            allowed: handle("allow"),
            rejected: handle("reject"),
            failed_allowed: handle("fallback_allow"),
            failed_rejected: handle("fallback_reject"),
            saturated_allowed: handle("saturated_allow"),
            saturated_rejected: handle("saturated_reject"),
            loading_allowed: handle("loading_allow"),
            loading_rejected: handle("loading_reject"),
            cached: handle("cached"),
            decisions,
            calls: Counter::default(),
            call_seconds: Counter::default(),
            plugins,
        }
    }
}

/// One log line a second at most, for lines a player can cause on every
/// request or connection (a flood of refused requests must not flood the
/// log, nor the disk under it): the lines left out in between are counted
/// and reported with the next one.
#[derive(Debug, Default)]
pub struct Throttle {
    /// Unix ms of the last line written.
    last_ms: AtomicU64,
    left_out: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Self {
        Self {
            last_ms: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may be
    /// written now; `None` (and one more left out) otherwise.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(tidegate_plugin_host::unix_ms())
    }

    fn admit_at(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= 1000
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.left_out.swap(0, Ordering::Relaxed))
        } else {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[test]
fn a_throttle_writes_one_line_a_second_and_counts_the_rest() {
    let t = Throttle::new();
    assert_eq!(t.admit_at(5_000), Some(0));
    for ms in [5_001, 5_500, 5_999] {
        assert_eq!(t.admit_at(ms), None);
    }
    assert_eq!(t.admit_at(6_000), Some(3));
    assert_eq!(t.admit_at(6_001), None);
    assert_eq!(t.admit_at(9_000), Some(1));
}

/// Runs each challenge's `admit-connection` plugin.
pub struct PluginPolicy {
    host: Host,
    store: Arc<dyn ArtifactStore>,
    applied: ArcSwap<HashMap<String, Arc<AppliedPolicy>>>,
    pub metrics: EdgeMetrics,
    /// The failure log line (one a second at most).
    failure_log: Throttle,
    /// Where plugin calls run.
    pool: DecisionPool,
    /// Recent decisions (answered from here within their TTL).
    cache: DecisionCache<Verdict>,
    /// The policies etcd names, as the route watch last saw them (published
    /// before the routes that use them): a challenge named here whose
    /// plugin is not compiled yet gets its fallback, never a free pass.
    wanted: PolicyFeed,
}

/// How edge decisions are made off the request path.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// Threads of the decision pool.
    pub threads: usize,
    /// Decisions that may wait for a thread; past it the fallback applies.
    pub queue: usize,
    /// The pool's CPU time as a share of one core; past it the fallback
    /// applies until it refills.
    pub cpu_share: f64,
    /// How long a decision is reused for the same instance, source and host.
    pub cache_ttl: Duration,
}

impl std::fmt::Debug for PluginPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginPolicy")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl PluginPolicy {
    pub fn new(
        host: Host,
        store: Arc<dyn ArtifactStore>,
        limits: EdgeLimits,
        wanted: PolicyFeed,
    ) -> std::io::Result<Self> {
        Ok(Self {
            host,
            store,
            applied: ArcSwap::default(),
            metrics: EdgeMetrics::default(),
            failure_log: Throttle::new(),
            pool: DecisionPool::new(limits.threads, limits.queue, limits.cpu_share)?,
            cache: DecisionCache::new(limits.cache_ttl),
            wanted,
        })
    }

    /// Keeps the loaded plugins equal to `wanted` forever: a new digest is
    /// fetched, verified and compiled off the runtime, then swapped in (the
    /// old plugin serves until then); a broken one is retried every 5 s.
    pub async fn run(self: Arc<Self>) {
        let mut wanted = self.wanted.changed.subscribe();
        loop {
            wanted.mark_unchanged();
            let current = self.wanted.get();
            let me = self.clone();
            let broken = tokio::task::spawn_blocking(move || me.sync(&current))
                .await
                .unwrap_or(true);
            let retry = async {
                if broken {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                changed = wanted.changed() => if changed.is_err() { return },
                () = retry => {}
            }
        }
    }

    /// One pass; returns whether any policy is broken.
    fn sync(&self, wanted: &HashMap<String, PolicyPointer>) -> bool {
        let old = self.applied.load_full();
        let mut next = HashMap::with_capacity(wanted.len());
        let mut broken = false;
        for (challenge, w) in wanted {
            let reusable = old.get(challenge).filter(|s| match s.as_ref() {
                AppliedPolicy::Loaded { plugin, fallback } => {
                    plugin.digest().as_str() == w.digest && *fallback == w.fallback
                }
                AppliedPolicy::Broken { .. } => false,
            });
            if let Some(applied) = reusable {
                next.insert(challenge.clone(), applied.clone());
                continue;
            }
            let applied = match self.load(&w.digest) {
                Ok(plugin) => {
                    tracing::info!(%challenge, digest = %w.digest, hooks = ?plugin.hook_names(),
                        "policy loaded");
                    AppliedPolicy::Loaded {
                        plugin,
                        fallback: w.fallback,
                    }
                }
                Err(error) => {
                    broken = true;
                    tracing::warn!(%challenge, digest = %w.digest, %error, fallback = ?w.fallback,
                        "policy unavailable; its fallback applies at the edge (retrying)");
                    AppliedPolicy::Broken {
                        digest: w.digest.clone(),
                        error: error.to_string(),
                        fallback: w.fallback,
                    }
                }
            };
            next.insert(challenge.clone(), Arc::new(applied));
        }
        self.applied.store(Arc::new(next));
        let (n_loaded, n_broken) = self.loaded();
        for (state, n) in [("loaded", n_loaded), ("broken", n_broken)] {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            self.metrics
                .plugins
                .get_or_create(&StateLabel { state })
                .set(n);
        }
        // Compiled plugins nobody names any more are dropped.
        self.host
            .retain(&|d: &Digest| wanted.values().any(|w| w.digest == d.as_str()));
        broken
    }

    fn load(&self, digest: &str) -> Result<Arc<Plugin>, Unavailable> {
        let digest = Digest::parse(digest)?;
        if let Some(p) = self.host.get(&digest) {
            return Ok(p);
        }
        let bytes = self.store.get(&digest)?;
        Ok(self.host.load(&bytes)?)
    }

    /// Policies loaded now, and how many are broken.
    pub fn loaded(&self) -> (usize, usize) {
        let applied = self.applied.load();
        let broken = applied
            .values()
            .filter(|s| matches!(s.as_ref(), AppliedPolicy::Broken { .. }))
            .count();
        (applied.len() - broken, broken)
    }

    /// Every pool thread busy and the queue full: the fallback, at once.
    fn saturated(&self, fallback: PolicyFallback) -> Verdict {
        match fallback {
            PolicyFallback::Allow => {
                self.metrics.saturated_allowed.inc();
                Verdict::Allow
            }
            PolicyFallback::Deny => {
                self.metrics.saturated_rejected.inc();
                Verdict::Reject(
                    "the edge's policy calls are saturated; the challenge's policy_fallback is deny"
                        .into(),
                )
            }
        }
    }

    /// The fallback of a policy this agent has not compiled yet: counted
    /// apart from failures (every agent start goes through it).
    fn loading(&self, wanted: &PolicyPointer) -> Verdict {
        if !wanted.admits {
            return Verdict::Allow;
        }
        match wanted.fallback {
            PolicyFallback::Allow => {
                self.metrics.loading_allowed.inc();
                Verdict::Allow
            }
            PolicyFallback::Deny => {
                self.metrics.loading_rejected.inc();
                Verdict::Reject(format!(
                    "policy {} is not loaded at this agent yet; the challenge's policy_fallback is deny",
                    wanted.digest
                ))
            }
        }
    }

    fn fallback(&self, fallback: PolicyFallback, cause: String) -> Verdict {
        if let Some(left_out) = self.failure_log.admit() {
            tracing::warn!(%cause, ?fallback, left_out, "policy failed at the edge; applying the fallback (left_out: lines like it in the last second)");
        }
        match fallback {
            PolicyFallback::Allow => {
                self.metrics.failed_allowed.inc();
                Verdict::Allow
            }
            PolicyFallback::Deny => {
                self.metrics.failed_rejected.inc();
                Verdict::Reject(format!("{cause}; the challenge's policy_fallback is deny"))
            }
        }
    }

    /// Registers `tidegate_policy_*` (in the `tidegate_policy` prefix registry).
    pub fn register(&self, registry: &mut Registry) {
        let m = &self.metrics;
        registry.register(
            "edge_decisions",
            "admit-connection decisions at this agent",
            m.decisions.clone(),
        );
        registry.register("calls", "Plugin calls made at this agent", m.calls.clone());
        registry.register(
            "call_seconds",
            "Time spent in plugin calls",
            m.call_seconds.clone(),
        );
        registry.register(
            "plugins",
            "Challenges' policies at this agent by state",
            m.plugins.clone(),
        );
    }
}

/// Why a policy could not be loaded at the edge (its fallback applies).
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    #[error(transparent)]
    Digest(#[from] tidegate_plugin_host::DigestError),
    #[error(transparent)]
    Store(#[from] tidegate_plugin_host::StoreError),
    #[error(transparent)]
    Compile(#[from] tidegate_plugin_host::LoadError),
}

#[async_trait::async_trait]
impl EdgePolicy for PluginPolicy {
    async fn admit(&self, conn: &Connection<'_>) -> Verdict {
        let policy = {
            let applied = self.applied.load();
            let Some(policy) = applied.get(conn.challenge) else {
                // Not compiled here yet (the agent just started, or the
                // challenge just got its first policy): its fallback, as
                // for a plugin that cannot load.
                return match self.wanted.now.load().get(conn.challenge) {
                    Some(w) => self.loading(w),
                    None => Verdict::Allow,
                };
            };
            policy.clone()
        };
        let (plugin, fallback) = match policy.as_ref() {
            AppliedPolicy::Loaded { plugin, fallback } => (plugin.clone(), *fallback),
            AppliedPolicy::Broken {
                digest,
                error,
                fallback,
            } => {
                return self.fallback(*fallback, format!("policy {digest} unavailable: {error}"));
            }
        };
        let wit = tidegate_plugin_host::Connection {
            instance: conn.instance.to_string(),
            team: conn.team.to_string(),
            challenge: conn.challenge.to_string(),
            source: conn.source.map(|s| s.to_string()),
            protocol: if conn.protocol == "tcp" {
                tidegate_plugin_host::Protocol::Tcp
            } else {
                tidegate_plugin_host::Protocol::Http
            },
            host: conn.host.to_string(),
        };
        let key = DecisionKey {
            instance: conn.instance.to_string(),
            source: conn.source,
            host: conn.host.to_string(),
            protocol: if conn.protocol == "tcp" {
                "tcp"
            } else {
                "http"
            },
            policy: plugin.digest().clone(),
            fallback,
        };
        let now = std::time::Instant::now();
        if let Some(v) = self.cache.get(&key, now) {
            self.metrics.cached.inc();
            return v;
        }
        let call = self
            .pool
            .run(move || {
                let started = std::time::Instant::now();
                let answer = plugin.admit_connection(&wit);
                (answer, started.elapsed())
            })
            .await;
        let Some((answer, took)) = call else {
            return self.saturated(fallback);
        };
        if answer.is_some() {
            self.metrics.calls.inc();
            self.metrics.call_seconds.inc_by(took.as_secs_f64());
        }
        let verdict = match answer {
            None | Some(Ok(tidegate_plugin_host::Verdict::Allow)) => {
                self.metrics.allowed.inc();
                Verdict::Allow
            }
            Some(Ok(tidegate_plugin_host::Verdict::Reject(reason))) => {
                self.metrics.rejected.inc();
                Verdict::Reject(reason)
            }
            // A failing plugin's fallback is reused like a decision: a
            // flood against it costs one failed call per key and TTL.
            Some(Err(e)) => self.fallback(fallback, e.to_string()),
        };
        self.cache.put(key, verdict.clone(), now);
        verdict
    }
}

#[cfg(test)]
mod loading_tests {
    use super::*;
    use std::sync::{Mutex, mpsc};
    use tidegate_plugin_host::StoreError;

    /// A store whose reads wait until the test lets each one go, then find
    /// nothing: the time an agent spends fetching and compiling a plugin.
    #[derive(Debug)]
    struct HeldStore(Mutex<mpsc::Receiver<()>>);

    impl ArtifactStore for HeldStore {
        fn put(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
            Err(StoreError::Missing(Digest::of(bytes)))
        }
        fn get(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
            if let Ok(held) = self.0.lock() {
                let _ = held.recv();
            }
            Err(StoreError::Missing(digest.clone()))
        }
    }

    fn conn(challenge: &str) -> Connection<'_> {
        Connection {
            instance: "i-1",
            team: "t",
            challenge,
            source: None,
            protocol: "tcp",
            host: "",
        }
    }

    /// Between an agent learning a challenge's policy and compiling it, a
    /// connection gets the challenge's fallback: a deny challenge refuses,
    /// an allow one admits, both counted as `loading_*` (not as failures).
    /// A challenge with no policy admits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_named_policy_not_loaded_yet_applies_its_fallback() {
        let (release, held) = mpsc::channel();
        let feed = PolicyFeed::default();
        let host = Host::new(tidegate_plugin_host::Limits::default()).unwrap();
        let limits = EdgeLimits {
            threads: 1,
            queue: 4,
            cpu_share: 1.0,
            cache_ttl: Duration::ZERO,
        };
        let store = Arc::new(HeldStore(Mutex::new(held)));
        let policy = Arc::new(PluginPolicy::new(host, store, limits, feed.clone()).unwrap());
        tokio::spawn(policy.clone().run());
        let digest = Digest::of(b"a policy").as_str().to_string();
        let pointer = |fallback| PolicyPointer {
            digest: digest.clone(),
            fallback,
            admits: true,
        };
        let spawns_only = PolicyPointer {
            admits: false,
            ..pointer(PolicyFallback::Deny)
        };
        feed.publish(&HashMap::from([
            ("denied".to_string(), pointer(PolicyFallback::Deny)),
            ("open".to_string(), pointer(PolicyFallback::Allow)),
            ("spawns-only".to_string(), spawns_only),
        ]));
        // The store holds both reads: nothing is compiled.
        match policy.admit(&conn("denied")).await {
            Verdict::Reject(why) => assert!(why.contains("not loaded"), "{why}"),
            Verdict::Allow => panic!("a deny challenge's policy was skipped while it loaded"),
        }
        assert_eq!(policy.metrics.loading_rejected.get(), 1);
        assert_eq!(policy.admit(&conn("open")).await, Verdict::Allow);
        assert_eq!(policy.metrics.loading_allowed.get(), 1);
        assert_eq!(policy.metrics.failed_rejected.get(), 0);
        assert_eq!(policy.admit(&conn("free")).await, Verdict::Allow);
        // A plugin that decides no connection is not waited for.
        assert_eq!(policy.admit(&conn("spawns-only")).await, Verdict::Allow);
        assert_eq!(policy.metrics.loading_rejected.get(), 1);
        assert_eq!(policy.metrics.allowed.get(), 0);
        assert_eq!(policy.loaded(), (0, 0));
        // Released, the blob is missing: broken, and the fallback still holds.
        for _ in 0..3 {
            release.send(()).unwrap();
        }
        for _ in 0..200 {
            if policy.loaded() == (0, 3) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(policy.loaded(), (0, 3));
        match policy.admit(&conn("denied")).await {
            Verdict::Reject(why) => assert!(why.contains("unavailable"), "{why}"),
            Verdict::Allow => panic!("a broken deny policy admitted"),
        }
        assert_eq!(policy.metrics.failed_rejected.get(), 1);
        drop(release);
    }
}
