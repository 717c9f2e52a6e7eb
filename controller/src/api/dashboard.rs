//! The organizer dashboard: `GET /dashboard` is one static page (no build
//! step, no outside assets) that reads `GET /v1/dashboard` with the admin
//! token every 5 s. Read-only.

use std::collections::BTreeSet;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiResult, AppState, Scope, challenges, cluster, etcd, instances, json_response};

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

/// Everything the page shows, in one answer (admin scope).
pub(super) async fn data(State(app): AppState, scope: Scope) -> ApiResult {
    scope.require_admin()?;
    let leader = etcd(&app, || cluster::current_leader(&app)).await?;
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
    let (workers, items, revision) = {
        let view = app.view.lock();
        let mut workers = cluster::workers_json(&view);
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
            .map(|i| instances::instance_json(&app, &i.record, view.status_text(&i.record.id)))
            .collect();
        items.sort_by_key(|i| std::cmp::Reverse(i["created_at"].as_u64().unwrap_or(0)));
        (workers, items, view.revision)
    };
    Ok(json_response(
        StatusCode::OK,
        json!({
            "replica": {
                "id": app.cfg.id,
                "role": if app.leader.load().is_some() { "leader" } else { "standby" },
            },
            "leader": leader,
            "revision": revision,
            "now": super::unix_now(),
            "workers": workers,
            "instances": items,
            "refusals": app.telemetry.recent(),
            "policies": policies,
            "challenges": records.len(),
            "challenge_errors": errors,
        }),
    ))
}
