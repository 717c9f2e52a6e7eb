//! Issue #23's shards through the real binaries: three controllers with
//! sixteen shards, a real etcd and a real agent.
//!
//! - each controller leads 5 or 6 shards, and any of them takes a spawn
//!   for any shard (forwarded, never a 307);
//! - a killed controller's shards move to the others within its lease
//!   TTL while spawns to the other shards see no error; restarted, it
//!   takes its share back;
//! - a paused controller's shards move; nothing it led is written with
//!   its old tokens after the move, and the other shards go on;
//! - 200 concurrent spawns over every shard and all three controllers
//!   keep the worker's capacity and every team's per-challenge limit.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::daemons::{ADMIN, Agent, Controller, eventually, web_spec};
use tidegate_lab::etcd::EtcdCluster;
use tidegate_lab::images::ensure_demo_images;
use tidegate_lab::keys;
use tidegate_schema::shards::shard_of;

const SHARDS: u16 = 16;

struct Sharded {
    controllers: Vec<Controller>,
    _agent: Agent,
    client: Client,
    etcd: EtcdCluster,
    dir: tempfile::TempDir,
    worker: String,
}

/// etcd, three controllers with 16 shards, one agent of `capacity` slots.
async fn sharded(capacity: u32) -> Sharded {
    ensure_demo_images().unwrap();
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut controllers = Vec::new();
    for id in ["c1", "c2", "c3"] {
        controllers
            .push(Controller::start_on(&etcd, id, dir.path(), None, |c| c.shards = SHARDS).await);
    }
    let worker = format!("worker-s-{}", std::process::id());
    let agent = Agent::start(&etcd, &worker, dir.path(), |a| a.capacity = capacity).await;
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let s = Sharded {
        controllers,
        _agent: agent,
        client,
        etcd,
        dir,
        worker,
    };
    let all: Vec<usize> = vec![0, 1, 2];
    assert!(
        eventually(20, || async { spread(&s, &all).await.is_some() }).await,
        "16 shards were not spread 5-6 over three controllers: {:?}",
        leads(&s, &all).await
    );
    assert!(
        eventually(10, || async {
            s.controllers[0]
                .call(Method::GET, "/v1/workers", None, None)
                .await
                .1["workers"][0]["id"]
                == s.worker.as_str()
        })
        .await,
        "the agent never registered"
    );
    s
}

/// Controller index → the shards it says it leads (alive ones in `which`).
async fn leads(s: &Sharded, which: &[usize]) -> BTreeMap<usize, Vec<u16>> {
    let mut out = BTreeMap::new();
    for &i in which {
        let st = s.controllers[i].status().await;
        let led: Vec<u16> = st["shards"]["led"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u16)
                    .collect()
            })
            .unwrap_or_default();
        out.insert(i, led);
    }
    out
}

/// Shard → its one leader among `which`, when every shard has exactly one
/// and each of them leads 16/n rounded up or down.
async fn spread(s: &Sharded, which: &[usize]) -> Option<BTreeMap<u16, usize>> {
    let l = leads(s, which).await;
    let mut by_shard = BTreeMap::new();
    for (i, shards) in &l {
        for shard in shards {
            if by_shard.insert(*shard, *i).is_some() {
                return None;
            }
        }
    }
    let n = which.len();
    let (lo, hi) = (usize::from(SHARDS) / n, usize::from(SHARDS).div_ceil(n));
    (by_shard.len() == usize::from(SHARDS) && l.values().all(|v| (lo..=hi).contains(&v.len())))
        .then_some(by_shard)
}

/// One challenge name per shard.
fn challenge_of_shard(shard: u16) -> String {
    (0..100_000)
        .map(|i| format!("sh{shard}-{i}"))
        .find(|n| shard_of(n, SHARDS) == shard)
        .unwrap()
}

