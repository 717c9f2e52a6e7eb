//! Attacks on the HTTP servers players and platforms reach (an agent's
//! entry point, the controller's API): request heads sent a byte at a time
//! (slowloris) and more connections from one address than an agent lets
//! one address hold; a pinned connection to an instance its policy
//! refuses; two teams' requests over one L7 edge's pooled connection to
//! their owner; a TCP connection held open without a byte; and a
//! WebSocket tunnel whose player never reads.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::range::{IDLE_SECS, Range, call};
use super::services::spawn_running;
use super::{Attack, From, Verdict};

pub(super) fn attacks() -> Vec<Attack> {
    vec![
        Attack::new(
            "slowloris on agent a's HTTP entry: 100 request heads, one byte a second",
            From::Network,
            "http-limits",
            |r| {
                let deadline = Duration::from_millis(r.a_cfg.http_header_timeout_ms);
                slowloris(r.a_cfg.http_entry, &r.alice.hostname, deadline)
            },
        ),
        Attack::new(
            "slowloris on the controller's API: 100 request heads, one byte a second",
            From::Network,
            "http-limits",
            |r| {
                let to = r.plane.url.trim_start_matches("http://").parse()?;
                let cfg = tidegate_schema::config::ControllerConfig::default();
                let deadline = Duration::from_millis(cfg.http_header_timeout_ms);
                slowloris(to, "controller", deadline)
            },
        ),
        Attack::new(
            "hold 300 kept-alive HTTP connections to alice's instance from one address",
            From::Network,
            "http-limits",
            hold_http,
        ),
        Attack::new(
            "a pinned HTTP connection to locked's instance through agent a (forwarded to b, its owner, with a pinned proof)",
            From::Network,
            "pinned-policy",
            pinned_locked,
        ),
        Attack::new(
            "two teams' hostnames over one kept-alive connection through agent b, whose L7 pool carries both to their owner a on one upstream connection",
            From::Network,
            "pinned-proof",
            pooled_hop,
        ),
        Attack::new(
            "quiet TCP connection held past the instance's 10 s idle timeout",
            From::Network,
            "tcp-idle",
            hold_quiet,
        ),
        Attack::new(
            "a WebSocket tunnel through agent a whose player floods it and never reads what comes back",
            From::Network,
            "stalled-reader",
            stalled_reader,
        ),
    ]
}

/// A tunnel to an echo behind a `101` (`rt-tunnel`, the eager upgrade
/// server), through agent a from 127.0.0.1, into which the player writes
/// until its writes stall for 2 s (every buffer on the way full of the
/// echo it does not read), then reads nothing. The agent's write to the
/// player then waits, and the tunnel with it (neither side is silent, so
/// no idle limit runs): it holds its connection place, an upstream
/// connection and every buffer. Blocked if the agent has closed it
/// `upstream_read_timeout_ms` + 8 s later; through if it then still
/// echoes a fresh message once the player reads.
fn stalled_reader(r: &Range) -> Result<Verdict> {
    register_ws_echo(r, "rt-tunnel", "WS_EAGER")?;
    let spawned = spawn_running(r, "rt-tunnel", &["tunnel-x"])?;
    let host = &spawned.hosts[0];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let entry = r.a_cfg.http_entry;
    let mut s = connect_from(&rt, [127, 0, 0, 1].into(), entry)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(
        format!(
            "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        .as_bytes(),
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        anyhow::ensure!(
            s.read(&mut byte)? == 1,
            "closed before the upgrade's answer"
        );
        head.push(byte[0]);
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 101"),
        "through {entry}: not a 101: {:?}",
        String::from_utf8_lossy(&head)
    );
    let mut echo = [0u8; 5];
    s.write_all(b"hello")?;
    s.read_exact(&mut echo)?;
    anyhow::ensure!(
        &echo == b"hello",
        "the tunnel answered {echo:?}, not the echo"
    );
    // Flood until the writes stall.
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0usize;
    loop {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => anyhow::bail!("the tunnel failed while {sent} bytes were written: {e}"),
        }
        anyhow::ensure!(sent < 1 << 30, "1 GiB went into the tunnel without a stall");
    }
    let stalled = Instant::now();
    let limit = Duration::from_millis(r.a_cfg.upstream_read_timeout_ms);
    // Watch for the agent's reset without reading (a read would let the
    // tunnel move again).
    let mut reset = None;
    while reset.is_none() && stalled.elapsed() < limit + Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(500));
        if let Err(e) = rustix::net::sockopt::socket_error(&s)? {
            reset = Some((stalled.elapsed(), e));
        }
    }
    if let Some((after, e)) = reset {
        // The agent's write stalled a little before the player's did.
        anyhow::ensure!(
            after >= limit / 2,
            "reset after only {after:?} ({e}), well before the write-stall limit {limit:?}"
        );
        return Ok(Verdict::Blocked(format!(
            "reset {:.1} s after the player's writes stalled ({sent} bytes written): {e}",
            after.as_secs_f64()
        )));
    }
    // Read what is there: the end of the connection, or (still open) the
    // echo of everything sent.
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = vec![0u8; 64 << 10];
    let mut back = 0usize;
    let ended = loop {
        match s.read(&mut buf) {
            Ok(0) => break Some("closed".to_string()),
            Ok(n) => back += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break None;
            }
            Err(e) => break Some(format!("reset ({e})")),
        }
    };
    let seen = format!(
        "{sent} bytes written until the writes stalled, {back} read back {:.0} s later",
        stalled.elapsed().as_secs_f64()
    );
    if let Some(how) = ended {
        return Ok(Verdict::Blocked(format!("{how}: {seen}")));
    }
    s.write_all(b"still here")?;
    let mut echo = [0u8; 10];
    s.read_exact(&mut echo)?;
    anyhow::ensure!(&echo == b"still here", "the tunnel answered {echo:?}");
    Ok(Verdict::Succeeded(format!(
        "the tunnel still echoes: {seen}"
    )))
}

