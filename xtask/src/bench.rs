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
            tcp()?;
            plugins()?;
            routes()
        }
        Some("http") => http(),
        Some("tcp") => tcp(),
        Some("plugins") => plugins(),
        Some("routes") => routes(),
        Some(other) => {
            bail!("no benchmark named {other:?}: `http`, `tcp`, `plugins` and `routes` exist")
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

/// `cargo build --release` of these binaries of these packages.
fn build_release(packages: &[&str], bins: &[&str]) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["build", "--release", "--quiet"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    for b in bins {
        cmd.args(["--bin", b]);
    }
    sh::run(&mut cmd)
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
    let target = crate::target_dir();
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
    let haproxy = haproxy(dir, &cfg)?;

    // tidegate: etcd, the route (the instance's owner is a worker whose HTTP
    // entry is the origin, so the agent proxies straight to it), one agent.
    let etcd = EtcdCluster::start(1)?;
    let endpoint = etcd.endpoints()[0].clone();
    let put = |key: &str, value: &str| etcd_put(&endpoint, key, value);
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
         Targets: ≥ 1.2× nginx and ≥ 1.0× HAProxy. Measured: {:.2}× nginx, {:.2}× HAProxy.\n\n\
         Reading: every proxy runs one worker thread on 2 cores shared with wrk and the origin, so this compares \
         cost per request on one core. A profile of the agent during a round (`perf record -g`, 999 Hz, taken for \
         issue #8) has no single hotspot: about 58% of its samples in its own code, spread over Pingora's HTTP/1 \
         parsing, header maps and tokio's task wake-ups; 34% in the kernel (socket sends and receives; loopback \
         delivery is charged to the sender, as for the peers); 7% in libc (memmove). With glibc's allocator, \
         malloc and free were 22% of the agent's samples; the agent now uses mimalloc, which cut allocation to \
         about 4% and moved the ratio from 0.36–0.39× to 0.44–0.58× nginx in back-to-back runs on this (noisy: the \
         origin alone varied 22k–44k req/s between rounds) machine. The route lookup, the policy hook and the \
         per-instance counters do not appear in the profile's top 30. What is left is Pingora's per-request work \
         against nginx's and HAProxy's hand-tuned event loops: fewer allocations per request (reused header \
         maps and buffers) would be the next step, and production runs `http_threads` = cores.\n",
        std::fs::metadata(dir.join("index.html")).map_or(0, |m| m.len()),
        ours / nginx_rps,
        ours / haproxy_rps,
    );
    write_report("HTTP proxy", &section)?;
    println!("\n{section}");
    Ok(())
}

/// iperf3 receiver throughput in Gbit/s of one 5 s single-stream run. The
/// server takes one client at a time and may still be closing a previous
/// (readiness-probe) connection: up to 3 attempts.
fn iperf3(host: &str, port: u16) -> Result<f64> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match iperf3_once(host, port) {
            Ok(g) => return Ok(g),
            Err(e) if attempt < 3 => {
                println!("  iperf3 to {host}:{port} failed ({e:#}); retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

fn iperf3_once(host: &str, port: u16) -> Result<f64> {
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

/// One byte echoed through `host:port`.
fn echo_once(host: &str, port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect((host, port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut back = Vec::new();
    s.write_all(b"x").is_ok()
        && s.shutdown(std::net::Shutdown::Write).is_ok()
        && s.read_to_end(&mut back).is_ok()
        && back == b"x"
}

/// Connections per second through `host:port` to an echo backend: `tasks`
/// clients each looping connect → 1 byte → half-close → read the echo and
/// EOF → close, for `secs`. Fails if any connection went wrong.
fn conn_rate(host: &str, port: u16, secs: u64) -> Result<f64> {
    const TASKS: usize = 16;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let host = host.to_string();
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u64, 0u64);
                    let mut first_error = None;
                    while tokio::time::Instant::now() < deadline {
                        let once = async {
                            let mut s =
                                tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                            s.write_all(b"x").await?;
                            s.shutdown().await?;
                            let mut back = Vec::new();
                            s.read_to_end(&mut back).await?;
                            std::io::Result::Ok(back == b"x")
                        };
                        let result = tokio::time::timeout(Duration::from_secs(2), once).await;
                        match result {
                            Ok(Ok(true)) => ok += 1,
                            other => {
                                failed += 1;
                                first_error.get_or_insert_with(|| match other {
                                    Ok(Ok(_)) => "wrong echo".to_string(),
                                    Ok(Err(e)) => e.to_string(),
                                    Err(_) => "timed out after 2 s".to_string(),
                                });
                            }
                        }
                    }
                    (ok, failed, first_error)
                })
            })
            .collect();
        let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
        for t in tasks {
            let (o, f, e) = t.await?;
            ok += o;
            failed += f;
            errors.extend(e);
        }
        let took = start.elapsed().as_secs_f64();
        if failed > 0 {
            errors.dedup();
            bail!(
                "{failed} of {} connections through {host}:{port} failed: {}",
                ok + failed,
                errors.join("; ")
            );
        }
        Ok(ok as f64 / took)
    })
}

