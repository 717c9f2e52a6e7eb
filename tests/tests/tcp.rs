//! The TCP data plane (#6) on a real kernel with real containers: a public
//! port per instance on every agent, steered by eBPF `sk_lookup` (or, with
//! CAP_BPF taken away, one listener per port) and spliced to the instance.
//! The same suite runs on every data path: splice(2), the in-kernel
//! sockhash and the userspace copy, plus the no-eBPF fallback.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Plane, plane, plane_wrapped};
use reqwest::Method;
use tidegate_lab::daemons::{Agent, eventually};
use tidegate_schema::config::{DataPath, Steering};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Sends `line`, shuts the write side, and returns everything the server sent back.
async fn echo(addr: &str, line: &str) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await??;
    s.write_all(line.as_bytes()).await?;
    s.shutdown().await?; // half-close: the reply must still arrive whole
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut out)).await??;
    Ok(out)
}

fn echo_image() -> String {
    tidegate_lab::images::binary_image(
        "tidegate/test-tcp-echo",
        std::path::Path::new(env!("CARGO_BIN_EXE_tcp-echo")),
        &[],
    )
    .unwrap()
}

/// Registers `name` with one TCP port 1337 and spawns it for team t1; returns (id, public port).
async fn tcp_instance(
    p: &Plane,
    name: &str,
    image: &str,
    extra: serde_json::Value,
) -> (String, u16) {
    let mut spec = serde_json::json!({"image": image, "ports": [{"name": "tcp", "port": 1337, "protocol": "tcp"}]});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    let (s, body) = p.controller.put_challenge(name, spec).await;
    assert!(s.is_success(), "{body}");
    let (s, inst) = p.controller.spawn(name, "t1").await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{inst}");
    let port = inst["tcp"][0]["port"].as_u64().unwrap() as u16;
    (inst["id"].as_str().unwrap().to_string(), port)
}

fn entries(p: &Plane, port: u16) -> [String; 2] {
    [
        format!("{}:{port}", p.a_host),
        format!("{}:{port}", p.b_host),
    ]
}

async fn wait_echo(addr: &str) {
    let ok = eventually(30, || async {
        echo(addr, "ping\n").await.is_ok_and(|r| r == "ping\n")
    })
    .await;
    assert!(ok, "no echo through {addr}");
}

/// Sum of one per-instance series over both agents.
async fn both(p: &Plane, series: &str) -> f64 {
    p.a.metric(series).await.unwrap_or(0.0) + p.b.metric(series).await.unwrap_or(0.0)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Splice,
    Sockhash,
    Copy,
}

