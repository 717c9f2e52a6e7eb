//! `/v1/status` and `/v1/workers`.

use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::bodies::{ErrorBody, Worker, WorkerList};
use super::{ApiResult, AppState, Scope, etcd, json_response};
use crate::App;

/// This replica's role, the leader, etcd's members and revision, counters.
#[utoipa::path(
    get, path = "/v1/status", tag = "cluster", operation_id = "status",
    responses(
        (status = 200, description = "this replica: role (leader when it leads any shard), token (of the lowest shard it leads), the leader of shard 0, `shards` (count, those this replica leads, each shard's leader and token), etcd members and revision, its view's revision and counters", body = serde_json::Value),
        (status = 503, description = "etcd has no quorum", body = ErrorBody),
    )
)]
pub(super) async fn status(State(app): AppState, _scope: Scope) -> ApiResult {
    let led = app.shards.led();
    let token = led
        .first()
        .and_then(|s| app.shards.lead(*s))
        .map(|l| l.token);
    let members = etcd(&app, || {
        let mut client = app.client.clone();
        async move { client.member_list().await }
    })
    .await?;
    // A linearizable read of nothing: the cluster's current revision.
    let probe = app.ks.root_prefix();
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
    let m = &app.metrics;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "id": app.cfg.id,
            "role": if led.is_empty() { "standby" } else { "leader" },
            "token": token,
            "leader": leader_of(&app, 0),
            "shards": shards(&app),
            "etcd": { "members": members, "revision": revision },
            "view_revision": app.view.lock().revision,
            "counters": {
                "spawns": m.spawns.get(),
                "spawn_refusals": m.spawn_refusals.get(),
                "renewals": m.renewals.get(),
                "deletions": m.deletions.get(),
                "fenced_writes": m.fenced_writes.get(),
                "leader_changes": m.leader_changes.get(),
                "forwarded": m.forwarded.get(),
                "forward_failed": m.forward_failed.get(),
                "worker_gone_deletions": m.worker_gone_deletions.get(),
                "policy_denials": m.policy_denials.get(),
                "policy_failures": m.policy_failures.get(),
                "idle_expirations": m.idle_expirations.get(),
                "plugins_compiled": app.policies.host.cached(),
            },
        }),
    ))
}

/// Who leads `shard` (as `{id, url}`), as this replica last saw it.
pub(super) fn leader_of(app: &App, shard: u16) -> Value {
    if app.shards.lead(shard).is_some() {
        return json!({ "id": app.cfg.id, "url": app.cfg.advertise() });
    }
    match app.shards.seen().leaders.get(&shard) {
        Some((m, _)) if m.id != app.cfg.id => json!({ "id": m.id, "url": m.url }),
        _ => Value::Null,
    }
}

/// The shards: their count, those this replica leads, and each one's
/// leader and token as this replica last saw them.
pub(super) fn shards(app: &App) -> Value {
    let seen = app.shards.seen();
    let leaders: Vec<Value> = (0..app.shards.count())
        .map(|shard| {
            let token = app
                .shards
                .lead(shard)
                .map(|l| l.token)
                .or_else(|| seen.leaders.get(&shard).map(|(_, t)| *t));
            json!({ "shard": shard, "leader": leader_of(app, shard), "token": token })
        })
        .collect();
    json!({
        "count": app.shards.count(),
        "led": app.shards.led(),
        "leaders": leaders,
    })
}

/// Live workers with their capacity and load.
#[utoipa::path(
    get, path = "/v1/workers", tag = "cluster", operation_id = "list_workers",
    responses((status = 200, description = "the registered workers", body = WorkerList))
)]
pub(super) async fn workers(State(app): AppState, _scope: Scope) -> ApiResult {
    let workers = workers_of(&app.view.lock());
    Ok(json_response(StatusCode::OK, WorkerList { workers }))
}

/// The registered workers with their load.
pub(super) fn workers_of(view: &crate::view::View) -> Vec<Worker> {
    view.workers
        .values()
        .map(|w| Worker::new(w, view.load(&w.id), view.committed(&w.id)))
        .collect()
}
