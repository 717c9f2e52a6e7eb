//! Warm pools end to end (#22): real etcd, a controller, two agents and
//! Docker. A pooled challenge keeps `min` unassigned containers running,
//! routed by no hostname; a spawn gets one of them (no container started)
//! whose `/flag` holds that team's own flag, written by the agent at claim,
//! before any request reaches it; the pool refills, also after one of its
//! containers is removed under it; flag files go with their instances.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Plane, plane};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::daemons::{ADMIN, eventually, web_spec};
use tidegate_lab::docker::docker;

/// The pool of `challenge` as `GET /v1/pools` shows it.
async fn pool(p: &Plane, challenge: &str) -> Value {
    let (s, body) = p
        .controller
        .call(Method::GET, "/v1/pools", None, Some(ADMIN))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["challenge"] == challenge)
        .cloned()
        .unwrap_or(Value::Null)
}

/// The ids of the pool's running instances.
async fn ready(p: &Plane, challenge: &str) -> BTreeSet<String> {
    pool(p, challenge).await["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["status"] == "running")
                .map(|i| i["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The containers labelled with instance `id`.
fn containers(id: &str) -> Vec<String> {
    let filter = format!("label=tidegate.instance={id}");
    docker(&["ps", "-q", "--filter", &filter])
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `GET path` with `Host: host` through `entry`: (status, body).
async fn get(entry: &str, host: &str, path: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .get(format!("http://{entry}{path}"))
        .header("host", host)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match r {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

/// The host file an agent bind-mounts at `/flag` for instance `id`.
fn flag_file(worker: &str, id: &str) -> std::path::PathBuf {
    let cfg = tidegate_schema::config::AgentConfig {
        worker_id: worker.to_string(),
        cluster_label: Some(tidegate_lab::daemons::lab_cluster()),
        ..Default::default()
    };
    cfg.worker_flag_dir().join(id).join("flag")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawns_get_running_pooled_instances_each_with_its_own_flag_in_a_file() {
    let p = plane(|_| {}).await;
    let c = &p.controller;
    let mut spec = web_spec();
    spec["pool"] = json!({"min": 3, "max": 3});
    spec["flag"] = json!({"file": "/flag"});
    let (s, body) = c.put_challenge("warm", spec).await;
    assert!(s.is_success(), "{body}");

    // Three unassigned containers run, each reached by no hostname.
    assert!(
        eventually(90, || async { ready(&p, "warm").await.len() == 3 }).await,
        "the pool never had 3 running: {}\nagent a:\n{}\nagent b:\n{}",
        pool(&p, "warm").await,
        p.a.proc.log_tail(20),
        p.b.proc.log_tail(20)
    );
    let pooled = ready(&p, "warm").await;
    let domain = "ctf.localhost";
    for id in &pooled {
        assert_eq!(containers(id).len(), 1, "containers of pooled {id}");
        let (s, _) = get(&p.a_http, &format!("{id}.{domain}"), "/").await;
        assert_eq!(s, 404, "pooled {id} is routable");
    }
    let pooled_entry = pool(&p, "warm").await;
    let worker_of = |id: &str| -> String {
        pooled_entry["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["id"] == id)
            .unwrap()["worker"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // Its flag file is there (the bind mount's source) and holds no flag yet.
    let first = pooled.iter().next().unwrap();
    assert_eq!(
        std::fs::read_to_string(flag_file(&worker_of(first), first)).unwrap(),
        ""
    );

    // Three teams spawn: each gets a pooled instance, routable at once,
    // with its own flag in /flag from its very first answer.
    let mut flags = BTreeSet::new();
    let mut claimed = Vec::new();
    let mut waits = Vec::new();
    for team in ["red", "green", "blue"] {
        let start = Instant::now();
        let (s, inst) = c.spawn("warm", team).await;
        assert_eq!(s, StatusCode::CREATED, "{inst}");
        let id = inst["id"].as_str().unwrap().to_string();
        assert!(pooled.contains(&id), "{team} got {id}, not a pooled one");
        let host = inst["http"][0]["hostname"].as_str().unwrap().to_string();
        let mut answer = (0, String::new());
        while start.elapsed() < Duration::from_secs(20) {
            answer = get(&p.b_http, &host, "/cgi-bin/flag").await;
            if answer.0 == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        waits.push(start.elapsed());
        assert_eq!(answer.0, 200, "{team}'s instance {id}: {answer:?}");
        let flag = answer.1.trim().to_string();
        assert!(flag.starts_with("flag{"), "{team}: /flag holds {flag:?}");
        assert!(flags.insert(flag.clone()), "{team} got a flag given before");
        let (s, r) = c
            .call(
                Method::POST,
                &format!("/v1/instances/{id}/flag?team={team}"),
                Some(json!({"flag": flag})),
                None,
            )
            .await;
        assert_eq!((s, r["correct"].clone()), (StatusCode::OK, json!(true)));
        let worker = worker_of(&id);
        claimed.push((id, worker));
    }
    waits.sort();
    eprintln!("POST to first 200 of a pooled instance: {waits:?}");

    // The pool is back to three, none of them handed out.
    assert!(
        eventually(90, || async {
            let now = ready(&p, "warm").await;
            now.len() == 3 && claimed.iter().all(|(id, _)| !now.contains(id))
        })
        .await,
        "the pool was not refilled: {}",
        pool(&p, "warm").await
    );

    // A pooled container removed under the agent: the pool is whole again.
    let victim = ready(&p, "warm").await.into_iter().next().unwrap();
    for container in containers(&victim) {
        docker(&["rm", "-f", &container]).unwrap();
    }
    assert!(
        eventually(60, || async {
            ready(&p, "warm").await.len() == 3 && !containers(&victim).is_empty()
        })
        .await,
        "not refilled after its container was removed: {}",
        pool(&p, "warm").await
    );

    // Deleting a claimed instance removes its flag file with it.
    let (id, worker) = &claimed[0];
    let (s, body) = c
        .call(Method::DELETE, &format!("/v1/instances/{id}"), None, None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    assert!(
        eventually(20, || async {
            containers(id).is_empty() && !flag_file(worker, id).exists()
        })
        .await,
        "instance {id}'s container or flag file stayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_flag_file_cannot_be_written_fails_naming_the_setting() {
    // Nothing can be made under /proc: every write of the file fails.
    let p = plane(|c| c.flag_dir = "/proc/tidegate-flags".into()).await;
    let c = &p.controller;
    let mut spec = web_spec();
    spec["flag"] = json!({"file": "/flag"});
    let (s, body) = c.put_challenge("filed", spec).await;
    assert!(s.is_success(), "{body}");
    let (s, inst) = c.spawn("filed", "red").await;
    assert_eq!(s, StatusCode::CREATED, "{inst}");
    let id = inst["id"].as_str().unwrap().to_string();
    let path = format!("/v1/instances/{id}");
    let failed = eventually(60, || async {
        let (_, now) = c.call(Method::GET, &path, None, None).await;
        now["status"]
            .as_str()
            .is_some_and(|s| s.starts_with("failed") && s.contains("flag_dir"))
    })
    .await;
    assert!(failed, "{}", c.call(Method::GET, &path, None, None).await.1);
    // No container was made without its flag.
    assert!(containers(&id).is_empty());
}