/// Everything #6 asks of a data path, through both agents.
async fn suite(p: &Plane, path: Path, ebpf: bool) {
    for agent in [&p.a, &p.b] {
        assert_eq!(
            agent.metric("tidegate_tcp_ebpf_steering").await,
            Some(if ebpf { 1.0 } else { 0.0 }),
            "{}",
            agent.log()
        );
    }
    let image = echo_image();
    let (_, demo_port) = tcp_instance(
        p,
        "demo",
        tidegate_lab::images::DEMO_TCP,
        serde_json::json!({}),
    )
    .await;
    let (id, port) = tcp_instance(p, "echo", &image, serde_json::json!({})).await;

    // demo-tcp (busybox nc): a line through each agent comes back.
    for addr in entries(p, demo_port) {
        wait_echo(&addr).await;
    }
    // Half-close: the client shuts its write side and still gets the whole reply.
    for addr in entries(p, port) {
        wait_echo(&addr).await;
        let big: String = (0..200_000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let back = echo(&addr, &big).await.unwrap();
        assert!(
            back == big,
            "200 KB half-closed reply differs via {addr}: got {} bytes",
            back.len()
        );
    }

    // 1,000 connections open at once, each echoing its own line.
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let addr = entries(p, port)[i % 2].clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(&addr).await?;
                barrier.wait().await; // every connection is open before any sends
                let line = format!("connection {i} says {}\n", "x".repeat(i % 97));
                s.write_all(line.as_bytes()).await?;
                s.shutdown().await?;
                let mut out = String::new();
                tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut out)).await??;
                std::io::Result::Ok(out == line)
            })
        })
        .collect();
    let mut good = 0;
    let mut failures = std::collections::BTreeMap::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(true) => good += 1,
            Ok(false) => *failures.entry("wrong echo".to_string()).or_insert(0) += 1,
            Err(e) => *failures.entry(e.to_string()).or_insert(0) += 1,
        }
    }
    if good != 1000 {
        let mut why = String::new();
        for (name, agent) in [("a", &p.a), ("b", &p.b)] {
            for stage in ["not_ready", "connect", "transfer"] {
                let series = format!("tidegate_tcp_failed_connections_total{{stage=\"{stage}\"}}");
                why += &format!(" {name}:{stage}={:?}", agent.metric(&series).await);
            }
            // With TIDEGATE_LOG=debug the agents say why each one ended.
            for line in agent
                .log()
                .lines()
                .filter(|l| l.contains("ended with an error"))
            {
                why += &format!("\n  {name}: {line}");
            }
        }
        panic!(
            "of 1,000 concurrent connections only {good} echoed correctly: {failures:?}; agents' failed connections:{why}"
        );
    }
    let failed =
        |stage: &str| format!("tidegate_tcp_failed_connections_total{{stage=\"{stage}\"}}");
    // Failed connections at any stage: a client that resets before the
    // agent has read its first bytes fails there, not in the transfer.
    let all_failures = || async {
        let mut sum = 0.0;
        for stage in ["not_ready", "connect", "transfer"] {
            sum += both(p, &failed(stage)).await;
        }
        sum
    };
    let failures_before = all_failures().await;

    // Resets: 50 clients abort mid-stream (RST); the agents let go of them.
    for i in 0..50 {
        let s = TcpStream::connect(&entries(p, port)[i % 2]).await.unwrap();
        let mut s = s;
        s.write_all(b"about to reset\n").await.unwrap();
        s.set_zero_linger().unwrap();
        drop(s);
    }
    // Teardown: nothing stays open, and bytes were counted.
    let active = format!("tidegate_tcp_active_connections{{instance=\"{id}\"}}");
    let idle = eventually(20, || async { both(p, &active).await == 0.0 }).await;
    assert!(idle, "connections left open: {}", both(p, &active).await);
    // Each agent that accepted a reset client counts it (b's forwarded half
    // may be counted by a too), at the stage the reset reached it.
    let resets = all_failures().await - failures_before;
    assert!(
        resets >= 50.0,
        "failed connections counted for 50 resets: {resets}"
    );
    let counted = both(
        p,
        &format!("tidegate_tcp_connections_total{{instance=\"{id}\"}}"),
    )
    .await;
    assert!(counted >= 1000.0, "connections counted: {counted}");
    let bytes = both(
        p,
        &format!("tidegate_tcp_sent_bytes_total{{instance=\"{id}\"}}"),
    )
    .await;
    assert!(bytes >= 400_000.0, "bytes sent to players counted: {bytes}");
    if path == Path::Sockhash {
        // The bytes really went through the kernel's sockhash.
        // (A client that already sent and half-closed when the agent pairs
        // it cannot be inserted — the kernel takes only established
        // sockets — and goes through splice(2); under load that is some.)
        let spliced = both(p, "tidegate_tcp_sockhash_pairs_total{result=\"spliced\"}").await;
        let refused = both(p, "tidegate_tcp_sockhash_pairs_total{result=\"refused\"}").await;
        assert!(
            spliced + refused >= 1000.0,
            "pairs spliced in the kernel: {spliced}, refused: {refused}"
        );
        kernel_spliced_echo(p, port).await;
        for agent in [&p.a, &p.b] {
            assert_sockhash_empty(agent).await;
        }
    }

    // A port no instance holds is refused at once (RST, not a timeout).
    let unallocated = (30000..40000)
        .find(|q| *q != port && *q != demo_port)
        .unwrap();
    for host in [p.a_host.as_str(), p.b_host.as_str()] {
        let t = Instant::now();
        let e = TcpStream::connect((host, unallocated)).await.unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{host}:{unallocated}: {e}"
        );
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    // After delete both agents refuse the port within one watch delay.
    p.controller
        .call(Method::DELETE, &format!("/v1/instances/{id}"), None, None)
        .await;
    for addr in entries(p, port) {
        let closed = eventually(5, || async {
            matches!(TcpStream::connect(addr.as_str()).await,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
        .await;
        assert!(closed, "{addr} still accepts after delete");
    }
}

/// 20 connections through agent a that send nothing until a has paired
/// them in the kernel (its counter says so), then 100 KB each, half-close,
/// and the whole reply back: the bytes provably went through the sockhash.
async fn kernel_spliced_echo(p: &Plane, port: u16) {
    let series = "tidegate_tcp_sockhash_pairs_total{result=\"spliced\"}";
    let before = p.a.metric(series).await.unwrap_or(0.0);
    let addr = format!("{}:{port}", p.a_host);
    let mut conns = Vec::new();
    for _ in 0..20 {
        conns.push(TcpStream::connect(&addr).await.unwrap());
    }
    let paired = eventually(20, || async {
        p.a.metric(series).await.unwrap_or(0.0) >= before + 20.0
    })
    .await;
    assert!(
        paired,
        "agent a did not pair 20 idle connections in the kernel"
    );
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            tokio::spawn(async move {
                let body: Vec<u8> = (0..100_000).map(|j| ((i + j) % 251) as u8).collect();
                s.write_all(&body).await?;
                s.shutdown().await?;
                let mut back = Vec::new();
                tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut back)).await??;
                std::io::Result::Ok(back == body)
            })
        })
        .collect();
    for t in tasks {
        assert!(
            t.await.unwrap().unwrap(),
            "a kernel-spliced echo came back different"
        );
    }
}