/// Puts one challenge per shard (through c1), with `extra` in its spec.
async fn challenges(s: &Sharded, extra: Value) -> Vec<String> {
    let mut names = Vec::new();
    for shard in 0..SHARDS {
        let name = challenge_of_shard(shard);
        let mut spec = web_spec();
        if let (Some(o), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        let (st, body) = s.controllers[0]
            .call(
                Method::PUT,
                &format!("/v1/challenges/{name}"),
                Some(spec),
                Some(ADMIN),
            )
            .await;
        assert!(st.is_success(), "{name}: {st} {body}");
        names.push(name);
    }
    names
}

/// Spawns then deletes at once (the worker's slots stay free); the spawn's status.
async fn spawn_and_free(c: &Controller, challenge: &str, team: &str) -> (StatusCode, Value) {
    let (st, body) = c.spawn(challenge, team).await;
    if st == StatusCode::CREATED
        && let Some(id) = body["id"].as_str()
    {
        let (d, gone) = c
            .call(Method::DELETE, &format!("/v1/instances/{id}"), None, None)
            .await;
        assert!(d.is_success(), "deleting {id}: {d} {gone}");
    }
    (st, body)
}

#[tokio::test]
async fn sixteen_shards_over_three_controllers_move_on_kill_and_pause_and_any_controller_spawns() {
    let mut s = sharded(8).await;
    let names = challenges(&s, json!({})).await;
    let owners = spread(&s, &[0, 1, 2]).await.unwrap();
    eprintln!("leads: {:?}", leads(&s, &[0, 1, 2]).await);

    // Any controller takes a spawn for any shard: its own or forwarded,
    // never a redirect.
    for (i, c) in s.controllers.iter().enumerate() {
        let own = owners.iter().find(|(_, o)| **o == i).unwrap().0;
        let other = owners.iter().find(|(_, o)| **o != i).unwrap().0;
        for shard in [*own, *other] {
            let (st, body) =
                spawn_and_free(c, &names[usize::from(shard)], &format!("any-{i}")).await;
            assert_eq!(
                st,
                StatusCode::CREATED,
                "c{} for shard {shard}: {body}",
                i + 1
            );
        }
    }

    // Kill c3: its shards move to c1 and c2 within its lease TTL (2 s in
    // the lab); spawns for c1's and c2's shards, through both, meanwhile
    // all succeed.
    let c3_shards: BTreeSet<u16> = owners
        .iter()
        .filter(|(_, o)| **o == 2)
        .map(|(s, _)| *s)
        .collect();
    let others: Vec<u16> = (0..SHARDS).filter(|k| !c3_shards.contains(k)).collect();
    s.controllers[2].proc.signal("KILL").unwrap();
    let killed = Instant::now();
    let mut n = 0;
    let mut moved_in = None;
    while killed.elapsed() < Duration::from_secs(20) {
        let shard = others[n % others.len()];
        let c = &s.controllers[n % 2];
        let (st, body) = spawn_and_free(c, &names[usize::from(shard)], &format!("move-{n}")).await;
        assert_eq!(
            st,
            StatusCode::CREATED,
            "spawn {n} for shard {shard} (not c3's) during the move: {body}"
        );
        n += 1;
        if moved_in.is_none() && spread(&s, &[0, 1]).await.is_some() {
            moved_in = Some(killed.elapsed());
        }
        if moved_in.is_some() && n >= 20 {
            break;
        }
    }
    let moved_in = moved_in.expect("c3's shards were not taken over within 20 s");
    eprintln!(
        "c3 killed: its {} shards moved in {moved_in:?}; {n} spawns to the other shards meanwhile, all 201",
        c3_shards.len()
    );
    assert!(
        moved_in < Duration::from_secs(8),
        "the move took {moved_in:?}"
    );
    // Its shards are spawned for again (through the forward to the new leader).
    for shard in &c3_shards {
        let (st, body) =
            spawn_and_free(&s.controllers[0], &names[usize::from(*shard)], "after-kill").await;
        assert_eq!(
            st,
            StatusCode::CREATED,
            "shard {shard} after the move: {body}"
        );
    }

    // c3 comes back and takes its share back.
    let dir = s.dir.path().to_path_buf();
    s.controllers[2].restart(&dir).await;
    let back = Instant::now();
    assert!(
        eventually(60, || async { spread(&s, &[0, 1, 2]).await.is_some() }).await,
        "c3 did not take shards back within a minute: {:?}",
        leads(&s, &[0, 1, 2]).await
    );
    eprintln!(
        "c3 restarted: led {:?} after {:?}",
        leads(&s, &[2]).await,
        back.elapsed()
    );

    // Pause c2 (SIGSTOP): its shards move; the others' go on.
    let owners = spread(&s, &[0, 1, 2]).await.unwrap();
    let c2_shards: BTreeSet<u16> = owners
        .iter()
        .filter(|(_, o)| **o == 1)
        .map(|(s, _)| *s)
        .collect();
    let c2_tokens = tokens_of(&s, &c2_shards).await;
    s.controllers[1].proc.signal("STOP").unwrap();
    let paused = Instant::now();
    let mut n = 0;
    let c1_shard = *owners.iter().find(|(_, o)| **o == 0).unwrap().0;
    while paused.elapsed() < Duration::from_secs(6) {
        let (st, body) = spawn_and_free(
            &s.controllers[0],
            &names[usize::from(c1_shard)],
            &format!("pause-{n}"),
        )
        .await;
        assert_eq!(
            st,
            StatusCode::CREATED,
            "c1's shard {c1_shard} while c2 is paused: {body}"
        );
        n += 1;
    }
    let taken = tokens_of(&s, &c2_shards).await;
    for shard in &c2_shards {
        assert!(
            taken
                .get(shard)
                .is_some_and(|t| Some(t) != c2_tokens.get(shard)),
            "shard {shard} of the paused c2 was not taken over: {c2_tokens:?} -> {taken:?}"
        );
    }
    // Spawns for c2's old shards go to the new leaders.
    let since = revision(&s).await;
    for shard in &c2_shards {
        let (st, body) = s.controllers[0]
            .spawn(&names[usize::from(*shard)], "after-pause")
            .await;
        assert_eq!(
            st,
            StatusCode::CREATED,
            "shard {shard} with c2 paused: {body}"
        );
    }
    // c2 wakes up: whatever it still tries for those shards is fenced.
    s.controllers[1].proc.signal("CONT").unwrap();
    let (st, body) = s.controllers[1]
        .spawn(
            &names[usize::from(*c2_shards.iter().next().unwrap())],
            "woken",
        )
        .await;
    assert!(
        st == StatusCode::CREATED || st == StatusCode::SERVICE_UNAVAILABLE,
        "the woken c2: {st} {body}"
    );
    // No record created since the takeover carries one of c2's old tokens.
    let records = s
        .client
        .clone()
        .get(
            keys::prefix(tidegate_schema::Kind::Instances),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let old: BTreeSet<i64> = c2_tokens.values().copied().collect();
    for kv in records.kvs() {
        let r: Value = serde_json::from_slice(kv.value()).unwrap();
        let token = r["token"].as_i64().unwrap_or_default();
        assert!(
            kv.create_revision() < since || !old.contains(&token),
            "{} was created at {} with the paused c2's token {token}",
            r["id"],
            kv.create_revision()
        );
    }
    eprintln!(
        "c2 paused: its {} shards moved; {n} spawns to c1's shard {c1_shard} meanwhile, all 201",
        c2_shards.len()
    );
    drop(s.etcd);
}

/// Shard → the token of its current leader key.
async fn tokens_of(s: &Sharded, shards: &BTreeSet<u16>) -> BTreeMap<u16, i64> {
    let mut out = BTreeMap::new();
    for shard in shards {
        let key = keys::ks().key(&tidegate_schema::Key::ShardLeader(*shard));
        let got = s.client.clone().get(key, None).await.unwrap();
        if let Some(kv) = got.kvs().first() {
            out.insert(*shard, kv.create_revision());
        }
    }
    out
}

async fn revision(s: &Sharded) -> i64 {
    s.client
        .clone()
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

#[tokio::test]
async fn two_hundred_concurrent_spawns_over_every_shard_keep_capacity_and_team_limits() {
    const SLOTS: usize = 12;
    let s = sharded(SLOTS as u32).await;
    let names = challenges(&s, json!({"per_team_max": 1})).await;
    // 100 (team, challenge) pairs over all 16 shards, each asked twice at
    // once, through the three controllers in turn.
    let mut asks = Vec::new();
    for p in 0..100usize {
        let (team, challenge) = (format!("team-{}", p % 40), names[p % 16].clone());
        for copy in 0..2 {
            asks.push((p * 2 + copy, team.clone(), challenge.clone()));
        }
    }
    let urls: Vec<String> = s.controllers.iter().map(|c| c.url.clone()).collect();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let started = Instant::now();
    let tasks: Vec<_> = asks
        .into_iter()
        .map(|(i, team, challenge)| {
            let (http, url) = (http.clone(), urls[i % 3].clone());
            tokio::spawn(async move {
                let resp = http
                    .post(format!("{url}/v1/instances"))
                    .bearer_auth(tidegate_lab::daemons::PLATFORM)
                    .json(&json!({"challenge": challenge, "team": team}))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                (status, team, challenge, body)
            })
        })
        .collect();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut created: BTreeMap<(String, String), usize> = BTreeMap::new();
    for t in tasks {
        let (status, team, challenge, body) = t.await.unwrap();
        assert_ne!(status, StatusCode::TEMPORARY_REDIRECT, "{body}");
        *by_status.entry(status.as_u16()).or_default() += 1;
        if status == StatusCode::CREATED {
            *created.entry((team, challenge)).or_default() += 1;
        } else {
            *reasons
                .entry(body["reason"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
    }
    eprintln!(
        "200 concurrent spawns in {:?}: {by_status:?}, refusals {reasons:?}",
        started.elapsed()
    );
    for (pair, n) in &created {
        assert_eq!(*n, 1, "{pair:?} got {n} instances (per_team_max 1)");
    }
    let total: usize = created.values().sum();
    assert!(
        total <= SLOTS,
        "{total} instances on a worker of {SLOTS} slots"
    );
    // What etcd holds agrees: never more than the worker's slots.
    let records = s
        .client
        .clone()
        .get(
            keys::prefix(tidegate_schema::Kind::Instances),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    assert_eq!(records.kvs().len(), total);
    assert!(
        total >= SLOTS / 2,
        "only {total} of {SLOTS} slots were used: {reasons:?}"
    );
    assert!(
        reasons
            .keys()
            .all(|r| ["team_limit", "no_capacity", "guarded", "contended"].contains(&r.as_str())),
        "{reasons:?}"
    );
}

/// A shard no controller may lead answers 503 `no_scheduler` naming the
/// shard and the challenge (after waiting up to 2 s for one), and spawns
/// go through again once one leads it. The controller is made to fail
/// closed by an old single-election controller's key, which it never
/// schedules beside.
#[tokio::test]
async fn a_shard_without_a_scheduler_answers_503_no_scheduler_naming_it() {
    ensure_demo_images().unwrap();
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start_on(&etcd, "c1", dir.path(), None, |c| c.shards = SHARDS).await;
    let worker = format!("worker-n-{}", std::process::id());
    let _agent = Agent::start(&etcd, &worker, dir.path(), |a| a.capacity = 2).await;
    let (s, body) = c.put_challenge("web", web_spec()).await;
    assert!(s.is_success(), "{body}");
    // It leads every shard first: an empty `led` below can then only be
    // its failing closed, not a first poll yet to come.
    assert!(
        eventually(10, || async {
            c.status().await["shards"]["led"]
                .as_array()
                .is_some_and(|l| l.len() == usize::from(SHARDS))
        })
        .await,
        "a lone controller did not lead all {SHARDS} shards: {}",
        c.status().await
    );
    let mut client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let lease = client.lease_grant(60, None).await.unwrap().id();
    let old = format!(
        "{}{lease:x}",
        keys::prefix(tidegate_schema::keys::Kind::Election)
    );
    client
        .put(
            old.as_str(),
            "an-old-controller",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    assert!(
        eventually(10, || async {
            c.status().await["shards"]["led"]
                .as_array()
                .is_some_and(Vec::is_empty)
        })
        .await,
        "the controller went on leading beside an old single-election controller: {}",
        c.status().await
    );
    let started = Instant::now();
    let (s, body) = c.spawn("web", "t1").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["reason"], "no_scheduler", "{body}");
    let shard = shard_of("web", SHARDS);
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("shard {shard} ")) && error.contains("\"web\""),
        "the 503 does not name shard {shard} and challenge web: {body}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "answered before waiting for a scheduler: {:?}",
        started.elapsed()
    );
    client.lease_revoke(lease).await.unwrap();
    assert!(
        eventually(20, || async {
            c.spawn("web", "t1").await.0 == StatusCode::CREATED
        })
        .await,
        "no spawn went through after the old controller's key was gone"
    );
}
