//! An HTTP/1.1 load generator for `cargo xtask bench http`: one thread,
//! `--connections` concurrent clients, each sending `GET` requests one at a
//! time until `--secs` have passed.
//!
//! ```text
//! http-load --addr 127.0.0.1:8080 --secs 6 [--connections 32] [--hosts a,b]
//!           [--path /index.html] [--per-connection K] [--close]
//!           [--assets /style.css] [--expect-body-contains STR]
//! ```
//!
//! - client `i` sends `Host: hosts[i % len]` (default: the `--addr` text);
//! - `--per-connection K`: 0 keeps one connection alive for the whole run;
//!   K > 0 sends K requests on a connection, then opens a new one;
//! - `--close`: the K-th request carries `Connection: close` and the server
//!   must close (within 1 s); without it the client closes after the answer;
//! - `--assets PATH`: the requests after a connection's first ask for `PATH`
//!   (a page, then its small assets);
//! - `--expect-body-contains STR`: a body without `STR` is an error.
//!
//! Responses need a Content-Length (chunked is an error). A request's latency
//! runs from its write to its body's last byte, connect included for a
//! connection's first. A non-2xx answer, a failed check or an IO error counts
//! one error and the client reconnects. Requests cut off at the deadline are
//! not counted. Prints one JSON line: `requests` (2xx answers that passed),
//! `errors`, `connections` (opened), `secs`, `rps`, `p50_ms`, `p99_ms` (null
//! when nothing completed) and `statuses` (every answer's status, counted).
//! Exits 0 however many errors; 1 on bad arguments or an address that never
//! accepts.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, timeout, timeout_at};

const USAGE: &str = "usage: http-load --addr HOST:PORT --secs S [--connections N] [--hosts h1,h2] \
[--path /p] [--per-connection K] [--close] [--assets /a] [--expect-body-contains STR]";

#[derive(Debug, Default)]
struct Args {
    addr: String,
    secs: Duration,
    connections: usize,
    hosts: Vec<String>,
    path: String,
    per_connection: u64,
    close: bool,
    assets: Option<String>,
    expect: Option<String>,
}

#[derive(Debug, Default)]
struct Stats {
    latencies_us: Vec<u32>,
    errors: u64,
    connections: u64,
    statuses: BTreeMap<u16, u64>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("http-load: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), String> {
    let args = Arc::new(parse_args()?);
    let addr = tokio::net::lookup_host(&args.addr)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| format!("--addr {}: not an address", args.addr))?;
    probe(addr).await?;
    let start = Instant::now();
    let deadline = start.checked_add(args.secs).ok_or("--secs too large")?;
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let args = Arc::clone(&args);
        let host = args.hosts[i % args.hosts.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::default();
            let _ = timeout_at(deadline, client(&args, addr, &host, &mut stats)).await;
            stats
        }));
    }
    let mut all = Stats::default();
    for task in tasks {
        let s = task.await.map_err(|e| format!("a client failed: {e}"))?;
        all.latencies_us.extend_from_slice(&s.latencies_us);
        all.errors += s.errors;
        all.connections += s.connections;
        for (status, n) in s.statuses {
            *all.statuses.entry(status).or_default() += n;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if all.connections == 0 {
        return Err(format!("{addr} accepted no connection during the run"));
    }
    let mut lat = all.latencies_us;
    lat.sort_unstable();
    let pct = |p: f64| {
        let i = (lat.len().saturating_sub(1) as f64 * p).round() as usize;
        lat.get(i).map(|&us| f64::from(us) / 1000.0)
    };
    let json = serde_json::json!({
        "requests": lat.len(),
        "errors": all.errors,
        "connections": all.connections,
        "secs": secs,
        "rps": lat.len() as f64 / secs,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "statuses": all.statuses,
    });
    println!("{json}");
    Ok(())
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        connections: 32,
        path: "/".into(),
        ..Args::default()
    };
    let mut hosts = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--close" => a.close = true,
            "--addr" => a.addr = value()?,
            "--secs" => {
                let v = value()?;
                a.secs = v
                    .parse::<f64>()
                    .ok()
                    .and_then(|s| Duration::try_from_secs_f64(s).ok())
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| format!("--secs {v}: not a positive number"))?;
            }
            "--connections" => a.connections = number(&flag, &value()?)?,
            "--hosts" => hosts = Some(value()?),
            "--path" => a.path = value()?,
            "--per-connection" => a.per_connection = number(&flag, &value()?)?,
            "--assets" => a.assets = Some(value()?),
            "--expect-body-contains" => a.expect = Some(value()?),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    if a.addr.is_empty() || a.secs.is_zero() {
        return Err(format!("--addr and --secs are required\n{USAGE}"));
    }
    if a.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if a.close && a.per_connection == 0 {
        return Err("--close needs --per-connection K > 0".into());
    }
    let hosts = hosts.unwrap_or_else(|| a.addr.clone());
    a.hosts = hosts.split(',').map(String::from).collect();
    let visible = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !a.hosts.iter().all(|h| visible(h)) {
        return Err(format!("--hosts {hosts}: not a list of host names"));
    }
    for path in std::iter::once(&a.path).chain(&a.assets) {
        if !path.starts_with('/') || !visible(path) {
            return Err(format!("{path}: not a path (/..., no spaces)"));
        }
    }
    Ok(a)
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{flag} {v}: not a number"))
}

