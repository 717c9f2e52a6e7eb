//! The leader's `on-idle` check: every `idle_check_secs`, each live
//! instance of a challenge whose policy implements `on-idle` is judged on
//! the traffic its agent reports (`GET /activity`: the owner sees every
//! request and connection, also those other agents forwarded); `expire`
//! deletes the instance. A worker that does not answer, or a plugin that
//! fails, keeps its instances: reaping is never done on missing data.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tidegate_plugin_host::{Activity, IdleDecision, Plugin};
use tidegate_schema::{
    ActivityReport, ChallengeName, ChallengeRecord, InstanceActivity, InstanceRecord, Kind, Record,
    WorkerId,
};

use crate::App;

/// Runs the check while this replica leads, forever.
pub async fn run_idle_checks(app: Arc<App>) {
    let mut headers = reqwest::header::HeaderMap::new();
    match scrape_header(&app.cfg) {
        Ok(Some(h)) => {
            headers.insert(reqwest::header::AUTHORIZATION, h);
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "on-idle policies cannot read agents' /activity"),
    }
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .default_headers(headers)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "no HTTP client: on-idle policies will not run");
            return;
        }
    };
    let period = Duration::from_secs(app.cfg.idle_check_secs);
    loop {
        tokio::time::sleep(period).await;
        if app.leads_any() {
            check_once(&app, &http).await;
        }
    }
}

/// `Bearer <scrape token>` for agents' `/activity`, if a token is set.
fn scrape_header(
    cfg: &tidegate_schema::config::ControllerConfig,
) -> Result<Option<reqwest::header::HeaderValue>, String> {
    let Some(path) = &cfg.scrape_token_file else {
        tracing::warn!(
            "no scrape_token_file: agents refuse /activity, so on-idle policies keep every instance"
        );
        return Ok(None);
    };
    let token = tidegate_schema::config::read_secret_file("scrape_token_file", path, 16)?;
    let mut value = b"Bearer ".to_vec();
    value.extend_from_slice(&token);
    let mut value = reqwest::header::HeaderValue::from_bytes(&value).map_err(|_| {
        format!(
            "scrape_token_file {}: not a valid header value",
            path.display()
        )
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// The challenges with an `on-idle` policy, and their compiled plugins.
type IdlePolicies = HashMap<ChallengeName, (Arc<Plugin>, ChallengeRecord)>;

async fn check_once(app: &App, http: &reqwest::Client) {
    let challenges = match idle_challenges(app).await {
        Ok(c) if c.is_empty() => return,
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "on-idle check: cannot list challenges");
            return;
        }
    };
    let mut plugins = IdlePolicies::new();
    // Each shard's leader judges its own challenges' instances.
    for c in challenges
        .into_iter()
        .filter(|c| app.lead(&c.name).is_some())
    {
        let Some(policy) = &c.policy else { continue };
        match app.policies.plugin(policy).await {
            Ok(p) => {
                plugins.insert(c.name.clone(), (p, c));
            }
            Err(e) => tracing::warn!(challenge = %c.name, error = %e,
                "on-idle check: policy unavailable; keeping its instances"),
        }
    }
    for ((worker, addr), records) in by_worker(app, &plugins) {
        let Some(report) = activity(http, &worker, addr).await else {
            continue;
        };
        for rec in records {
            let Some((plugin, challenge)) = plugins.get(&rec.challenge) else {
                continue;
            };
            // Not in the report: the agent does not run it (yet), nothing to judge.
            if let Some(seen) = report.instances.get(&rec.id) {
                judge(app, plugin, challenge, &rec, *seen).await;
            }
        }
    }
}

/// Live instances of the challenges in `plugins`, grouped by the worker
/// that runs them and where its `/activity` is.
fn by_worker(
    app: &App,
    plugins: &IdlePolicies,
) -> BTreeMap<(WorkerId, SocketAddr), Vec<InstanceRecord>> {
    let mut by_worker: BTreeMap<_, Vec<_>> = BTreeMap::new();
    let view = app.view.lock();
    for i in view.instances.values() {
        // A pooled instance is idle by design until a team has it.
        if i.record.is_pooled() || !plugins.contains_key(&i.record.challenge) {
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
    by_worker
}

/// One agent's `/activity`, or `None` (logged) when it cannot be had.
async fn activity(
    http: &reqwest::Client,
    worker: &WorkerId,
    addr: SocketAddr,
) -> Option<ActivityReport> {
    match http.get(format!("http://{addr}/activity")).send().await {
        Ok(r) if r.status().is_success() => match r.json().await {
            Ok(report) => Some(report),
            Err(e) => {
                tracing::warn!(%worker, error = %e, "on-idle check: unreadable /activity");
                None
            }
        },
        Ok(r) => {
            tracing::warn!(%worker, status = %r.status(), "on-idle check: /activity failed (401: the controllers' and agents' scrape_token_file differ or are unset)");
            None
        }
        Err(e) => {
            tracing::warn!(%worker, error = %e, "on-idle check: worker unreachable; keeping its instances");
            None
        }
    }
}

/// Asks the policy about one instance and expires it when it says so.
async fn judge(
    app: &App,
    plugin: &Plugin,
    challenge: &ChallengeRecord,
    rec: &InstanceRecord,
    seen: InstanceActivity,
) {
    let activity = Activity {
        instance: rec.id.to_string(),
        team: rec.team_str().to_string(),
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
        Some(Ok(IdleDecision::Expire)) => {
            tracing::info!(instance = %rec.id, team = rec.team_str(), challenge = %rec.challenge,
                last_activity_ms = seen.last_activity_ms,
                "expiring instance: its challenge's on-idle policy says it is idle");
            match crate::lifecycle::delete(&app.client, &app.ks, &rec.id, None).await {
                Ok(()) => {
                    app.metrics.idle_expirations.inc();
                }
                Err(e) => tracing::warn!(instance = %rec.id, error = %e,
                    "could not expire an idle instance"),
            }
        }
        Some(Ok(IdleDecision::Keep)) | None => {}
        Some(Err(e)) => {
            app.metrics.policy_failures.inc();
            tracing::warn!(challenge = %challenge.name, error = %e,
                "on-idle policy failed; keeping the instance");
        }
    }
}

/// The challenges whose policy implements `on-idle`.
async fn idle_challenges(app: &App) -> Result<Vec<ChallengeRecord>, etcd_client::Error> {
    let prefix = app.ks.prefix(Kind::Challenges);
    let resp = app
        .client
        .clone()
        .get(
            prefix.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
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
