//! Measurements behind `cargo xtask bench routes` (built in release).
//!
//! - `propagation <api> <token> <challenge> <n> <agent entry>...`: `n`
//!   spawns one after another; for each, from the API's 201 until every
//!   agent routes the new hostname (its entry stops answering 404 for it),
//!   polled every millisecond per agent, and from sending the spawn until
//!   the first agent answers 200 (the container serves). Each instance is
//!   deleted afterwards. Prints JSON with the samples in milliseconds.
//! - `rush <api> <token> <challenge> <n> <agent entry>`: `n` spawns sent
//!   at once (the start of an event); for each, from sending it until the
//!   agent first answers 200 for its hostname, polled every 200 ms. Every
//!   instance is deleted afterwards. Prints JSON with the samples in ms.
//! - `claims <api> <token> <challenge> <n> <agent entry>`: `n` spawns one
//!   after another; for each, from sending it until the agent first
//!   answers 200 with a flag (`flag{`) on `/cgi-bin/flag` of its hostname,
//!   polled every millisecond. Prints JSON with the samples in ms and
//!   whether every flag differed; the instances are deleted afterwards.
//! - `docker <image> <n> <parallel> <label>`: the engine alone, no
//!   tidegate: `n` containers of `image` created and started (32 MiB,
//!   read-only, all capabilities dropped, a tmpfs /tmp, on Docker's default
//!   bridge as instances are on theirs, labelled `label`),
//!   `parallel` at a time; prints the seconds taken, then removes them.
//! - `event <api> <token> <teams> <arrive ms> <play ms> <challenges>
//!   <agent entry>`: teams arriving over a few seconds, each spawning one
//!   of a mix of challenges as a player would (`event.rs`).
//! - `seed <etcd endpoint> <n>`: writes `n` instance records (and their
//!   status) of a worker `ghost` straight into etcd, 100 per Txn.
//! - `spawns <etcd endpoint> <apis> <token> <challenges> <n> <in flight>`:
//!   the control plane's spawn throughput. Registers a worker `ghost` no
//!   agent runs (room for all, so no container is made: the figure is the
//!   controllers' and etcd's), then `n` spawns of teams of their own, `in
//!   flight` at a time, over the comma-separated API URLs and challenges
//!   in turn. Prints JSON with the seconds taken and each spawn's ms; any
//!   answer but 201 fails it.

mod event;

use std::time::{Duration, Instant};

use etcd_client::{Client, Txn, TxnOp};
use serde_json::{Value, json};
use tidegate_lab::routes::{self, ghost_worker};
use tidegate_schema::{
    Hostname, InstanceId, InstanceRecord, InstanceStatus, Key, Keyspace, Record, StatusRecord, V1,
    WorkerId,
};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("propagation") if args.len() >= 7 => {
            propagation(&args[2], &args[3], &args[4], &args[5], &args[6..]).await
        }
        Some("rush") if args.len() == 7 => {
            rush(&args[2], &args[3], &args[4], &args[5], &args[6]).await
        }
        Some("claims") if args.len() == 7 => {
            claims(&args[2], &args[3], &args[4], &args[5], &args[6]).await
        }
        Some("event") => event::event(&args[2..]).await,
        Some("seed") if args.len() == 4 => seed(&args[2], &args[3]).await,
        Some("spawns") if args.len() == 8 => spawns(&args[2..]).await,
        Some("docker") if args.len() == 6 => {
            docker_alone(&args[2], &args[3], &args[4], &args[5]).await
        }
        _ => Err("usage: route-bench propagation <api> <token> <challenge> <n> <agent entry>... | rush <api> <token> <challenge> <n> <agent entry> | claims <api> <token> <challenge> <n> <agent entry> | event <api> <token> <teams> <arrive ms> <play ms> <challenges> <agent entry> | seed <etcd endpoint> <n> | spawns <etcd endpoint> <apis> <token> <challenges> <n> <in flight> | docker <image> <n> <parallel> <label>".into()),
    };
    if let Err(e) = result {
        eprintln!("route-bench: {e}");
        std::process::exit(1);
    }
}

