//! Warm pools, the scheduler's side (a real etcd, real controllers; the
//! workers are registered and their agents' status reports written by the
//! test): the pool is filled to `min` with team-less records that claim no
//! hostname, port or team slot; a spawn claims a running one in one Txn
//! (team, hostnames, flag), each pooled instance goes to one team only
//! under concurrent spawns, and the pool refills; a new scheduler adopts
//! the pool it finds (no leak, no double assignment); a pooled instance
//! that fails is replaced; bad pool settings are refused naming the field.
//! (Containers, flag files and routing: tests/tests/pool.rs.)

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use etcd_client::{Client, GetOptions, PutOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::etcd::EtcdCluster;

fn pooled_web(min: u32, max: u32) -> Value {
    json!({"image": "x", "pool": {"min": min, "max": max}, "flag": {"file": "/flag"},
        "ports": [{"name": "web", "port": 80, "protocol": "http"}]})
}

/// Every instance record in etcd: id → (record, lease).
async fn records(client: &Client) -> BTreeMap<String, (Value, i64)> {
    let resp = client
        .clone()
        .get(
            keys::prefix(tidegate_schema::Kind::Instances),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            let v: Value = serde_json::from_slice(kv.value()).unwrap();
            (v["id"].as_str().unwrap().to_string(), (v, kv.lease()))
        })
        .collect()
}

/// The pooled (team-less) records of `challenge`: id → (worker, lease).
async fn pooled(client: &Client, challenge: &str) -> BTreeMap<String, (String, i64)> {
    records(client)
        .await
        .into_iter()
        .filter(|(_, (r, _))| r.get("team").is_none() && r["challenge"] == challenge)
        .map(|(id, (r, lease))| (id, (r["worker"].as_str().unwrap().to_string(), lease)))
        .collect()
}

