//! Placement by resources: each worker says what it gives instances
//! (`allocatable`), and the scheduler places an instance where its summed
//! limits fit, never committing more than a worker gives; spread evens the
//! load, pack fills one worker first; an instance larger than any worker is
//! refused naming the resource, and a challenge spec no worker could run
//! gets a warning when it is put.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeMap;

use common::*;
use etcd_client::Client;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::etcd::EtcdCluster;
use tidegate_schema::config::Placement;

fn sized(memory_mib: u32) -> Value {
    // Queueing off: a full cluster answers 503 naming what is short (with
    // it on, the same words come with the 202: tests/queue.rs).
    json!({"image": "x", "per_team_max": 100, "queue": false, "limits": {"memory_mib": memory_mib, "cpus": 0.25},
        "ports": [{"name": "web", "port": 80, "protocol": "http"}]})
}

/// Two workers of 1 GiB, 16 CPUs and 10,000 processes each, and the
/// challenges `big` (600 MiB), `small` (100 MiB) and `huge` (2 GiB).
async fn cluster(placement: Placement) -> (EtcdCluster, tempfile::TempDir, Controller) {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start_on(&etcd, "c1", dir.path(), None, |cfg| {
        cfg.placement = placement
    })
    .await;
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let gib = json!({"memory_mib": 1024, "millicpus": 16000, "pids": 10000});
    for w in ["worker-a", "worker-b"] {
        register_worker_with(&client, w, 100, Some(gib.clone())).await;
    }
    for (name, mib) in [("big", 600), ("small", 100)] {
        let (s, body) = c.put_challenge(name, sized(mib)).await;
        assert!(s.is_success(), "{body}");
        assert!(body.get("warnings").is_none(), "{body}");
    }
    assert!(sees_workers(&c, 2).await);
    (etcd, dir, c)
}

/// Memory committed per worker, as `GET /v1/workers` says, checked
/// against the sum of the live instances' limits.
async fn committed(c: &Controller) -> BTreeMap<String, u64> {
    let (_, workers) = c.call(Method::GET, "/v1/workers", None, None).await;
    let (_, list) = c.call(Method::GET, "/v1/instances", None, None).await;
    let mut summed = BTreeMap::<String, u64>::new();
    for i in list["instances"].as_array().unwrap() {
        let mib = if i["challenge"] == "big" { 600 } else { 100 };
        *summed
            .entry(i["worker"].as_str().unwrap().into())
            .or_default() += mib;
    }
    let mut said = BTreeMap::new();
    for w in workers["workers"].as_array().unwrap() {
        let id = w["id"].as_str().unwrap().to_string();
        let m = w["committed"]["memory_mib"].as_u64().unwrap();
        assert_eq!(m, summed.get(&id).copied().unwrap_or(0), "{w}");
        assert_eq!(w["allocatable"]["memory_mib"], 1024, "{w}");
        said.insert(id, m);
    }
    said
}

#[tokio::test]
async fn placement_never_commits_more_than_a_worker_gives() {
    let (_etcd, _dir, c) = cluster(Placement::Spread).await;
    // Spread: the two big ones go one to each worker.
    for team in ["t1", "t2"] {
        let (s, body) = c.spawn("big", team).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
    }
    let after_big = committed(&c).await;
    assert_eq!(after_big.values().copied().collect::<Vec<_>>(), [600, 600]);
    // A third does not fit anywhere (424 MiB left on each): 503 naming memory.
    let (s, body) = c.spawn("big", "t3").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["reason"], "no_capacity", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("memory: needs 600 MiB, 424 available"),
        "{body}"
    );
    // Small ones fill what is left: 4 per worker (400 of 424 MiB), then none.
    let mut placed = 0;
    for n in 0..10 {
        let (s, body) = c.spawn("small", &format!("s{n}")).await;
        match s {
            StatusCode::CREATED => placed += 1,
            StatusCode::SERVICE_UNAVAILABLE => assert_eq!(body["reason"], "no_capacity"),
            other => panic!("{other}: {body}"),
        }
        assert!(committed(&c).await.values().all(|m| *m <= 1024));
    }
    assert_eq!(placed, 8);
    assert_eq!(
        committed(&c).await.values().copied().collect::<Vec<_>>(),
        [1000, 1000]
    );

    // An instance larger than any worker: 409 naming the resource, and a
    // warning when such a challenge is put.
    let (s, body) = c.put_challenge("huge", sized(2048)).await;
    assert!(s.is_success(), "{body}");
    let warning = body["warnings"][0]
        .as_str()
        .unwrap_or_else(|| panic!("no warning: {body}"));
    assert!(
        warning.contains("memory: needs 2048 MiB, 1024 available"),
        "{warning}"
    );
    let (s, body) = c.spawn("huge", "t9").await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["reason"], "too_large", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("memory: needs 2048 MiB, 1024 available"),
        "{body}"
    );
}

#[tokio::test]
async fn pack_fills_one_worker_before_the_next_and_spread_evens_them() {
    for (mode, want) in [
        (Placement::Pack, [1000, 0]),
        (Placement::Spread, [500, 500]),
    ] {
        let (_etcd, _dir, c) = cluster(mode).await;
        for n in 0..10 {
            let (s, body) = c.spawn("small", &format!("s{n}")).await;
            assert_eq!(s, StatusCode::CREATED, "{mode:?}: {body}");
        }
        let mut got: Vec<u64> = committed(&c).await.into_values().collect();
        got.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(got, want, "{mode:?}");
    }
}
