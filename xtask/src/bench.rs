//! `cargo xtask bench`: benchmarks against peers measured in the same run,
//! written to docs/benchmarks.md.
//!
//! `http`: wrk through a release-built agent, nginx and HAProxy, each in
//! front of the same nginx origin serving a small static body, one worker
//! thread each, rounds alternating between the proxies. nginx runs with
//! `master_process off` (one process, so stopping it by pid leaves nothing).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tidegate_lab::etcd::EtcdCluster;
use tidegate_lab::ports::free_port;
use tidegate_lab::process::{Supervised, wait_until};

use crate::{sh, workspace_root};

const ROUNDS: usize = 3;
const SECONDS: u32 = 6;
const CONNECTIONS: u32 = 32;
const HOST: &str = "00000be4c0.ctf.localhost";

pub(crate) fn run(which: Option<String>) -> Result<()> {
    match which.as_deref() {
        None => {
            http()?;
            tcp()
        }
        Some("http") => http(),
        Some("tcp") => tcp(),
        Some(other) => {
            bail!("no benchmark named {other:?}: `http` and `tcp` exist; plugins lands with #7")
        }
    }
}

/// One wrk run's figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn parse_latency(s: &str) -> Option<f64> {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        _ => return None,
    })
}

fn wrk(url: &str, host: &str) -> Result<Sample> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{CONNECTIONS}"),
            &format!("-d{SECONDS}s"),
            "--latency",
        ])
        .args(["-H", &format!("Host: {host}"), url])
        .output()
        .context("running wrk (cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok());
    let p50 = field("50%").and_then(|v| parse_latency(&v));
    let p99 = field("99%").and_then(|v| parse_latency(&v));
    let errors = text
        .lines()
        .any(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    match (rps, p50, p99) {
        (Some(rps), Some(p50_ms), Some(p99_ms)) if !errors => Ok(Sample {
            rps,
            p50_ms,
            p99_ms,
        }),
        _ => bail!("wrk against {url} failed or saw errors:\n{text}"),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn http() -> Result<()> {
    let root = workspace_root();
    println!("building the agent (release)");
    sh::run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "tidegate-agent",
        "--bins",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let agent_bin = target.join("release/tidegate-agent");
    let work = tempfile::Builder::new()
        .prefix("tidegate-bench-")
        .tempdir()?;
    let dir = work.path();

    // The origin: nginx serving a small static body, 1 worker.
    let origin_port = free_port()?;
    std::fs::write(
        dir.join("index.html"),
        "tidegate benchmark origin: a small static body\n",
    )?;
    let origin = nginx(
        dir,
        "origin",
        &format!(
            "server {{ listen 127.0.0.1:{origin_port}; access_log off; root {}; keepalive_requests 1000000; }}",
            dir.display()
        ),
    )?;
    // nginx as a proxy, with upstream keepalive.
    let nginx_port = free_port()?;
    let nginx_proxy = nginx(dir, "proxy", &format!(
        "upstream origin {{ server 127.0.0.1:{origin_port}; keepalive 64; }}
         server {{ listen 127.0.0.1:{nginx_port}; access_log off; keepalive_requests 1000000;
           location / {{ proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
    ))?;
    // HAProxy, one thread, connection reuse.
    let haproxy_port = free_port()?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\
         frontend f\n  bind 127.0.0.1:{haproxy_port}\n  default_backend b\nbackend b\n  server origin 127.0.0.1:{origin_port}\n"
        ),
    )?;
    let haproxy = Supervised::spawn(
        "haproxy",
        "haproxy",
        &["-db".into(), "-f".into(), cfg.display().to_string()],
        &dir.join("haproxy.log"),
    )?;

    // tidegate: etcd, the route (the instance's owner is a worker whose HTTP
    // entry is the origin, so the agent proxies straight to it), one agent.
    let etcd = EtcdCluster::start(1)?;
    let endpoint = etcd.endpoints()[0].clone();
    let put = |key: &str, value: &str| -> Result<()> {
        sh::run(Command::new("etcdctl").env("ETCDCTL_API", "3").args([
            "--endpoints",
            &endpoint,
            "put",
            key,
            value,
        ]))
    };
    put(
        "/tidegate/workers/origin",
        &format!(
            r#"{{"v":1,"id":"origin","address":"127.0.0.1","http_entry":"127.0.0.1:{origin_port}","tcp_host":"127.0.0.1","capacity":1,"version":"bench","started_at":0}}"#
        ),
    )?;
    put(
        "/tidegate/instances/00000be4c0",
        &format!(
            r#"{{"v":1,"id":"00000be4c0","challenge":"bench","team":"bench","worker":"origin","token":1,"created_at":0,"expires_at":9999999999,"http":[{{"port_name":"web","hostname":"{HOST}","target_port":80}}],"container":{{"image":"none","limits":{{"memory_mib":256,"cpus":0.5,"pids":128}}}},"flag":"f"}}"#
        ),
    )?;
    let agent_port = free_port()?;
    let metrics_port = free_port()?;
    let agent_cfg = dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "worker_id = \"bench\"\netcd = [\"{endpoint}\"]\nhttp_entry = \"127.0.0.1:{agent_port}\"\nhttp_threads = 1\npull_images = false\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"
        ),
    )?;
    let agent = Supervised::spawn(
        "agent",
        &agent_bin.display().to_string(),
        &["--config".into(), agent_cfg.display().to_string()],
        &dir.join("agent.log"),
    )?;
    let url = |port: u16| format!("http://127.0.0.1:{port}/index.html");
    let ready = |port: u16| {
        wait_until(Duration::from_secs(20), || {
            Command::new("curl")
                .args([
                    "-sf",
                    "-o",
                    "/dev/null",
                    "-H",
                    &format!("Host: {HOST}"),
                    &url(port),
                ])
                .status()
                .is_ok_and(|s| s.success())
        })
    };
    for (name, port) in [
        ("origin", origin_port),
        ("nginx", nginx_port),
        ("haproxy", haproxy_port),
        ("tidegate", agent_port),
    ] {
        if !ready(port) {
            bail!(
                "{name} on port {port} does not answer; agent log:\n{}",
                agent.log_tail(20)
            );
        }
    }

    let targets = [
        ("direct (origin)", origin_port),
        ("nginx 1.22 proxy", nginx_port),
        ("HAProxy 2.6", haproxy_port),
        ("tidegate agent", agent_port),
    ];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
    for round in 0..ROUNDS {
        for (i, (name, port)) in targets.iter().enumerate() {
            let s = wrk(&url(*port), HOST)?;
            println!(
                "round {} {name:18} {:>10.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
                round + 1,
                s.rps,
                s.p50_ms,
                s.p99_ms
            );
            samples[i].push(s);
        }
    }
    let agent_rss = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("?").to_string())
        })
        .unwrap_or_default();
    drop((agent, haproxy, nginx_proxy, origin, etcd));

    let rows: Vec<(String, f64, f64, f64)> = targets
        .iter()
        .zip(&samples)
        .map(|((name, _), s)| {
            (
                name.to_string(),
                median(s.iter().map(|x| x.rps).collect()),
                median(s.iter().map(|x| x.p50_ms).collect()),
                median(s.iter().map(|x| x.p99_ms).collect()),
            )
        })
        .collect();
    let nginx_rps = rows[1].1;
    let haproxy_rps = rows[2].1;
    let ours = rows[3].1;
    let mut table = String::from(
        "| target | req/s (median) | p50 ms | p99 ms | vs nginx | vs HAProxy |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for (name, rps, p50, p99) in &rows {
        table += &format!(
            "| {name} | {rps:.0} | {p50:.3} | {p99:.3} | {:.2}× | {:.2}× |\n",
            rps / nginx_rps,
            rps / haproxy_rps
        );
    }
    let section = format!(
        "## HTTP proxy (`cargo xtask bench http`)\n\n\
         wrk `-t1 -c{CONNECTIONS} -d{SECONDS}s --latency` with a Host header, {ROUNDS} rounds alternating between targets, medians shown. \
         Every proxy has one worker thread and sits in front of the same origin (nginx, 1 worker, a {}-byte static file, keep-alive). \
         tidegate is a release build of the agent with `http_threads = 1`, routing the Host through its etcd-fed table; \
         agent RSS after the run: {agent_rss} kB.\n\n{table}\n\
         Targets: ≥ 1.2× nginx and ≥ 1.0× HAProxy. Measured: {:.2}× nginx, {:.2}× HAProxy.\n",
        std::fs::metadata(dir.join("index.html")).map_or(0, |m| m.len()),
        ours / nginx_rps,
        ours / haproxy_rps,
    );
    write_report("HTTP proxy", &section)?;
    println!("\n{section}");
    Ok(())
}

