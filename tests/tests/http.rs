//! The HTTP data plane: two real agents with their Pingora proxies, real
//! containers, real clients (curl, a WebSocket client).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{get, plane};

use etcd_client::PutOptions;
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::daemons::{ADMIN, eventually, web_spec};
use tidegate_lab::images::{DEMO_HTTP_BODY, DEMO_SILENT, DEMO_SOLVER, binary_image};
use tidegate_lab::ports::free_port;
use tidegate_schema::config::{AgentConfig, ConfigFile};

#[tokio::test]
async fn any_agent_serves_any_instance_and_forgets_it_after_delete() {
    let p = plane(|_| {}).await;
    p.controller.put_challenge("web", web_spec()).await;
    let (id, host, owner) = p.running("web", "t1").await;
    // Through the owner and through the other agent; Host is case- and port-insensitive.
    for entry in [&p.a_http, &p.b_http] {
        let ok = eventually(10, || async { get(entry, &host, None).await.0 == 200 }).await;
        assert!(ok, "{host} not served through {entry}");
        let (s, _, body) = get(entry, &format!("{}:80", host.to_uppercase()), None).await;
        assert_eq!(s, 200);
        assert!(body.contains(DEMO_HTTP_BODY), "{body}");
    }
    eprintln!("instance {id} runs on {owner}; served through both agents");
    // Per-instance metrics on both agents (each counts what it proxied).
    for agent in [&p.a, &p.b] {
        let n = agent
            .metric(&format!(
                "tidegate_http_requests_total{{instance=\"{id}\"}}"
            ))
            .await
            .unwrap_or(0.0);
        assert!(n >= 2.0, "{} counted {n} requests for {id}", agent.worker);
    }
    // Unknown host: 404, HTML or JSON.
    let (s, _, body) = get(&p.a_http, "nope.ctf.localhost", None).await;
    assert_eq!(s, 404);
    assert!(body.contains("<h1>404"), "{body}");
    let (s, h, body) = get(&p.b_http, "nope.ctf.localhost", Some("application/json")).await;
    assert_eq!(s, 404);
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], 404);

    // Forwarded headers reach the container (busybox httpd's CGI sees them).
    // Delete: both agents stop routing within one watch delay.
    let (s, _) = p
        .controller
        .call(Method::DELETE, &format!("/v1/instances/{id}"), None, None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let deleted = Instant::now();
    for entry in [&p.a_http, &p.b_http] {
        let gone = eventually(5, || async { get(entry, &host, None).await.0 == 404 }).await;
        assert!(gone, "{host} still routed through {entry}");
    }
    eprintln!(
        "both agents answered 404 {:?} after the delete",
        deleted.elapsed()
    );
    let metrics = p.a.metrics().await.unwrap();
    assert!(
        metrics.contains("tidegate_agent_routes 0"),
        "route table not empty"
    );
}