/// The splice maps hold nothing once every connection closed: read by the
/// agent (aya) and, independently, by bpftool from the kernel.
async fn assert_sockhash_empty(agent: &Agent) {
    let empty = eventually(10, || async {
        let text = agent.metrics().await.unwrap_or_default();
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tidegate_tcp_sockhash_entries{"))
            .collect();
        rows.len() == 3 && rows.iter().all(|l| l.ends_with(" 0"))
    })
    .await;
    assert!(
        empty,
        "sockhash not empty:\n{}",
        agent.metrics().await.unwrap_or_default()
    );
    let text = agent.metrics().await.unwrap();
    for line in text
        .lines()
        .filter(|l| l.starts_with("tidegate_tcp_sockhash_entries{"))
    {
        let id = line
            .split("id=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "id", id])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bpftool map dump id {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            dump.as_array().map(Vec::len),
            Some(0),
            "map {id} per bpftool: {dump}"
        );
    }
}

/// A client writing as fast as it can through `addr` to a backend reading
/// 1 MB/s: returns (bytes the client got rid of, bytes the backend read).
async fn push_into_slow_backend(addr: &str, secs: u64) -> (u64, u64) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = s.into_split();
    let sunk = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let sunk = sunk.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(n) = l.parse() {
                    sunk.store(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while let Ok(Ok(())) = tokio::time::timeout_at(deadline, w.write_all(&chunk)).await {
        written += chunk.len() as u64;
    }
    let done = sunk.load(std::sync::atomic::Ordering::Relaxed);
    reader.abort();
    (written, done)
}

fn rss_kib(agent: &Agent) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.proc.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Behind a backend reading 1 MB/s, what sits between client and backend
/// stays bounded (pipes and socket buffers), and so does the agent.
async fn memory_bounded(p: &Plane) {
    let sink = tidegate_lab::images::binary_image(
        "tidegate/test-tcp-sink",
        std::path::Path::new(env!("CARGO_BIN_EXE_tcp-echo")),
        &["--sink", "1000000"],
    )
    .unwrap();
    let (_, port) = tcp_instance(p, "sink", &sink, serde_json::json!({})).await;
    let [via_a, via_b] = entries(p, port);
    for addr in [&via_a, &via_b] {
        // Ready when the backend reports what it read.
        let ready = eventually(30, || async {
            let Ok(mut s) = TcpStream::connect(addr.as_str()).await else { return false };
            if s.write_all(&[1u8; 200_000]).await.is_err() {
                return false;
            }
            let mut line = String::new();
            let mut r = BufReader::new(s);
            matches!(tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut line)).await, Ok(Ok(n)) if n > 0)
        })
        .await;
        assert!(ready, "the slow backend never answered through {addr}");
    }
    let before = (rss_kib(&p.a), rss_kib(&p.b));
    let ((wa, sa), (wb, sb)) = tokio::join!(
        push_into_slow_backend(&via_a, 6),
        push_into_slow_backend(&via_b, 6)
    );
    let after = (rss_kib(&p.a), rss_kib(&p.b));
    eprintln!(
        "slow backend: via a wrote {wa} read {sa}; via b wrote {wb} read {sb}; agent RSS KiB {before:?} -> {after:?}"
    );
    assert!(
        sa > 1_000_000 && sb > 1_000_000,
        "the backend read too little: {sa} {sb}"
    );
    // Socket buffers on loopback autotune to at most 32 MiB receive and
    // 4 MiB send per socket; a path hop adds two sockets and a pipe.
    for (written, read, hops) in [(wa, sa, 1u64), (wb, sb, 2)] {
        let in_flight = written - read.min(written);
        assert!(
            in_flight < hops * 80 * 1024 * 1024,
            "{in_flight} bytes in flight behind a 1 MB/s backend"
        );
    }
    for (b, a) in [before, after] {
        assert!(a < b + 64 * 1024, "agent RSS grew from {b} KiB to {a} KiB");
    }
}

