//! The waiting queue: spawns that find no room get 202 and a place;
//! places are admitted in fair order (round-robin across teams, then by
//! arrival) as room frees, each exactly once and under the id it was
//! promised; a place nobody asks about lapses after its hold; the queue is
//! in etcd, so a new scheduler goes on with it in the same order; bad
//! queue settings are refused naming the field.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use etcd_client::Client;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::etcd::EtcdCluster;

fn web(queue: Value) -> Value {
    json!({"image": "x", "queue": queue,
        "ports": [{"name": "web", "port": 80, "protocol": "http"}]})
}

/// A controller on a 1-member etcd with workers of `slots` slots each.
async fn cluster(workers: &[u32]) -> (EtcdCluster, tempfile::TempDir, Controller, Client) {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    for (i, slots) in workers.iter().enumerate() {
        register_worker(&client, &format!("worker-{i}"), *slots).await;
    }
    let c = Controller::start(&etcd, "c1", dir.path()).await;
    assert!(eventually(10, || c.is_leader()).await, "c1 never led");
    assert!(sees_workers(&c, workers.len()).await);
    (etcd, dir, c, client)
}

/// Live instances: id → team.
async fn live(c: &Controller) -> BTreeMap<String, String> {
    let (s, list) = c.call(Method::GET, "/v1/instances", None, None).await;
    assert_eq!(s, StatusCode::OK, "{list}");
    list["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().into(),
                i["team"].as_str().unwrap().into(),
            )
        })
        .collect()
}

/// The queue's ids in admission order, checking each place's position
/// is its rank among its challenge's places (1..=n) and `waiting` is n.
async fn queue(c: &Controller) -> Vec<String> {
    let (s, q) = c.call(Method::GET, "/v1/queue", None, None).await;
    assert_eq!(s, StatusCode::OK, "{q}");
    let q = q["queued"].as_array().unwrap();
    let mut per_challenge: BTreeMap<&str, usize> = BTreeMap::new();
    for w in q {
        let n = per_challenge
            .entry(w["challenge"].as_str().unwrap())
            .or_default();
        *n += 1;
        assert_eq!(w["position"], *n, "{w}");
        assert_eq!(w["status"], "queued", "{w}");
    }
    for w in q {
        assert_eq!(
            w["waiting"],
            per_challenge[w["challenge"].as_str().unwrap()],
            "{w}"
        );
    }
    q.iter().map(|w| w["id"].as_str().unwrap().into()).collect()
}

async fn delete(c: &Controller, id: &str) {
    let (s, body) = c
        .call(Method::DELETE, &format!("/v1/instances/{id}"), None, None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{id}: {body}");
}

/// Frees the room of every live instance and checks that the next ones
/// admitted are exactly the first `expected.len()` of the queue, each under
/// its promised id; returns what is live then.
async fn free_and_expect(c: &Controller, expected: &[String]) -> BTreeMap<String, String> {
    for id in live(c).await.keys() {
        delete(c, id).await;
    }
    let want: BTreeSet<&String> = expected.iter().collect();
    let now = std::sync::Mutex::new(BTreeMap::new());
    let admitted = eventually(20, || async {
        let live = live(c).await;
        let same = live.keys().collect::<BTreeSet<_>>() == want;
        *now.lock().unwrap() = live;
        same
    })
    .await;
    let now = now.into_inner().unwrap();
    assert!(
        admitted,
        "expected {} admitted ({want:?}); live: {now:?}",
        want.len()
    );
    now
}

#[tokio::test]
async fn a_rush_past_capacity_waits_and_is_admitted_in_order_exactly_once() {
    // Room for 30: two workers of 15 slots.
    let (_etcd, _dir, c, _client) = cluster(&[15, 15]).await;
    assert!(
        c.put_challenge("web", web(json!(true)))
            .await
            .0
            .is_success()
    );
    // 200 teams at once.
    let answers = futures::future::join_all((0..200).map(|i| {
        let c = &c;
        async move {
            (
                format!("team-{i:03}"),
                c.spawn("web", &format!("team-{i:03}")).await,
            )
        }
    }))
    .await;
    let mut created = BTreeSet::new();
    let mut queued: BTreeMap<String, String> = BTreeMap::new();
    for (team, (s, body)) in &answers {
        match *s {
            StatusCode::CREATED => {
                created.insert(body["id"].as_str().unwrap().to_string());
            }
            StatusCode::ACCEPTED => {
                assert_eq!(body["status"], "queued", "{body}");
                assert_eq!(body["reason"], "no_capacity", "{body}");
                let detail = body["detail"].as_str().unwrap();
                assert!(
                    detail.contains("free slot") || detail.contains("others are waiting"),
                    "{body}"
                );
                assert_eq!(body["team"], team.as_str(), "{body}");
                assert!(body["position"].as_u64().unwrap() >= 1, "{body}");
                queued.insert(body["id"].as_str().unwrap().into(), team.clone());
            }
            other => panic!("{team}: {other} {body}"),
        }
    }
    assert_eq!((created.len(), queued.len()), (30, 170));
    // Asking again keeps the place (same id), and GET by id answers it.
    let (first_id, first_team) = queued.iter().next().unwrap();
    let (s, again) = c.spawn("web", first_team).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["id"], first_id.as_str());
    let (s, got) = c
        .call(
            Method::GET,
            &format!("/v1/instances/{first_id}?team={first_team}"),
            None,
            None,
        )
        .await;
    assert_eq!((s, &got["status"]), (StatusCode::OK, &json!("queued")));
    // Another team's ?team= sees no such instance.
    let (s, _) = c
        .call(
            Method::GET,
            &format!("/v1/instances/{first_id}?team=team-xyz"),
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // One team per place: no team waits twice.
    let order = queue(&c).await;
    assert_eq!(order.len(), 170);
    assert_eq!(
        order.iter().collect::<BTreeSet<_>>(),
        queued.keys().collect()
    );
    // Room frees 30 at a time: the next 30 in the queue's order come in,
    // under their promised ids, until all 170 have.
    let mut admitted: BTreeMap<String, String> = BTreeMap::new();
    let mut rest = order;
    while !rest.is_empty() {
        let take = rest.len().min(30);
        let now = free_and_expect(&c, &rest[..take]).await;
        for (id, team) in now {
            assert_eq!(
                queued.get(&id),
                Some(&team),
                "{id} admitted for another team"
            );
            assert!(
                admitted.insert(id.clone(), team).is_none(),
                "{id} admitted twice"
            );
        }
        rest.drain(..take);
        assert_eq!(queue(&c).await, rest, "the queue's order changed");
    }
    assert_eq!(admitted.len(), 170);
    let metrics = c.call(Method::GET, "/metrics", None, None).await.1;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.contains("tidegate_controller_admitted_total 170"),
        "{metrics}"
    );
    assert!(metrics.contains("tidegate_controller_queued_total 170"));
    assert!(metrics.contains("tidegate_controller_queue_length 0"));
}