/// iperf3 receiver throughput in Gbit/s of one 5 s single-stream run.
fn iperf3(host: &str, port: u16) -> Result<f64> {
    let out = Command::new("iperf3")
        .args(["-c", host, "-p", &port.to_string(), "-t", "5", "-J"])
        .output()
        .context("running iperf3 (cargo xtask setup installs it)")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 to {host}:{port}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| {
            format!(
                "iperf3 to {host}:{port} reported no throughput: {}",
                v["error"]
            )
        })
}

/// `tcp`: iperf3 through the agent's TCP path and HAProxy TCP mode, against
/// the direct loopback connection, alternating rounds.
fn tcp() -> Result<()> {
    let root = workspace_root();
    println!("building the agent (release)");
    sh::run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "tidegate-agent",
        "--bins",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let work = tempfile::Builder::new()
        .prefix("tidegate-bench-")
        .tempdir()?;
    let dir = work.path();
    let port = free_port()?;
    let server = Supervised::spawn(
        "iperf3",
        "iperf3",
        &["-s", "-B", "127.0.0.1", "-p", &port.to_string()].map(String::from),
        &dir.join("iperf3.log"),
    )?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  nbthread 1\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend f\n  bind 127.0.0.3:{port}\n  default_backend b\nbackend b\n  server s 127.0.0.1:{port}\n"
        ),
    )?;
    let haproxy = Supervised::spawn(
        "haproxy",
        "haproxy",
        &["-db".into(), "-f".into(), cfg.display().to_string()],
        &dir.join("haproxy.log"),
    )?;
    // The instance's public port is the iperf3 port; its owner is a worker
    // whose tcp_host is 127.0.0.1, so the agent on 127.0.0.2 forwards there.
    let etcd = EtcdCluster::start(1)?;
    let endpoint = etcd.endpoints()[0].clone();
    let put = |key: &str, value: &str| -> Result<()> {
        sh::run(Command::new("etcdctl").env("ETCDCTL_API", "3").args([
            "--endpoints",
            &endpoint,
            "put",
            key,
            value,
        ]))
    };
    put(
        "/tidegate/workers/origin",
        r#"{"v":1,"id":"origin","address":"127.0.0.1","http_entry":"127.0.0.1:1","tcp_host":"127.0.0.1","capacity":1,"version":"bench","started_at":0}"#,
    )?;
    put(
        "/tidegate/instances/00000be4c1",
        &format!(
            r#"{{"v":1,"id":"00000be4c1","challenge":"bench","team":"bench","worker":"origin","token":1,"created_at":0,"expires_at":9999999999,"tcp":[{{"port_name":"data","port":{port},"target_port":{port}}}],"container":{{"image":"none","limits":{{"memory_mib":256,"cpus":0.5,"pids":128}}}},"flag":"f"}}"#
        ),
    )?;
    let agent_cfg = dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "worker_id = \"bench\"\netcd = [\"{endpoint}\"]\nhttp_entry = \"127.0.0.2:{}\"\ntcp_host = \"127.0.0.2\"\npull_images = false\nmetrics_listen = \"127.0.0.1:{}\"\n",
            free_port()?,
            free_port()?
        ),
    )?;
    let agent = Supervised::spawn(
        "agent",
        &target.join("release/tidegate-agent").display().to_string(),
        &["--config".into(), agent_cfg.display().to_string()],
        &dir.join("agent.log"),
    )?;
    let listening = |host: &str| {
        wait_until(Duration::from_secs(20), || {
            std::net::TcpStream::connect((host, port)).is_ok()
        })
    };
    for host in ["127.0.0.1", "127.0.0.2", "127.0.0.3"] {
        if !listening(host) {
            bail!(
                "nothing listens on {host}:{port}; agent log:\n{}",
                agent.log_tail(20)
            );
        }
    }
    let targets = [
        ("direct loopback", "127.0.0.1"),
        ("HAProxy 2.6 (tcp mode)", "127.0.0.3"),
        ("tidegate agent (userspace copy)", "127.0.0.2"),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..ROUNDS {
        for (i, (name, host)) in targets.iter().enumerate() {
            let g = iperf3(host, port)?;
            println!("round {} {name:32} {g:6.2} Gbit/s", round + 1);
            results[i].push(g);
        }
    }
    drop((agent, haproxy, server, etcd));
    let direct = median(results[0].clone());
    let mut table = String::from("| path | Gbit/s (median) | vs direct |\n|---|---:|---:|\n");
    for ((name, _), r) in targets.iter().zip(&results) {
        let m = median(r.clone());
        table += &format!("| {name} | {m:.2} | {:.2}× |\n", m / direct);
    }
    let ours = median(results[2].clone());
    let section = format!(
        "## TCP throughput (`cargo xtask bench tcp`)\n\n\
         iperf3 single stream, 5 s, receiver side, {ROUNDS} rounds alternating, medians; server on 127.0.0.1, \
         HAProxy (1 thread) on 127.0.0.3, the agent's TCP path on 127.0.0.2 (release build; the userspace fallback, \
         tokio `copy_bidirectional`; the eBPF redirector and splice paths of #6 are not measured yet).\n\n{table}\n\
         Target: ≥ 0.9× direct loopback. Measured: {:.2}×. Connection rate not measured yet.\n",
        ours / direct
    );
    write_report("TCP throughput", &section)?;
    println!("\n{section}");
    Ok(())
}