#[tokio::test]
async fn splice_path_with_ebpf_steering() {
    let p = plane(|c| {
        c.tcp_steering = Steering::Ebpf;
        c.tcp_data_path = DataPath::Splice;
    })
    .await;
    suite(&p, Path::Splice, true).await;
    memory_bounded(&p).await;
    idle_connections_hold_no_pipe(&p).await;
}

/// Open descriptors of `agent`'s process.
fn open_fds(agent: &Agent) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", agent.proc.pid()))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// On the splice path a connection holds a pipe only while bytes move:
/// 250 idle connections through each agent (the owner serves one half,
/// the other agent forwards the other half to it, 750 agent legs in all)
/// cost two descriptors per leg (its two sockets; the idle watch borrows
/// the player's), not six.
async fn idle_connections_hold_no_pipe(p: &Plane) {
    let (_, port) = tcp_instance(p, "idle", &echo_image(), serde_json::json!({})).await;
    let [via_a, via_b] = entries(p, port);
    for addr in [&via_a, &via_b] {
        wait_echo(addr).await;
    }
    let before = open_fds(&p.a) + open_fds(&p.b);
    let mut held = Vec::new();
    for addr in [&via_a, &via_b] {
        for _ in 0..250 {
            let mut s = TcpStream::connect(addr.as_str()).await.unwrap();
            s.write_all(b"x\n").await.unwrap();
            let mut back = [0u8; 2];
            s.read_exact(&mut back).await.unwrap();
            held.push(s);
        }
    }
    let after = open_fds(&p.a) + open_fds(&p.b);
    let per_leg = after.saturating_sub(before) as f64 / 750.0;
    eprintln!(
        "descriptors of both agents with 500 idle connections: {before} -> {after} ({per_leg:.2} per agent leg)"
    );
    assert!(
        (1.5..2.5).contains(&per_leg),
        "{per_leg:.2} descriptors per idle agent leg ({before} -> {after})"
    );
}