/// Waits up to 5 s for `addr` to accept a connection.
async fn probe(addr: SocketAddr) -> Result<(), String> {
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        let err = match timeout_at(give_up, TcpStream::connect(addr)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".into(),
        };
        if Instant::now() >= give_up {
            return Err(format!("{addr} never accepted a connection in 5 s: {err}"));
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// One client's loop; the caller drops it at the deadline.
async fn client(a: &Args, addr: SocketAddr, host: &str, s: &mut Stats) {
    // Formatted once, indexed by 2 * (an asset) + (Connection: close).
    let (page, assets) = (&a.path, a.assets.as_ref().unwrap_or(&a.path));
    let close = "Connection: close\r\n";
    let requests: Vec<Vec<u8>> = [(page, ""), (page, close), (assets, ""), (assets, close)]
        .into_iter()
        .map(|(path, close)| {
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{close}\r\n").into_bytes()
        })
        .collect();
    let expect = a.expect.as_deref().map(str::as_bytes);
    let mut buf = Vec::with_capacity(16 * 1024);
    s.latencies_us.reserve(64 * 1024);
    loop {
        let mut started = Instant::now();
        let mut stream = match connect(addr).await {
            Ok(stream) => stream,
            Err(_) => {
                s.errors += 1;
                sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        s.connections += 1;
        buf.clear();
        let mut sent = 0u64;
        loop {
            let last = sent + 1 == a.per_connection;
            let asset = sent > 0 && a.assets.is_some();
            let request = &requests[2 * usize::from(asset) + usize::from(last && a.close)];
            let Ok(r) = exchange(&mut stream, request, &mut buf, expect).await else {
                s.errors += 1;
                break;
            };
            *s.statuses.entry(r.status).or_default() += 1;
            if !(200..300).contains(&r.status) || !r.matched {
                s.errors += 1;
                break;
            }
            let us = started.elapsed().as_micros();
            s.latencies_us.push(u32::try_from(us).unwrap_or(u32::MAX));
            sent += 1;
            if last && a.close {
                // The server must close within 1 s, sending nothing more.
                let read = timeout(Duration::from_secs(1), read_more(&mut stream, &mut buf)).await;
                let eof = matches!(read, Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof);
                if !eof || !buf.is_empty() {
                    s.errors += 1;
                }
                break;
            }
            if last || r.close {
                break;
            }
            started = Instant::now();
        }
    }
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

struct Response {
    status: u16,
    /// The server said `Connection: close`.
    close: bool,
    /// The body held `--expect-body-contains` (or none was asked for).
    matched: bool,
}

/// Writes `request` and reads its response into `buf`, which keeps any
/// bytes read past it.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
    expect: Option<&[u8]>,
) -> io::Result<Response> {
    stream.write_all(request).await?;
    let mut scanned = 0;
    let head_len = loop {
        if let Some(i) = buf[scanned..].windows(4).position(|w| w == b"\r\n\r\n") {
            break scanned + i + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("response head over 64 KiB"));
        }
        scanned = buf.len().saturating_sub(3);
        read_more(stream, buf).await?;
    };
    let (status, length, close) = parse_head(&buf[..head_len])?;
    let end = head_len + length;
    buf.reserve(end.saturating_sub(buf.len()));
    while buf.len() < end {
        read_more(stream, buf).await?;
    }
    let body = &buf[head_len..end];
    let matched = expect.is_none_or(|n| n.is_empty() || body.windows(n.len()).any(|w| w == n));
    buf.drain(..end);
    Ok(Response {
        status,
        close,
        matched,
    })
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.len() == buf.capacity() {
        buf.reserve(16 * 1024);
    }
    match stream.read_buf(buf).await? {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        _ => Ok(()),
    }
}

/// Status, body length and `Connection: close` of a response head.
fn parse_head(head: &[u8]) -> io::Result<(u16, usize, bool)> {
    let bad = |what: &str| io::Error::other(format!("bad response: {what}"));
    let mut lines = head.split(|&b| b == b'\n').map(<[u8]>::trim_ascii);
    let first = lines.next().unwrap_or_default();
    let status = first
        .strip_prefix(b"HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| std::str::from_utf8(code).ok()?.parse::<u16>().ok())
        .ok_or_else(|| bad("status line"))?;
    let (mut length, mut close) = (None, false);
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok());
            length = Some(n.ok_or_else(|| bad("Content-Length"))?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            return Err(bad("Transfer-Encoding (chunked) is not supported"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let length = match (length, status) {
        (Some(n), _) => n,
        (None, 204 | 304) => 0,
        (None, _) => return Err(bad("no Content-Length")),
    };
    Ok((status, length, close))
}