#[tokio::test]
async fn error_answers_503_502_504_and_the_hop_guard() {
    let p = plane(|c| {
        c.upstream_read_timeout_ms = 1500;
        c.max_body_bytes = 1024;
    })
    .await;
    p.controller
        .put_challenge("ghost", json!({"image": "tidegate/does-not-exist:1", "ports": [{"name": "web", "port": 80, "protocol": "http"}]}))
        .await;
    p.controller
        .put_challenge("closed", json!({"image": "tidegate/demo-http:2", "ports": [{"name": "web", "port": 9999, "protocol": "http"}]}))
        .await;
    p.controller
        .put_challenge("silent", json!({"image": DEMO_SILENT, "ports": [{"name": "web", "port": 8080, "protocol": "http"}]}))
        .await;

    // Known but not running: 503 with Retry-After (through either agent).
    let (s, inst) = p.controller.spawn("ghost", "t1").await;
    assert_eq!(s, StatusCode::CREATED);
    let host = inst["http"][0]["hostname"].as_str().unwrap().to_string();
    for entry in [&p.a_http, &p.b_http] {
        assert!(
            eventually(10, || async { get(entry, &host, None).await.0 == 503 }).await,
            "no 503 via {entry}"
        );
        let (_, h, body) = get(entry, &host, Some("application/json")).await;
        assert_eq!(h["retry-after"], "2");
        assert!(body.contains("not running"), "{body}");
    }

    // Nothing listens on the declared port: 502.
    let (_, host, _) = p.running("closed", "t1").await;
    for entry in [&p.a_http, &p.b_http] {
        let (s, _, body) = get(entry, &host, None).await;
        assert_eq!(s, 502, "{body}");
    }

    // Accepts but never answers: 504 after the read timeout.
    let (_, host, _) = p.running("silent", "t1").await;
    let started = Instant::now();
    let (s, _, body) = get(&p.a_http, &host, None).await;
    assert_eq!(s, 504, "{body}");
    assert!(started.elapsed() >= Duration::from_millis(1500));

    // A body over max_body_bytes: 413 before anything reaches the instance.
    let r = reqwest::Client::new()
        .post(format!("http://{}/", p.a_http))
        .header("host", &host)
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);

    // A player's own x-tidegate-hop proves nothing: the non-owner counts
    // it, serves the request as the player's and forwards it (with a proof
    // of its own) to the owner. (A proven hop forwarded again gets 508:
    // tcp.rs, a_forwarding_loop_is_cut_after_one_hop.)
    let (_, host, owner) = {
        p.controller.put_challenge("web", web_spec()).await;
        p.running("web", "t2").await
    };
    let non_owner = if owner == p.a.worker {
        &p.b_http
    } else {
        &p.a_http
    };
    let non_owner_agent = if owner == p.a.worker { &p.b } else { &p.a };
    let refused = r#"tidegate_hop_refused_total{protocol="http",reason="malformed"}"#;
    let before = non_owner_agent.metric(refused).await.unwrap_or(0.0);
    let r = reqwest::Client::new()
        .get(format!("http://{non_owner}/"))
        .header("host", &host)
        .header("x-tidegate-hop", "someone")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(non_owner_agent.metric(refused).await, Some(before + 1.0));
}

/// A running instance of the WebSocket echo image (`env` for its mode) and
/// its hostname.
async fn ws_echo(p: &common::Plane, challenge: &str, env: Value) -> String {
    let image = binary_image(
        "tidegate/test-ws-echo",
        std::path::Path::new(env!("CARGO_BIN_EXE_ws-echo")),
        &[],
    )
    .unwrap();
    p.controller
        .put_challenge(
            challenge,
            json!({"image": image, "env": env,
                   "ports": [{"name": "web", "port": 8080, "protocol": "http"}]}),
        )
        .await;
    p.running(challenge, "t1").await.1
}

#[tokio::test]
async fn a_websocket_echo_works_through_both_agents() {
    let p = plane(|_| {}).await;
    let host = ws_echo(&p, "ws", json!({})).await;
    for entry in [&p.a_http, &p.b_http] {
        ws_round_trips(entry, &host, 3).await;
    }
}

/// A WebSocket to `host` through `entry`: `n` messages echoed, then closed.
async fn ws_round_trips(entry: &str, host: &str, n: usize) {
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{entry}/echo"),
    )
    .unwrap();
    req.headers_mut().insert("host", host.parse().unwrap());
    let stream = tokio::net::TcpStream::connect(entry).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    for i in 0..n {
        let text = format!("hello {i} via {entry}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
            .await
            .unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
}

/// An instance that answers its upgrade before the request has reached it
/// (cloudflare/pingora#946: Pingora 0.9.1 then ends the tunnel right after
/// the 101, about one connection in two). 100 upgrades through each agent:
/// every one gets its 101 and its bytes back.
#[tokio::test]
async fn an_eager_upgrade_answer_keeps_the_tunnel_open_through_both_agents() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = plane(|_| {}).await;
    let host = ws_echo(&p, "eager", json!({"WS_EAGER": "1"})).await;
    let mut ended = Vec::new();
    for entry in [&p.a_http, &p.b_http] {
        for i in 0..100 {
            let mut s = tokio::net::TcpStream::connect(entry.as_str())
                .await
                .unwrap();
            let req = format!(
                "GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "closed before the answer's head via {entry}");
                head.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            assert!(head.starts_with("HTTP/1.1 101"), "via {entry}: {head}");
            let ping = format!("ping {i}");
            s.write_all(ping.as_bytes()).await.unwrap();
            let mut back = Vec::new();
            while back.len() < ping.len() {
                match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => back.extend_from_slice(&buf[..n]),
                    other => {
                        ended.push(format!("{entry} #{i}: {other:?} after {back:?}"));
                        break;
                    }
                }
            }
            if back.len() >= ping.len() {
                assert_eq!(back, ping.as_bytes(), "via {entry}");
            }
        }
    }
    assert!(
        ended.is_empty(),
        "{} of 200 tunnels ended after the 101: {ended:?}",
        ended.len()
    );
}