#[tokio::test]
async fn sockhash_path_with_ebpf_steering() {
    let p = plane(|c| {
        c.tcp_steering = Steering::Ebpf;
        c.tcp_data_path = DataPath::Sockhash;
    })
    .await;
    assert_eq!(
        p.a.metric("tidegate_tcp_data_path_info{path=\"sockhash\"}")
            .await,
        Some(1.0)
    );
    suite(&p, Path::Sockhash, true).await;
    if std::env::var_os("TIDEGATE_SOCKHASH_MEMORY").is_some() {
        memory_bounded(&p).await;
    }
}

#[tokio::test]
async fn copy_path_with_ebpf_steering() {
    let p = plane(|c| {
        c.tcp_steering = Steering::Ebpf;
        c.tcp_data_path = DataPath::Copy;
    })
    .await;
    suite(&p, Path::Copy, true).await;
}

/// A worker registered with another agent's address (a copied config)
/// makes both agents forward its instances to agent b, which would forward
/// them to itself forever. A connection forwarded once is never forwarded
/// again: b closes it, counts it and says why; HTTP answers 508.
#[tokio::test]
async fn a_forwarding_loop_is_cut_after_one_hop() {
    let p = plane(|_| {}).await;
    let mut etcd = p.client.clone();
    let lease = etcd.lease_grant(600, None).await.unwrap().id();
    let ghost = serde_json::json!({"v": 1, "id": "ghost", "address": p.b_host,
        "http_entry": p.b_http, "tcp_host": p.b_host, "capacity": 10000,
        "version": "copied config", "started_at": 1});
    etcd.put(
        tidegate_lab::keys::worker("ghost"),
        ghost.to_string(),
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    let registered = eventually(10, || async {
        p.controller
            .call(Method::GET, "/v1/workers", None, None)
            .await
            .1["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 3)
    })
    .await;
    assert!(registered, "the ghost worker never showed up");
    let spec = serde_json::json!({"image": "x", "ports": [
        {"name": "web", "port": 80, "protocol": "http"},
        {"name": "tcp", "port": 1337, "protocol": "tcp"}]});
    let (s, body) = p.controller.put_challenge("looped", spec).await;
    assert!(s.is_success(), "{body}");
    let (s, inst) = p.controller.spawn("looped", "t1").await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{inst}");
    assert_eq!(inst["worker"], "ghost", "the emptiest worker gets it");
    let port = inst["tcp"][0]["port"].as_u64().unwrap() as u16;
    let hostname = inst["http"][0]["hostname"].as_str().unwrap().to_string();

    let loops = "tidegate_tcp_failed_connections_total{stage=\"loop\"}";
    for addr in entries(&p, port) {
        let n = p.b.metric(loops).await.unwrap_or(0.0);
        // Routed (forwarded) as soon as the agents see the instance.
        let cut = eventually(10, || async {
            let _ = echo(&addr, "anyone there?\n").await;
            p.b.metric(loops).await.unwrap_or(0.0) > n
        })
        .await;
        assert!(cut, "no loop cut at b for a connection through {addr}");
        // Every connection is closed at once, with nothing sent back.
        let t = Instant::now();
        let reply = echo(&addr, "anyone there?\n").await;
        assert!(
            matches!(&reply, Ok(r) if r.is_empty()) || reply.is_err(),
            "{addr}: {reply:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(3), "{addr} hung");
    }
    assert!(p.b.log().contains("TCP routing loop"), "{}", p.b.log());
    assert_eq!(p.a.metric(loops).await, Some(0.0), "a forwards, b cuts");
    for entry in [&p.a_http, &p.b_http] {
        let (s, _, body) = common::get(entry, &hostname, None).await;
        assert_eq!(s, 508, "{entry}: {body}");
    }
}

/// One TLS port for every TCP challenge: `ncat --ssl` with the SNI the API
/// names (`tls_hostname`) reaches the instance through either agent, the
/// bytes counted as the instance's; an SNI of no instance, no SNI and a
/// client that is not speaking TLS are closed and counted.
#[tokio::test]
async fn tcp_over_tls_is_routed_by_sni_through_either_agent() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = common::wildcard_cert(certs.path());
    let tls_port = tidegate_lab::ports::free_port().unwrap();
    let p = plane(|c| {
        c.tls_tcp_entry = Some(std::net::SocketAddr::new(c.tcp_host, tls_port));
        c.tls_cert = Some(cert.clone());
        c.tls_key = Some(key.clone());
    })
    .await;
    let (s, body) = p
        .controller
        .put_challenge(
            "echo",
            serde_json::json!({"image": echo_image(), "ports": [{"name": "nc", "port": 1337, "protocol": "tcp"}]}),
        )
        .await;
    assert!(s.is_success(), "{body}");
    let (s, inst) = p.controller.spawn("echo", "t1").await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{inst}");
    let id = inst["id"].as_str().unwrap().to_string();
    let sni = inst["tcp"][0]["tls_hostname"].as_str().unwrap().to_string();
    assert_eq!(sni, format!("{id}-nc.ctf.localhost"));

    // Sends `line` (stdin stays open: ncat closes the whole TLS connection
    // at EOF) and returns the first line that comes back, or "" on close.
    let ncat = |host: String, sni: String, line: String| {
        let cert = cert.clone();
        async move {
            let mut child = tokio::process::Command::new("ncat")
                .args(["--ssl", "--ssl-verify", "--ssl-trustfile"])
                .arg(&cert)
                .args([
                    "--ssl-servername",
                    &sni,
                    "-w",
                    "3",
                    &host,
                    &tls_port.to_string(),
                ])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(line.as_bytes()).await;
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut first = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), out.read_line(&mut first)).await;
            first
        }
    };
    for host in [p.a_host.clone(), p.b_host.clone()] {
        let line = format!("hello over TLS via {host}\n");
        let echoed = eventually(30, || async {
            ncat(host.clone(), sni.clone(), line.clone()).await == line
        })
        .await;
        assert!(
            echoed,
            "no echo over TLS via {host}: {:?}\n{}",
            ncat(host.clone(), sni.clone(), line.clone()).await,
            p.a.log()
        );
    }
    let received = both(
        &p,
        &format!("tidegate_tcp_received_bytes_total{{instance=\"{id}\"}}"),
    )
    .await;
    assert!(
        received >= 40.0,
        "bytes counted for the instance: {received}"
    );

    // Closed, not served: an SNI of no instance, and a client that is not
    // speaking TLS at all.
    let failed = |stage: &'static str| {
        let p = &p;
        async move {
            p.a.metric(&format!(
                "tidegate_tcp_failed_connections_total{{stage=\"{stage}\"}}"
            ))
            .await
            .unwrap_or(0.0)
        }
    };
    let (not_ready, tls) = (failed("not_ready").await, failed("tls").await);
    let out = ncat(
        p.a_host.clone(),
        "0000000000-nc.ctf.localhost".into(),
        "anyone?\n".into(),
    )
    .await;
    assert_eq!(out, "", "an unknown SNI got an answer");
    let mut plain = TcpStream::connect((p.a_host.as_str(), tls_port))
        .await
        .unwrap();
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut reply)).await;
    assert!(
        !String::from_utf8_lossy(&reply).contains("HTTP"),
        "plain text was answered: {reply:?}"
    );
    assert_eq!(failed("not_ready").await, not_ready + 1.0);
    assert!(eventually(5, || async { failed("tls").await == tls + 1.0 }).await);
}