/// Reports `id` as its agent would: `state` on the instance's lease.
async fn report(client: &Client, worker: &str, id: &str, lease: i64, state: Value) {
    let st = json!({"v": 1, "instance": id, "worker": worker, "status": state,
        "address": "198.18.0.9", "updated_at": 1});
    client
        .clone()
        .put(
            keys::status(worker, id),
            st.to_string(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
}

/// Reports every pooled instance of `challenge` running; their ids.
async fn all_running(client: &Client, challenge: &str) -> BTreeSet<String> {
    let pool = pooled(client, challenge).await;
    for (id, (worker, lease)) in &pool {
        report(client, worker, id, *lease, json!({"state": "running"})).await;
    }
    pool.into_keys().collect()
}

/// `GET /v1/pools`'s entry for `challenge`.
async fn pool_entry(c: &Controller, challenge: &str) -> Value {
    let (s, body) = c.call(Method::GET, "/v1/pools", None, Some(ADMIN)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["challenge"] == challenge)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn cluster() -> (EtcdCluster, tempfile::TempDir, Controller, Client) {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-0", 20).await;
    register_worker(&client, "worker-1", 20).await;
    let c = Controller::start(&etcd, "c1", dir.path()).await;
    assert!(eventually(10, || c.is_leader()).await, "c1 never led");
    assert!(sees_workers(&c, 2).await);
    (etcd, dir, c, client)
}

#[tokio::test]
async fn a_pool_fills_to_min_and_each_pooled_instance_goes_to_one_team() {
    let (_etcd, _dir, c, client) = cluster().await;
    let (s, body) = c.put_challenge("web", pooled_web(3, 3)).await;
    assert!(s.is_success(), "{body}");
    assert!(
        eventually(10, || async { pooled(&client, "web").await.len() == 3 }).await,
        "the pool never had 3: {:?}",
        pooled(&client, "web").await
    );
    // Team-less, routed by nothing: no claim of any kind, spread over both
    // workers, and not among the instances any team or list sees.
    assert_eq!(count(&client, &keys::claims()).await, 0);
    let pool = pooled(&client, "web").await;
    let workers: BTreeSet<&String> = pool.values().map(|(w, _)| w).collect();
    assert_eq!(workers.len(), 2, "not spread: {pool:?}");
    for id in pool.keys() {
        let (s, _) = c
            .call(Method::GET, &format!("/v1/instances/{id}"), None, None)
            .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "pooled {id} is visible");
    }
    let (_, list) = c.call(Method::GET, "/v1/instances", None, None).await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 0, "{list}");
    // Not claimable while not running: spawns start fresh instances.
    let (s, fresh) = c.spawn("web", "early").await;
    assert_eq!(s, StatusCode::CREATED, "{fresh}");
    assert!(!pool.contains_key(fresh["id"].as_str().unwrap()));

    // Running: six teams at once share the three pooled instances, each
    // to one team, and the other three get instances of their own.
    let ready = all_running(&client, "web").await;
    assert!(
        eventually(5, || async { pool_entry(&c, "web").await["ready"] == 3 }).await,
        "{}",
        pool_entry(&c, "web").await
    );
    let spawns: Vec<_> = (0..6)
        .map(|i| {
            let c = &c;
            async move { c.spawn("web", &format!("team-{i}")).await }
        })
        .collect();
    let answers = futures::future::join_all(spawns).await;
    let mut claimed = BTreeMap::new();
    for (i, (s, body)) in answers.iter().enumerate() {
        assert_eq!(*s, StatusCode::CREATED, "team-{i}: {body}");
        let id = body["id"].as_str().unwrap().to_string();
        assert_eq!(body["team"], format!("team-{i}"));
        assert_eq!(body["http"].as_array().unwrap().len(), 1, "{body}");
        if ready.contains(&id) {
            assert!(
                claimed.insert(id.clone(), i).is_none(),
                "{id} handed out twice"
            );
        }
    }
    assert_eq!(
        claimed.len(),
        3,
        "the three ready pooled instances: {claimed:?}"
    );
    // In etcd: each claimed record has its team, hostname claim, team slot,
    // secret with its own flag, and no status until its agent reports.
    let all = records(&client).await;
    let mut flags = BTreeSet::new();
    for (id, i) in &claimed {
        let (rec, lease) = &all[id];
        assert_eq!(rec["team"], format!("team-{i}"));
        let worker = rec["worker"].as_str().unwrap();
        let host = rec["http"][0]["hostname"].as_str().unwrap();
        let kv = client
            .clone()
            .get(keys::hostname_claim(host), None)
            .await
            .unwrap();
        assert_eq!(kv.kvs()[0].value_str().unwrap(), id.as_str());
        assert_eq!(
            kv.kvs()[0].lease(),
            *lease,
            "claim not on the instance's lease"
        );
        assert_eq!(count(&client, &keys::status(worker, id)).await, 0);
        let secret = client
            .clone()
            .get(keys::secret(worker, id), None)
            .await
            .unwrap();
        let secret: Value = serde_json::from_slice(secret.kvs()[0].value()).unwrap();
        let flag = secret["flag"].as_str().unwrap().to_string();
        assert!(flag.starts_with("flag{"), "{flag}");
        assert!(flags.insert(flag.clone()), "flag given twice");
        // The platform's flag check knows whose it is.
        let (s, r) = c
            .call(
                Method::POST,
                &format!("/v1/instances/{id}/flag"),
                Some(json!({"flag": flag})),
                None,
            )
            .await;
        assert_eq!((s, r["correct"].clone()), (StatusCode::OK, json!(true)));
    }
    // The pool is back to three, none of them handed out before.
    assert!(
        eventually(10, || async {
            let now = pooled(&client, "web").await;
            now.len() == 3 && now.keys().all(|id| !claimed.contains_key(id))
        })
        .await,
        "the pool was not refilled: {:?}",
        pooled(&client, "web").await
    );
}

#[tokio::test]
async fn a_new_scheduler_adopts_the_pool_without_leaking_or_handing_out_twice() {
    let (etcd, dir, c1, client) = cluster().await;
    let c2 = Controller::start(&etcd, "c2", dir.path()).await;
    let (s, body) = c1.put_challenge("web", pooled_web(3, 3)).await;
    assert!(s.is_success(), "{body}");
    assert!(eventually(10, || async { pooled(&client, "web").await.len() == 3 }).await);
    let before = all_running(&client, "web").await;
    drop(c1);
    assert!(eventually(15, || c2.is_leader()).await, "c2 never led");
    // Adopted as it was: the same three, none added.
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let now: BTreeSet<String> = pooled(&client, "web").await.into_keys().collect();
        assert_eq!(now, before, "the new scheduler changed the pool");
    }
    let answers = futures::future::join_all((0..4).map(|i| {
        let c2 = &c2;
        async move { c2.spawn("web", &format!("t{i}")).await }
    }))
    .await;
    let ids: Vec<String> = answers
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, StatusCode::CREATED, "{b}");
            b["id"].as_str().unwrap().to_string()
        })
        .collect();
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 4, "{ids:?}");
    assert_eq!(ids.iter().filter(|id| before.contains(*id)).count(), 3);
    // Refilled to three, and nothing else team-less was left behind.
    assert!(
        eventually(10, || async {
            let now = pooled(&client, "web").await;
            now.len() == 3 && now.keys().all(|id| !before.contains(id))
        })
        .await
    );
}

