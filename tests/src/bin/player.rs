//! `player`: what a player runs inside an instance (or on the network)
//! during `cargo xtask redteam`. Players upload their own tools; this is
//! ours. Every subcommand prints one line saying what happened and exits 0;
//! whether that means the attack got through is the red team's to judge.
//! Exit 2 is a usage error.
//!
//! - `connect HOST PORT`: `open`, `refused: …` or `timeout`.
//! - `send HOST PORT HEX TEXT`: writes the bytes `HEX` (e.g. a forged PROXY
//!   v2 header), then `TEXT` and a newline, then half-closes; prints what
//!   came back (`closed` if nothing).
//! - `http HOST PORT HOSTNAME [NAME:VALUE ...]`: `GET /` with those headers;
//!   prints the status code.
//! - `arp-claim IFACE IP COUNT`: sends COUNT gratuitous ARP replies claiming
//!   IP for IFACE's MAC (needs NET_RAW); prints `sent N`.
//! - `fill PATH MIB`: writes up to MIB MiB into the file PATH; prints the
//!   bytes written and the error that stopped it, if any.
//! - `spam SECS`: writes to stdout as fast as it can for SECS seconds.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let line = match args.as_slice() {
        ["connect", host, port] => connect(host, port),
        ["send", host, port, hex, text] => send(host, port, hex, text),
        ["http", host, port, hostname, headers @ ..] => http(host, port, hostname, headers),
        ["arp-claim", iface, ip, count] => arp_claim(iface, ip, count),
        ["fill", path, mib] => fill(path, mib),
        ["spam", secs] => spam(secs),
        _ => {
            eprintln!("usage: player connect|send|http|arp-claim|fill|spam … (see the source)");
            return ExitCode::from(2);
        }
    };
    match line {
        Ok(l) => {
            println!("{l}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("player: {e}");
            ExitCode::from(2)
        }
    }
}

type Res = Result<String, String>;

fn addr(host: &str, port: &str) -> Result<SocketAddr, String> {
    (
        host,
        port.parse::<u16>()
            .map_err(|e| format!("port {port}: {e}"))?,
    )
        .to_socket_addrs()
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))
}

fn open(host: &str, port: &str) -> Result<Result<TcpStream, String>, String> {
    let a = addr(host, port)?;
    Ok(match TcpStream::connect_timeout(&a, TIMEOUT) {
        Ok(s) => {
            let _ = s.set_read_timeout(Some(TIMEOUT));
            Ok(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Err("timeout".into()),
        Err(e) => Err(format!("refused: {e}")),
    })
}

fn connect(host: &str, port: &str) -> Res {
    Ok(match open(host, port)? {
        Ok(_) => "open".into(),
        Err(e) => e,
    })
}

fn send(host: &str, port: &str, hex: &str, text: &str) -> Res {
    let mut bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|e| format!("hex: {e}"))?;
    bytes.extend_from_slice(text.as_bytes());
    bytes.push(b'\n');
    let mut s = match open(host, port)? {
        Ok(s) => s,
        Err(e) => return Ok(e),
    };
    if s.write_all(&bytes).is_err() {
        return Ok("closed".into());
    }
    let _ = s.shutdown(Shutdown::Write);
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    Ok(if back.is_empty() {
        "closed".into()
    } else {
        String::from_utf8_lossy(&back).trim().to_string()
    })
}

fn http(host: &str, port: &str, hostname: &str, headers: &[&str]) -> Res {
    let mut s = match open(host, port)? {
        Ok(s) => s,
        Err(e) => return Ok(e),
    };
    let mut req = format!("GET / HTTP/1.1\r\nHost: {hostname}\r\nConnection: close\r\n");
    for h in headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("header {h}: NAME:VALUE"))?;
        req += &format!("{name}: {value}\r\n");
    }
    req += "\r\n";
    if s.write_all(req.as_bytes()).is_err() {
        return Ok("closed".into());
    }
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    let text = String::from_utf8_lossy(&back);
    Ok(text
        .split_whitespace()
        .nth(1)
        .unwrap_or("closed")
        .to_string())
}

fn arp_claim(iface: &str, ip: &str, count: &str) -> Res {
    use pnet_datalink::Channel;
    let ip: Ipv4Addr = ip.parse().map_err(|e| format!("{ip}: {e}"))?;
    let count: u32 = count.parse().map_err(|e| format!("{count}: {e}"))?;
    let nic = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == iface)
        .ok_or_else(|| format!("no interface {iface}"))?;
    let mac = nic
        .mac
        .ok_or_else(|| format!("{iface} has no MAC"))?
        .octets();
    let mut tx = match pnet_datalink::channel(&nic, Default::default()) {
        Ok(Channel::Ethernet(tx, _)) => tx,
        Ok(_) => return Err("not an Ethernet channel".into()),
        Err(e) => return Ok(format!("refused: {e}")),
    };
    // Ethernet broadcast, then a gratuitous ARP reply: "ip is at mac".
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    let mut sent = 0;
    for _ in 0..count {
        match tx.send_to(&frame, None) {
            Some(Ok(())) => sent += 1,
            Some(Err(e)) => return Ok(format!("refused: {e}")),
            None => return Ok("refused: no buffer".into()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(format!("sent {sent}"))
}

fn fill(path: &str, mib: &str) -> Res {
    let mib: u64 = mib.parse().map_err(|e| format!("{mib}: {e}"))?;
    let block = vec![0x5a; 1 << 20];
    let mut written = 0u64;
    let mut f = match std::fs::File::create(path) {
        Ok(f) => f,
        Err(e) => return Ok(format!("wrote 0 bytes: {e}")),
    };
    for _ in 0..mib {
        if let Err(e) = f.write_all(&block).and_then(|()| f.sync_data()) {
            let len = f.metadata().map_or(written, |m| m.len());
            return Ok(format!("wrote {len} bytes: {e}"));
        }
        written += block.len() as u64;
    }
    Ok(format!("wrote {written} bytes"))
}

fn spam(secs: &str) -> Res {
    let secs: u64 = secs.parse().map_err(|e| format!("{secs}: {e}"))?;
    let until = Instant::now() + Duration::from_secs(secs);
    let line = [b'y'; 4095]
        .iter()
        .copied()
        .chain([b'\n'])
        .collect::<Vec<u8>>();
    let mut out = std::io::stdout().lock();
    let mut bytes = 0u64;
    while Instant::now() < until {
        for _ in 0..256 {
            if out.write_all(&line).is_err() {
                return Ok(format!("stopped after {bytes} bytes"));
            }
            bytes += line.len() as u64;
        }
    }
    Ok(format!("spammed {bytes} bytes"))
}
