//! `tcp`: iperf3 throughput and connections/s through agents, each data
//! path, and one forwarded hop, against the instance reached directly and
//! through HAProxy; rounds alternating between targets.
//!
//! Everything is real: a controller spawns three instances of a challenge
//! whose image runs iperf3's server and the project's echo server, one on
//! each of three agents (`splice`, `sockhash`, `copy`, each on its own
//! loopback address with eBPF steering); a fourth agent (`splice`) owns
//! none and forwards to the owner with the hop header (PROXY v2), which
//! the owner takes off: the path a player takes through any agent.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tidegate_local::images::{BENCH_ECHO_PORT, BENCH_IPERF_PORT, bench_tcp_image};
use tidegate_local::ports::free_port;
use tidegate_local::process::{Supervised, wait_until};
use tidegate_schema::config::{DataPath, Steering};

use super::{Containers, ControlPlane, Figures, Mode, agent, agent_config, api, haproxy, median};

/// The owning agents: data path and address.
const OWNERS: [(DataPath, &str); 3] = [
    (DataPath::Splice, "127.0.0.2"),
    (DataPath::Sockhash, "127.0.0.4"),
    (DataPath::Copy, "127.0.0.5"),
];
/// The agent that owns nothing and forwards.
const EDGE: &str = "127.0.0.6";
/// HAProxy's address.
const HAPROXY: &str = "127.0.0.3";

/// One instance: its owner's data path, public ports, container address.
struct Instance {
    path: DataPath,
    data: u16,
    echo: u16,
    address: String,
}

/// Where a measured connection goes: a name, a host, the data and echo ports.
type Target = (String, String, u16, u16);

pub(super) fn run(mode: Mode) -> Result<Figures> {
    println!("building the controller, the agent and the echo server");
    let bin_dir = mode.build(
        &["tidegate-controller", "tidegate-agent", "tidegate-tests"],
        &["tidegate-controller", "tidegate-agent", "tcp-echo"],
    )?;
    let image = bench_tcp_image(&bin_dir.join("tcp-echo"))?;
    let _kernel = KernelSettings::set()?;
    // The agents inherit it.
    let most = raise_open_files()?;
    let plane = ControlPlane::start(&bin_dir, 1)?;
    let (dir, url, etcd) = (plane.dir(), plane.url.as_str(), &plane.etcd);
    let label = format!("bench-tcp-{}", std::process::id());
    let _containers = Containers(label.clone());
    let start = |worker: &str, path: DataPath, host: &str| -> Result<Supervised> {
        let mut cfg = agent_config(worker, &etcd.endpoints(), dir, &label)?;
        let ip = host.parse()?;
        cfg.advertise_address = ip;
        cfg.tcp_host = ip;
        cfg.http_entry = SocketAddr::new(ip, free_port()?);
        cfg.capacity = 1;
        cfg.tcp_steering = Steering::Ebpf;
        cfg.tcp_data_path = path;
        // The held-connections run opens 40,000 at once from this host's
        // one address; the caps' cost is the same whatever their value.
        cfg.tcp_max_connections_per_source = 65_536;
        cfg.tcp_max_connections_per_instance = 65_536;
        agent(&bin_dir, dir, &cfg)
    };
    let mut agents = Vec::new();
    for (path, host) in OWNERS {
        agents.push(start(&format!("bench-{path}"), path, host)?);
    }
    let instances = spawn_instances(dir, url, &image)?;
    // The edge agent joins once every instance has its owner.
    agents.push(start("bench-edge", DataPath::Splice, EDGE)?);
    let direct = &instances[0];
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(direct))?;
    let _haproxy = haproxy(&cfg)?;
    let mut targets: Vec<Target> = vec![
        target(
            "direct to the instance",
            &direct.address,
            BENCH_IPERF_PORT,
            BENCH_ECHO_PORT,
        ),
        target(
            "HAProxy 2.6 (tcp mode, 1 thread)",
            HAPROXY,
            direct.data,
            direct.echo,
        ),
    ];
    for (i, (path, host)) in OWNERS.iter().enumerate() {
        let what = match path {
            DataPath::Splice => "splice(2), the default",
            DataPath::Sockhash => "in-kernel sockhash, opt-in",
            DataPath::Copy => "userspace copy",
        };
        let inst = instances
            .iter()
            .find(|i| i.path == *path)
            .with_context(|| format!("no instance on the {path} agent"))?;
        targets.push(target(
            &format!("tidegate agent: {what}"),
            host,
            inst.data,
            inst.echo,
        ));
        if i == 0 {
            let name = "tidegate agent: splice, forwarded by another agent (hop header)";
            targets.push(target(name, EDGE, inst.data, inst.echo));
        }
    }
    for (name, host, data, echo) in &targets {
        let up = wait_until(Duration::from_secs(30), || {
            echo_once(host, *echo) && std::net::TcpStream::connect((host.as_str(), *data)).is_ok()
        });
        if !up {
            let logs: String = agents.iter().map(|a| a.log_tail(10)).collect();
            bail!("{name} does not pass traffic on {host}; agent logs:\n{logs}");
        }
    }
    let (gbits, rates) = measure(mode, &targets)?;
    // The debug build of --short holds fewer: the path, not the count.
    let n = if mode.short { 2_000 } else { HELD }.min(most);
    let held = hold_forwarded(&instances, n)?;
    drop(agents);
    Ok(figures(mode, &targets, &gbits, &rates, &held))
}

