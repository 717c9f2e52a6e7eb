//! Hostile use of the API, against a real controller and a real etcd:
//! another team's instance id, floods of one team, and renewals whose
//! answers etcd loses.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use etcd_client::Client;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::etcd::EtcdCluster;
use tidegate_lab::faults::LossyLink;
use tidegate_lab::slow::{raw_exchange, read_to_close, rss_kib, slowloris};
use tidegate_schema::config::{Rate, RateLimits};

async fn worker_listed(c: &Controller) {
    assert!(
        eventually(5, || async {
            c.call(Method::GET, "/v1/workers", None, None).await.1["workers"][0]["id"] == "worker-a"
        })
        .await
    );
}

/// etcd (`members`), a controller configured by `configure`, a registered
/// worker with room for 10,000 instances, and challenge `web` from `spec`.
struct Lab {
    etcd: EtcdCluster,
    _dir: tempfile::TempDir,
    c: Controller,
    client: Client,
}

async fn lab(
    members: usize,
    spec: Value,
    configure: impl FnOnce(&mut tidegate_schema::config::ControllerConfig),
) -> Lab {
    let etcd = EtcdCluster::start(members).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start_on(&etcd, "c1", dir.path(), None, configure).await;
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 10_000).await;
    assert_eq!(c.put_challenge("web", spec).await.0, StatusCode::CREATED);
    worker_listed(&c).await;
    Lab {
        etcd,
        _dir: dir,
        c,
        client,
    }
}

#[tokio::test]
async fn another_teams_instance_id_is_answered_as_a_missing_one() {
    let spec = json!({"image": "x", "ports": [{"name": "web", "port": 80, "protocol": "http"}],
        "ttl": {"default_secs": 30, "max_secs": 600, "max_renewals": 5},
        "flag": {"template": "CTF{{hmac}}"}});
    let Lab {
        c,
        etcd: _etcd,
        _dir,
        ..
    } = lab(1, spec, |_| {}).await;
    let (s, inst) = c.spawn("web", "alice").await;
    assert_eq!(s, StatusCode::CREATED, "{inst}");
    let id = inst["id"].as_str().unwrap().to_string();
    let missing = if id == "0000000000" {
        "0000000001"
    } else {
        "0000000000"
    };

    // Each operation as team mallory on alice's id, and on an id nobody
    // has: the same status, and the same words but for the id.
    let ops: [(Method, &str, Option<Value>); 4] = [
        (Method::GET, "", None),
        (Method::POST, "/renew", None),
        (Method::POST, "/flag", Some(json!({"flag": "CTF{guess}"}))),
        (Method::DELETE, "", None),
    ];
    for (method, tail, body) in &ops {
        let theirs = c
            .call(
                method.clone(),
                &format!("/v1/instances/{id}{tail}?team=mallory"),
                body.clone(),
                None,
            )
            .await;
        let nobodys = c
            .call(
                method.clone(),
                &format!("/v1/instances/{missing}{tail}?team=mallory"),
                body.clone(),
                None,
            )
            .await;
        assert_eq!(
            theirs.0,
            StatusCode::NOT_FOUND,
            "{method} {tail}: {}",
            theirs.1
        );
        assert_eq!(
            theirs.1.to_string().replace(&id, "ID"),
            nobodys.1.to_string().replace(missing, "ID"),
            "{method} {tail}: another team's instance is told apart from a missing one"
        );
    }
    // Nothing happened to alice's instance.
    let (s, got) = c
        .call(Method::GET, &format!("/v1/instances/{id}"), None, None)
        .await;
    assert_eq!(s, StatusCode::OK, "{got}");
    assert_eq!(got["renewals"], 0, "{got}");

    // A team id that is not one is a 400 naming the field.
    let (s, body) = c
        .call(
            Method::DELETE,
            &format!("/v1/instances/{id}?team=a%2Fb"),
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "team", "{body}");

    // As alice, every operation works.
    let ok = |path: &str| format!("/v1/instances/{id}{path}?team=alice");
    assert_eq!(
        c.call(Method::GET, &ok(""), None, None).await.0,
        StatusCode::OK
    );
    // (A second later, so that a renewal extends it.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, body) = c.call(Method::POST, &ok("/renew"), None, None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = c
        .call(
            Method::POST,
            &ok("/flag"),
            Some(json!({"flag": "CTF{guess}"})),
            None,
        )
        .await;
    assert_eq!((s, body["correct"].clone()), (StatusCode::OK, json!(false)));
    assert_eq!(
        c.call(Method::DELETE, &ok(""), None, None).await.0,
        StatusCode::NO_CONTENT
    );
}