/// `tcp`: iperf3 throughput and connection rate through the agent with each
/// data path and HAProxy TCP mode, against the direct loopback connection,
/// alternating rounds.
fn tcp() -> Result<()> {
    println!("building the agent and the echo backend (release)");
    build_release(
        &["tidegate-agent", "tidegate-tests"],
        &["tidegate-agent", "tcp-echo"],
    )?;
    let target = crate::target_dir();
    let work = tempfile::Builder::new()
        .prefix("tidegate-bench-")
        .tempdir()?;
    let dir = work.path();
    // Two backends on 127.0.0.1: iperf3 (throughput) and an echo server (connection rate).
    let port = free_port()?;
    let echo_port = free_port()?;
    let server = Supervised::spawn(
        "iperf3",
        "iperf3",
        &["-s", "-B", "127.0.0.1", "-p", &port.to_string()].map(String::from),
        &dir.join("iperf3.log"),
    )?;
    let echo = Supervised::spawn(
        "tcp-echo",
        &target.join("release/tcp-echo").display().to_string(),
        &["--listen".into(), format!("127.0.0.1:{echo_port}")],
        &dir.join("echo.log"),
    )?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  nbthread 1\n  maxconn 8192\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend f\n  bind 127.0.0.3:{port}\n  default_backend b\nbackend b\n  server s 127.0.0.1:{port}\n\
         frontend fe\n  bind 127.0.0.3:{echo_port}\n  default_backend be\nbackend be\n  server s 127.0.0.1:{echo_port}\n"
        ),
    )?;
    let haproxy = haproxy(dir, &cfg)?;
    // The instance's public ports are the backends' ports; its owner is a
    // worker whose tcp_host is 127.0.0.1, so each agent forwards there:
    // one proxy hop, as for HAProxy.
    let etcd = EtcdCluster::start(1)?;
    let endpoint = etcd.endpoints()[0].clone();
    let put = |key: &str, value: &str| etcd_put(&endpoint, key, value);
    put(
        "/tidegate/workers/origin",
        r#"{"v":1,"id":"origin","address":"127.0.0.1","http_entry":"127.0.0.1:1","tcp_host":"127.0.0.1","capacity":1,"version":"bench","started_at":0}"#,
    )?;
    put(
        "/tidegate/instances/00000be4c1",
        &format!(
            r#"{{"v":1,"id":"00000be4c1","challenge":"bench","team":"bench","worker":"origin","token":1,"created_at":0,"expires_at":9999999999,"tcp":[{{"port_name":"data","port":{port},"target_port":{port}}},{{"port_name":"echo","port":{echo_port},"target_port":{echo_port}}}],"container":{{"image":"none","limits":{{"memory_mib":256,"cpus":0.5,"pids":128}}}},"flag":"f"}}"#
        ),
    )?;
    // One agent per data path, each on its own tcp_host, eBPF steering.
    let paths = [
        ("splice", "127.0.0.2"),
        ("sockhash", "127.0.0.4"),
        ("copy", "127.0.0.5"),
    ];
    let mut agents = Vec::new();
    for (path, host) in paths {
        let agent_cfg = dir.join(format!("agent-{path}.toml"));
        std::fs::write(
            &agent_cfg,
            format!(
                "worker_id = \"bench-{path}\"\netcd = [\"{endpoint}\"]\nhttp_entry = \"{host}:{}\"\ntcp_host = \"{host}\"\n\
                 tcp_steering = \"ebpf\"\ntcp_data_path = \"{path}\"\npull_images = false\nmetrics_listen = \"127.0.0.1:{}\"\n",
                free_port()?,
                free_port()?
            ),
        )?;
        agents.push(Supervised::spawn(
            &format!("agent-{path}"),
            &target.join("release/tidegate-agent").display().to_string(),
            &["--config".into(), agent_cfg.display().to_string()],
            &dir.join(format!("agent-{path}.log")),
        )?);
    }
    let mut targets = vec![
        ("direct loopback".to_string(), "127.0.0.1"),
        ("HAProxy 2.6 (tcp mode, 1 thread)".to_string(), "127.0.0.3"),
    ];
    for (path, host) in paths {
        let what = match path {
            "splice" => "splice(2), the default",
            "sockhash" => "in-kernel sockhash, opt-in",
            _ => "userspace copy",
        };
        targets.push((format!("tidegate agent: {what}"), host));
    }
    for (name, host) in &targets {
        let up = wait_until(Duration::from_secs(20), || {
            echo_once(host, echo_port) && std::net::TcpStream::connect((*host, port)).is_ok()
        });
        if !up {
            let logs: String = agents.iter().map(|a| a.log_tail(10)).collect();
            bail!("{name} does not pass traffic on {host}; agent logs:\n{logs}");
        }
    }
    let mut gbits: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..ROUNDS {
        for (i, (name, host)) in targets.iter().enumerate() {
            let g = iperf3(host, port)?;
            let r = conn_rate(host, echo_port, 3)?;
            println!(
                "round {} {name:45} {g:6.2} Gbit/s {r:8.0} conn/s",
                round + 1
            );
            gbits[i].push(g);
            rates[i].push(r);
        }
    }
    drop((agents, haproxy, echo, server, etcd));
    let direct = median(gbits[0].clone());
    let direct_rate = median(rates[0].clone());
    let haproxy_rate = median(rates[1].clone());
    let mut table = String::from(
        "| path | Gbit/s (median) | vs direct | connections/s (median) | vs direct | vs HAProxy |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for (((name, _), g), r) in targets.iter().zip(&gbits).zip(&rates) {
        let (g, r) = (median(g.clone()), median(r.clone()));
        table += &format!(
            "| {name} | {g:.2} | {:.2}× | {r:.0} | {:.2}× | {:.2}× |\n",
            g / direct,
            r / direct_rate,
            r / haproxy_rate
        );
    }
    let ours = median(gbits[2].clone());
    let ours_rate = median(rates[2].clone());
    let section = format!(
        "## TCP throughput and connection rate (`cargo xtask bench tcp`)\n\n\
         Throughput: iperf3 single stream, 5 s, receiver side. Connection rate: 16 concurrent clients, each looping \
         connect → 1 byte → half-close → read the echo and EOF → close, for 3 s, against a tokio echo server; \
         any failed connection fails the benchmark. {ROUNDS} rounds alternating between targets, medians shown. \
         Backends on 127.0.0.1; HAProxy (1 thread) and one release-built agent per data path, each on its own \
         address with eBPF `sk_lookup` steering, forward one hop to them.\n\n{table}\n\
         Targets: ≥ 0.9× direct loopback throughput and ≥ HAProxy's connection rate. Measured (default path, splice): \
         {:.2}× direct throughput, {:.2}× HAProxy's connection rate.\n\n\
         Reading: on 2 cores the agent is a third busy process next to iperf3's client and server; splice(2) \
         moves no bytes through userspace but still costs two syscalls and a wakeup per chunk, which is the gap \
         to direct loopback (alone, without the other agents and HAProxy idle beside it, the same path measured \
         0.78–0.82× here). The sockhash path is slower still: every redirected skb goes through a kernel worker \
         (`sk_psock_backlog`) competing for the same 2 cores, and it has no backpressure (docs/architecture.md). \
         Connection rate varies ±10% between runs (0.88–1.01× HAProxy over the runs made for #6).\n",
        ours / direct,
        ours_rate / haproxy_rate
    );
    write_report("TCP throughput", &section)?;
    println!("\n{section}");
    Ok(())
}

