//! `/v1/status` and `/v1/workers`.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiResult, AppState, Scope, etcd, json_response};
use crate::App;
use crate::scheduler::Candidate;

/// Who leads, as the election key says (None while nobody does).
pub(super) async fn current_leader(app: &App) -> Result<Option<Candidate>, etcd_client::Error> {
    let mut client = app.client.clone();
    match client.leader(app.ks.election_name()).await {
        Ok(resp) => Ok(resp
            .kv()
            .and_then(|kv| serde_json::from_slice::<Candidate>(kv.value()).ok())),
        // etcd answers "election: no leader" as an error.
        Err(e) if e.to_string().contains("no leader") => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) async fn status(State(app): AppState, _scope: Scope) -> ApiResult {
    let leader = app.leader.load_full();
    let current = etcd(&app, || current_leader(&app)).await?;
    let members = etcd(&app, || {
        let mut client = app.client.clone();
        async move { client.member_list().await }
    })
    .await?;
    // A linearizable read of nothing: the cluster's current revision.
    let probe = format!("{}/", app.ks);
    let count = etcd(&app, || {
        let mut client = app.client.clone();
        let probe = probe.clone();
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_count_only();
        async move { client.get(probe, Some(options)).await }
    })
    .await?;
    let revision = count.header().map_or(0, |h| h.revision());
    let members: Vec<Value> = members
        .members()
        .iter()
        .map(|m| json!({ "name": m.name(), "id": format!("{:x}", m.id()), "client_urls": m.client_urls() }))
        .collect();
    let c = &app.counters;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "id": app.cfg.id,
            "role": if leader.is_some() { "leader" } else { "standby" },
            "token": leader.as_ref().map(|l| l.token),
            "leader": current,
            "etcd": { "members": members, "revision": revision },
            "view_revision": app.view.lock().revision,
            "counters": {
                "spawns": c.spawns.load(Ordering::Relaxed),
                "spawn_refusals": c.spawn_refusals.load(Ordering::Relaxed),
                "renewals": c.renewals.load(Ordering::Relaxed),
                "deletions": c.deletions.load(Ordering::Relaxed),
                "fenced_writes": c.fenced_writes.load(Ordering::Relaxed),
                "leader_changes": c.leader_changes.load(Ordering::Relaxed),
                "worker_gone_deletions": c.worker_gone_deletions.load(Ordering::Relaxed),
                "policy_denials": c.policy_denials.load(Ordering::Relaxed),
                "policy_failures": c.policy_failures.load(Ordering::Relaxed),
                "idle_expirations": c.idle_expirations.load(Ordering::Relaxed),
                "plugins_compiled": app.policies.host.cached(),
            },
        }),
    ))
}

pub(super) async fn workers(State(app): AppState, _scope: Scope) -> ApiResult {
    let items = workers_json(&app.view.lock());
    Ok(json_response(StatusCode::OK, json!({ "workers": items })))
}

/// The registered workers with their load.
pub(super) fn workers_json(view: &crate::view::View) -> Vec<Value> {
    view.workers
        .values()
        .map(|w| {
            let load = view.load(&w.id);
            json!({
                "id": w.id,
                "address": w.address,
                "http_entry": w.http_entry,
                "tcp_host": w.tcp_host,
                "capacity": w.capacity,
                "instances": load,
                "free": (w.capacity as usize).saturating_sub(load),
                "version": w.version,
                "started_at": w.started_at,
            })
        })
        .collect()
}