/// Answers of one flood: status → count, and the latencies of the others.
#[derive(Debug, Default)]
struct Tally {
    statuses: BTreeMap<u16, usize>,
    retry_after_missing: usize,
}

#[tokio::test]
async fn a_flooding_team_is_refused_429_while_other_teams_spawn_on() {
    let spawn_rate = Rate {
        per_minute: 60,
        burst: 5,
    };
    let spec = json!({"image": "x", "per_team_max": 100,
        "ports": [{"name": "web", "port": 80, "protocol": "http"}]});
    let Lab {
        c,
        client,
        etcd: _etcd,
        _dir,
    } = lab(1, spec, |cfg| {
        cfg.rate_limits = RateLimits {
            spawn: spawn_rate,
            platform: Rate::OFF,
            ..RateLimits::default()
        };
    })
    .await;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let url = format!("{}/v1/instances", c.url);
    let send = {
        let http = http.clone();
        move |team: String| {
            let http = http.clone();
            let url = url.clone();
            async move {
                let t = Instant::now();
                let resp = http
                    .post(&url)
                    .bearer_auth(PLATFORM)
                    .body(json!({"challenge": "web", "team": team}).to_string())
                    .send()
                    .await
                    .unwrap();
                let retry_after = resp.headers().contains_key("retry-after");
                (resp.status().as_u16(), retry_after, t.elapsed())
            }
        }
    };

    // The other teams' spawns without a flood, for comparison.
    let mut baseline = Vec::new();
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (status, _, took) = send(format!("calm-{i}")).await;
        assert_eq!(status, 201);
        baseline.push(took);
    }
    baseline.sort();

    // Team "flood": 10,000 spawns over 10 s, 16 at a time.
    let started = Instant::now();
    let tally = Arc::new(std::sync::Mutex::new(Tally::default()));
    let mut flooders = Vec::new();
    for _ in 0..16 {
        let (send, tally) = (send.clone(), tally.clone());
        flooders.push(tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(16));
            for _ in 0..625 {
                pace.tick().await;
                let (status, retry_after, _) = send("flood".into()).await;
                let mut t = tally.lock().unwrap();
                *t.statuses.entry(status).or_default() += 1;
                if status == 429 && !retry_after {
                    t.retry_after_missing += 1;
                }
            }
        }));
    }
    // Meanwhile 40 other teams spawn one instance each, 4 a second.
    let mut others = Vec::new();
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        others.push(tokio::spawn(send(format!("team-{i}"))));
    }
    for f in flooders {
        f.await.unwrap();
    }
    let elapsed = started.elapsed();
    let mut latencies = Vec::new();
    for o in others {
        let (status, _, took) = o.await.unwrap();
        assert_eq!(status, 201, "another team's spawn was refused");
        latencies.push(took);
    }
    latencies.sort();
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let created = tally.statuses.get(&201).copied().unwrap_or(0);
    let limited = tally.statuses.get(&429).copied().unwrap_or(0);
    eprintln!(
        "flood: {:?} in {elapsed:.1?}; other teams' spawns p50 {:?} p99 {:?} (without the flood: p50 {:?} p99 {:?})",
        tally.statuses,
        latencies[latencies.len() / 2],
        latencies[latencies.len() * 99 / 100],
        baseline[baseline.len() / 2],
        baseline[baseline.len() * 99 / 100]
    );
    assert_eq!(created + limited, 10_000, "{:?}", tally.statuses);
    // The bucket: its burst, then one a second.
    let allowed = spawn_rate.burst as usize + elapsed.as_secs() as usize + 1;
    assert!(
        (spawn_rate.burst as usize..=allowed).contains(&created),
        "the flooding team spawned {created} in {elapsed:?}; at most {allowed} allowed"
    );
    assert_eq!(tally.retry_after_missing, 0, "a 429 without Retry-After");
    // Counted per team.
    let series = "tidegate_controller_rate_limited_total{op=\"spawn\",team=\"flood\"}";
    assert_eq!(c_metric(&c, series).await, Some(limited as f64));
    // Exactly the instances answered 201 exist.
    assert_eq!(
        count(&client, &keys::prefix(tidegate_schema::Kind::Instances)).await,
        (created + 80) as i64
    );
}

