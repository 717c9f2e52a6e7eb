//! The edge admission hook: asked for every HTTP request and TCP connection
//! before it reaches an instance. [`PluginPolicy`] runs the challenge's
//! WebAssembly policy (`admit-connection`), loaded by digest from the
//! artifact store; challenges without one (or whose plugin does not
//! implement the hook) admit everything.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
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

/// An edge admission policy.
pub trait EdgePolicy: Send + Sync {
    fn admit(&self, conn: &Connection<'_>) -> Verdict;
}

/// Admits everything.
#[derive(Debug, Default)]
pub struct AllowAll;

impl EdgePolicy for AllowAll {
    fn admit(&self, _conn: &Connection<'_>) -> Verdict {
        Verdict::Allow
    }
}

/// A challenge's policy as etcd names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub digest: String,
    pub fallback: PolicyFallback,
}

/// Challenge name → its policy, as the route watch last saw it.
pub type WantedPolicies = Arc<HashMap<String, Wanted>>;

/// A challenge's policy as the edge applies it.
#[derive(Debug)]
enum Slot {
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

/// Counters of edge decisions, for `/metrics`.
#[derive(Debug, Default)]
pub struct EdgeCounters {
    pub allowed: AtomicU64,
    pub rejected: AtomicU64,
    pub failed_allowed: AtomicU64,
    pub failed_rejected: AtomicU64,
    /// Calls into plugins and their total time (microseconds).
    pub calls: AtomicU64,
    pub call_micros: AtomicU64,
}

/// Runs each challenge's `admit-connection` plugin.
pub struct PluginPolicy {
    host: Host,
    store: Arc<dyn ArtifactStore>,
    slots: ArcSwap<HashMap<String, Arc<Slot>>>,
    pub counters: EdgeCounters,
    /// Unix ms of the last failure log line (one a second at most).
    last_failure_log: AtomicU64,
}

impl std::fmt::Debug for PluginPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginPolicy")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl PluginPolicy {
    pub fn new(host: Host, store: Arc<dyn ArtifactStore>) -> Self {
        Self {
            host,
            store,
            slots: ArcSwap::default(),
            counters: EdgeCounters::default(),
            last_failure_log: AtomicU64::new(0),
        }
    }

    /// Keeps the loaded plugins equal to `wanted` forever: a new digest is
    /// fetched, verified and compiled off the runtime, then swapped in (the
    /// old plugin serves until then); a broken one is retried every 5 s.
    pub async fn run(self: Arc<Self>, mut wanted: tokio::sync::watch::Receiver<WantedPolicies>) {
        loop {
            let current = wanted.borrow_and_update().clone();
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
    fn sync(&self, wanted: &HashMap<String, Wanted>) -> bool {
        let old = self.slots.load_full();
        let mut next = HashMap::with_capacity(wanted.len());
        let mut broken = false;
        for (challenge, w) in wanted {
            let reusable = old.get(challenge).filter(|s| match s.as_ref() {
                Slot::Loaded { plugin, fallback } => {
                    plugin.digest().as_str() == w.digest && *fallback == w.fallback
                }
                Slot::Broken { .. } => false,
            });
            if let Some(slot) = reusable {
                next.insert(challenge.clone(), slot.clone());
                continue;
            }
            let slot = match self.load(&w.digest) {
                Ok(plugin) => {
                    tracing::info!(%challenge, digest = %w.digest, hooks = ?plugin.hook_names(),
                        "policy loaded");
                    Slot::Loaded {
                        plugin,
                        fallback: w.fallback,
                    }
                }
                Err(error) => {
                    broken = true;
                    tracing::warn!(%challenge, digest = %w.digest, %error, fallback = ?w.fallback,
                        "policy unavailable; its fallback applies at the edge (retrying)");
                    Slot::Broken {
                        digest: w.digest.clone(),
                        error,
                        fallback: w.fallback,
                    }
                }
            };
            next.insert(challenge.clone(), Arc::new(slot));
        }
        self.slots.store(Arc::new(next));
        // Compiled plugins nobody names any more are dropped.
        self.host
            .retain(&|d: &Digest| wanted.values().any(|w| w.digest == d.as_str()));
        broken
    }

    fn load(&self, digest: &str) -> Result<Arc<Plugin>, String> {
        let digest = Digest::parse(digest)?;
        if let Some(p) = self.host.get(&digest) {
            return Ok(p);
        }
        let bytes = self.store.get(&digest).map_err(|e| e.to_string())?;
        self.host.load(&bytes).map_err(|e| e.to_string())
    }

    /// Policies loaded now, and how many are broken.
    pub fn loaded(&self) -> (usize, usize) {
        let slots = self.slots.load();
        let broken = slots
            .values()
            .filter(|s| matches!(s.as_ref(), Slot::Broken { .. }))
            .count();
        (slots.len() - broken, broken)
    }

    fn fallback(&self, fallback: PolicyFallback, cause: String) -> Verdict {
        let now = tidegate_plugin_host::unix_ms();
        let last = self.last_failure_log.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_failure_log
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%cause, ?fallback, "policy failed at the edge; applying the fallback");
        }
        match fallback {
            PolicyFallback::Allow => {
                self.counters.failed_allowed.fetch_add(1, Ordering::Relaxed);
                Verdict::Allow
            }
            PolicyFallback::Deny => {
                self.counters
                    .failed_rejected
                    .fetch_add(1, Ordering::Relaxed);
                Verdict::Reject(format!("{cause}; the challenge's policy_fallback is deny"))
            }
        }
    }

