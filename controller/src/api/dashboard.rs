//! The organizer dashboard: `GET /dashboard` is one static page (no build
//! step, no outside assets) that reads `GET /v1/dashboard` with the admin
//! token every 5 s. Read-only.

use std::collections::BTreeSet;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::bodies::{ErrorBody, Instance};
use super::{ApiResult, AppState, Scope, challenges, cluster, json_response};

const PAGE: &str = include_str!("dashboard.html");

/// The page itself holds no data; it asks for the token and fetches.
pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// What the organizer dashboard (`GET /dashboard`, an HTML page) shows:
/// this replica, the leader, workers (registered or absent), live
/// instances, the spawns waiting for room (`queue`, in admission order),
/// this replica's recent refusals, policies in force.
#[utoipa::path(
    get, path = "/v1/dashboard", tag = "cluster", operation_id = "dashboard",
    security(("admin" = [])),
    responses(
        (status = 200, description = "the dashboard's data", body = serde_json::Value),
        (status = 403, description = "this needs the admin token", body = ErrorBody),
    )
)]
pub(super) async fn data(State(app): AppState, scope: Scope) -> ApiResult {
    scope.require_admin()?;
    let leader = super::cluster::leader_of(&app, 0);
    let shards = super::cluster::shards(&app);
    let (records, errors) = challenges::load_all(&app).await?;
    let policies: Vec<Value> = records
        .iter()
        .filter_map(|(rec, _)| {
            let p = rec.policy.as_ref()?;
            Some(json!({
                "challenge": rec.name,
                "digest": p.digest,
                "hooks": p.hooks,
                "size": p.size,
                "uploaded_at": p.uploaded_at,
                "fallback": rec.spec.policy_fallback,
            }))
        })
        .collect();
    let (workers, items, queue, revision) = {
        let view = app.view.lock();
        let mut workers: Vec<Value> = cluster::workers_of(&view)
            .into_iter()
            .filter_map(|w| serde_json::to_value(w).ok())
            .collect();
        for w in &mut workers {
            w["state"] = json!("registered");
        }
        // Workers that still own instances but left the cluster: their
        // instances are deleted once worker_grace_secs has passed.
        let gone: BTreeSet<_> = view
            .instances
            .values()
            .map(|i| &i.record.worker)
            .filter(|w| !view.workers.contains_key(*w))
            .collect();
        for w in gone {
            workers.push(json!({
                "id": w,
                "state": "absent",
                "instances": view.load(w),
            }));
        }
        let mut items: Vec<Value> = view
            .instances
            .values()
            // Pooled instances are no team's (`GET /v1/pools` lists them).
            .filter(|i| !i.record.is_pooled())
            .filter_map(|i| {
                let status = view.status_text(&i.record.id);
                let services = view.services_of(&i.record.id);
                let solver = view.solver_of(&i.record.id);
                serde_json::to_value(
                    Instance::new(&app, &i.record, status)
                        .with_services(services)
                        .with_solver(solver, true),
                )
                .ok()
            })
            .collect();
        items.sort_by_key(|i| std::cmp::Reverse(i["created_at"].as_u64().unwrap_or(0)));
        // The waiting queue in the order the scheduler admits it.
        let queue: Vec<Value> = view
            .fair_order()
            .into_iter()
            .enumerate()
            .map(|(i, w)| {
                json!({
                    "position": i + 1,
                    "id": w.record.id,
                    "challenge": w.record.challenge,
                    "team": w.record.team,
                    "reason": w.record.reason,
                    "detail": w.record.detail,
                    "queued_at": w.record.queued_at,
                })
            })
            .collect();
        (workers, items, queue, view.revision)
    };
    Ok(json_response(
        StatusCode::OK,
        json!({
            "replica": {
                "id": app.cfg.id,
                "role": if app.leads_any() { "leader" } else { "standby" },
            },
            "leader": leader,
            "shards": shards,
            "revision": revision,
            "now": tidegate_schema::time::unix_secs(),
            "workers": workers,
            "instances": items,
            "queue": queue,
            "refusals": app.metrics.recent(),
            "per_minute": app.metrics.per_minute(tidegate_schema::time::unix_secs()),
            "policies": policies,
            "challenges": records.len(),
            "challenge_errors": errors,
        }),
    ))
}