/// One TCP connection to idler's instance (tcp_idle_timeout_secs =
/// [`IDLE_SECS`]): a line echoed, then not a byte. Blocked if the agent
/// closes it by the timeout plus the agent's check interval and 5 s of
/// slack; through if it still echoes after that.
fn hold_quiet(r: &Range) -> Result<Verdict> {
    let to = SocketAddr::new(r.a_cfg.tcp_host, r.idler.tcp_port);
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = [0u8; 5];
    s.write_all(b"ping\n")?;
    s.read_exact(&mut buf)?;
    anyhow::ensure!(&buf == b"ping\n", "idler's instance did not echo");
    let quiet = Instant::now();
    let limit = Duration::from_secs(u64::from(IDLE_SECS));
    let give_up = limit + limit / 4 + Duration::from_secs(5);
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    while quiet.elapsed() < give_up {
        match s.read(&mut buf) {
            Ok(0) => {
                let after = quiet.elapsed();
                return Ok(if after + Duration::from_secs(1) >= limit {
                    Verdict::Blocked(format!("closed after {:.1} s quiet", after.as_secs_f64()))
                } else {
                    anyhow::bail!("closed after only {after:?}, before the idle timeout")
                });
            }
            Ok(_) => anyhow::bail!("the instance sent a byte unasked"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                return Ok(Verdict::Blocked(format!(
                    "reset after {:.1} s quiet: {e}",
                    quiet.elapsed().as_secs_f64()
                )));
            }
        }
    }
    // Still open: show it is alive, not half-dead.
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"ping\n")?;
    s.read_exact(&mut buf)?;
    Ok(Verdict::Succeeded(format!(
        "still echoing after {:.1} s quiet",
        quiet.elapsed().as_secs_f64()
    )))
}

/// 100 connections to `to` each sending a request head a byte a second:
/// blocked if the server closed every one by its header `deadline` (plus
/// 3 s of slack); through if any is still open after that.
fn slowloris(to: SocketAddr, host: &str, deadline: Duration) -> Result<Verdict> {
    let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Slow: ");
    let mut open = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.write_all(head.as_bytes())?;
        s.set_nonblocking(true)?;
        open.push(s);
    }
    let started = Instant::now();
    let give_up = deadline + Duration::from_secs(3);
    let mut closed = 0;
    while !open.is_empty() && started.elapsed() < give_up {
        std::thread::sleep(Duration::from_secs(1));
        open.retain_mut(|s| {
            let mut buf = [0u8; 512];
            let gone = match s.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                Err(_) => true,
            } || s.write_all(b"a").is_err();
            closed += usize::from(gone);
            !gone
        });
    }
    let seen = format!(
        "{closed} of 100 closed, {} still open after {:.0} s (header deadline {deadline:?})",
        open.len(),
        started.elapsed().as_secs_f64(),
    );
    Ok(if open.is_empty() {
        Verdict::Blocked(seen)
    } else {
        Verdict::Succeeded(seen)
    })
}

/// 300 connections from one address of this host (127.0.0.1: the host's
/// other address is agent a's own, which the cap leaves to the total, as
/// it carries the players other agents forward), each a complete request
/// for alice's hostname, kept alive: more than the per-source cap answered
/// 200 means the cap is not there.
fn hold_http(r: &Range) -> Result<Verdict> {
    let request = format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", r.alice.hostname);
    let mut held = Vec::new();
    let (mut served, mut refused) = (0, 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for _ in 0..300 {
        let Ok(mut s) = connect_from(&rt, [127, 0, 0, 1].into(), r.a_cfg.http_entry) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 12];
        if s.write_all(request.as_bytes()).is_ok() && s.read_exact(&mut buf).is_ok() {
            match &buf {
                b"HTTP/1.1 200" => served += 1,
                b"HTTP/1.1 503" => refused += 1,
                _ => {}
            }
        }
        held.push(s);
    }
    let cap = r.a_cfg.http_max_connections_per_source;
    let seen = format!(
        "{served} of 300 served, {refused} refused 503 (http_max_connections_per_source = {cap})"
    );
    Ok(if served == 0 {
        anyhow::bail!("no connection was served at all: {seen}")
    } else if served <= cap {
        Verdict::Blocked(seen)
    } else {
        Verdict::Succeeded(seen)
    })
}

