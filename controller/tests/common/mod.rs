//! Helpers for the controller's tests: the daemons come from the harness
//! (`tidegate_lab::daemons`); what needs an etcd client lives here.

#![allow(dead_code, unreachable_pub)] // each test file uses a part of this

use etcd_client::{Client, PutOptions};
use serde_json::json;
pub use tidegate_lab::daemons::*;
pub use tidegate_lab::keys;

/// Registers a worker the way an agent does (record under a lease).
pub async fn register_worker(client: &Client, id: &str, capacity: u32) -> i64 {
    register_worker_with(client, id, capacity, None).await
}

/// As [`register_worker`], giving instances `allocatable` (memory, CPU, pids).
pub async fn register_worker_with(
    client: &Client,
    id: &str,
    capacity: u32,
    allocatable: Option<serde_json::Value>,
) -> i64 {
    let mut c = client.clone();
    let lease = c.lease_grant(600, None).await.unwrap().id();
    let mut rec = json!({"v": 1, "id": id, "address": "127.0.0.2", "http_entry": "127.0.0.2:8080",
        "tcp_host": "127.0.0.2", "capacity": capacity, "version": "test", "started_at": 1});
    if let Some(a) = allocatable {
        rec["allocatable"] = a;
    }
    c.put(
        keys::worker(id),
        rec.to_string(),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    lease
}

/// The etcd revision now.
pub async fn revision(client: &Client) -> i64 {
    client
        .clone()
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

/// How many keys lie under `prefix`.
pub async fn count(client: &Client, prefix: &str) -> i64 {
    client
        .clone()
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count()
}

/// Whether `c` lists `n` workers within 5 s (its view caught up with
/// their registration).
pub async fn sees_workers(c: &Controller, n: usize) -> bool {
    eventually(5, || async {
        c.call(reqwest::Method::GET, "/v1/workers", None, None)
            .await
            .1["workers"]
            .as_array()
            .is_some_and(|w| w.len() == n)
    })
    .await
}