fn nginx(dir: &Path, name: &str, server: &str) -> Result<Supervised> {
    let conf = dir.join(format!("nginx-{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\npid {}/nginx-{name}.pid;\nerror_log {}/nginx-{name}.err;\n\
             events {{ worker_connections 4096; }}\nhttp {{ {server} }}\n",
            dir.display(),
            dir.display()
        ),
    )?;
    Ok(Supervised::spawn(
        &format!("nginx-{name}"),
        "nginx",
        &[
            "-c".into(),
            conf.display().to_string(),
            "-p".into(),
            dir.display().to_string(),
        ],
        &dir.join(format!("nginx-{name}.log")),
    )?)
}

/// Replaces the section `## {title}…` of docs/benchmarks.md (or appends it),
/// keeping the header with the machine description current.
fn write_report(title: &str, section: &str) -> Result<()> {
    let path = workspace_root().join("docs/benchmarks.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut sections: Vec<String> = old
        .split("\n## ")
        .skip(1)
        .map(|s| format!("## {s}"))
        .filter(|s| !s.starts_with(&format!("## {title}")))
        .collect();
    sections.push(section.trim_end().to_string());
    sections.sort();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = sh::output(Command::new("uname").arg("-r")).unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let header = format!(
        "# Benchmarks\n\nRegenerated by `cargo xtask bench` (one section per benchmark; `cargo xtask bench <name>` reruns one). \
         Peers are measured in the same run on the same machine.\n\n\
         Machine: {cores} cores ({cpu}), kernel {}, Debian 12; everything on loopback.\n",
        kernel.trim()
    );
    std::fs::write(&path, format!("{header}\n{}\n", sections.join("\n\n")))?;
    println!("wrote {}", path.display());
    Ok(())
}