/// A connection to `to` from this host's address `from`, blocking.
fn connect_from(
    rt: &tokio::runtime::Runtime,
    from: IpAddr,
    to: SocketAddr,
) -> std::io::Result<TcpStream> {
    let socket = if from.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(from, 0))?;
    let s = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(3), socket.connect(to))
            .await
            .map_err(|_| std::io::Error::from(ErrorKind::TimedOut))?
    })?;
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    Ok(s)
}

/// A plain request to team locked's instance (its challenge is served
/// pinned; its allowlist policy refuses everyone at the edge) through agent
/// a, which pins it and forwards it to b (the owner) with a pinned proof.
/// It leaves from 127.0.0.1: this host's other addresses are agent a's,
/// and an agent pins no connection from an agent's address without a
/// proof. Blocked if answered 403; through if the instance answers.
fn pinned_locked(r: &Range) -> Result<Verdict> {
    let entry = r.a_cfg.http_entry;
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["--interface", "127.0.0.1", "-H"])
        .arg(format!("Host: {}", r.locked.hostname))
        .arg(format!("http://{entry}/"))
        .output()?;
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match got.as_str() {
        "200" => Ok(Verdict::Succeeded(format!(
            "the locked instance answered 200 through {entry}"
        ))),
        "403" => Ok(Verdict::Blocked(format!("{entry}: 403"))),
        other => anyhow::bail!("through {entry}: {other:?}, not 403 or 200"),
    }
}

/// Two instances of an HTTP echo challenge (`container=<its hostname>
/// host=<Host>` per request, kept alive), for two teams, on agent a (b
/// holds its one instance already). One client connection to agent b
/// from this host's address, agent a's: b serves it on its L7 path (an
/// agent's address without a proof pins nothing) and forwards both
/// requests to a, the owner, with its L7 proof, over one pooled upstream
/// connection. An owner that pinned that connection on the L7 proof would
/// send the second team's request to the first team's instance. Blocked
/// if each Host is answered by its own instance; through if the second is
/// answered by the first's.
fn pooled_hop(r: &Range) -> Result<Verdict> {
    register_ws_echo(r, "rt-echo", "HTTP_ECHO")?;
    let spawned = spawn_running(r, "rt-echo", &["pool-x", "pool-y"])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let entry = r.b_cfg.http_entry;
    let mut s = connect_from(&rt, r.a_cfg.advertise_address, entry)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut answers = Vec::new();
    let mut buf = Vec::new();
    for host in &spawned.hosts {
        s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())?;
        answers.push(read_answer(&mut s, &mut buf)?);
    }
    let container = |body: &str| -> String {
        body.split_whitespace()
            .find_map(|f| f.strip_prefix("container="))
            .unwrap_or("")
            .to_string()
    };
    let (first, second) = (&answers[0], &answers[1]);
    anyhow::ensure!(
        first.0 == 200 && second.0 == 200,
        "through {entry}: {} and {}, not 200 and 200 ({:?}, {:?})",
        first.0,
        second.0,
        first.1,
        second.1
    );
    let (x, y) = (container(&first.1), container(&second.1));
    let seen = format!(
        "{} answered by container {x}, then {} by container {y}",
        spawned.hosts[0], spawned.hosts[1]
    );
    Ok(if x.is_empty() || y.is_empty() {
        anyhow::bail!("an answer names no container: {seen}")
    } else if x == y {
        Verdict::Succeeded(seen)
    } else {
        Verdict::Blocked(seen)
    })
}

/// Registers challenge `name` served by the `ws-echo` test server in the
/// mode its environment variable `mode` selects (one HTTP port, 8080).
fn register_ws_echo(r: &Range, name: &str, mode: &str) -> Result<()> {
    let image = tidegate_local::images::binary_image(
        "tidegate/redteam-http-echo",
        &r.bin_dir.join("ws-echo"),
        &[],
    )?;
    let spec = serde_json::json!({
        "image": image,
        "env": {mode: "1"},
        "ports": [{"name": "web", "port": 8080, "protocol": "http"}],
    });
    let (status, body) = call(&r.plane, "PUT", &format!("/v1/challenges/{name}"), &spec)?;
    anyhow::ensure!(
        status == 201 || status == 200,
        "registering {name}: {status} {body}"
    );
    Ok(())
}

/// One HTTP answer with a Content-Length body from `s`, `buf` holding what
/// was read past it: its status and body.
fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u16, String)> {
    loop {
        if let Some(answer) = tidegate_local::http::take_answer(buf) {
            return Ok(answer);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk)? {
            0 => anyhow::bail!("the connection closed before a whole answer"),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
