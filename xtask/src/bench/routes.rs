//! `routes`: route propagation (API 201 → every agent routes the hostname)
//! and spawn → routable (the first 200) with a 3-member etcd and 3 agents;
//! then an agent started against 10,000 instance records: time until its
//! table holds them all, and its RSS.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tidegate_local::ports::free_port;
use tidegate_local::process::{Supervised, wait_until};

use super::{
    ADMIN_TOKEN, Containers, ControlPlane, Figures, Mode, agent, agent_config, api, percentile,
};
use crate::sh;

/// One agent of the run: its process, HTTP entry and metrics address.
type Agent = (Supervised, String, SocketAddr);

pub(super) fn run(mode: Mode) -> Result<Figures> {
    let (spawns, resync) = (mode.count(40, 5), mode.count(10_000, 500));
    println!("building the controller, the agent and route-bench");
    let bin_dir = mode.build(
        &["tidegate-controller", "tidegate-agent", "tidegate-tests"],
        &["tidegate-controller", "tidegate-agent", "route-bench"],
    )?;
    tidegate_local::images::ensure_demo_images()?;
    let plane = ControlPlane::start(&bin_dir, 3)?;
    let (dir, url) = (plane.dir(), plane.url.as_str());
    let endpoints = plane.etcd.endpoints();
    let label = format!("bench-routes-{}", std::process::id());
    let containers = Containers(label.clone());
    let start = |name: &str, addr: &str| -> Result<Agent> {
        let mut cfg = agent_config(name, &endpoints, dir, &label)?;
        let ip = addr.parse()?;
        cfg.advertise_address = ip;
        cfg.tcp_host = ip;
        cfg.http_entry = SocketAddr::new(ip, free_port()?);
        cfg.reconcile_interval_ms = 200;
        let proc = agent(&bin_dir, dir, &cfg)?;
        Ok((proc, cfg.http_entry.to_string(), cfg.metrics_listen))
    };
    let agents = [
        start("bench-a", "127.0.0.2")?,
        start("bench-b", "127.0.0.3")?,
        start("bench-c", "127.0.0.4")?,
    ];
    let web = r#"{"image":"tidegate/demo-http:2","ports":[{"name":"web","port":8080,"protocol":"http"}]}"#;
    let (propagated, routable) = propagation(&bin_dir, dir, url, &agents, ("web", web), spawns)?;
    // Spawn → routable of instances with 1, 2 and 3 services: the routed
    // app waits for the others to be ready.
    let mut by_services = Vec::new();
    for n in 1..=3 {
        let name = format!("svc{n}");
        let spec = services_spec(n);
        let (_, routable) = propagation(
            &bin_dir,
            dir,
            url,
            &agents,
            (&name, &spec),
            mode.count(20, 3),
        )?;
        let (p50, p99) = (
            percentile(routable.clone(), 0.5),
            percentile(routable, 0.99),
        );
        println!("spawn → routable, {n} service(s): p50 {p50:.0} ms p99 {p99:.0} ms");
        by_services.push((p50, p99));
    }
    drop(agents);
    drop(containers);
    let (p50, p99) = (
        percentile(propagated.clone(), 0.5),
        percentile(propagated, 0.99),
    );
    let (r50, r99) = (
        percentile(routable.clone(), 0.5),
        percentile(routable, 0.99),
    );
    println!(
        "route propagation p50 {p50:.1} ms p99 {p99:.1} ms; spawn → routable p50 {r50:.0} ms p99 {r99:.0} ms"
    );

    // Resync: records of another worker, then a fresh agent.
    sh::output(Command::new(bin_dir.join("route-bench")).args([
        "seed",
        &endpoints[0],
        &resync.to_string(),
    ]))
    .context("route-bench seed failed")?;
    let started = Instant::now();
    let (proc, _, metrics) = start("bench-resync", "127.0.0.5")?;
    let synced = wait_for_routes(metrics, resync, started)?;
    let rss_mib = super::rss_kib(proc.pid())? as f64 / 1024.0;
    drop(proc);
    println!(
        "resync of {resync} instances: {:.2} s from process start, RSS {rss_mib:.0} MiB",
        synced.as_secs_f64()
    );
    Ok(figures(
        mode,
        [p50, p99, r50, r99],
        &by_services,
        synced,
        rss_mib,
    ))
}

/// A challenge of `n` services: `app` (routed, demo-http) after `n - 1`
/// others (demo-http, ready when 8080 accepts).
fn services_spec(n: usize) -> String {
    let small = serde_json::json!({"memory_mib": 32, "pids": 32});
    let tmp = serde_json::json!([{"path": "/tmp", "size_mib": 4}]);
    let mut services = serde_json::Map::new();
    let others: Vec<String> = (1..n).map(|i| format!("s{i}")).collect();
    for o in &others {
        services.insert(
            o.clone(),
            serde_json::json!({"image": "tidegate/demo-http:2", "ready": {"tcp": 8080},
                "limits": small, "tmpfs": tmp}),
        );
    }
    services.insert(
        "app".into(),
        serde_json::json!({"image": "tidegate/demo-http:2", "depends_on": others,
            "ready": {"http": {"port": 8080, "path": "/"}}, "limits": small, "tmpfs": tmp}),
    );
    serde_json::json!({
        "services": services,
        "ports": [{"name": "web", "port": 8080, "protocol": "http", "service": "app"}],
    })
    .to_string()
}