/// Without CAP_BPF (and the admin caps that would stand in for it) the
/// agent says so in one log line and serves every port with a listener.
#[tokio::test]
async fn without_cap_bpf_the_agent_falls_back_to_listeners() {
    // Without CAP_NET_ADMIN the agent cannot keep the host firewall either,
    // and would start no instance: this host's rules are the test's.
    let p = plane_wrapped(
        |c| c.allow_host_access = true,
        &[
            "setpriv",
            "--bounding-set",
            "-bpf,-sys_admin,-perfmon,-net_admin",
            "--",
        ],
    )
    .await;
    for agent in [&p.a, &p.b] {
        let log = agent.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("eBPF TCP steering unavailable"))
            .collect();
        assert_eq!(lines.len(), 1, "{} fallback lines in:\n{log}", lines.len());
        assert!(lines[0].contains("listener"), "{}", lines[0]);
    }
    suite(&p, Path::Splice, false).await;
    memory_bounded(&p).await;
}

/// `tcp_steering = "ebpf"` where eBPF cannot load: the agent refuses to
/// start and says why, instead of silently serving another way.
#[tokio::test]
async fn required_ebpf_without_cap_bpf_is_a_clear_startup_error() {
    let etcd = tidegate_lab::etcd::EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let host: std::net::IpAddr = common::hosts().0.parse().unwrap();
    let free = || tidegate_lab::ports::free_port().unwrap();
    let cfg = tidegate_schema::config::AgentConfig {
        worker_id: "nobpf".into(),
        etcd: etcd.endpoints(),
        tcp_host: host,
        tcp_steering: Steering::Ebpf,
        http_entry: std::net::SocketAddr::new(host, free()),
        metrics_listen: std::net::SocketAddr::from(([127, 0, 0, 1], free())),
        pull_images: false,
        ..Default::default()
    };
    tidegate_lab::daemons::write_config(&cfg, &config).unwrap();
    let out = tokio::process::Command::new("setpriv")
        .args([
            "--bounding-set",
            "-bpf,-sys_admin,-perfmon,-net_admin",
            "--",
        ])
        .arg(tidegate_lab::daemons::binary("tidegate-agent"))
        .arg("--config")
        .arg(&config)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tcp_steering = ebpf") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
}