/// Two kernel settings for the run, restored when dropped. The
/// connection-rate runs open 15,000 to 45,000 connections per row and round
/// toward one instance address and port (directly, through HAProxy, through
/// the agents); each ends in TIME_WAIT on this host, and each one that
/// reaches a Docker network is a conntrack entry for 120 s after. With the
/// defaults (TIME_WAIT ports reused only toward loopback, 262,144 conntrack
/// entries) the rate of every row collapses tenfold once the local ports are
/// all in TIME_WAIT, and the third round drops SYNs once the table is full
/// ("nf_conntrack: table full" in the kernel log), whoever proxies.
struct KernelSettings(Vec<(&'static str, String)>);

const KERNEL_SETTINGS: [(&str, &str); 2] = [
    ("/proc/sys/net/ipv4/tcp_tw_reuse", "1"),
    // (Present once Docker's NAT loaded the conntrack module.)
    ("/proc/sys/net/netfilter/nf_conntrack_max", "1048576"),
];

impl KernelSettings {
    fn set() -> Result<Self> {
        let mut was = Self(Vec::new());
        for (path, value) in KERNEL_SETTINGS {
            let Ok(old) = std::fs::read_to_string(path) else {
                continue;
            };
            std::fs::write(path, value).with_context(|| format!("writing {path} (root?)"))?;
            was.0.push((path, old.trim().to_string()));
        }
        Ok(was)
    }
}

impl Drop for KernelSettings {
    fn drop(&mut self) {
        for (path, old) in &self.0 {
            let _ = std::fs::write(path, old);
        }
    }
}

fn target(name: &str, host: &str, data: u16, echo: u16) -> Target {
    (name.to_string(), host.to_string(), data, echo)
}

/// The challenge `bench-tcp` and one instance of it per owning agent,
/// running; each with its owner's data path and its container's address.
fn spawn_instances(dir: &Path, url: &str, image: &str) -> Result<Vec<Instance>> {
    let spec = serde_json::json!({
        "image": image,
        "ports": [
            {"name": "data", "port": BENCH_IPERF_PORT, "protocol": "tcp"},
            {"name": "echo", "port": BENCH_ECHO_PORT, "protocol": "tcp"},
        ],
        // nofile: the held-connections run puts up to 13,400 on each echo
        // server (at most the engine's own limit: 20,000 on these machines).
        "limits": {"memory_mib": 512, "cpus": 2.0, "pids": 256, "nofile": 16384},
        "ttl": {"default_secs": 3600, "max_secs": 7200},
    });
    let (status, _) = call(dir, url, "PUT", "/v1/challenges/bench-tcp", &spec)?;
    if status != 201 {
        bail!("creating the challenge: {status}");
    }
    let registered = wait_until(Duration::from_secs(20), || {
        call(dir, url, "GET", "/v1/workers", &Value::Null).is_ok_and(|(_, v)| {
            v["workers"]
                .as_array()
                .is_some_and(|w| w.len() == OWNERS.len())
        })
    });
    if !registered {
        bail!("the owning agents did not register");
    }
    let mut instances = Vec::new();
    for team in 0..OWNERS.len() {
        let body = serde_json::json!({"challenge": "bench-tcp", "team": format!("bench-{team}")});
        let (status, v) = call(dir, url, "POST", "/v1/instances", &body)?;
        if status != 201 {
            bail!("spawning: {status} {v}");
        }
        let id = v["id"].as_str().context("no instance id")?.to_string();
        let worker = v["worker"].as_str().unwrap_or_default();
        let path = OWNERS
            .iter()
            .map(|(p, _)| *p)
            .find(|p| worker == format!("bench-{p}"))
            .with_context(|| format!("instance {id} went to {worker:?}"))?;
        let port = |name: &str| {
            v["tcp"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["port_name"] == name)
                .and_then(|p| p["port"].as_u64())
                .and_then(|p| u16::try_from(p).ok())
                .with_context(|| format!("instance {id} has no {name} port"))
        };
        let running = wait_until(Duration::from_secs(60), || {
            call(
                dir,
                url,
                "GET",
                &format!("/v1/instances/{id}"),
                &Value::Null,
            )
            .is_ok_and(|(_, v)| v["status"] == "running")
        });
        if !running {
            bail!("instance {id} on {worker} is not running after 60 s");
        }
        instances.push(Instance {
            path,
            data: port("data")?,
            echo: port("echo")?,
            address: container_address(&id)?,
        });
    }
    Ok(instances)
}

/// An API call with a JSON body; the status and the JSON answer.
fn call(dir: &Path, url: &str, method: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let out = api(dir, url, method, path, bytes)?;
    let (text, status) = out.rsplit_once(' ').context("no status")?;
    Ok((
        status.parse()?,
        serde_json::from_str(text).unwrap_or(Value::Null),
    ))
}

/// The address of instance `id`'s container on its network.
fn container_address(id: &str) -> Result<String> {
    let filter = format!("label=tidegate.instance={id}");
    let container = tidegate_local::docker::docker(&["ps", "-q", "--filter", &filter])?;
    let address = tidegate_local::docker::docker(&[
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        container.trim(),
    ])?;
    address
        .split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("instance {id}'s container has no address"))
}

/// HAProxy (1 thread, TCP mode) on [`HAPROXY`], forwarding `direct`'s
/// public ports to its container.
fn haproxy_config(direct: &Instance) -> String {
    let (data, echo, to) = (direct.data, direct.echo, &direct.address);
    format!(
        "global\n  nbthread 1\n  maxconn 8192\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend f\n  bind {HAPROXY}:{data}\n  default_backend b\nbackend b\n  server s {to}:{BENCH_IPERF_PORT}\n\
         frontend fe\n  bind {HAPROXY}:{echo}\n  default_backend be\nbackend be\n  server s {to}:{BENCH_ECHO_PORT}\n"
    )
}

/// Per target, one figure per round.
type PerTarget = Vec<Vec<f64>>;

/// Throughput (Gbit/s) and connections/s of every target, per round.
fn measure(mode: Mode, targets: &[Target]) -> Result<(PerTarget, PerTarget)> {
    let mut gbits: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..mode.rounds() {
        for (i, (name, host, data, echo)) in targets.iter().enumerate() {
            let g = iperf3(host, *data, mode.secs(5))?;
            let r = conn_rate(host, *echo, mode.secs(3))?;
            println!(
                "round {} {name:62} {g:6.2} Gbit/s {r:8.0} conn/s",
                round + 1
            );
            gbits[i].push(g);
            rates[i].push(r);
        }
    }
    Ok((gbits, rates))
}

/// iperf3 receiver throughput in Gbit/s of one single-stream run. The
/// server takes one client at a time and may still be closing a previous
/// (readiness-probe) connection: up to 3 attempts.
fn iperf3(host: &str, port: u16, secs: u64) -> Result<f64> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match iperf3_once(host, port, secs) {
            Ok(g) => return Ok(g),
            Err(e) if attempt < 3 => {
                println!("  iperf3 to {host}:{port} failed ({e:#}); retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

fn iperf3_once(host: &str, port: u16, secs: u64) -> Result<f64> {
    let out = std::process::Command::new("iperf3")
        .args([
            "-c",
            host,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ])
        .output()
        .context("running iperf3 (cargo xtask setup installs it)")?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
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

/// Connections per second through `host:port` to an echo backend: 16
/// clients each looping connect → 1 byte → half-close → read the echo and
/// EOF → close, for `secs`. Fails if any connection went wrong.
fn conn_rate(host: &str, port: u16, secs: u64) -> Result<f64> {
    const TASKS: usize = 16;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| tokio::spawn(echo_loop(host.to_string(), port, deadline)))
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

/// One client of [`conn_rate`]: connections that worked, failed, and the first error.
async fn echo_loop(
    host: String,
    port: u16,
    deadline: tokio::time::Instant,
) -> (u64, u64, Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    while tokio::time::Instant::now() < deadline {
        let once = async {
            let mut s = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            s.write_all(b"x").await?;
            s.shutdown().await?;
            let mut back = Vec::new();
            s.read_to_end(&mut back).await?;
            std::io::Result::Ok(back == b"x")
        };
        match tokio::time::timeout(Duration::from_secs(2), once).await {
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
}

/// The medians, and the report section.
fn figures(
    mode: Mode,
    targets: &[Target],
    gbits: &[Vec<f64>],
    rates: &[Vec<f64>],
    held: &Held,
) -> Figures {
    let direct = median(gbits[0].clone());
    let direct_rate = median(rates[0].clone());
    let haproxy_rate = median(rates[1].clone());
    let mut table = String::from(
        "| path | Gbit/s (median) | vs direct | connections/s (median) | vs direct | vs HAProxy |\n|---|---:|---:|---:|---:|---:|\n",
    );
    let mut values = Vec::new();
    for (((name, ..), g), r) in targets.iter().zip(gbits).zip(rates) {
        let (g, r) = (median(g.clone()), median(r.clone()));
        table += &format!(
            "| {name} | {g:.2} | {:.2}× | {r:.0} | {:.2}× | {:.2}× |\n",
            g / direct,
            r / direct_rate,
            r / haproxy_rate
        );
        values.push((format!("{name} Gbit/s"), g));
        values.push((format!("{name} conn/s"), r));
    }
    values.push(("forwarded connections held".into(), held.connections as f64));
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(0);
    values.push(("their distinct local ports".into(), held.ports as f64));
    let ours = median(gbits[2].clone());
    let ours_rate = median(rates[2].clone());
    let (rounds, iperf_secs, rate_secs) = (mode.rounds(), mode.secs(5), mode.secs(3));
    let section = format!(
        "## TCP throughput and connection rate (`cargo xtask bench tcp`)\n\n\
         Throughput: iperf3 single stream, {iperf_secs} s, receiver side. Connection rate: 16 concurrent clients, each looping \
         connect → 1 byte → half-close → read the echo and EOF → close, for {rate_secs} s, against the project's tokio echo server; \
         any failed connection fails the benchmark. {rounds} rounds alternating between targets, medians shown. \
         The backends run in real instances: a release controller spawned three of one challenge (iperf3's server and the \
         echo server, `cpus = 2`), one on each of three release agents, each agent on its own loopback address with eBPF \
         `sk_lookup` steering and its own data path. \"Direct\" and HAProxy (1 thread) reach one instance's container on its \
         Docker network; each agent serves its own instance; a fourth agent, owning none, forwards to the splice agent with \
         the hop header (PROXY v2) that the owner takes off, so that row is two agent hops. \
         During the run `net.ipv4.tcp_tw_reuse` is 1 and `net.netfilter.nf_conntrack_max` 1,048,576 (both restored \
         after): every row's connections end in TIME_WAIT toward the same instance address and port and stay in conntrack \
         for 120 s; with the defaults the rate of every row collapses tenfold once the local ports are all in TIME_WAIT, \
         and SYNs are dropped once the conntrack table is full. A worker expecting such connection rates is set the same \
         (deploy/README.md).\n\n{table}\n\
         Targets: ≥ 0.9× direct throughput and ≥ HAProxy's connection rate. Measured (default path, splice): \
         {:.2}× direct throughput, {:.2}× HAProxy's connection rate.\n\n\
         Reading: on 2 cores every agent is one more busy process next to iperf3's client and server and the container's \
         network path (veth and bridge), which is the same for every row; splice(2) moves no bytes through userspace but \
         still costs two syscalls and a wakeup per chunk. The sockhash path redirects every skb through a kernel worker \
         (`sk_psock_backlog`) competing for the same 2 cores, and has no backpressure (docs/architecture.md). \
         The forwarded row pays both hops on the same 2 cores.\n\n\
         Forwarded connections held at once: {} connections opened through the fourth agent to the three instances' echo \
         ports (round robin, each echoing one byte before the next batch), all held open together ({:.0} s to open): 40,000, \
         or as many as the open-file limit lets the agent hold (hard limit here {limit}, not raisable without \
         `CAP_SYS_RESOURCE`; two descriptors per connection, pipes are taken from a pool only while bytes move). The \
         agent's connections to the owners bind with `IP_BIND_ADDRESS_NO_PORT`, so the kernel picks the port per \
         destination: they use {} distinct local ports of the {} in `ip_local_port_range` (a port repeats toward \
         different owners), so no destination's ports are used up by another's. The maximum is per instance port and \
         forwarding agent: the size of `ip_local_port_range` (28,232 by default; deploy/README.md).\n",
        ours / direct,
        ours_rate / haproxy_rate,
        held.connections,
        held.secs,
        held.ports,
        held.range,
    );
    Figures {
        values,
        report: Some(("TCP throughput".into(), section)),
    }
}

/// What the held-connections run measured.
struct Held {
    connections: usize,
    /// Distinct local ports of the edge agent's connections to the owners.
    ports: usize,
    /// The size of `ip_local_port_range`.
    range: usize,
    secs: f64,
}

/// Forwarded connections opened at once through the edge agent (fewer if
/// the open-file limit does not allow them).
const HELD: usize = 40_000;

/// Lifts this process's soft open-file limit to its hard one (children
/// started after inherit it) and says how many connections the edge agent
/// can hold under it: two descriptors each (its two sockets; pipes are
/// held only while bytes are in flight), 1,000 kept for everything else.
fn raise_open_files() -> Result<usize> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).context("raising the open-file limit")?;
    let hard = limit.maximum.map_or(usize::MAX, |m| m as usize);
    Ok(hard.saturating_sub(1000) / 2)
}

/// Opens `n` connections through the edge agent to the instances' echo
/// ports (round robin, in batches of 500 at once, each echoing one byte),
/// holds them all, and counts the edge agent's local ports toward the
/// owners. Fails if any connection does not echo.
fn hold_forwarded(instances: &[Instance], n: usize) -> Result<Held> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = std::time::Instant::now();
    let held = rt.block_on(async {
        let mut held = Vec::with_capacity(n);
        while held.len() < n {
            let mut batch = tokio::task::JoinSet::new();
            for i in held.len()..n.min(held.len() + 500) {
                let port = instances[i % instances.len()].echo;
                batch.spawn(async move {
                    let mut s = tokio::net::TcpStream::connect((EDGE, port)).await?;
                    s.write_all(b"x").await?;
                    let mut back = [0u8; 1];
                    s.read_exact(&mut back).await?;
                    anyhow::Ok(s)
                });
            }
            let opened = tokio::time::timeout(Duration::from_secs(30), batch.join_all())
                .await
                .with_context(|| {
                    format!(
                        "{} connections held, the next 500 took over 30 s",
                        held.len()
                    )
                })?;
            for s in opened {
                held.push(s.with_context(|| {
                    format!("a forwarded connection failed with {} held", held.len())
                })?);
            }
        }
        anyhow::Ok(held)
    })?;
    let secs = started.elapsed().as_secs_f64();
    let out = std::process::Command::new("ss")
        .args(["-Htn", "state", "established", "src", EDGE])
        .output()?;
    let owners: Vec<&str> = OWNERS.iter().map(|(_, a)| *a).collect();
    let ports: std::collections::HashSet<&str> = std::str::from_utf8(&out.stdout)?
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().skip(2);
            let (local, peer) = (f.next()?, f.next()?);
            let peer_ip = peer.rsplit_once(':')?.0;
            owners
                .contains(&peer_ip)
                .then(|| local.rsplit_once(':').map(|(_, p)| p))?
        })
        .collect();
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")?;
    let bounds: Vec<usize> = range
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let range = match bounds[..] {
        [low, high] => high + 1 - low,
        _ => bail!("ip_local_port_range reads {range:?}"),
    };
    println!(
        "held {} forwarded connections ({secs:.0} s to open); {} distinct local ports toward the owners of {range}",
        held.len(),
        ports.len()
    );
    let connections = held.len();
    drop(held);
    Ok(Held {
        connections,
        ports: ports.len(),
        range,
        secs,
    })
}