/// `route-bench propagation` of challenge `name` (created from `spec`):
/// the propagation and spawn → routable times, in ms.
fn propagation(
    bin_dir: &Path,
    dir: &Path,
    url: &str,
    agents: &[Agent],
    (name, spec): (&str, &str),
    spawns: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let out = api(
        dir,
        url,
        "PUT",
        &format!("/v1/challenges/{name}"),
        spec.as_bytes().to_vec(),
    )?;
    if !out.ends_with(" 201") {
        bail!("creating the challenge {name}: {out}");
    }
    let registered = wait_until(Duration::from_secs(15), || {
        api(dir, url, "GET", "/v1/workers", Vec::new())
            .is_ok_and(|s| s.matches("\"bench-").count() >= agents.len())
    });
    if !registered {
        bail!("the {} agents did not register", agents.len());
    }
    let mut args: Vec<String> = vec![
        "propagation".into(),
        url.into(),
        ADMIN_TOKEN.into(),
        name.into(),
        spawns.to_string(),
    ];
    args.extend(agents.iter().map(|a| a.1.clone()));
    let out = sh::output(Command::new(bin_dir.join("route-bench")).args(&args))
        .context("route-bench propagation failed")?;
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    let samples = |k: &str| -> Vec<f64> {
        v[k].as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_f64())
            .collect()
    };
    let (propagation, routable) = (samples("propagation_ms"), samples("routable_ms"));
    if propagation.len() != spawns || routable.len() != spawns {
        bail!("route-bench returned too few samples");
    }
    Ok((propagation, routable))
}

/// Waits until the agent whose metrics are at `metrics` routes `n`
/// hostnames; how long after `started` that was.
pub(super) fn wait_for_routes(metrics: SocketAddr, n: usize, started: Instant) -> Result<Duration> {
    let url = format!("http://{metrics}/metrics");
    while started.elapsed() < Duration::from_secs(120) {
        let routes = sh::output(Command::new("curl").args(["-sf", &url])).and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("tidegate_agent_routes "))
                .and_then(|v| v.trim().parse::<usize>().ok())
        });
        if routes.is_some_and(|r| r >= n) {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("the agent never held the {n} routes")
}

/// The figures, and the report section.
fn figures(
    mode: Mode,
    [p50, p99, r50, r99]: [f64; 4],
    by_services: &[(f64, f64)],
    synced: Duration,
    rss_mib: f64,
) -> Figures {
    let (spawns, resync) = (mode.count(40, 5), mode.count(10_000, 500));
    let per_service_spawns = mode.count(20, 3);
    let rows: String = by_services
        .iter()
        .enumerate()
        .map(|(i, (a, b))| {
            format!(
                "| spawn → routable, {} service(s) (`services`) | {a:.0} ms | {b:.0} ms |\n",
                i + 1
            )
        })
        .collect();
    let verdict = if p99 <= 50.0 { "met" } else { "NOT met" };
    let section = format!(
        "## Route propagation and resync (`cargo xtask bench routes`)\n\n\
         A 3-member etcd on loopback, one release controller, three release agents (each its own loopback \
         address), the demo HTTP image. {spawns} spawns one after another, each deleted after it served.\n\n\
         | measure | p50 | p99 |\n|---|---:|---:|\n\
         | route propagation: API 201 → all 3 agents route the hostname (polled every 1 ms) | {p50:.1} ms | {p99:.1} ms |\n\
         | spawn → routable: POST sent → first 200 through an agent (includes the container start) | {r50:.0} ms | {r99:.0} ms |\n\
         {rows}\n\
         The rows by services count are {per_service_spawns} spawns each of a challenge whose routed `app` \
         depends on the others (each ready when its port 8080 accepts; the app when `GET /` answers): a \
         network of its own, then the others' containers together, then the app's.\n\n\
         Target route propagation p99 ≤ 50 ms: **{verdict}**.\n\n\
         Resync: {resync} instance records (and their status) of another worker written into etcd, then a new agent \
         started: **{:.2} s** from process start until its table held all {resync} hostnames (etcd connect, \
         list, build, eBPF load included); its RSS then: **{rss_mib:.0} MiB**.\n\n\
         Reading: propagation is one watch event per agent after the spawn Txn commits, so its median is a few \
         milliseconds; the p99 is scheduling on 2 cores (the controller, three agents, three etcd members and \
         Docker share them). Spawn → routable is the container start: the route is in every table within the \
         propagation time, then the agent creates and starts the container and reports it running; until then \
         agents answer 503 with a Retry-After. The resync is one paged list (1,000 keys a page, all at one \
         revision) and one table build.\n",
        synced.as_secs_f64()
    );
    Figures {
        values: vec![
            ("route propagation p99 ms".into(), p99),
            ("spawn → routable p50 ms".into(), r50),
            (
                "spawn → routable p50 ms, 1 service".into(),
                by_services.first().map_or(f64::NAN, |v| v.0),
            ),
            (
                "spawn → routable p50 ms, 2 services".into(),
                by_services.get(1).map_or(f64::NAN, |v| v.0),
            ),
            (
                "spawn → routable p50 ms, 3 services".into(),
                by_services.get(2).map_or(f64::NAN, |v| v.0),
            ),
            ("resync s".into(), synced.as_secs_f64()),
            ("resync RSS MiB".into(), rss_mib),
        ],
        report: Some(("Route propagation".into(), section)),
    }
}