/// An SSH challenge (the harness's dropbear image): a real `ssh -p <port>`
/// through either agent runs a command in the container.
#[tokio::test]
async fn ssh_through_either_agent() {
    let p = plane(|_| {}).await;
    let keydir = tempfile::tempdir().unwrap();
    let (key, public) = tidegate_lab::images::ssh_keypair(keydir.path()).unwrap();
    let spec = serde_json::json!({
        "image": tidegate_lab::images::DEMO_SSH,
        "ports": [{"name": "ssh", "port": tidegate_lab::images::DEMO_SSH_PORT, "protocol": "tcp"}],
        "env": {"AUTHORIZED_KEY": public},
        "cap_add": ["CHOWN", "SETUID", "SETGID", "DAC_OVERRIDE", "FOWNER", "SYS_CHROOT", "KILL"],
        // The root filesystem is read-only: the key and host keys go to tmpfs.
        "tmpfs": [{"path": "/root", "size_mib": 1}, {"path": "/etc/dropbear", "size_mib": 1}],
    });
    let (s, body) = p.controller.put_challenge("ssh", spec).await;
    assert!(s.is_success(), "{body}");
    let (s, inst) = p.controller.spawn("ssh", "t1").await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{inst}");
    let port = inst["tcp"][0]["port"].as_u64().unwrap() as u16;
    for host in [p.a_host.clone(), p.b_host.clone()] {
        let ran = eventually(30, || async {
            let out = tokio::process::Command::from(tidegate_lab::images::ssh_command(
                &key,
                &host,
                port,
                "echo ssh-through-tidegate; cat /proc/1/cmdline | tr '\\0' ' '",
            ))
            .output()
            .await;
            out.is_ok_and(|o| {
                let text = String::from_utf8_lossy(&o.stdout);
                o.status.success()
                    && text.starts_with("ssh-through-tidegate\n")
                    && text.contains("dropbear")
            })
        })
        .await;
        assert!(
            ran,
            "ssh through {host}:{port} did not run the command\n{}",
            p.a.log()
        );
    }
}