#[tokio::test]
async fn instances_keep_answering_through_both_agents_with_every_controller_dead() {
    let mut p = plane(|_| {}).await;
    p.controller.put_challenge("web", web_spec()).await;
    let (_, host, _) = p.running("web", "t1").await;
    p.controller.proc.kill().unwrap();
    // Longer than the controller's election TTL and a few watch delays.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..20 {
        for entry in [&p.a_http, &p.b_http] {
            let (s, _, body) = get(entry, &host, None).await;
            assert_eq!(s, 200, "{body}");
        }
    }
    let _ = &mut p;
}

#[tokio::test]
async fn ten_thousand_routes_load_and_look_up_correctly() {
    let p = plane(|_| {}).await;
    p.controller.put_challenge("web", web_spec()).await;
    let (_, real_host, _) = p.running("web", "t-real").await;
    // 10,000 instance records written straight to etcd, owned by a worker
    // "bulk" whose HTTP entry is a closed port (routes only, no containers).
    let mut client = p.client.clone();
    let lease = client.lease_grant(600, None).await.unwrap().id();
    let closed = free_port().unwrap();
    let b = "bulk";
    let worker_rec = json!({"v": 1, "id": b, "address": "127.0.0.1", "http_entry": format!("127.0.0.1:{closed}"),
        "tcp_host": "127.0.0.1", "capacity": 1, "version": "test", "started_at": 0});
    client
        .put(
            tidegate_lab::keys::worker(b),
            worker_rec.to_string(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
    let started = Instant::now();
    for chunk in (0..10_000u64).collect::<Vec<_>>().chunks(100) {
        let mut ops = Vec::new();
        for i in chunk {
            let id = format!("{:010x}", 0x10_0000_0000 + i);
            let rec = json!({"v": 1, "id": id, "challenge": "web", "team": format!("bulk-{i}"), "worker": b, "token": 1,
                "created_at": 0, "expires_at": 9_999_999_999u64,
                "http": [{"port_name": "web", "hostname": format!("{id}.ctf.localhost"), "target_port": 8080}],
                "container": {"image": "x", "limits": {"memory_mib": 256, "cpus": 0.5, "pids": 128}}, "flag": "f"});
            ops.push(etcd_client::TxnOp::put(
                tidegate_lab::keys::instance(&id),
                rec.to_string(),
                Some(PutOptions::new().with_lease(lease)),
            ));
        }
        client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
    let loaded = eventually(60, || async {
        p.a.metric("tidegate_agent_routes")
            .await
            .is_some_and(|n| n >= 10_001.0)
    })
    .await;
    assert!(loaded, "agent a never loaded 10,001 routes");
    eprintln!(
        "10,000 routes written and loaded by agent a in {:?}",
        started.elapsed()
    );
    // Lookups: the real instance still answers; a bulk host routes to the
    // bulk worker's (closed) entry, so 502; one past the last bulk id is 404.
    for _ in 0..10 {
        assert_eq!(get(&p.a_http, &real_host, None).await.0, 200);
        assert_eq!(get(&p.b_http, &real_host, None).await.0, 200);
    }
    for host in ["1000000000", "1000001234", "100000270f"] {
        let (s, _, body) = get(&p.a_http, &format!("{host}.ctf.localhost"), None).await;
        assert_eq!(s, 502, "{host}: {body}");
    }
    assert_eq!(
        get(&p.a_http, "1000002710.ctf.localhost", None).await.0,
        404,
        "one past the last bulk id"
    );
    let rss = std::fs::read_to_string(format!("/proc/{}/status", p.a.proc.pid())).unwrap();
    let rss = rss
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap_or("VmRSS: ?")
        .to_string();
    eprintln!("agent a with 10,001 routes: {rss}");
}

/// A plane whose agents serve HTTP in `mode`, agent a also HTTPS (with a
/// wildcard certificate): the plane, the certificate, a's HTTPS port, and
/// the directory holding the certificate.
async fn tls_plane(
    mode: tidegate_schema::spec::HttpMode,
) -> (common::Plane, std::path::PathBuf, u16, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = common::wildcard_cert(certs.path());
    let a_tls = free_port().unwrap();
    let https_entry: std::net::SocketAddr =
        format!("{}:{a_tls}", common::hosts().0).parse().unwrap();
    let p = plane(|c| {
        c.http_mode = mode;
        // Agent a only: b's address differs (it could not bind a's).
        if c.advertise_address == https_entry.ip() {
            c.https_entry = Some(https_entry);
            c.tls_cert = Some(cert.clone());
            c.tls_key = Some(key.clone());
        }
    })
    .await;
    (p, cert, a_tls, certs)
}

#[tokio::test]
async fn tls_termination_serves_http1_and_http2_with_a_wildcard_certificate() {
    let (p, cert, a_tls, _certs) = tls_plane(tidegate_schema::spec::HttpMode::L7).await;
    p.controller.put_challenge("web", web_spec()).await;
    let (_, host, _) = p.running("web", "t1").await;
    for (flag, want) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let text = curl_tls(&cert, flag, &host, (&p.a_host, a_tls));
        assert!(text.contains(DEMO_HTTP_BODY), "{flag}: {text}");
        assert!(
            text.trim_end().ends_with(&format!("200 {want}")),
            "{flag}: {text}"
        );
    }
}

/// curl (`flag`: `--http1.1` or `--http2`) to `https://{host}:{port}/` at
/// `addr`, trusting `cert`: its body, then `<status> <HTTP version>`, then
/// what it said on stderr.
fn curl_tls(cert: &std::path::Path, flag: &str, host: &str, (addr, port): (&str, u16)) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(cert)
        .args([
            flag,
            "-w",
            "\n%{http_code} %{http_version}",
            "--resolve",
            &format!("{host}:{port}:{addr}"),
        ])
        .arg(format!("https://{host}:{port}/"))
        .output()
        .unwrap();
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `n` GETs of `host` through `entry` on one kept-alive client: the
/// latencies, sorted.
async fn calm_client(entry: &str, host: &str, n: usize) -> Vec<Duration> {
    let client = reqwest::Client::new();
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client
            .get(format!("http://{entry}/"))
            .header("host", host)
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        took.push(t.elapsed());
    }
    took.sort();
    took
}

#[tokio::test]
async fn slow_clients_are_cut_off_at_the_header_deadline_while_players_are_served() {
    use tidegate_lab::slow::{
        connect_from, percentile, raw_exchange, read_to_close, rss_kib, slowloris,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = plane(|c| {
        c.http_header_timeout_ms = 4000;
        c.http_max_connections_per_source = 256;
    })
    .await;
    p.controller.put_challenge("web", web_spec()).await;
    let (_, host, _) = p.running("web", "t1").await;
    let entry: std::net::SocketAddr = p.a_http.parse().unwrap();
    let pid = p.a.proc.pid();
    let baseline = calm_client(&p.a_http, &host, 300).await;
    let rss_before = rss_kib(pid);

    // 5,000 slow connections from 20 addresses (250 each: under the
    // per-source cap), each adding a header byte every second, while a
    // player's client goes on.
    let until = Instant::now() + Duration::from_secs(25);
    let slow: Vec<_> = (0..5000)
        .map(|i| {
            let source = std::net::IpAddr::from([127, 0, 10, 1 + (i % 20) as u8]);
            let host = host.clone();
            tokio::spawn(async move {
                slowloris(source, entry, &host, Duration::from_secs(1), until).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let open_during = p.a.metric("tidegate_agent_http_connections_open").await;
    let rss_during = rss_kib(pid);
    let during = calm_client(&p.a_http, &host, 300).await;
    let mut closed_after = Vec::new();
    for s in slow {
        closed_after.push(s.await.unwrap().expect("a slow connection stayed open"));
    }
    closed_after.sort();
    eprintln!(
        "agent RSS {rss_before} KiB before, {rss_during} KiB with {open_during:?} connections open; \
         slow connections closed after {:?}..{:?}; player p50 {:?} p99 {:?} (without them: p50 {:?} p99 {:?})",
        closed_after[0],
        closed_after[closed_after.len() - 1],
        percentile(&during, 50),
        percentile(&during, 99),
        percentile(&baseline, 50),
        percentile(&baseline, 99),
    );
    assert!(
        open_during.unwrap_or(0.0) >= 4000.0,
        "the slow connections were not open at once: {open_during:?}"
    );
    // Cut off at the deadline (4 s), not before and not much after.
    assert!(
        closed_after[0] >= Duration::from_millis(3500),
        "{:?}",
        &closed_after[..5]
    );
    assert!(
        closed_after[closed_after.len() - 1] <= Duration::from_secs(9),
        "{:?}",
        &closed_after[closed_after.len() - 5..]
    );
    let timed_out = "tidegate_agent_http_connections_refused_total{reason=\"header_timeout\"}";
    assert_eq!(p.a.metric(timed_out).await, Some(5000.0));
    // With 5,000 held connections the agent stays under 320 MiB (they
    // cost about 30 KiB each: the proxy's session state; Pingora's own
    // 64 KiB read buffer per connection is off).
    assert!(
        rss_during < 320 * 1024,
        "{rss_before} KiB → {rss_during} KiB"
    );

    // After one answered request, the next head is under the deadline too.
    let mut kept = connect_from("127.0.10.50".parse().unwrap(), entry)
        .await
        .unwrap();
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    kept.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let started = Instant::now();
    kept.write_all(b"GET / HTTP/1.1\r\nX-Slow: a")
        .await
        .unwrap();
    let rest = read_to_close(&mut kept).await;
    let held = started.elapsed();
    assert!(
        held >= Duration::from_millis(3500) && held < Duration::from_secs(5),
        "a kept-alive connection's second head was held {held:?}: {rest}"
    );

    // A head over max_header_bytes (64 KiB): 431 and the close.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let answer = raw_exchange(entry, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let too_large = "tidegate_agent_http_connections_refused_total{reason=\"header_too_large\"}";
    assert_eq!(p.a.metric(too_large).await, Some(1.0));

    // Past the per-source cap (256), a new connection gets a 503 and the
    // close, counted; another address is still served.
    let source: std::net::IpAddr = "127.0.10.99".parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..256 {
        held.push(connect_from(source, entry).await.unwrap());
    }
    // Connected is not yet accepted: wait until the agent holds them all.
    let open = "tidegate_agent_http_connections_open";
    let all_held = eventually(3, || async { p.a.metric(open).await == Some(256.0) }).await;
    assert!(all_held, "{:?} connections open", p.a.metric(open).await);
    let mut extra = connect_from(source, entry).await.unwrap();
    let answer = read_to_close(&mut extra).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let capped = "tidegate_agent_http_connections_refused_total{reason=\"max_per_source\"}";
    assert_eq!(p.a.metric(capped).await, Some(1.0));
    assert_eq!(get(&p.a_http, &host, None).await.0, 200);
    drop(held);
}

/// What a prober saw of one hostname through one agent.
#[derive(Debug, Default, Clone)]
struct Probed {
    /// Answers that were not the instance's 200.
    errors: u32,
    /// Separate runs of errors: each is one reconnect for a player.
    windows: u32,
    /// The longest run, first error to the next 200.
    longest: Duration,
    /// The run going on, since when.
    since: Option<Instant>,
}

/// Issue #23's rollout must-show through the data plane: 20 live instances
/// of a challenge with a flag file and a solver, a new spec with
/// `canary=2, batch=5`. The 2 oldest are replaced first, the gate opens on
/// their solver checks, the other 18 follow at most 5 at a time, and every
/// instance keeps its id, hostname and flag. A prober through both agents
/// sees each hostname fail in at most one run of errors (one reconnect),
/// none longer than the switch window.
#[tokio::test]
async fn a_rollout_of_twenty_instances_is_seen_by_players_as_one_short_switch_each() {
    const SWITCH_WINDOW: Duration = Duration::from_secs(15);
    let p = plane(|cfg| cfg.allocatable_cpus = Some(16.0)).await;
    let mut spec = web_spec();
    spec["flag"] = json!({"file": "/flag"});
    spec["solver"] = json!({"image": DEMO_SOLVER, "interval_secs": 10, "timeout_secs": 8});
    assert_eq!(
        p.controller.put_challenge("web", spec.clone()).await.0,
        StatusCode::CREATED
    );
    let mut instances = Vec::new();
    for team in 1..=20 {
        let (id, host, _) = p.running("web", &format!("team-{team}")).await;
        instances.push((id, host));
    }
    let flag_dirs: Vec<_> = [&p.a, &p.b]
        .iter()
        .map(|a| AgentConfig::from_file(&a.config).unwrap().worker_flag_dir())
        .collect();
    let flag_of = |id: &str| {
        flag_dirs
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(id).join("flag")).ok())
    };
    let flags: Vec<_> = instances.iter().map(|(id, _)| flag_of(id)).collect();
    assert!(flags.iter().all(Option::is_some), "a flag file is missing");
    for (_, host) in &instances {
        for entry in [&p.a_http, &p.b_http] {
            let ok = eventually(10, || async { get(entry, host, None).await.0 == 200 }).await;
            assert!(ok, "{host} not served through {entry}");
        }
    }

    // The prober: every hostname through both agents, round after round.
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        let targets: Vec<(String, String)> = instances
            .iter()
            .flat_map(|(_, host)| {
                [
                    (p.a_http.clone(), host.clone()),
                    (p.b_http.clone(), host.clone()),
                ]
            })
            .collect();
        tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap();
            let mut seen = vec![Probed::default(); targets.len()];
            let mut rounds = 0u32;
            while !stop.load(Ordering::Relaxed) {
                for (i, (entry, host)) in targets.iter().enumerate() {
                    let ok = match client
                        .get(format!("http://{entry}/"))
                        .header("host", host)
                        .send()
                        .await
                    {
                        Ok(r) => {
                            r.status() == 200
                                && r.text().await.is_ok_and(|b| b.contains(DEMO_HTTP_BODY))
                        }
                        Err(_) => false,
                    };
                    let s = &mut seen[i];
                    let now = Instant::now();
                    match (ok, s.since) {
                        (false, None) => {
                            s.errors += 1;
                            s.windows += 1;
                            s.since = Some(now);
                        }
                        (false, Some(_)) => s.errors += 1,
                        (true, Some(t)) => {
                            s.longest = s.longest.max(now - t);
                            s.since = None;
                        }
                        (true, None) => {}
                    }
                }
                rounds += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (targets, seen, rounds)
        })
    };

    let mut next = spec.clone();
    next["env"] = json!({"ROLLOUT": "20"});
    let (s, body) = p
        .controller
        .put_challenge_with("web", next, "rollout=gated&canary=2&batch=5")
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let rollout = || async {
        p.controller
            .call(Method::GET, "/v1/challenges/web/rollout", None, Some(ADMIN))
            .await
            .1
    };
    let mut phases: Vec<(String, usize)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut finished = false;
    while !finished && Instant::now() < deadline {
        let r = rollout().await;
        let phase = r["phase"].as_str().unwrap_or_default().to_string();
        let picked = r["replaced"].as_array().map_or(0, Vec::len);
        if phases.last() != Some(&(phase.clone(), picked)) {
            phases.push((phase.clone(), picked));
        }
        finished = phase == "done";
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The last instance's switch ends within the window after `done`.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let (targets, seen, rounds) = prober.await.unwrap();
    let r = rollout().await;
    assert!(finished, "{r}\nphases: {phases:?}");
    eprintln!("phases: {phases:?}");
    let gate: Vec<_> = phases.iter().filter(|(p, _)| p == "gate").collect();
    assert!(!gate.is_empty(), "the gate was never seen: {phases:?}");
    assert!(gate.iter().all(|(_, n)| *n == 2), "{phases:?}");
    let mut last = 2;
    for (phase, n) in &phases {
        if phase == "batches" || phase == "done" {
            assert!(*n <= last + 5, "more than a batch at once: {phases:?}");
            last = *n;
        }
    }
    assert_eq!(r["running_new"], 20, "{r}");
    let canaries: Vec<_> = instances[..2].iter().map(|(id, _)| json!(id)).collect();
    assert_eq!(
        r["canaries"],
        json!(canaries),
        "the 2 oldest are the canaries: {r}"
    );
    for (i, (id, host)) in instances.iter().enumerate() {
        let (_, got) = p
            .controller
            .call(Method::GET, &format!("/v1/instances/{id}"), None, None)
            .await;
        assert_eq!(got["http"][0]["hostname"], host.as_str(), "{got}");
        assert_eq!(flag_of(id), flags[i], "{id}: its flag changed");
    }

    let mut longest = Duration::ZERO;
    let mut errors = 0;
    for ((entry, host), s) in targets.iter().zip(&seen) {
        assert!(
            s.since.is_none(),
            "{host} through {entry} still fails: {s:?}"
        );
        assert!(
            s.windows <= 1,
            "{host} through {entry} failed {} times: {s:?}",
            s.windows
        );
        assert!(
            s.longest <= SWITCH_WINDOW,
            "{host} through {entry} was down {:?}",
            s.longest
        );
        longest = longest.max(s.longest);
        errors += s.errors;
    }
    assert!(
        seen.iter().any(|s| s.windows == 1),
        "the prober never saw a switch: is it probing? ({rounds} rounds)"
    );
    eprintln!(
        "prober: {rounds} rounds over {} hostnames x 2 agents, {errors} errors, longest switch {longest:?}",
        instances.len()
    );
}

/// Requests on one kept-alive connection to `entry`, the i-th with Host
/// `hosts[i]`: each answer's status and body, in order. An answer that
/// never comes (the connection closed) ends the list early.
async fn one_connection(entry: &str, hosts: &[&str]) -> Vec<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(entry).await.unwrap();
    let mut answers = Vec::new();
    let mut buf = Vec::new();
    for host in hosts {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            break;
        }
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(answer) = tidegate_lab::http::take_answer(&mut buf) {
                    return Some(answer);
                }
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        match read {
            Ok(Some(answer)) => answers.push(answer),
            _ => break,
        }
    }
    answers
}

/// The HTTP echo image (`container=<its hostname> host=… xff=…` per
/// request, keep-alive) as challenge `name`, pinned or not.
async fn http_echo_challenge(p: &common::Plane, name: &str, mode: &str) {
    let image = binary_image(
        "tidegate/test-ws-echo",
        std::path::Path::new(env!("CARGO_BIN_EXE_ws-echo")),
        &[],
    )
    .unwrap();
    let (s, body) = p
        .controller
        .put_challenge(
            name,
            json!({"image": image, "env": {"HTTP_ECHO": "1"}, "http_mode": mode,
                   "ports": [{"name": "web", "port": 8080, "protocol": "http"}]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
}

/// The `container=` field of an echo answer.
fn container(body: &str) -> &str {
    body.split_whitespace()
        .find_map(|f| f.strip_prefix("container="))
        .unwrap_or("")
}

/// Issue #24: a pinned connection is routed once, by its first request,
/// through the owner and through the other agent alike; later requests
/// naming another Host still reach the first instance, no X-Forwarded-*
/// is added, and an L7 challenge's connection is still routed per request.
/// Deleting the instance closes its pinned connections within one watch
/// delay.
#[tokio::test]
async fn a_pinned_connection_stays_with_its_first_instance_until_the_instance_goes() {
    let p = plane(|_| {}).await;
    http_echo_challenge(&p, "pin", "pinned").await;
    http_echo_challenge(&p, "per-request", "l7").await;
    let (id1, h1, _) = p.running("pin", "t1").await;
    let (_, h2, _) = p.running("pin", "t2").await;
    let (_, h3, _) = p.running("per-request", "t1").await;
    let mut seen = std::collections::HashMap::new();
    for entry in [&p.a_http, &p.b_http] {
        for host in [&h1, &h2, &h3] {
            let ok = eventually(10, || async { get(entry, host, None).await.0 == 200 }).await;
            assert!(ok, "{host} not served through {entry}");
        }
        // Fresh connections: each instance answers for itself.
        let one = one_connection(entry, &[&h1]).await;
        let two = one_connection(entry, &[&h2]).await;
        let (c1, c2) = (container(&one[0].1), container(&two[0].1));
        assert!(!c1.is_empty() && c1 != c2, "{one:?} {two:?}");
        seen.insert(h1.clone(), c1.to_string());
        // One pinned connection, three Hosts: the first instance answers all.
        let answers = one_connection(entry, &[&h1, &h2, &h3]).await;
        assert_eq!(answers.len(), 3, "through {entry}: {answers:?}");
        for (i, (status, body)) in answers.iter().enumerate() {
            assert_eq!(*status, 200, "request {i} through {entry}: {body}");
            assert_eq!(container(body), c1, "request {i} through {entry}: {body}");
            assert!(body.contains("xff=-"), "pinned got X-Forwarded-For: {body}");
        }
        assert!(answers[1].1.contains(&format!("host={h2}")), "{answers:?}");
        // An L7 challenge's connection: every request routed by its Host,
        // with X-Forwarded-For; a pinned challenge reached that way gets
        // none (one proxy as far as the challenge can tell).
        let answers = one_connection(entry, &[&h3, &h2]).await;
        assert_eq!(answers.len(), 2, "through {entry}: {answers:?}");
        assert!(!answers[0].1.contains("xff=-"), "{answers:?}");
        assert_eq!(container(&answers[1].1), c2, "{answers:?}");
        assert!(answers[1].1.contains("xff=-"), "{answers:?}");
    }
    for agent in [&p.a, &p.b] {
        let n = agent
            .metric("tidegate_agent_http_connections_pinned_total")
            .await
            .unwrap_or(0.0);
        assert!(n >= 2.0, "{} pinned {n} connections", agent.worker);
    }

    // Held pinned connections through both agents, then the delete.
    let mut held = Vec::new();
    for entry in [&p.a_http, &p.b_http] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(entry.as_str())
            .await
            .unwrap();
        s.write_all(format!("GET / HTTP/1.1\r\nHost: {h1}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(String::from_utf8_lossy(&chunk[..n]).contains(&seen[&h1]));
        held.push(s);
    }
    // Still open and pinned right before the delete: another request,
    // naming the other instance, answered by the first.
    for s in &mut held {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(format!("GET / HTTP/1.1\r\nHost: {h2}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(String::from_utf8_lossy(&chunk[..n]).contains(&seen[&h1]));
    }
    let deleted = Instant::now();
    let (s, _) = p
        .controller
        .call(Method::DELETE, &format!("/v1/instances/{id1}"), None, None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    for (i, mut s) in held.into_iter().enumerate() {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "pinned connection {i} still open 10 s after the delete"
        );
    }
    eprintln!(
        "both pinned connections closed {:?} after the delete",
        deleted.elapsed()
    );
}

/// Issue #24: the edge policy decides a pinned connection once, at its
/// first request: a refused one gets the L7 path's 403 (and is closed), an
/// admitted one never reaches the refused instance, whatever Host its
/// later requests name.
#[tokio::test]
async fn a_denying_policy_refuses_a_pinned_connection_and_it_cannot_be_reached_through_another() {
    let p = plane(|c| c.plugin_deadline_ms = 50).await;
    http_echo_challenge(&p, "pin", "pinned").await;
    let (_, mallory, _) = p.running("pin", "mallory").await;
    let (_, red, _) = p.running("pin", "red").await;
    let (s, up) = p
        .controller
        .put_policy("pin", tidegate_lab::plugins::component("allowlist"))
        .await;
    assert_eq!(s, StatusCode::OK, "{up}");
    for entry in [&p.a_http, &p.b_http] {
        let refused = eventually(10, || async {
            let answers = one_connection(entry, &[&mallory, &red]).await;
            // The 403 closes the connection: no second answer.
            answers.len() == 1
                && answers[0].0 == 403
                && answers[0]
                    .1
                    .contains("team mallory is not on the allowlist")
        })
        .await;
        assert!(refused, "agent {entry} still admits mallory");
        let red_container = container(&one_connection(entry, &[&red]).await[0].1).to_string();
        let answers = one_connection(entry, &[&red, &mallory, &mallory]).await;
        assert_eq!(answers.len(), 3, "{answers:?}");
        for (status, body) in &answers {
            assert_eq!(*status, 200, "{body}");
            assert_eq!(container(body), red_container, "{body}");
        }
    }
}

/// Issue #24: with the agents pinning every challenge, what the L7 path
/// must see still goes there: a WebSocket upgrade and HTTP/2 over TLS.
#[tokio::test]
async fn websockets_and_http2_still_go_through_l7_when_agents_pin() {
    let (p, cert, a_tls, _certs) = tls_plane(tidegate_schema::spec::HttpMode::Pinned).await;
    let host = ws_echo(&p, "ws", json!({})).await;
    for entry in [&p.a_http, &p.b_http] {
        ws_round_trips(entry, &host, 2).await;
    }
    // Plain requests are pinned (the counter moves); upgrades were not.
    p.controller.put_challenge("web", web_spec()).await;
    let (_, web, _) = p.running("web", "t1").await;
    let pinned = || async {
        p.a.metric("tidegate_agent_http_connections_pinned_total")
            .await
            .unwrap_or(0.0)
    };
    let before = pinned().await;
    assert_eq!(get(&p.a_http, &web, None).await.0, 200);
    assert_eq!(pinned().await - before, 1.0);
    // HTTP/2 (ALPN h2) over TLS: the L7 path, which speaks it.
    let before = pinned().await;
    let text = curl_tls(&cert, "--http2", &web, (&p.a_host, a_tls));
    assert!(text.contains(DEMO_HTTP_BODY), "{text}");
    assert!(text.trim_end().ends_with("200 2"), "{text}");
    assert_eq!(pinned().await, before, "an HTTP/2 connection was pinned");
}