/// A series of the controller's `/metrics`.
async fn c_metric(c: &Controller, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", c.url))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Drops what one etcd member sends to its clients (its replies) on
/// loopback, until dropped.
struct DropReplies {
    port: u16,
}

impl DropReplies {
    const TAG: &'static str = "tidegate-test-drop-replies";

    fn rule(op: &str, port: u16) -> Vec<String> {
        let port = port.to_string();
        [
            "-w",
            op,
            "OUTPUT",
            "-o",
            "lo",
            "-p",
            "tcp",
            "--sport",
            &port,
            "-m",
            "comment",
            "--comment",
            Self::TAG,
            "-j",
            "DROP",
        ]
        .iter()
        .map(ToString::to_string)
        .collect()
    }

    fn start(port: u16) -> Self {
        let ok = std::process::Command::new("iptables")
            .args(Self::rule("-I", port))
            .status()
            .unwrap()
            .success();
        assert!(ok, "iptables -I failed");
        Self { port }
    }
}

impl Drop for DropReplies {
    fn drop(&mut self) {
        let _ = std::process::Command::new("iptables")
            .args(Self::rule("-D", self.port))
            .status();
    }
}

/// The client port of an etcd endpoint URL.
fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn renewals_while_etcd_is_paused_or_silent_never_lose_the_instance() {
    let spec = json!({"image": "x", "ports": [{"name": "web", "port": 80, "protocol": "http"}],
        "ttl": {"default_secs": 30, "max_secs": 3600, "max_renewals": 1000}});
    // Long enough for the etcd client to notice a member that stopped
    // answering (2 s keep-alive, 2 s timeout): the renewal then gets an
    // error for a Txn that may have committed.
    let Lab { etcd, c, _dir, .. } = lab(3, spec, |cfg| cfg.etcd_timeout_ms = 12_000).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        let (s, inst) = c.spawn("web", &format!("team-{i}")).await;
        assert_eq!(s, StatusCode::CREATED, "{inst}");
        ids.push(inst["id"].as_str().unwrap().to_string());
    }

    // Every instance renewed about once a second until told to stop; the
    // latest expiry each 200 answer granted is kept.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let granted = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let mut loops = Vec::new();
    for id in ids.clone() {
        let (stop, granted, url) = (stop.clone(), granted.clone(), c.url.clone());
        loops.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut answers = BTreeMap::<u16, usize>::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let resp = http
                    .post(format!("{url}/v1/instances/{id}/renew"))
                    .bearer_auth(PLATFORM)
                    .timeout(Duration::from_secs(20))
                    .send()
                    .await;
                if let Ok(resp) = resp {
                    let status = resp.status().as_u16();
                    *answers.entry(status).or_default() += 1;
                    let body: Value = resp.json().await.unwrap_or_default();
                    assert_ne!(status, 404, "instance {id} is gone: {body}");
                    if status == 200 {
                        let e = body["expires_at"].as_u64().unwrap();
                        let mut g = granted.lock().unwrap();
                        let best = g.entry(id.clone()).or_default();
                        *best = (*best).max(e);
                    }
                }
                tokio::time::sleep(Duration::from_millis(1100)).await;
            }
            answers
        }));
    }

    let endpoints = etcd.endpoints();
    let leader = {
        let mut leader = 0;
        for (i, e) in endpoints.iter().enumerate() {
            let mut cl = Client::connect([e.as_str()], None).await.unwrap();
            let st = cl.status().await.unwrap();
            if st.leader() == st.header().unwrap().member_id() {
                leader = i;
            }
        }
        leader
    };
    let follower = (leader + 1) % endpoints.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A follower's replies are dropped: what it is sent commits, and the
    // controller hears nothing until its connection is declared dead.
    {
        let _cut = DropReplies::start(port_of(&endpoints[follower]));
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The leader pauses mid-request, and resumes.
    etcd.process(leader).unwrap().signal("STOP").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    etcd.process(leader).unwrap().signal("CONT").unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    // And the (old) leader's replies are dropped.
    {
        let _cut = DropReplies::start(port_of(&endpoints[leader]));
        tokio::time::sleep(Duration::from_secs(8)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answers = BTreeMap::<u16, usize>::new();
    for l in loops {
        for (s, n) in l.await.unwrap() {
            *answers.entry(s).or_default() += n;
        }
    }
    let settled = c_metric(&c, "tidegate_controller_renewals_settled_total").await;
    eprintln!("renew answers: {answers:?}; settled after a lost answer: {settled:?}");
    assert!(answers.get(&200).copied().unwrap_or(0) > 20, "{answers:?}");

    // Every instance is there, with at least the expiry it was granted.
    let granted = granted.lock().unwrap().clone();
    for id in &ids {
        let (s, got) = c
            .call(Method::GET, &format!("/v1/instances/{id}"), None, None)
            .await;
        assert_eq!(s, StatusCode::OK, "instance {id} was lost: {got}");
        let g = granted.get(id).copied().unwrap_or(0);
        assert!(
            got["expires_at"].as_u64().unwrap() >= g,
            "instance {id} expires before what a renewal granted ({g}): {got}"
        );
    }
}

/// Waits until `c` is the scheduler again: a cut connection to its one
/// etcd endpoint can end its election session, and it then answers as a
/// standby (503) until it has won again.
async fn leading(c: &Controller) {
    let won =
        tidegate_lab::daemons::eventually(10, || async { c.status().await["role"] == "leader" })
            .await;
    assert!(won, "the controller did not lead again within 10 s");
}

#[tokio::test]
async fn spawns_and_renewals_committed_whose_answers_are_lost_keep_the_instance() {
    let etcd = EtcdCluster::start(1).unwrap();
    let member: std::net::SocketAddr = etcd.endpoints()[0]
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let eater = LossyLink::start(vec![member]).await;
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start_on(&etcd, "c1", dir.path(), None, |cfg| {
        cfg.etcd = vec![eater.url()];
    })
    .await;
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 100).await;
    let spec = json!({"image": "x", "ports": [{"name": "web", "port": 80, "protocol": "http"}],
        "ttl": {"default_secs": 30, "max_secs": 3600, "max_renewals": 1000}});
    assert_eq!(c.put_challenge("web", spec).await.0, StatusCode::CREATED);
    worker_listed(&c).await;
    // Every spawn's Txn commits and its answer is lost: each is found
    // committed and answered 201.
    let mut ids = Vec::new();
    for i in 0..4 {
        leading(&c).await;
        eater.arm(1);
        let (s, inst) = c.spawn("web", &format!("team-{i}")).await;
        eater.arm(0);
        assert_eq!(s, StatusCode::CREATED, "{inst}");
        assert_eq!(eater.lost(), i + 1, "the spawn's Txn was not cut");
        ids.push(inst["id"].as_str().unwrap().to_string());
    }
    assert_eq!(
        count(&client, &keys::prefix(tidegate_schema::Kind::Instances)).await,
        4
    );

    // Each renewal's Txn commits and its answer is lost.
    let mut answers = BTreeMap::<u16, usize>::new();
    let mut granted = BTreeMap::<String, u64>::new();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for id in &ids {
            leading(&c).await;
            let before = eater.lost();
            eater.arm(1);
            let (s, body) = c
                .call(
                    Method::POST,
                    &format!("/v1/instances/{id}/renew"),
                    None,
                    None,
                )
                .await;
            eater.arm(0);
            let eaten = eater.lost() - before;
            assert_eq!(
                eaten, 1,
                "round {round}: the renewal's Txn of {id} was not cut: {body}"
            );
            *answers.entry(s.as_u16()).or_default() += 1;
            if s == StatusCode::OK {
                granted.insert(id.clone(), body["expires_at"].as_u64().unwrap());
            }
        }
    }
    eprintln!("renew answers with every Txn's answer lost: {answers:?}");
    // Settled as committed: 200, and counted.
    assert_eq!(answers.get(&200), Some(&12), "{answers:?}");
    let settled = c_metric(&c, "tidegate_controller_renewals_settled_total").await;
    assert_eq!(settled, Some(12.0));
    for id in &ids {
        let (s, got) = c
            .call(Method::GET, &format!("/v1/instances/{id}"), None, None)
            .await;
        assert_eq!(
            s,
            StatusCode::OK,
            "instance {id} was lost to a renewal: {got}"
        );
        assert_eq!(got["expires_at"].as_u64(), granted.get(id).copied());
        assert_eq!(got["renewals"], 3, "{got}");
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off_at_the_header_deadline_while_spawns_go_on() {
    let Lab {
        c,
        etcd: _etcd,
        _dir,
        ..
    } = lab(1, web_spec(), |cfg| cfg.http_header_timeout_ms = 4000).await;
    let to: std::net::SocketAddr = c.url.trim_start_matches("http://").parse().unwrap();
    let pid = c.proc.pid();
    // Spawns without slow clients, for comparison.
    let mut baseline = Vec::new();
    for i in 0..40 {
        let t = Instant::now();
        let (s, body) = c.spawn("web", &format!("calm-{i}")).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        baseline.push(t.elapsed());
    }
    baseline.sort();
    let rss_before = rss_kib(pid);

    // 2,000 slow connections from 10 addresses (200 each: under the
    // per-source cap), while 40 teams spawn.
    let until = Instant::now() + Duration::from_secs(20);
    let slow: Vec<_> = (0..2000)
        .map(|i| {
            let source = std::net::IpAddr::from([127, 0, 9, 1 + (i % 10) as u8]);
            tokio::spawn(slowloris(source, to, "x", Duration::from_secs(1), until))
        })
        .collect();
    // Once they are all open (and trickling), the spawns.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_during = rss_kib(pid);
    let mut took = Vec::new();
    for i in 0..40 {
        let t = Instant::now();
        let (s, body) = c.spawn("web", &format!("team-{i}")).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        took.push(t.elapsed());
    }
    took.sort();
    let mut closed_after = Vec::new();
    for s in slow {
        closed_after.push(s.await.unwrap().expect("a slow connection stayed open"));
    }
    closed_after.sort();
    eprintln!(
        "controller RSS {rss_before} KiB before, {rss_during} KiB with 2,000 slow connections; \
         slow connections closed after {:?}..{:?}; spawns meanwhile p50 {:?} p99 {:?} \
         (without them: p50 {:?} p99 {:?})",
        closed_after[0],
        closed_after[closed_after.len() - 1],
        took[took.len() / 2],
        took[took.len() * 99 / 100],
        baseline[baseline.len() / 2],
        baseline[baseline.len() * 99 / 100]
    );
    // Cut off at the deadline (4 s), not before; and cut off, not held:
    // the bound after is loose because this client's 2,000 tasks notice the
    // close on one loaded thread (a CI run saw the last at 10.9 s).
    assert!(
        closed_after[0] >= Duration::from_millis(3500),
        "{closed_after:?}"
    );
    assert!(
        closed_after[closed_after.len() - 1] <= Duration::from_secs(20),
        "{closed_after:?}"
    );
    // 2,000 held connections cost under 64 MiB.
    assert!(
        rss_during.saturating_sub(rss_before) < 64 * 1024,
        "{rss_before} KiB → {rss_during} KiB"
    );

    // A head over 16 KiB: 431, and nothing more is read.
    let big = format!(
        "GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let answer = raw_exchange(to, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Past the per-source cap (256), a new connection is closed at once,
    // and counted; another address still gets in.
    let source = std::net::IpAddr::from([127, 0, 9, 99]);
    let mut held = Vec::new();
    for _ in 0..256 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(source, 0)).unwrap();
        held.push(socket.connect(to).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::new(source, 0)).unwrap();
    let mut extra = socket.connect(to).await.unwrap();
    assert_eq!(
        read_to_close(&mut extra).await,
        "",
        "the 257th connection was served"
    );
    let series =
        "tidegate_controller_connections_refused_total{reason=\"max_connections_per_source\"}";
    assert_eq!(c_metric(&c, series).await, Some(1.0));
    assert_eq!(c.status().await["role"], "leader");
}