/// Polls `entry` with `host` until the answer is not 404 (routed) or is
/// `want` when given; returns when that happened.
async fn wait_for(
    http: &reqwest::Client,
    entry: &str,
    host: &str,
    want: Option<u16>,
) -> Result<Instant, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = http
            .get(format!("http://{entry}/"))
            .header("host", host)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        let done = match want {
            Some(w) => status == w,
            None => status != 404 && status != 0,
        };
        if done {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{entry} never routed {host} (last answer {status})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Spawns `challenge` for `team`: its first hostname, its id, and when
/// the 201 came.
async fn spawn(
    http: &reqwest::Client,
    api: &str,
    token: &str,
    challenge: &str,
    team: &str,
) -> Result<(String, String, Instant), String> {
    let resp = http
        .post(format!("{api}/v1/instances"))
        .bearer_auth(token)
        .body(json!({"challenge": challenge, "team": team}).to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let answered = Instant::now();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    if status != 201 {
        return Err(format!("spawn for {team} answered {status}: {body}"));
    }
    let host = body["http"][0]["hostname"]
        .as_str()
        .ok_or("no hostname in the answer")?
        .to_string();
    let id = body["id"].as_str().ok_or("no id")?.to_string();
    Ok((host, id, answered))
}

/// Asks `agent` for `host` until it answers 200 (`Err`: the last status,
/// 0 for no answer, once `deadline` passed). Every 200 ms: as often as a
/// player's page would ask, not so often that the pollers (1,000
/// requests/s for 200) take the cores Docker needs.
pub(crate) async fn served(
    http: &reqwest::Client,
    agent: &str,
    host: &str,
    deadline: Instant,
) -> Result<(), u16> {
    loop {
        let got = http
            .get(format!("http://{agent}/"))
            .header("host", host)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if got == 200 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(got);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn propagation(
    api: &str,
    token: &str,
    challenge: &str,
    n: &str,
    agents: &[String],
) -> Result<(), String> {
    let n: usize = n.parse().map_err(|_| "n must be a number")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| e.to_string())?;
    let mut propagation_ms = Vec::new();
    let mut routable_ms = Vec::new();
    for i in 0..n {
        let sent = Instant::now();
        let (host, id, answered) =
            spawn(&http, api, token, challenge, &format!("route-bench-{i}")).await?;
        let waits = agents.iter().map(|a| wait_for(&http, a, &host, None));
        let routed = futures::future::try_join_all(waits).await?;
        let last = routed.into_iter().max().unwrap_or(answered);
        propagation_ms.push(last.duration_since(answered).as_secs_f64() * 1000.0);
        let serving = wait_for(&http, &agents[0], &host, Some(200)).await?;
        routable_ms.push(serving.duration_since(sent).as_secs_f64() * 1000.0);
        let _ = http
            .delete(format!("{api}/v1/instances/{id}"))
            .bearer_auth(token)
            .send()
            .await;
    }
    println!(
        "{}",
        json!({"propagation_ms": propagation_ms, "routable_ms": routable_ms})
    );
    Ok(())
}

async fn rush(api: &str, token: &str, challenge: &str, n: &str, agent: &str) -> Result<(), String> {
    let n: usize = n.parse().map_err(|_| "n must be a number")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let one = |i: usize| {
        let http = http.clone();
        async move {
            let sent = Instant::now();
            let (host, id, _) = spawn(&http, api, token, challenge, &format!("rush-{i}")).await?;
            served(&http, agent, &host, sent + Duration::from_secs(300))
                .await
                .map_err(|got| format!("{host} not served within 300 s (last {got})"))?;
            Ok::<_, String>((sent.elapsed().as_secs_f64() * 1000.0, id))
        }
    };
    let results = futures::future::try_join_all((0..n).map(one)).await?;
    for (_, id) in &results {
        let _ = http
            .delete(format!("{api}/v1/instances/{id}"))
            .bearer_auth(token)
            .send()
            .await;
    }
    let routable_ms: Vec<f64> = results.iter().map(|(ms, _)| *ms).collect();
    println!("{}", json!({ "routable_ms": routable_ms }));
    Ok(())
}

/// Spawns one after another, each timed from the POST until its flag page
/// first answers with a flag.
async fn claims(
    api: &str,
    token: &str,
    challenge: &str,
    n: &str,
    agent: &str,
) -> Result<(), String> {
    let n: usize = n.parse().map_err(|_| "n must be a number")?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut ms = Vec::new();
    let mut flags = std::collections::BTreeSet::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let sent = Instant::now();
        let (host, id, _) = spawn(&http, api, token, challenge, &format!("claim-{i}")).await?;
        ids.push(id);
        let deadline = sent + Duration::from_secs(120);
        loop {
            let got = http
                .get(format!("http://{agent}/cgi-bin/flag"))
                .header("host", host.as_str())
                .send()
                .await;
            if let Ok(r) = got
                && r.status().as_u16() == 200
            {
                let body = r.text().await.unwrap_or_default();
                if body.contains("flag{") {
                    flags.insert(body.trim().to_string());
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("{host} gave no flag within 120 s"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ms.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    for id in &ids {
        let _ = http
            .delete(format!("{api}/v1/instances/{id}"))
            .bearer_auth(token)
            .send()
            .await;
    }
    println!("{}", json!({"ms": ms, "distinct": flags.len() == n}));
    Ok(())
}

/// The engine's own create+start rate (what a rush of instances cannot beat).
async fn docker_alone(image: &str, n: &str, parallel: &str, label: &str) -> Result<(), String> {
    use bollard::models::{ContainerCreateBody, HostConfig};
    use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
    use futures::StreamExt;
    let n: usize = n.parse().map_err(|_| "n must be a number")?;
    let parallel: usize = parallel.parse().map_err(|_| "parallel must be a number")?;
    let docker = bollard::Docker::connect_with_local_defaults().map_err(|e| e.to_string())?;
    let body = || ContainerCreateBody {
        image: Some(image.to_string()),
        labels: Some([(label.to_string(), "1".to_string())].into()),
        host_config: Some(HostConfig {
            memory: Some(32 << 20),
            pids_limit: Some(32),
            readonly_rootfs: Some(true),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            tmpfs: Some([("/tmp".to_string(), "size=4m".to_string())].into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let started = Instant::now();
    let made: Vec<Result<String, String>> = futures::stream::iter(0..n)
        .map(|_| {
            let docker = docker.clone();
            let body = body();
            async move {
                let id = docker
                    .create_container(None::<CreateContainerOptions>, body)
                    .await
                    .map_err(|e| e.to_string())?
                    .id;
                docker
                    .start_container(&id, None)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(id)
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let remove = Some(RemoveContainerOptions {
        force: true,
        ..Default::default()
    });
    let mut failed = None;
    for m in &made {
        match m {
            Ok(id) => {
                let _ = docker.remove_container(id, remove.clone()).await;
            }
            Err(e) => failed = Some(e.clone()),
        }
    }
    if let Some(e) = failed {
        return Err(format!("a container was not made: {e}"));
    }
    println!("{}", json!({ "secs": secs }));
    Ok(())
}

/// `spawns`: see the module's doc.
async fn spawns(args: &[String]) -> Result<(), String> {
    let [endpoint, apis, token, challenges, n, in_flight] = args else {
        return Err("spawns needs 6 arguments".into());
    };
    let n: usize = n.parse().map_err(|_| "n must be a number")?;
    let in_flight: usize = in_flight
        .parse()
        .map_err(|_| "in flight must be a number")?;
    let apis: Vec<&str> = apis.split(',').collect();
    let challenges: Vec<&str> = challenges.split(',').collect();
    let mut client = Client::connect([endpoint.as_str()], None)
        .await
        .map_err(|e| e.to_string())?;
    let ghost = WorkerId::parse("ghost").map_err(|e| e.to_string())?;
    // Not 127.0.0.1, where benchmarks' clients connect from: a registered
    // worker's address is an agent's (its connections are not pinned).
    let worker = ghost_worker(&ghost, std::net::SocketAddr::from(([127, 0, 0, 9], 1)));
    client
        .put(
            Keyspace::default().key(&Key::Worker(ghost)),
            worker.encode(),
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
    // Every controller's view holds the worker before the clock starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let one = |i: usize| {
        let http = http.clone();
        let (api, challenge) = (apis[i % apis.len()], challenges[i % challenges.len()]);
        async move {
            let sent = Instant::now();
            spawn(&http, api, token, challenge, &format!("s-{i}")).await?;
            Ok::<_, String>(sent.elapsed().as_secs_f64() * 1000.0)
        }
    };
    use futures::StreamExt;
    let results: Vec<Result<f64, String>> = futures::stream::iter((0..n).map(one))
        .buffer_unordered(in_flight.max(1))
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let ms = results.into_iter().collect::<Result<Vec<f64>, String>>()?;
    println!("{}", json!({ "secs": secs, "ms": ms }));
    Ok(())
}

async fn seed(endpoint: &str, n: &str) -> Result<(), String> {
    let n: usize = n.parse().map_err(|_| "n must be a number")?;
    let mut client = Client::connect([endpoint], None)
        .await
        .map_err(|e| e.to_string())?;
    let ks = Keyspace::default();
    let ghost = WorkerId::parse("ghost").map_err(|e| e.to_string())?;
    // Not 127.0.0.1, where benchmarks' clients connect from: a registered
    // worker's address is an agent's (its connections are not pinned).
    let worker = ghost_worker(&ghost, std::net::SocketAddr::from(([127, 0, 0, 9], 1)));
    client
        .put(ks.key(&Key::Worker(ghost.clone())), worker.encode(), None)
        .await
        .map_err(|e| e.to_string())?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let mut ops = Vec::new();
        for i in chunk {
            let id = InstanceId::from_random(0xb000_0000_u64 + *i as u64);
            let (record, status) = ghost_instance(&id, *i, &ghost)?;
            ops.push(TxnOp::put(
                ks.key(&Key::Instance(id.clone())),
                record.encode(),
                None,
            ));
            let key = Key::Status {
                worker: ghost.clone(),
                instance: id,
            };
            ops.push(TxnOp::put(ks.key(&key), status.encode(), None));
        }
        client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| e.to_string())?;
    }
    println!("{}", json!({"seeded": n}));
    Ok(())
}

/// Instance `id` (the `i`th) of worker `ghost`, and its status: running.
fn ghost_instance(
    id: &InstanceId,
    i: usize,
    ghost: &WorkerId,
) -> Result<(InstanceRecord, StatusRecord), String> {
    let e = |e: tidegate_schema::Invalid| e.to_string();
    let team = format!("t{i}").parse().map_err(e)?;
    let hostname = Hostname::parse(&format!("{id}.ctf.localhost")).map_err(e)?;
    let record = routes::ghost_instance(id, &team, ghost, hostname).map_err(e)?;
    let status = StatusRecord {
        v: V1,
        instance: id.clone(),
        worker: ghost.clone(),
        team: record.team.clone(),
        container_id: None,
        address: Some(routes::GHOST_ADDRESS),
        status: InstanceStatus::Running,
        updated_at: 0,
        services: Default::default(),
        solver: None,
        spec_revision: 0,
    };
    Ok((record, status))
}