/// Connects to `to` from the local address `source`.
async fn connect_from(source: std::net::IpAddr, to: &str) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    socket.connect(to.parse().unwrap()).await
}

/// Whether a line sent on `s` comes back within 5 s.
async fn echoes(s: &mut TcpStream, line: &str) -> bool {
    if s.write_all(line.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; line.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if buf == line.as_bytes()
    )
}

#[tokio::test]
async fn idle_connections_close_at_the_specs_timeout_and_one_address_is_capped() {
    let p = plane(|c| c.tcp_max_connections_per_source = 256).await;
    let image = echo_image();
    let (_, port) = tcp_instance(
        &p,
        "idle",
        &image,
        serde_json::json!({"tcp_idle_timeout_secs": 10}),
    )
    .await;
    let [via_a, _] = entries(&p, port);
    wait_echo(&via_a).await;

    // One connection goes quiet, another keeps talking every 2 s.
    let mut quiet = TcpStream::connect(&via_a).await.unwrap();
    assert!(echoes(&mut quiet, "quiet\n").await);
    let went_quiet = Instant::now();
    let closed = tokio::spawn(async move {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(30), quiet.read(&mut buf)).await;
        (went_quiet.elapsed(), read.map(|r| r.map_err(|e| e.kind())))
    });
    let mut talking = TcpStream::connect(&via_a).await.unwrap();
    for i in 0..9 {
        assert!(
            echoes(&mut talking, &format!("still here {i}\n")).await,
            "a talking connection was closed after {:?}",
            went_quiet.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (after, read) = closed.await.unwrap();
    assert!(
        after >= Duration::from_secs(9) && after < Duration::from_secs(25),
        "the quiet connection closed after {after:?} (tcp_idle_timeout_secs = 10)"
    );
    // Reset, not closed with a FIN: the player can tell it from the
    // instance's own close.
    assert_eq!(
        read.ok(),
        Some(Err(std::io::ErrorKind::ConnectionReset)),
        "how the quiet connection ended"
    );
    assert!(
        p.a.metric("tidegate_tcp_failed_connections_total{stage=\"idle_timeout\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );

    // 1,000 connections from one address: 256 (the per-source cap) are
    // served, the others closed at accept; another address still gets in.
    // (An instance with the default idle timeout: opening them all takes a
    // while.)
    let (_, port) = tcp_instance(&p, "held", &image, serde_json::json!({})).await;
    let [via_a, _] = entries(&p, port);
    wait_echo(&via_a).await;
    let one: std::net::IpAddr = [127, 0, 77, 1].into();
    let mut held = Vec::new();
    for _ in 0..1000 {
        held.push(connect_from(one, &via_a).await.unwrap());
    }
    let mut served = 0;
    for s in &mut held {
        served += usize::from(echoes(s, "x\n").await);
    }
    assert_eq!(served, 256, "connections served from one address");
    let refused =
        p.a.metric("tidegate_tcp_failed_connections_total{stage=\"max_per_source\"}")
            .await;
    assert_eq!(refused, Some(744.0));
    let mut other = connect_from([127, 0, 77, 2].into(), &via_a).await.unwrap();
    assert!(echoes(&mut other, "another address\n").await);
    drop(held);
    // Their places come back once they close.
    assert!(
        eventually(10, || async {
            match connect_from(one, &via_a).await {
                Ok(mut s) => echoes(&mut s, "again\n").await,
                Err(_) => false,
            }
        })
        .await
    );
}
