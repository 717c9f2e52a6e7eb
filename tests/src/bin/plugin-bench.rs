//! Measurements behind `cargo xtask bench plugins` (built in release).
//!
//! - `calls <component> <hook> <n>`: `n` calls through the plugin host as
//!   the controller and agents make them (fresh instance from the
//!   pre-instantiated component, the call, the store dropped), one at a
//!   time; prints JSON with the compile time, p50/p99/mean in µs and how
//!   many calls the host stopped at their deadline.
//! - `api <url> <token> <clients> <secs>`: `clients` loops posting spawns of
//!   challenge `web` for distinct teams; prints JSON with answers/s by status.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tidegate_plugin_host::{Cause, Connection, Host, Limits, Protocol, SpawnRequest};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("calls") if args.len() == 5 => calls(&args[2], &args[3], &args[4]),
        Some("api") if args.len() == 6 => api(&args[2], &args[3], &args[4], &args[5]),
        _ => Err("usage: plugin-bench calls <component> <admit-spawn|admit-connection> <n> | api <url> <token> <clients> <secs>".into()),
    };
    if let Err(e) = result {
        eprintln!("plugin-bench: {e}");
        std::process::exit(1);
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn calls(path: &str, hook: &str, n: &str) -> Result<(), String> {
    let n: usize = n.parse().map_err(|_| "n must be a number")?;
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let host = Host::new(Limits::default()).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let plugin = host.load(&bytes).map_err(|e| e.to_string())?;
    let compile_ms = started.elapsed().as_secs_f64() * 1000.0;
    let request = SpawnRequest {
        team: "red".into(),
        challenge: "web".into(),
        team_live: 0,
        team_live_all: 1,
        team_recent: 1,
        cluster_free_slots: 10,
        cluster_capacity: 64,
        now_ms: 0,
    };
    let conn = Connection {
        instance: "00000be4c0".into(),
        team: "red".into(),
        challenge: "web".into(),
        source: Some("198.18.0.7".into()),
        protocol: Protocol::Http,
        host: "00000be4c0.ctf.localhost".into(),
    };
    // A call the host stopped at its deadline is counted, not fatal: on a
    // busy 2-core machine a preempted call can cross 5 ms, and the bench
    // measures what happens; any other failure is a broken plugin.
    let one = || -> Result<bool, String> {
        let result = match hook {
            "admit-spawn" => plugin.admit_spawn(&request).map(|r| r.map(drop)),
            "admit-connection" => plugin.admit_connection(&conn).map(|r| r.map(drop)),
            other => return Err(format!("unknown hook {other}")),
        };
        match result {
            Some(Ok(())) => Ok(false),
            Some(Err(e)) if matches!(e.cause, Cause::Timeout(_)) => Ok(true),
            Some(Err(e)) => Err(e.to_string()),
            None => Err(format!("the plugin does not implement {hook}")),
        }
    };
    for _ in 0..n.min(1000) {
        one()?;
    }
    let mut micros = Vec::with_capacity(n);
    let mut stopped = 0u64;
    let all = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        stopped += u64::from(one()?);
        micros.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let per_sec = n as f64 / all.elapsed().as_secs_f64();
    micros.sort_by(|a, b| a.total_cmp(b));
    let mean = micros.iter().sum::<f64>() / micros.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "compile_ms": compile_ms,
            "p50_us": percentile(&micros, 0.50),
            "p99_us": percentile(&micros, 0.99),
            "mean_us": mean,
            "calls_per_sec": per_sec,
            "stopped": stopped,
            "n": n,
        })
    );
    Ok(())
}

fn api(url: &str, token: &str, clients: &str, secs: &str) -> Result<(), String> {
    let clients: usize = clients.parse().map_err(|_| "clients must be a number")?;
    let secs: u64 = secs.parse().map_err(|_| "secs must be a number")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let http = reqwest::Client::new();
        let until = Instant::now() + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let (http, url, token) = (http.clone(), url.to_string(), token.to_string());
                tokio::spawn(async move {
                    let mut counts: BTreeMap<u16, u64> = BTreeMap::new();
                    let mut i = 0u64;
                    while Instant::now() < until {
                        let body = serde_json::json!({"challenge": "web", "team": format!("bench-{c}-{i}")});
                        i += 1;
                        let status = match http
                            .post(format!("{url}/v1/instances"))
                            .bearer_auth(&token)
                            .body(body.to_string())
                            .send()
                            .await
                        {
                            Ok(r) => r.status().as_u16(),
                            Err(_) => 0,
                        };
                        *counts.entry(status).or_default() += 1;
                    }
                    counts
                })
            })
            .collect();
        let mut total: BTreeMap<u16, u64> = BTreeMap::new();
        for t in tasks {
            for (s, n) in t.await.map_err(|e| e.to_string())? {
                *total.entry(s).or_default() += n;
            }
        }
        let per_sec: BTreeMap<String, f64> = total
            .iter()
            .map(|(s, n)| (s.to_string(), *n as f64 / secs as f64))
            .collect();
        println!("{}", serde_json::json!({ "per_sec": per_sec }));
        Ok(())
    })
}
