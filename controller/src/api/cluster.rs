//! `/v1/status` and `/v1/workers`.

use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::bodies::{ErrorBody, Worker, WorkerList};
use super::{ApiResult, AppState, Scope, etcd, json_response};
use crate::election::current_leader;

/// This replica's role, the leader, etcd's members and revision, counters.
#[utoipa::path(
    get, path = "/v1/status", tag = "cluster", operation_id = "status",
    responses(
        (status = 200, description = "this replica: role, token (when it leads), the leader, etcd members and revision, its view's revision and counters", body = serde_json::Value),
        (status = 503, description = "etcd has no quorum", body = ErrorBody),
    )
)]
pub(super) async fn status(State(app): AppState, _scope: Scope) -> ApiResult {
    let leader = app.leader.load_full();
    let current = etcd(&app, || current_leader(&app.client, &app.ks)).await?;
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
            "role": if leader.is_some() { "leader" } else { "standby" },
            "token": leader.as_ref().map(|l| l.token),
            "leader": current,
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