/// HAProxy in the foreground with config file `cfg`, logging into `dir`.
fn haproxy(dir: &Path, cfg: &Path) -> Result<Supervised> {
    Ok(Supervised::spawn(
        "haproxy",
        "haproxy",
        &["-db".into(), "-f".into(), cfg.display().to_string()],
        &dir.join("haproxy.log"),
    )?)
}

/// Writes one key straight into etcd (the benchmarks' hand-made routes).
fn etcd_put(endpoint: &str, key: &str, value: &str) -> Result<()> {
    sh::run(Command::new("etcdctl").env("ETCDCTL_API", "3").args([
        "--endpoints",
        endpoint,
        "put",
        key,
        value,
    ]))
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

/// Median of three runs of `plugin-bench calls` for one plugin and hook.
fn plugin_calls(bench: &Path, component: &Path, hook: &str) -> Result<(f64, f64, f64, f64)> {
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut rate = Vec::new();
    let mut compile = Vec::new();
    for _ in 0..ROUNDS {
        let out = sh::output(Command::new(bench).args([
            "calls",
            &component.display().to_string(),
            hook,
            "20000",
        ]))
        .with_context(|| format!("plugin-bench calls {} {hook} failed", component.display()))?;
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("plugin-bench said {out:?}"))?;
        let f = |k: &str| v[k].as_f64().context("plugin-bench output");
        p50.push(f("p50_us")?);
        p99.push(f("p99_us")?);
        rate.push(f("calls_per_sec")?);
        compile.push(f("compile_ms")?);
    }
    Ok((median(p50), median(p99), median(rate), median(compile)))
}

