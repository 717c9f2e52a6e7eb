//! `spawns`: the control plane's spawn throughput, one controller (one
//! shard) against three controllers sharing 16 shards, the same load:
//! spawns of teams of their own over 16 challenges (one per shard), a
//! fixed number in flight, sent round-robin to every controller's API (a
//! controller forwards what another shard's leader schedules). A worker no
//! agent runs has room for all (`route-bench spawns`): no container is
//! made, so the figure is the controllers' and etcd's alone.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tidegate_local::etcd::EtcdCluster;
use tidegate_local::process::wait_until;
use tidegate_schema::config::RateLimits;

use super::{ControlPlane, Figures, Mode, api, median, percentile};
use crate::cluster::PLATFORM_TOKEN;

/// The shards of the sharded setup.
const SHARDS: u16 = 16;

pub(super) fn run(mode: Mode) -> Result<Figures> {
    let n = mode.count(600, 32);
    let in_flight = mode.count(32, 8);
    println!("building the controller and route-bench");
    let bin_dir = mode.build(
        &["tidegate-controller", "tidegate-tests"],
        &["tidegate-controller", "route-bench"],
    )?;
    let mut rows = Vec::new();
    for (controllers, shards) in [(1usize, 1u16), (3, SHARDS)] {
        let mut rates = Vec::new();
        let mut all_ms = Vec::new();
        for round in 1..=mode.rounds() {
            let (secs, ms) = one(&bin_dir, controllers, shards, n, in_flight)?;
            println!(
                "round {round}: {controllers} controller(s), {shards} shard(s): {n} spawns, {in_flight} in flight, in {secs:.2} s ({:.0}/s)",
                n as f64 / secs
            );
            rates.push(n as f64 / secs);
            all_ms.extend(ms);
        }
        rows.push((
            controllers,
            shards,
            median(rates),
            percentile(all_ms.clone(), 0.5),
            percentile(all_ms, 0.99),
        ));
    }
    let mut figures = Figures {
        values: Vec::new(),
        report: None,
    };
    let mut table = String::from(
        "| controllers | shards | spawns/s (median of rounds) | spawn p50 | spawn p99 |\n|---|---|---|---|---|\n",
    );
    for (controllers, shards, rate, p50, p99) in &rows {
        figures
            .values
            .push((format!("spawns/s with {controllers} controller(s)"), *rate));
        figures.values.push((
            format!("spawn p99 ms with {controllers} controller(s)"),
            *p99,
        ));
        table += &format!("| {controllers} | {shards} | {rate:.0} | {p50:.1} ms | {p99:.1} ms |\n");
    }
    let ratio = rows[1].2 / rows[0].2;
    let section = format!(
        "## Spawn throughput: one controller against three (sharded)\n\n\
         `cargo xtask bench spawns`: {n} spawns of teams of their own over 16 challenges (one per \
         shard), {in_flight} in flight, sent round-robin to every controller's API; a worker no \
         agent runs has room for all, so no container is made and the figure is the \
         controllers' and etcd's (one member). {} round(s) each, each on a fresh etcd and fresh \
         controllers.\n\n{table}\n\
         Three sharded controllers made {ratio:.2}× the spawns/s of one. All spawns here go to \
         one worker, so every spawn of every controller writes the same worker guard: the \
         controllers collide on it and decide again (`guarded`, retried for up to 5 s), and \
         they share two cores with etcd, whose one transaction per spawn is the same in both \
         setups. Sharding's gain in an event is that a controller's death pauses only its \
         shards' spawns; spreading placement so that leaders pick different workers would cut \
         the collisions (not built).\n",
        mode.rounds()
    );
    figures.report = Some((
        "Spawn throughput: one controller against three (sharded)".into(),
        section,
    ));
    Ok(figures)
}

/// One setup, fresh: `controllers` controllers with `shards` shards; the
/// seconds `n` spawns took and each one's ms.
fn one(
    bin_dir: &std::path::Path,
    controllers: usize,
    shards: u16,
    n: usize,
    in_flight: usize,
) -> Result<(f64, Vec<f64>)> {
    let etcd = EtcdCluster::start(1)?;
    let mut plane = ControlPlane::start_with(bin_dir, etcd, &[], |c| {
        c.shards = shards;
        // The buckets would measure themselves.
        c.rate_limits = RateLimits::off();
    })?;
    let mut urls = vec![plane.url.clone()];
    for _ in 1..controllers {
        urls.push(plane.add_replica(bin_dir, &[], "\"led\":[")?);
    }
    // Every shard led, each by one of them.
    let spread = wait_until(Duration::from_secs(20), || {
        let mut led = 0;
        for url in &urls {
            let Ok(out) = api(plane.dir(), url, "GET", "/v1/status", Vec::new()) else {
                return false;
            };
            let body = out.rsplit_once(' ').map_or("", |(b, _)| b);
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let mine = v["shards"]["led"].as_array().map_or(0, Vec::len);
            if mine == 0 {
                return false;
            }
            led += mine;
        }
        led == usize::from(shards)
    });
    if !spread {
        bail!("the {shards} shards were not spread over {controllers} controllers within 20 s");
    }
    let names: Vec<String> = (0..SHARDS)
        .map(|k| {
            (0..100_000)
                .map(|i| format!("sp{k}-{i}"))
                .find(|name| tidegate_schema::shards::shard_of(name, SHARDS) == k)
                .unwrap_or_default()
        })
        .collect();
    let spec = format!(
        r#"{{"image":"{}","per_team_max":1,"ports":[{{"name":"web","port":8080,"protocol":"http"}}]}}"#,
        tidegate_local::images::DEMO_HTTP
    );
    for name in &names {
        let out = api(
            plane.dir(),
            &plane.url,
            "PUT",
            &format!("/v1/challenges/{name}"),
            spec.clone().into_bytes(),
        )?;
        if !out.ends_with(" 201") {
            bail!("creating the challenge {name}: {out}");
        }
    }
    let run = Command::new(bin_dir.join("route-bench"))
        .args([
            "spawns",
            &plane.etcd.endpoints()[0],
            &urls.join(","),
            PLATFORM_TOKEN,
            &names.join(","),
            &n.to_string(),
            &in_flight.to_string(),
        ])
        .output()
        .context("running route-bench")?;
    if !run.status.success() {
        bail!(
            "route-bench spawns failed: {}",
            String::from_utf8_lossy(&run.stderr).trim()
        );
    }
    let out = String::from_utf8_lossy(&run.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    let secs = v["secs"].as_f64().context("route-bench spawns: no secs")?;
    let ms: Vec<f64> = v["ms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    if ms.len() != n {
        bail!("route-bench spawns returned {} samples of {n}", ms.len());
    }
    Ok((secs, ms))
}