#[tokio::test]
async fn a_failed_pooled_instance_is_replaced_and_a_removed_pool_is_emptied() {
    let (_etcd, _dir, c, client) = cluster().await;
    let (s, body) = c.put_challenge("web", pooled_web(2, 4)).await;
    assert!(s.is_success(), "{body}");
    assert!(eventually(10, || async { pooled(&client, "web").await.len() == 2 }).await);
    let pool = pooled(&client, "web").await;
    let (bad, (worker, lease)) = pool.iter().next().unwrap();
    report(
        &client,
        worker,
        bad,
        *lease,
        json!({"state": "failed", "reason": "exited with code 3 after 5 restarts"}),
    )
    .await;
    assert!(
        eventually(10, || async {
            let now = pooled(&client, "web").await;
            now.len() == 2 && !now.contains_key(bad)
        })
        .await,
        "the failed pooled instance was not replaced: {:?}",
        pooled(&client, "web").await
    );
    // A spec change replaces the pool; a spec without one empties it.
    let old: BTreeSet<String> = pooled(&client, "web").await.into_keys().collect();
    let mut changed = pooled_web(2, 4);
    changed["env"] = json!({"MODE": "2"});
    let (s, body) = c.put_challenge("web", changed).await;
    assert!(s.is_success(), "{body}");
    assert!(
        eventually(10, || async {
            let now = pooled(&client, "web").await;
            now.len() == 2 && now.keys().all(|id| !old.contains(id))
        })
        .await
    );
    let mut plain = pooled_web(0, 1);
    plain.as_object_mut().unwrap().remove("pool");
    let (s, body) = c.put_challenge("web", plain).await;
    assert!(s.is_success(), "{body}");
    assert!(eventually(10, || async { pooled(&client, "web").await.is_empty() }).await);
}

#[tokio::test]
async fn bad_pool_settings_are_refused_naming_the_field() {
    let (_etcd, _dir, c, client) = cluster().await;
    let env_flag = {
        let mut s = pooled_web(1, 2);
        s.as_object_mut().unwrap().remove("flag");
        s
    };
    let relative = {
        let mut s = pooled_web(1, 2);
        s["flag"]["file"] = json!("flag.txt");
        s
    };
    let in_proc = {
        let mut s = pooled_web(1, 2);
        s["flag"]["file"] = json!("/proc/self/flag");
        s
    };
    for (spec, field) in [
        (pooled_web(3, 2), "pool.min"),
        (pooled_web(0, 0), "pool.max"),
        (pooled_web(1, 101), "pool.max"),
        (env_flag, "flag.file"),
        (relative, "flag.file"),
        (in_proc, "flag.file"),
    ] {
        let (s, body) = c.put_challenge("web", spec.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{spec}: {body}");
        assert_eq!(body["field"], field, "{spec}: {body}");
    }
    // Nothing was written, so nothing is pooled.
    assert_eq!(
        count(&client, &keys::prefix(tidegate_schema::Kind::Instances)).await,
        0
    );
    // A fixed flag (no {hmac}) is the same for every instance: env works.
    let mut fixed = pooled_web(1, 2);
    fixed["flag"] = json!({"template": "flag{same-for-all}"});
    let (s, body) = c.put_challenge("web", fixed).await;
    assert!(s.is_success(), "{body}");
}
