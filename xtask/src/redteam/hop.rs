//! Instance names from an agent's metrics endpoint (an id is a hostname,
//! the only secret of an HTTP instance), and spoofed agent-to-agent hops:
//! a player claims that agent a forwarded
//! their request or connection, so that agent b (the owner of team locked's
//! instance, whose edge policy refuses them) skips the policy. The claims
//! come from agent a's own address: from this host (a process on an
//! agent's host) and from mallory's egress instance (masqueraded to the
//! host's address toward b). Each must meet the policy (HTTP 403, TCP
//! closed with nothing echoed), and b must count it with the real source.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::range::Range;
use super::{Attack, From, Verdict};
use crate::sh;

/// Where the forged claim is sent from.
#[derive(Clone, Copy)]
enum Sender {
    /// This host: agent a's address toward b.
    Host,
    /// Mallory's egress instance (masqueraded to the same address).
    Egress,
}

impl Sender {
    fn from(self) -> From {
        match self {
            Sender::Host => From::Network,
            Sender::Egress => From::Instance,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Sender::Host => "agent a's address",
            Sender::Egress => "an egress instance",
        }
    }

    fn player(self, r: &Range, args: &[&str]) -> Result<String> {
        match self {
            Sender::Host => r.player(&[], args),
            Sender::Egress => {
                let mut full = vec!["/player"];
                full.extend_from_slice(args);
                r.exec(&r.mallory_egress, &full)
            }
        }
    }
}

/// A forged `x-tidegate-hop`: the value before proofs (a worker's id) or a
/// v1 claim with a made-up MAC.
fn forged_http(v1: bool) -> String {
    if v1 {
        let now = tidegate_schema::time::unix_secs();
        format!(
            "x-tidegate-hop:v1;t={now};w=worker-a;c=203.0.113.7:4444;m={}",
            "0".repeat(64)
        )
    } else {
        "x-tidegate-hop:worker-a".to_string()
    }
}

/// A PROXY v2 header naming 203.0.113.7:4444 as the player, to `dst`;
/// with `tlv`, a made-up proof TLV (type 0xE0) after the addresses.
fn forged_proxy_v2(dst: SocketAddr, tlv: bool) -> Result<String> {
    let IpAddr::V4(dst_ip) = dst.ip() else {
        bail!("agent b's TCP host is not IPv4: {dst}");
    };
    let mut h: Vec<u8> = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&[203, 0, 113, 7]);
    h.extend_from_slice(&dst_ip.octets());
    h.extend_from_slice(&4444u16.to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    if tlv {
        let worker = b"worker-a";
        let mut value = vec![1u8];
        value.extend_from_slice(&tidegate_schema::time::unix_secs().to_be_bytes());
        value.push(worker.len() as u8);
        value.extend_from_slice(worker);
        value.extend_from_slice(&[0u8; 32]);
        h.push(0xE0);
        h.extend_from_slice(&(value.len() as u16).to_be_bytes());
        h.extend_from_slice(&value);
        let body = (h.len() - 16) as u16;
        h[14..16].copy_from_slice(&body.to_be_bytes());
    }
    Ok(h.iter().map(|b| format!("{b:02x}")).collect())
}

pub(super) fn attacks() -> Vec<Attack> {
    let mut all = Vec::new();
    for path in ["/metrics", "/activity"] {
        all.push(Attack::new(
            format!("read instance names from agent b's {path}"),
            From::Network,
            "scrape-token",
            move |r| names(r, path),
        ));
    }
    for sender in [Sender::Host, Sender::Egress] {
        for (v1, what) in [(false, "a worker's id"), (true, "a made-up v1 proof")] {
            all.push(Attack::new(
                format!("x-tidegate-hop with {what} from {}", sender.name()),
                sender.from(),
                "hop-proof",
                move |r| http(r, sender, v1),
            ));
        }
        for (tlv, what) in [(false, "no proof"), (true, "a made-up proof TLV")] {
            all.push(Attack::new(
                format!("PROXY v2 header with {what} from {}", sender.name()),
                sender.from(),
                "hop-proof",
                move |r| tcp(r, sender, tlv),
            ));
        }
    }
    all
}

/// The forged HTTP claim to agent b for the locked instance.
fn http(r: &Range, sender: Sender, v1: bool) -> Result<Verdict> {
    let entry = r.b_cfg.http_entry;
    let (ip, port) = (entry.ip().to_string(), entry.port().to_string());
    let host = r.locked.hostname.as_str();
    let plain = sender.player(r, &["http", &ip, &port, host])?;
    if plain != "403" {
        bail!(
            "without a claim the locked instance answers {plain}, not 403: the policy is not in place"
        );
    }
    let before = refused(r)?;
    let got = sender.player(r, &["http", &ip, &port, host, &forged_http(v1)])?;
    judge(r, &got, "200", before)
}

/// The forged PROXY v2 header to agent b's port of the locked instance.
fn tcp(r: &Range, sender: Sender, tlv: bool) -> Result<Verdict> {
    let dst = SocketAddr::new(r.b_cfg.tcp_host, r.locked.tcp_port);
    let (ip, port) = (dst.ip().to_string(), dst.port().to_string());
    let plain = sender.player(r, &["send", &ip, &port, "", "hello"])?;
    if plain != "closed" {
        bail!(
            "without a header the locked instance answers {plain:?}, not a close: the policy is not in place"
        );
    }
    let before = refused(r)?;
    let got = sender.player(
        r,
        &["send", &ip, &port, &forged_proxy_v2(dst, tlv)?, "hello"],
    )?;
    judge(r, &got, "hello", before)
}

/// Succeeded when the instance answered (`served`); blocked when it did
/// not and b counted the claim, naming the real source in its log.
fn judge(r: &Range, got: &str, served: &str, before: f64) -> Result<Verdict> {
    if got == served {
        return Ok(Verdict::Succeeded(format!(
            "the locked instance answered {got:?}"
        )));
    }
    let after = refused(r)?;
    let source = r.a_cfg.advertise_address.to_string();
    let logged =
        r.b.log_tail(400)
            .lines()
            .any(|l| l.contains("a hop claim without a valid proof") && l.contains(&source));
    if after <= before || !logged {
        bail!(
            "refused ({got}), but agent b counted {} claims (was {before}) and logged the source {source}: {logged}",
            after
        );
    }
    Ok(Verdict::Blocked(format!(
        "{got}; b counted it and logged the source {source}"
    )))
}

/// Whether agent b's `path`, read without the scrape token, names the
/// locked instance (its id is its hostname's first label).
fn names(r: &Range, path: &str) -> Result<Verdict> {
    let url = format!("http://{}{path}", r.b_cfg.metrics_listen);
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", "-w", " %{http_code}", &url])
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once(' ').unwrap_or((&text, ""));
    let id = r.locked.id.as_str();
    Ok(if body.contains(id) {
        Verdict::Succeeded(format!("{status}; the answer names instance {id}"))
    } else {
        Verdict::Blocked(format!("{status}; {} bytes, no instance named", body.len()))
    })
}

/// Agent b's `tidegate_hop_refused_total`, every label summed.
fn refused(r: &Range) -> Result<f64> {
    let url = format!("http://{}/metrics", r.b_cfg.metrics_listen);
    let text = sh::output(Command::new("curl").args(["-sf", "--max-time", "5", &url]))
        .with_context(|| format!("agent b's metrics at {url}"))?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("tidegate_hop_refused_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