#[tokio::test]
async fn admission_is_round_robin_across_teams_then_by_arrival() {
    // One slot; a filler holds it.
    let (_etcd, _dir, c, _client) = cluster(&[1]).await;
    for name in ["a", "b"] {
        assert!(c.put_challenge(name, web(json!(true))).await.0.is_success());
    }
    assert_eq!(c.spawn("a", "filler").await.0, StatusCode::CREATED);
    // Arrival: t1 a, t1 b, t2 a, t3 b.
    let mut id = BTreeMap::new();
    for (team, ch) in [("t1", "a"), ("t1", "b"), ("t2", "a"), ("t3", "b")] {
        let (s, body) = c.spawn(ch, team).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
        id.insert((team, ch), body["id"].as_str().unwrap().to_string());
    }
    // t1's second place comes after every team's first.
    let fair: Vec<String> = [("t1", "a"), ("t2", "a"), ("t3", "b"), ("t1", "b")]
        .iter()
        .map(|k| id[k].clone())
        .collect();
    assert_eq!(queue(&c).await, fair);
    for (i, next) in fair.iter().enumerate() {
        free_and_expect(&c, std::slice::from_ref(next)).await;
        assert_eq!(queue(&c).await, fair[i + 1..]);
    }
}

#[tokio::test]
async fn a_place_nobody_asks_about_lapses_and_leaving_frees_it() {
    let (_etcd, _dir, c, _client) = cluster(&[1]).await;
    let held = json!({"hold_secs": 5});
    assert!(c.put_challenge("web", web(held)).await.0.is_success());
    assert_eq!(c.spawn("web", "filler").await.0, StatusCode::CREATED);
    let mut ids = BTreeMap::new();
    for team in ["poller", "gone", "leaver"] {
        let (s, body) = c.spawn("web", team).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["hold_secs"], 5);
        ids.insert(team, body["id"].as_str().unwrap().to_string());
    }
    let path = |team: &str| format!("/v1/instances/{}?team={team}", ids[team]);
    // The leaver leaves at once.
    let (s, body) = c.call(Method::DELETE, &path("leaver"), None, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(
        c.call(Method::GET, &path("leaver"), None, None).await.0,
        StatusCode::NOT_FOUND
    );
    // The poller asks every second for 9 s; nobody asks about "gone".
    for _ in 0..9 {
        let (s, body) = c.call(Method::GET, &path("poller"), None, None).await;
        assert_eq!(
            (s, &body["status"]),
            (StatusCode::OK, &json!("queued")),
            "{body}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        c.call(Method::GET, &path("gone"), None, None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(queue(&c).await, vec![ids["poller"].clone()]);
    // A team that lost its place can ask again: a new place, at the end.
    let (s, body) = c.spawn("web", "gone").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    assert_ne!(body["id"], ids["gone"].as_str());
    assert_eq!(body["position"], 2);
}

#[tokio::test]
async fn the_queue_survives_a_leader_kill_in_order_and_the_new_leader_admits_it() {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 10).await;
    let mut c1 = Controller::start(&etcd, "c1", dir.path()).await;
    assert!(eventually(10, || c1.is_leader()).await, "c1 never led");
    let c2 = Controller::start(&etcd, "c2", dir.path()).await;
    assert!(
        c1.put_challenge("web", web(json!(true)))
            .await
            .0
            .is_success()
    );
    assert!(sees_workers(&c1, 1).await && sees_workers(&c2, 1).await);
    let mut queued = BTreeMap::new();
    for i in 0..110 {
        let team = format!("team-{i:03}");
        let (s, body) = c1.spawn("web", &team).await;
        if i < 10 {
            assert_eq!(s, StatusCode::CREATED, "{body}");
        } else {
            assert_eq!(s, StatusCode::ACCEPTED, "{body}");
            assert_eq!(body["position"], i - 9, "{body}");
            queued.insert(body["id"].as_str().unwrap().to_string(), team);
        }
    }
    let before = queue(&c1).await;
    assert_eq!(before.len(), 100);
    c1.proc.kill().unwrap();
    assert!(
        eventually(4 * ELECTION_TTL, || c2.is_leader()).await,
        "c2 never took over"
    );
    // Same places, same order, on the new leader.
    assert_eq!(queue(&c2).await, before);
    // The new leader admits the first ten as room frees...
    let now = free_and_expect(&c2, &before[..10]).await;
    for (id, team) in &now {
        assert_eq!(queued.get(id), Some(team));
    }
    // ...and every other once there is room for all.
    register_worker(&client, "worker-b", 200).await;
    let all: BTreeSet<&String> = before.iter().collect();
    let seen = std::sync::Mutex::new(BTreeSet::new());
    let done = eventually(20, || async {
        let live = live(&c2).await;
        seen.lock().unwrap().extend(live.keys().cloned());
        live.len() == 100 && queue(&c2).await.is_empty()
    })
    .await;
    assert!(done, "not all admitted: {} live", live(&c2).await.len());
    assert_eq!(
        seen.into_inner().unwrap().iter().collect::<BTreeSet<_>>(),
        all
    );
    // Nothing queued is left in etcd, and every admitted id is one instance.
    assert_eq!(count(&client, "/tidegate/queue/").await, 0);
    assert_eq!(count(&client, "/tidegate/instances/").await, 100);
}

#[tokio::test]
async fn bad_queue_settings_are_refused_naming_the_field() {
    let (_etcd, _dir, c, _client) = cluster(&[1]).await;
    for (queue, field) in [
        (json!({"hold_secs": 1}), "queue.hold_secs"),
        (json!({"hold_secs": 100000}), "queue.hold_secs"),
        (json!({"max_waiting": 0}), "queue.max_waiting"),
        (json!({"max_waiting": 1000001}), "queue.max_waiting"),
        (json!({"wait": 3}), "queue"),
        (json!("yes"), "queue"),
    ] {
        let (s, body) = c.put_challenge("web", web(queue.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{queue}: {body}");
        let said = format!("{} {}", body["field"], body["error"]);
        assert!(said.contains(field), "{queue}: {body}");
    }
    // Queueing off: a full cluster answers 503 as before.
    assert!(
        c.put_challenge("web", web(json!(false)))
            .await
            .0
            .is_success()
    );
    assert_eq!(c.spawn("web", "t1").await.0, StatusCode::CREATED);
    let (s, body) = c.spawn("web", "t2").await;
    assert_eq!(
        (s, &body["reason"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("no_capacity")),
        "{body}"
    );
    // A small queue: past max_waiting, 503 queue_full.
    assert!(
        c.put_challenge("web", web(json!({"max_waiting": 1})))
            .await
            .0
            .is_success()
    );
    assert_eq!(c.spawn("web", "t2").await.0, StatusCode::ACCEPTED);
    let (s, body) = c.spawn("web", "t3").await;
    assert_eq!(
        (s, &body["reason"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("queue_full")),
        "{body}"
    );
}

#[tokio::test]
async fn places_wait_while_no_worker_is_registered_and_are_admitted_when_one_is() {
    let (_etcd, _dir, c, client) = cluster(&[]).await;
    let lease = register_worker(&client, "worker-x", 1).await;
    assert!(sees_workers(&c, 1).await);
    assert!(
        c.put_challenge("web", web(json!(true)))
            .await
            .0
            .is_success()
    );
    assert_eq!(c.spawn("web", "filler").await.0, StatusCode::CREATED);
    let (s, body) = c.spawn("web", "t1").await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
    let place = body["id"].as_str().unwrap().to_string();
    // The only worker goes (an agent restarting): the place waits.
    client.clone().lease_revoke(lease).await.unwrap();
    assert!(sees_workers(&c, 0).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(queue(&c).await, vec![place.clone()]);
    // A worker with room comes: the place is admitted under its id.
    register_worker(&client, "worker-y", 4).await;
    let admitted = eventually(10, || async { live(&c).await.contains_key(&place) }).await;
    assert!(admitted, "never admitted: {:?}", queue(&c).await);
}
