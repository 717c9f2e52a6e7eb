//! Challenges' policy plugins on the controller: upload (validate, dry-run,
//! store by digest), and the `admit-spawn`, `renew` and `on-idle` decisions
//! with the challenge's fallback when a plugin fails.
//!
//! Compiled plugins are cached by digest in the [`Host`]; a replica that
//! meets a digest it has not compiled (another replica took the upload)
//! fetches the blob from the artifact store, verifies and compiles it once.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tidegate_plugin_host::{
    ArtifactStore, CallError, Digest, DirStore, Host, Limits, LoadError, Plugin, SpawnDecision,
    SpawnRequest,
};
use tidegate_schema::telemetry::Histogram;
use tidegate_schema::{ChallengeRecord, PolicyFallback, PolicyRef};

/// The team name of the upload's dry-run request.
pub const DRY_RUN_TEAM: &str = "tidegate-dry-run";

/// The plugin machinery of one controller.
pub struct Policies {
    pub host: Host,
    pub store: Arc<dyn ArtifactStore>,
    pub calls: PluginCalls,
}

/// Bucket bounds (seconds) of plugin call latency.
const CALL_BUCKETS: [f64; 9] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];

/// The hooks the controller calls.
const HOOKS: [&str; 3] = ["admit-spawn", "renew", "on-idle"];

/// Latency and failures of plugin calls, per hook.
#[derive(Debug)]
pub struct PluginCalls {
    latency: [Histogram; 3],
    failures: [AtomicU64; 3],
}

impl Default for PluginCalls {
    fn default() -> Self {
        Self {
            latency: HOOKS.map(|_| Histogram::new(&CALL_BUCKETS)),
            failures: HOOKS.map(|_| AtomicU64::new(0)),
        }
    }
}

impl PluginCalls {
    /// Runs one hook call (`None`: the plugin does not implement it) and
    /// records its time and whether it failed (trap, deadline, memory).
    pub fn timed<T>(
        &self,
        hook: &'static str,
        call: impl FnOnce() -> Option<Result<T, CallError>>,
    ) -> Option<Result<T, CallError>> {
        let i = HOOKS.iter().position(|h| *h == hook).unwrap_or(0);
        let started = std::time::Instant::now();
        let answer = call();
        if let Some(a) = &answer {
            self.latency[i].observe(started.elapsed());
            if a.is_err() {
                self.failures[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        answer
    }

    /// `{prefix}_plugin_call_seconds{hook}` and `{prefix}_plugin_failures_total{hook}`.
    pub fn render(&self, out: &mut String, prefix: &str) {
        let name = format!("{prefix}_plugin_call_seconds");
        for (i, hook) in HOOKS.iter().enumerate() {
            self.latency[i].render(
                out,
                &name,
                "Time of policy plugin calls, by hook.",
                &format!("hook=\"{hook}\""),
                i == 0,
            );
        }
        let _ = writeln!(
            out,
            "# HELP {prefix}_plugin_failures_total Plugin calls that trapped, hit the deadline or the memory limit, by hook.\n# TYPE {prefix}_plugin_failures_total counter"
        );
        for (i, hook) in HOOKS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{prefix}_plugin_failures_total{{hook=\"{hook}\"}} {}",
                self.failures[i].load(Ordering::Relaxed)
            );
        }
    }
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Why an upload is refused (a 400 each; 500 for the store).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("the dry run of admit-spawn failed: {0}")]
    DryRun(CallError),
    #[error("{0}")]
    Store(String),
}

/// A plugin's answer, or the fallback's, with what to tell the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided<T> {
    /// The plugin decided.
    Plugin(T),
    /// The plugin failed; the challenge's fallback applies.
    Fallback {
        fallback: PolicyFallback,
        error: String,
    },
}

impl Policies {
    pub fn new(dir: &std::path::Path, limits: Limits) -> anyhow::Result<Self> {
        let store = DirStore::new(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self {
            host: Host::new(limits)?,
            store: Arc::new(store),
            calls: PluginCalls::default(),
        })
    }