/// Spawn answers per second from `plugin-bench api` (16 clients, 3 s).
fn spawn_rate(bench: &Path, url: &str, status: &str) -> Result<f64> {
    let out = sh::output(Command::new(bench).args(["api", url, ADMIN_TOKEN, "16", "3"]))
        .context("plugin-bench api failed")?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("plugin-bench said {out:?}"))?;
    let per_sec = v["per_sec"].as_object().context("plugin-bench output")?;
    if per_sec.keys().any(|k| k != status) {
        bail!("spawns answered other than {status}: {v}");
    }
    per_sec
        .get(status)
        .and_then(|r| r.as_f64())
        .context("no answers at all")
}

const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";

/// `plugins`: the cost of a policy call (fresh instance from the
/// pre-instantiated component, the call, the drop) and spawn decisions per
/// second through a release controller with and without a policy.
fn plugins() -> Result<()> {
    let root = workspace_root();
    println!("building the controller, plugin-bench (release) and the plugins");
    build_release(
        &["tidegate-controller", "tidegate-tests"],
        &["tidegate-controller", "plugin-bench"],
    )?;
    let target = crate::target_dir();
    let built = tidegate_lab::plugins::build(&root.join("plugins"), &target.join("plugins"), &[])
        .map_err(anyhow::Error::msg)?;
    let path = |name: &str| {
        built
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.component.clone())
            .with_context(|| format!("plugin {name} was not built"))
    };
    let bench = target.join("release/plugin-bench");
    let (s50, s99, srate, scompile) = plugin_calls(&bench, &path("team-limit")?, "admit-spawn")?;
    let (c50, c99, crate_, ccompile) =
        plugin_calls(&bench, &path("allowlist")?, "admit-connection")?;
    println!(
        "admit-spawn p50 {s50:.1} µs p99 {s99:.1} µs; admit-connection p50 {c50:.1} µs p99 {c99:.1} µs"
    );

    // Spawn decisions through the API: etcd, one release controller, no
    // agents. Without a policy a spawn reaches placement and is answered
    // 503 (no worker); with `allowlist` it is decided (403) by the plugin
    // before placement. Same etcd read of the challenge in both.
    let work = tempfile::Builder::new()
        .prefix("tidegate-bench-")
        .tempdir()?;
    let dir = work.path();
    let etcd = EtcdCluster::start(1)?;
    let (_controller, url) = release_controller(&target, dir, &etcd.endpoints())?;
    let http = |method: &str, path: &str, body: Vec<u8>| api(dir, &url, method, path, body);
    let spec = r#"{"image":"tidegate/demo-http:1","ports":[{"name":"web","port":8080,"protocol":"http"}]}"#;
    let out = http("PUT", "/v1/challenges/web", spec.as_bytes().to_vec())?;
    if !out.ends_with(" 201") {
        bail!("creating the challenge: {out}");
    }
    let without = spawn_rate(&bench, &url, "503")?;
    let out = http(
        "PUT",
        "/v1/challenges/web/policy",
        std::fs::read(path("allowlist")?)?,
    )?;
    if !out.ends_with(" 200") {
        bail!("uploading allowlist: {out}");
    }
    let with = spawn_rate(&bench, &url, "403")?;
    println!("spawn answers/s: {without:.0} without a policy, {with:.0} decided by allowlist");

    let verdict = if s99 <= 50.0 && c99 <= 50.0 {
        "met"
    } else {
        "NOT met"
    };
    let section = format!(
        "## Policy plugins (issue #7)\n\n\
         `cargo xtask bench plugins`. One policy call = what the controller and the agents do per decision: a \
         fresh instance from the cached, pre-instantiated component (pooling allocator), the hook call with its \
         CPU-time deadline and memory cap armed, and the store dropped. 20,000 calls one after another after 1,000 \
         warm-up calls, median of {ROUNDS} runs; release build, examples built by `cargo xtask build-plugins`.\n\n\
         | call | p50 | p99 | calls/s (1 thread) | compile once |\n|---|---|---|---|---|\n\
         | `team-limit` admit-spawn | {s50:.1} µs | {s99:.1} µs | {srate:.0} | {scompile:.0} ms |\n\
         | `allowlist` admit-connection | {c50:.1} µs | {c99:.1} µs | {crate_:.0} | {ccompile:.0} ms |\n\n\
         Target instantiate + call + drop p99 ≤ 50 µs: **{verdict}**.\n\n\
         Spawn decisions through the API (release controller, 1-member etcd, 16 clients for 3 s, each spawn a new \
         team): with `allowlist` denying, **{with:.0} decisions/s**; the same requests with no policy, which read \
         the same challenge and then fail placement (no worker, 503): {without:.0}/s. The plugin's share of a \
         decision is the call above; the rest is HTTP, the etcd read of the challenge and the per-leader spawn lock.\n"
    );
    write_report("Policy plugins", &section)
}