    /// The Prometheus lines of the edge policies.
    pub fn render_metrics(&self, out: &mut String) {
        let c = &self.counters;
        let (loaded, broken) = self.loaded();
        let n = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        tidegate_schema::telemetry::counters(
            out,
            "tidegate_policy_edge_decisions_total",
            "admit-connection decisions at this agent.",
            "decision",
            &[
                ("allow", n(&c.allowed)),
                ("reject", n(&c.rejected)),
                ("fallback_allow", n(&c.failed_allowed)),
                ("fallback_reject", n(&c.failed_rejected)),
            ],
        );
        let _ = writeln!(
            out,
            "# HELP tidegate_policy_calls_total Plugin calls made at this agent.\n# TYPE tidegate_policy_calls_total counter\ntidegate_policy_calls_total {}\n# HELP tidegate_policy_call_seconds_total Time spent in plugin calls.\n# TYPE tidegate_policy_call_seconds_total counter\ntidegate_policy_call_seconds_total {:.6}",
            c.calls.load(Ordering::Relaxed),
            c.call_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "# HELP tidegate_policy_plugins Challenges' policies at this agent by state.\n# TYPE tidegate_policy_plugins gauge\ntidegate_policy_plugins{{state=\"loaded\"}} {loaded}\ntidegate_policy_plugins{{state=\"broken\"}} {broken}"
        );
    }
}

impl EdgePolicy for PluginPolicy {
    fn admit(&self, conn: &Connection<'_>) -> Verdict {
        let slots = self.slots.load();
        let Some(slot) = slots.get(conn.challenge) else {
            return Verdict::Allow;
        };
        let (plugin, fallback) = match slot.as_ref() {
            Slot::Loaded { plugin, fallback } => (plugin, *fallback),
            Slot::Broken {
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
        let started = std::time::Instant::now();
        let answer = plugin.admit_connection(&wit);
        if answer.is_some() {
            self.counters.calls.fetch_add(1, Ordering::Relaxed);
            self.counters
                .call_micros
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        match answer {
            None | Some(Ok(tidegate_plugin_host::Verdict::Allow)) => {
                self.counters.allowed.fetch_add(1, Ordering::Relaxed);
                Verdict::Allow
            }
            Some(Ok(tidegate_plugin_host::Verdict::Reject(reason))) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                Verdict::Reject(reason)
            }
            Some(Err(e)) => self.fallback(fallback, e.to_string()),
        }
    }
}
