//! Controller replicas under failure, as real processes against a real
//! 3-member etcd: leader killed, leader paused past its lease, etcd quorum
//! lost and restored.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::time::{Duration, Instant};

use common::*;
use etcd_client::{Client, GetOptions};
use reqwest::StatusCode;
use serde_json::Value;
use tidegate_lab::etcd::EtcdCluster;

/// Two replicas, c1 the leader; a worker and the `web` challenge registered.
async fn two_replicas(
    etcd: &EtcdCluster,
    dir: &std::path::Path,
) -> (Controller, Controller, Client) {
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 100).await;
    let c1 = Controller::start(etcd, "c1", dir).await;
    assert!(eventually(10, || c1.is_leader()).await, "c1 never led");
    let c2 = Controller::start(etcd, "c2", dir).await;
    assert_eq!(c2.status().await["role"], "standby");
    assert_eq!(
        c1.put_challenge("web", web_spec()).await.0,
        StatusCode::CREATED
    );
    for c in [&c1, &c2] {
        assert!(
            eventually(5, || async {
                c.call(reqwest::Method::GET, "/v1/workers", None, None)
                    .await
                    .1["workers"][0]["id"]
                    == "worker-a"
            })
            .await
        );
    }
    (c1, c2, client)
}

/// (team, fencing token) of every instance record in etcd.
async fn records(client: &Client) -> Vec<(String, i64)> {
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
            let v = serde_json::from_slice::<Value>(kv.value()).unwrap();
            (
                v["team"].as_str().unwrap().to_string(),
                v["token"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// A spawn sent to a standby, its answer and which replica made it.
async fn spawn_at(c: &Controller, team: &str, token: &str) -> (StatusCode, Option<String>, Value) {
    let resp = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}/v1/instances", c.url))
        .bearer_auth(token)
        .body(format!(r#"{{"challenge": "web", "team": "{team}"}}"#))
        .send()
        .await
        .unwrap();
    let by = resp
        .headers()
        .get("x-tidegate-scheduler")
        .map(|v| v.to_str().unwrap().to_string());
    (resp.status(), by, resp.json().await.unwrap())
}

#[tokio::test]
async fn a_standby_forwards_then_takes_over_within_two_ttls_when_the_leader_is_killed() {
    let etcd = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut c1, c2, client) = two_replicas(&etcd, dir.path()).await;
    let c1_token = c1.status().await["token"].as_i64().unwrap();

    // The standby carries the spawn to the scheduler, with the caller's
    // token: no redirect, one answer, the record written under c1's token.
    let (s, by, body) = spawn_at(&c2, "t1", PLATFORM).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    assert_eq!(by.as_deref(), Some("c1"));
    assert_eq!(records(&client).await, [("t1".to_string(), c1_token)]);
    // A renewal too (too early to extend: the scheduler's own 409).
    let id = body["id"].as_str().unwrap();
    let (s, body) = c2
        .call(
            reqwest::Method::POST,
            &format!("/v1/instances/{id}/renew"),
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("would not extend"),
        "{body}"
    );
    // A bad token is refused by the standby itself, never forwarded.
    let (s, by, _) = spawn_at(&c2, "t2", "not-a-token").await;
    assert_eq!((s, by), (StatusCode::UNAUTHORIZED, None));
    // A request marked as forwarded is not forwarded again.
    let (s, body) = c2
        .call_with(
            reqwest::Method::POST,
            "/v1/instances",
            Some(serde_json::json!({"challenge": "web", "team": "t3"})),
            &[("x-tidegate-forwarded-by", "c9")],
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"].as_str().unwrap().contains("by c9"), "{body}");
    assert_eq!(c2.status().await["leader"]["id"], "c1");
    assert_eq!(c2.status().await["counters"]["forwarded"], 2);

    let killed = Instant::now();
    c1.proc.kill().unwrap();
    assert!(
        eventually(4 * ELECTION_TTL, || c2.is_leader()).await,
        "no takeover"
    );
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(2 * ELECTION_TTL),
        "takeover took {took:?}"
    );
    eprintln!("takeover after SIGKILL of the leader: {took:?}");
    let status = c2.status().await;
    assert_eq!(status["leader"]["id"], "c2");
    let (s, body) = c2.spawn("web", "t4").await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    // The dead scheduler's key has expired: nothing names it any more.
    let (s, by, _) = spawn_at(&c2, "t5", PLATFORM).await;
    assert_eq!((s, by), (StatusCode::CREATED, None));
}

#[tokio::test]
async fn a_standby_that_cannot_reach_the_scheduler_answers_503_naming_it() {
    // Killed: nothing listens, refused at once (before the standby's own
    // takeover, a TTL later). Paused: its port accepts but never answers,
    // so the forward times out (10 x etcd_timeout_ms).
    // A kill racing the hop's connect may also reset a connection the
    // kernel had accepted: "failed to answer" (it may have been carried out).
    for (how, said) in [
        ("KILL", ["could not be reached", "failed to answer"]),
        ("STOP", ["did not answer within", "did not answer within"]),
    ] {
        let etcd = EtcdCluster::start(3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (c1, c2, _client) = two_replicas(&etcd, dir.path()).await;
        c1.proc.signal(how).unwrap();
        let (s, body) = c2.spawn("web", "t1").await;
        if how == "STOP" {
            c1.proc.signal("CONT").unwrap();
        }
        match s {
            StatusCode::SERVICE_UNAVAILABLE => {
                let e = body["error"].as_str().unwrap();
                assert!(
                    e.contains("the scheduler c1 at") && said.iter().any(|s| e.contains(s)),
                    "{how}: {body}"
                );
                assert_eq!(body["leader"], c1.url.as_str(), "{body}");
                assert_eq!(c2.status().await["counters"]["forward_failed"], 1);
            }
            // Only if c2 had taken over before it asked.
            StatusCode::CREATED => assert!(c2.is_leader().await, "{how}: {body}"),
            other => panic!("{how}: unexpected {other}: {body}"),
        }
    }
}

/// Whether a resumed ex-leader handles a queued spawn before it notices its
/// lost lease (then etcd must refuse the stale token) or after (it
/// forwards) is up to scheduling. Every round checks the safety property
/// (no write with the stale token lands; each answer is fenced or made by
/// the new leader); rounds go on, roles swapped, until one
/// shows a fenced attempt — once on a quiet machine, at most four.
#[tokio::test]
async fn a_leader_paused_past_its_lease_lands_no_write_when_it_resumes() {
    let etcd = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (c1, c2, client) = two_replicas(&etcd, dir.path()).await;
    let (mut leader, mut standby) = (&c1, &c2);
    let mut fenced = 0;
    for round in 1..=4 {
        fenced += paused_leader_round(leader, standby, &client, round).await;
        if fenced > 0 {
            break;
        }
        std::mem::swap(&mut leader, &mut standby);
    }
    assert!(
        fenced >= 1,
        "in 4 rounds the paused leader never tried to write (all forwarded)"
    );
}

/// Pauses `leader` until `standby` takes over, queues 10 spawns at the
/// paused one, resumes it and checks what it answered and wrote; returns
/// how many were fenced.
async fn paused_leader_round(
    leader: &Controller,
    standby: &Controller,
    client: &Client,
    round: u32,
) -> u64 {
    let old_token = leader.status().await["token"].as_i64().unwrap();
    let fenced_before = leader.status().await["counters"]["fenced_writes"]
        .as_u64()
        .unwrap();
    leader.proc.signal("STOP").unwrap();
    assert!(
        eventually(5 * ELECTION_TTL, || standby.is_leader()).await,
        "round {round}: no takeover while {} is stopped",
        leader.id
    );
    let new_token = standby.status().await["token"].as_i64().unwrap();
    assert!(new_token > old_token);

    // Spawns reach the paused ex-leader; they run when the process resumes.
    let pending: Vec<_> = (0..10)
        .map(|i| {
            let url = leader.url.clone();
            tokio::spawn(async move {
                let r = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .unwrap()
                    .post(format!("{url}/v1/instances"))
                    .bearer_auth(PLATFORM)
                    .body(format!(
                        r#"{{"challenge": "web", "team": "paused-{round}-{i}"}}"#
                    ))
                    .send()
                    .await
                    .unwrap();
                let by = r
                    .headers()
                    .get("x-tidegate-scheduler")
                    .map(|v| v.to_str().unwrap().to_string());
                (r.status(), by, r.text().await.unwrap())
            })
        })
        .collect();
    // Resume only once all ten are connected (the kernel accepts them while
    // the process is stopped): requests arriving after the resume are
    // forwarded.
    let port = leader.url.rsplit(':').next().unwrap().to_string();
    let connected = || {
        let out = std::process::Command::new("ss")
            .args([
                "-Htn",
                "state",
                "established",
                &format!("( sport = :{port} )"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    for _ in 0..100 {
        if connected() >= 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.proc.signal("CONT").unwrap();
    let (mut fenced, mut forwarded) = (0, 0);
    for p in pending {
        let (status, by, body) = p.await.unwrap();
        eprintln!("round {round}: paused ex-leader answered {status} (scheduler {by:?}) {body}");
        match status {
            // It tried, and etcd refused the stale token.
            StatusCode::SERVICE_UNAVAILABLE if body.contains("fencing token") => fenced += 1,
            // It noticed the lost lease first and carried it to the new leader.
            StatusCode::CREATED => {
                assert_eq!(by.as_deref(), Some(standby.id.as_str()), "{body}");
                forwarded += 1;
            }
            other => panic!("round {round}: unexpected answer {other}: {body}"),
        }
    }
    let counters = leader.status().await["counters"].clone();
    eprintln!("round {round}: {fenced} of 10 were fenced; counters: {counters}");
    assert_eq!(
        counters["fenced_writes"].as_u64().unwrap() - fenced_before,
        fenced
    );
    // None of the queued spawns landed with the stale token: those that
    // landed are the forwarded ones, under the new leader's token.
    let paused = format!("paused-{round}-");
    let landed: Vec<_> = records(client)
        .await
        .into_iter()
        .filter(|(team, _)| team.starts_with(&paused))
        .collect();
    assert!(
        landed.iter().all(|(_, token)| *token == new_token) && landed.len() == forwarded,
        "round {round}: {forwarded} forwarded, but landed: {landed:?} (the stale token was {old_token}, the new {new_token})"
    );
    // The new leader schedules normally, and the old one rejoins as a standby.
    assert_eq!(
        standby.spawn("web", &format!("t-after-{round}")).await.0,
        StatusCode::CREATED
    );
    assert!(eventually(5, || async { leader.status().await["role"] == "standby" }).await);
    assert!(
        records(client)
            .await
            .contains(&(format!("t-after-{round}"), new_token))
    );
    fenced
}

#[tokio::test]
async fn losing_etcd_quorum_answers_503_quickly_and_recovers_without_restart() {
    let mut etcd = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 100).await;
    let c = Controller::start(&etcd, "c1", dir.path()).await;
    assert!(eventually(10, || c.is_leader()).await);
    c.put_challenge("web", web_spec()).await;
    assert!(
        eventually(5, || async {
            c.call(reqwest::Method::GET, "/v1/workers", None, None)
                .await
                .1["workers"][0]["id"]
                == "worker-a"
        })
        .await
    );
    assert_eq!(c.spawn("web", "before").await.0, StatusCode::CREATED);

    etcd.kill_member(1).unwrap();
    etcd.kill_member(2).unwrap();
    for team in ["q1", "q2", "q3"] {
        let started = Instant::now();
        let (s, body) = c.spawn("web", team).await;
        let took = started.elapsed();
        eprintln!("spawn without quorum: {s} in {took:?}: {body}");
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(!body["error"].as_str().unwrap().is_empty());
        assert!(took < Duration::from_secs(5), "503 took {took:?}");
    }

    etcd.restart_member(1).unwrap();
    etcd.restart_member(2).unwrap();
    etcd.wait_healthy(0).unwrap();
    let started = Instant::now();
    let mut recovered = false;
    for i in 0..300 {
        if c.spawn("web", &format!("after-{i}")).await.0 == StatusCode::CREATED {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "spawns did not succeed within 30 s of quorum returning"
    );
    eprintln!(
        "spawns succeeded again {:?} after quorum returned",
        started.elapsed()
    );
    assert!(c.proc.is_alive(), "the controller had to restart");
}