    /// Validates an upload, compiles it, dry-runs `admit-spawn` on a sample
    /// request for `challenge`, and stores the blob. Blocking (compiling
    /// takes tens of milliseconds): call off the async runtime.
    pub fn upload(&self, challenge: &str, bytes: &[u8]) -> Result<Arc<Plugin>, UploadError> {
        let plugin = self.host.load(bytes)?;
        if let Some(Err(e)) = plugin.admit_spawn(&dry_run_request(challenge)) {
            return Err(UploadError::DryRun(e));
        }
        self.store
            .put(bytes)
            .map_err(|e| UploadError::Store(e.to_string()))?;
        Ok(plugin)
    }

    /// The compiled plugin of a challenge's policy: cached, or fetched from
    /// the store, verified and compiled (off the runtime).
    pub async fn plugin(self: &Arc<Self>, policy: &PolicyRef) -> Result<Arc<Plugin>, String> {
        let digest = Digest::parse(&policy.digest)?;
        if let Some(p) = self.host.get(&digest) {
            return Ok(p);
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let bytes = me.store.get(&digest).map_err(|e| e.to_string())?;
            me.host
                .load(&bytes)
                .map_err(|e| format!("policy {digest}: {e}"))
        })
        .await
        .map_err(|e| format!("loading the policy: {e}"))?
    }

    /// `admit-spawn` for a challenge with a policy; `None` when the
    /// challenge has none or the plugin does not implement the hook.
    pub async fn admit_spawn(
        self: &Arc<Self>,
        challenge: &ChallengeRecord,
        req: &SpawnRequest,
    ) -> Option<Decided<SpawnDecision>> {
        let policy = challenge.policy.as_ref()?;
        let fallback = challenge.spec.policy_fallback;
        let plugin = match self.plugin(policy).await {
            Ok(p) => p,
            Err(error) => return Some(failed(challenge, "admit-spawn", fallback, error)),
        };
        match self
            .calls
            .timed("admit-spawn", || plugin.admit_spawn(req))?
        {
            Ok(d) => Some(Decided::Plugin(d)),
            Err(e) => Some(failed(challenge, "admit-spawn", fallback, e.to_string())),
        }
    }
}

/// Logs a plugin failure and returns the fallback.
pub fn failed<T>(
    challenge: &ChallengeRecord,
    hook: &'static str,
    fallback: PolicyFallback,
    error: String,
) -> Decided<T> {
    tracing::warn!(challenge = %challenge.name, hook, ?fallback, %error,
        "policy plugin failed; applying the challenge's fallback");
    Decided::Fallback { fallback, error }
}

/// The sample request of the upload's dry run.
pub fn dry_run_request(challenge: &str) -> SpawnRequest {
    SpawnRequest {
        team: DRY_RUN_TEAM.into(),
        challenge: challenge.into(),
        team_live: 0,
        team_live_all: 0,
        team_recent: 0,
        cluster_free_slots: 1,
        cluster_capacity: 1,
        now_ms: tidegate_plugin_host::unix_ms(),
    }
}

/// What an agent's `/activity` says of one instance.
#[derive(Debug, Clone, Copy, Default, serde::Deserialize)]
pub struct Seen {
    #[serde(default)]
    pub last_activity_ms: u64,
    #[serde(default)]
    pub open_connections: u32,
}

/// An agent's `/activity` answer.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ActivityReport {
    #[serde(default)]
    pub instances: std::collections::HashMap<String, Seen>,
}