/// A release controller on etcd `endpoints`, leading; its API URL.
fn release_controller(
    target: &Path,
    dir: &Path,
    endpoints: &[String],
) -> Result<(Supervised, String)> {
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let cfg = dir.join("controller.toml");
    let etcd: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    std::fs::write(
        &cfg,
        format!(
            "id = \"bench\"\nlisten = \"127.0.0.1:{port}\"\netcd = [{}]\nadmin_token = \"{ADMIN_TOKEN}\"\n\
             platform_token = \"bench-platform-token-0123456789\"\nflag_secret = \"bench-flag-secret-0123456789\"\n\
             election_ttl_secs = 2\nartifact_dir = \"{}\"\ntcp_ports = \"30000-39999\"\n",
            etcd.join(", "),
            dir.join("artifacts").display()
        ),
    )?;
    let controller = Supervised::spawn(
        "controller",
        &target
            .join("release/tidegate-controller")
            .display()
            .to_string(),
        &["--config".into(), cfg.display().to_string()],
        &dir.join("controller.log"),
    )?;
    let leading = wait_until(Duration::from_secs(15), || {
        api(dir, &url, "GET", "/v1/status", Vec::new())
            .is_ok_and(|s| s.contains("\"role\":\"leader\""))
    });
    if !leading {
        bail!("the controller did not lead within 15 s");
    }
    Ok((controller, url))
}

/// One API call with the admin token through curl: the body, a space and the status code.
fn api(dir: &Path, url: &str, method: &str, path: &str, body: Vec<u8>) -> Result<String> {
    let body_file = dir.join(format!("body-{}", std::process::id()));
    std::fs::write(&body_file, body)?;
    sh::output(
        Command::new("curl")
            .args(["-sS", "-X", method, "-H"])
            .arg(format!("Authorization: Bearer {ADMIN_TOKEN}"))
            .arg("--data-binary")
            .arg(format!("@{}", body_file.display()))
            .args(["-w", " %{http_code}"])
            .arg(format!("{url}{path}")),
    )
    .with_context(|| format!("curl {method} {path} failed"))
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// `routes`: route propagation (API 201 → every agent routes the hostname)
/// and spawn → routable (the first 200) with a 3-member etcd and 3 agents;
/// then an agent started against 10,000 instance records: time until its
/// table holds them all, and its RSS.
fn routes() -> Result<()> {
    const SPAWNS: usize = 40;
    const RESYNC: usize = 10_000;
    println!("building the controller, the agent and route-bench (release)");
    build_release(
        &["tidegate-controller", "tidegate-agent", "tidegate-tests"],
        &["tidegate-controller", "tidegate-agent", "route-bench"],
    )?;
    tidegate_lab::images::ensure_demo_images()?;
    let target = crate::target_dir();
    let work = tempfile::Builder::new()
        .prefix("tidegate-bench-")
        .tempdir()?;
    let dir = work.path();
    let etcd = EtcdCluster::start(3)?;
    let endpoints = etcd.endpoints();
    let (_controller, url) = release_controller(&target, dir, &endpoints)?;
    let label = format!("bench-routes-{}", std::process::id());
    let agent = |name: &str, addr: &str| -> Result<(Supervised, String, u16)> {
        let http = format!("{addr}:{}", free_port()?);
        let metrics = free_port()?;
        let cfg = dir.join(format!("{name}.toml"));
        let etcd: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
        std::fs::write(
            &cfg,
            format!(
                "worker_id = \"{name}\"\netcd = [{}]\nadvertise_address = \"{addr}\"\nhttp_entry = \"{http}\"\n\
                 tcp_host = \"{addr}\"\npull_images = false\nmetrics_listen = \"127.0.0.1:{metrics}\"\n\
                 cluster_label = \"{label}\"\nartifact_dir = \"{}\"\nreconcile_interval_ms = 200\n",
                etcd.join(", "),
                dir.join("artifacts").display()
            ),
        )?;
        let proc = Supervised::spawn(
            name,
            &target.join("release/tidegate-agent").display().to_string(),
            &["--config".into(), cfg.display().to_string()],
            &dir.join(format!("{name}.log")),
        )?;
        let up = wait_until(Duration::from_secs(15), || {
            sh::output(
                Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{metrics}/metrics")]),
            )
            .is_some()
        });
        if !up {
            bail!("agent {name} did not start:\n{}", proc.log_tail(20));
        }
        Ok((proc, http, metrics))
    };
    let remove_containers = || {
        if let Some(ids) = sh::output(Command::new("docker").args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=tidegate.cluster={label}"),
        ])) {
            for id in ids.split_whitespace() {
                let _ = sh::output(Command::new("docker").args(["rm", "-f", "-v", id]));
            }
        }
    };
    let result = (|| -> Result<(Vec<f64>, Vec<f64>)> {
        let agents = [
            agent("bench-a", "127.0.0.2")?,
            agent("bench-b", "127.0.0.3")?,
            agent("bench-c", "127.0.0.4")?,
        ];
        let spec = r#"{"image":"tidegate/demo-http:1","ports":[{"name":"web","port":8080,"protocol":"http"}]}"#;
        let out = api(
            dir,
            &url,
            "PUT",
            "/v1/challenges/web",
            spec.as_bytes().to_vec(),
        )?;
        if !out.ends_with(" 201") {
            bail!("creating the challenge: {out}");
        }
        let registered = wait_until(Duration::from_secs(15), || {
            api(dir, &url, "GET", "/v1/workers", Vec::new())
                .is_ok_and(|s| s.matches("\"bench-").count() >= 3)
        });
        if !registered {
            bail!("the 3 agents did not register");
        }
        let mut args: Vec<String> = vec![
            "propagation".into(),
            url.clone(),
            ADMIN_TOKEN.into(),
            "web".into(),
            SPAWNS.to_string(),
        ];
        args.extend(agents.iter().map(|a| a.1.clone()));
        let out = sh::output(Command::new(target.join("release/route-bench")).args(&args))
            .context("route-bench propagation failed")?;
        let v: serde_json::Value = serde_json::from_str(out.trim())?;
        let samples = |k: &str| -> Vec<f64> {
            v[k].as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_f64())
                .collect()
        };
        Ok((samples("propagation_ms"), samples("routable_ms")))
    })();
    remove_containers();
    let (propagation, routable) = result?;
    if propagation.len() != SPAWNS || routable.len() != SPAWNS {
        bail!("route-bench returned too few samples");
    }
    let (p50, p99) = (
        percentile(propagation.clone(), 0.5),
        percentile(propagation, 0.99),
    );
    let (r50, r99) = (
        percentile(routable.clone(), 0.5),
        percentile(routable, 0.99),
    );
    println!(
        "route propagation p50 {p50:.1} ms p99 {p99:.1} ms; spawn → routable p50 {r50:.0} ms p99 {r99:.0} ms"
    );

    // Resync: 10,000 records of another worker, then a fresh agent.
    sh::output(Command::new(target.join("release/route-bench")).args([
        "seed",
        &endpoints[0],
        &RESYNC.to_string(),
    ]))
    .context("route-bench seed failed")?;
    let started = std::time::Instant::now();
    let (proc, _, metrics) = agent("bench-resync", "127.0.0.5")?;
    let mut synced = None;
    while started.elapsed() < Duration::from_secs(120) {
        let routes = sh::output(
            Command::new("curl").args(["-sf", &format!("http://127.0.0.1:{metrics}/metrics")]),
        )
        .and_then(|m| {
            m.lines()
                .find_map(|l| {
                    l.strip_prefix("tidegate_agent_routes ")
                        .map(|v| v.trim().parse::<usize>().ok())
                })
                .flatten()
        });
        if routes.is_some_and(|r| r >= RESYNC) {
            synced = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let synced = synced.context("the agent never held the 10,000 routes")?;
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", proc.pid()))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    drop(proc);
    remove_containers();
    let rss_mib = rss_kib as f64 / 1024.0;
    println!(
        "resync of {RESYNC} instances: {:.2} s from process start, RSS {rss_mib:.0} MiB",
        synced.as_secs_f64()
    );
    let verdict = if p99 <= 50.0 { "met" } else { "NOT met" };
    let section = format!(
        "## Route propagation and resync (`cargo xtask bench routes`)\n\n\
         A 3-member etcd on loopback, one release controller, three release agents (each its own loopback \
         address), the demo HTTP image. {SPAWNS} spawns one after another, each deleted after it served.\n\n\
         | measure | p50 | p99 |\n|---|---:|---:|\n\
         | route propagation: API 201 → all 3 agents route the hostname (polled every 1 ms) | {p50:.1} ms | {p99:.1} ms |\n\
         | spawn → routable: POST sent → first 200 through an agent (includes the container start) | {r50:.0} ms | {r99:.0} ms |\n\n\
         Target route propagation p99 ≤ 50 ms: **{verdict}**.\n\n\
         Resync: {RESYNC} instance records (and endpoints) of another worker written into etcd, then a new agent \
         started: **{:.2} s** from process start until its table held all {RESYNC} hostnames (etcd connect, \
         list, build, eBPF load included); its RSS then: **{rss_mib:.0} MiB**.\n\n\
         Reading: propagation is one watch event per agent after the spawn Txn commits, so its median is a few \
         milliseconds; the p99 is scheduling on 2 cores (the controller, three agents, three etcd members and \
         Docker share them; alone, without the HTTP and TCP benchmarks before it, the same run measured \
         p99 7.7–7.8 ms). Spawn → routable is the container start: the route is in every table within the \
         propagation time, then the agent creates and starts the container and reports it running; until then \
         agents answer 503 with a Retry-After. The resync is one paged list (1,000 keys a page, all at one \
         revision) and one table build. Its RSS was 64–68 MiB with glibc's allocator (runs for #7); mimalloc, \
         adopted in #8 for the proxy's per-request allocations, keeps more freed memory mapped.\n",
        synced.as_secs_f64()
    );
    write_report("Route propagation", &section)
}