/// While leading, every `idle_check_secs`: for each live instance of a
/// challenge whose policy implements `on-idle`, read its traffic from the
/// agent that runs it (the owner sees every request and connection, also
/// those other agents forwarded) and ask the policy; `expire` deletes the
/// instance. A worker that does not answer, or a plugin that fails, keeps
/// its instances: reaping is never done on missing data.
pub async fn run_idle_checks(app: Arc<crate::App>) {
    let http = match reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client: on-idle policies will not run");
            return;
        }
    };
    let period = std::time::Duration::from_secs(app.cfg.idle_check_secs);
    loop {
        tokio::time::sleep(period).await;
        if app.leader.load().is_none() {
            continue;
        }
        let challenges = match idle_challenges(&app).await {
            Ok(c) if c.is_empty() => continue,
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "on-idle check: cannot list challenges");
                continue;
            }
        };
        let mut plugins = std::collections::HashMap::new();
        for c in &challenges {
            let Some(policy) = &c.policy else { continue };
            match app.policies.plugin(policy).await {
                Ok(p) => {
                    plugins.insert(c.name.clone(), (p, c));
                }
                Err(e) => tracing::warn!(challenge = %c.name, error = %e,
                    "on-idle check: policy unavailable; keeping its instances"),
            }
        }
        // Instances to ask about, grouped by the worker that runs them.
        let mut by_worker: std::collections::BTreeMap<_, Vec<_>> = Default::default();
        {
            let view = app.view.lock();
            for i in view.instances.values() {
                if !plugins.contains_key(&i.record.challenge) {
                    continue;
                }
                let Some(addr) = view.workers.get(&i.record.worker).and_then(|w| w.metrics) else {
                    continue;
                };
                by_worker
                    .entry((i.record.worker.clone(), addr))
                    .or_default()
                    .push(i.record.clone());
            }
        }
        for ((worker, addr), records) in by_worker {
            let report: ActivityReport = match http
                .get(format!("http://{addr}/activity"))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => match r.json().await {
                    Ok(report) => report,
                    Err(e) => {
                        tracing::warn!(%worker, error = %e, "on-idle check: unreadable /activity");
                        continue;
                    }
                },
                Ok(r) => {
                    tracing::warn!(%worker, status = %r.status(), "on-idle check: /activity failed");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%worker, error = %e, "on-idle check: worker unreachable; keeping its instances");
                    continue;
                }
            };
            for rec in records {
                let Some((plugin, challenge)) = plugins.get(&rec.challenge) else {
                    continue;
                };
                let Some(seen) = report.instances.get(rec.id.as_str()).copied() else {
                    // The agent does not run it (yet): nothing to judge.
                    continue;
                };
                let activity = tidegate_plugin_host::Activity {
                    instance: rec.id.to_string(),
                    team: rec.team.to_string(),
                    challenge: rec.challenge.to_string(),
                    last_activity_ms: seen.last_activity_ms,
                    created_ms: rec.created_at * 1000,
                    now_ms: tidegate_plugin_host::unix_ms(),
                    open_connections: seen.open_connections,
                };
                match app
                    .policies
                    .calls
                    .timed("on-idle", || plugin.on_idle(&activity))
                {
                    Some(Ok(tidegate_plugin_host::IdleDecision::Expire)) => {
                        tracing::info!(instance = %rec.id, team = %rec.team, challenge = %rec.challenge,
                            last_activity_ms = seen.last_activity_ms,
                            "expiring instance: its challenge's on-idle policy says it is idle");
                        match crate::lifecycle::delete(&app.client, &app.ks, &rec.id).await {
                            Ok(()) => {
                                app.counters
                                    .idle_expirations
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => tracing::warn!(instance = %rec.id, error = %e,
                                "could not expire an idle instance"),
                        }
                    }
                    Some(Ok(tidegate_plugin_host::IdleDecision::Keep)) | None => {}
                    Some(Err(e)) => {
                        app.counters.policy_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(challenge = %challenge.name, error = %e,
                            "on-idle policy failed; keeping the instance");
                    }
                }
            }
        }
    }
}

/// The challenges whose policy implements `on-idle`.
async fn idle_challenges(app: &crate::App) -> Result<Vec<ChallengeRecord>, String> {
    use tidegate_schema::Record;
    let prefix = app.ks.prefix(tidegate_schema::Kind::Challenges);
    let resp = app
        .client
        .clone()
        .get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| ChallengeRecord::decode(kv.value()).ok())
        .filter(|c| {
            c.policy
                .as_ref()
                .is_some_and(|p| p.hooks.iter().any(|h| h == "on-idle"))
        })
        .collect())
}
