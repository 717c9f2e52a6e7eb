//! Proofs of agent-to-agent hops.
//!
//! An agent forwards a player's request or connection to the instance's
//! owner and says so (the HTTP header `x-tidegate-hop`, a PROXY v2 header
//! on TCP), so the owner neither asks the edge policy a second time nor
//! forwards it again. A claim alone proves nothing: a player on an agent's
//! host, or an egress instance masqueraded to it, sends from the same
//! address. So every hop carries an HMAC-SHA256, with the cluster's hop key
//! (`hop_key_file`, the same on every agent), over:
//!
//! ```text
//! "tidegate-hop v1\0" | protocol | t (unix seconds) | source IP (the edge's forward_from)
//! | worker | destination (the owner's entry the edge connected to)
//! | instance | client (the player's address)
//! ```
//!
//! The owner recomputes it from what it sees itself (the connection's peer
//! IP and local address, the instance its own table routes there) and what
//! the claim carries (time, worker, client), and accepts it within
//! [`MAX_SKEW`] seconds. Anything else (no proof, a wrong one, a stale
//! one) is an ordinary player's request: the policy is asked with the
//! connection's real source, and the loop guard does not fire. Each such
//! claim is counted (`tidegate_hop_refused_total`) and logged with the real
//! source, at most once a second.
//!
//! Within those seconds, a proof could be replayed only from the edge
//! agent's own address, for the same player, instance and owner; such a
//! replay skips the policy again (a rate-limiting policy does not see it,
//! a policy changed in those seconds is not asked).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use ring::hmac;

/// How far a proof's time may be from the owner's clock, in seconds.
pub const MAX_SKEW: u64 = 10;

/// The shortest hop key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

/// Which data plane a hop is for (part of what is signed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Tcp,
    /// A pinned HTTP connection (one instance for the whole connection):
    /// signed apart from [`Protocol::Http`], so the owner pins only a
    /// connection the edge pinned, never one an L7 edge reuses for many
    /// players' requests.
    Pinned,
}

/// Why a claimed hop was served as a player's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refused {
    /// The claim is not in the form this agent writes.
    Malformed,
    /// A well-formed header without a proof.
    NoProof,
    /// The proof's time is more than [`MAX_SKEW`] seconds away.
    Stale,
    /// The proof does not match (another key, or another source,
    /// destination, instance or client than signed).
    BadMac,
    /// The claim comes from an address no registered agent has.
    NotAnAgent,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
            Protocol::Pinned => "pinned",
        }
    }
}

impl Refused {
    fn label(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::NoProof => "no_proof",
            Refused::Stale => "stale",
            Refused::BadMac => "bad_mac",
            Refused::NotAnAgent => "not_an_agent",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::NoProof => "no proof",
            Refused::Stale => "stale (clocks more than 10 s apart?)",
            Refused::BadMac => "bad MAC",
            Refused::NotAnAgent => "not from an agent's address",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RefusedLabel {
    protocol: &'static str,
    reason: &'static str,
}

/// What a hop claims: when, which agent, for which player, and the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub t: u64,
    pub worker: String,
    pub client: SocketAddr,
    pub mac: [u8; 32],
}

/// What a proof binds besides the claim: the hop's two ends and instance.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    pub protocol: Protocol,
    /// The edge agent's address (the owner sees it as the peer).
    pub source: IpAddr,
    /// The owner's entry the edge connected to.
    pub destination: SocketAddr,
    pub instance: &'a str,
}

/// The cluster's hop key, this agent's id, and the refusals seen.
pub struct Hops {
    key: hmac::Key,
    me: String,
    refused: Family<RefusedLabel, Counter>,
    /// The second of the last refusal logged, and refusals not logged since.
    last_log: AtomicU64,
    unlogged: AtomicU64,
}

impl std::fmt::Debug for Hops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hops")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl Hops {
    /// Hops signed with `key` (at least [`MIN_KEY_BYTES`]).
    pub fn new(key: &[u8], me: &str) -> Result<Self, String> {
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the hop key is {} bytes; at least {MIN_KEY_BYTES} are needed",
                key.len()
            ));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            me: me.to_string(),
            refused: Family::default(),
            last_log: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        })
    }

    /// The key in `path` (a trailing newline is not part of it).
    pub fn from_file(path: &Path, me: &str) -> Result<Self, String> {
        let raw =
            std::fs::read(path).map_err(|e| format!("hop_key_file {}: {e}", path.display()))?;
        let key = raw.trim_ascii_end();
        Self::new(key, me).map_err(|e| format!("hop_key_file {}: {e}", path.display()))
    }

    /// A key no other agent has: hops from other agents are then served as
    /// players' (policy asked again), and only this agent's own hops back
    /// to itself are recognised.
    pub fn random(me: &str) -> Result<Self, String> {
        let mut key = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
            .map_err(|_| "no random bytes for a hop key".to_string())?;
        Self::new(&key, me)
    }

    /// This agent's worker id.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The `x-tidegate-hop` value proving a request of `client` to
    /// `instance` on `protocol`, leaving from `source` for `destination`.
    pub fn http_proof(
        &self,
        protocol: Protocol,
        (source, destination): (IpAddr, SocketAddr),
        instance: &str,
        client: SocketAddr,
    ) -> String {
        let hop = Hop {
            protocol,
            source,
            destination,
            instance,
        };
        http_value(&self.sign(&hop, client))
    }

    /// This agent's claim for a hop it sends now.
    pub fn sign(&self, hop: &Hop<'_>, client: SocketAddr) -> Claim {
        let t = tidegate_schema::time::unix_secs();
        let tag = hmac::sign(&self.key, &message(hop, t, &self.me, client));
        let mut mac = [0u8; 32];
        mac.copy_from_slice(tag.as_ref());
        Claim {
            t,
            worker: self.me.clone(),
            client,
            mac,
        }
    }

    /// Whether `claim` proves `hop`.
    pub fn verify(&self, hop: &Hop<'_>, claim: &Claim) -> Result<(), Refused> {
        let now = tidegate_schema::time::unix_secs();
        if now.abs_diff(claim.t) > MAX_SKEW {
            return Err(Refused::Stale);
        }
        let msg = message(hop, claim.t, &claim.worker, claim.client);
        hmac::verify(&self.key, &msg, &claim.mac).map_err(|_| Refused::BadMac)
    }

    /// Whether `claim` (as read off the wire) proves `hop`. With the
    /// `hop-proof` defence planted (debug builds, `cargo xtask redteam`),
    /// any claim does, as before proofs: trust by source address.
    pub fn check(&self, hop: &Hop<'_>, claim: Result<Claim, Refused>) -> Result<(), Refused> {
        if tidegate_schema::config::planted("hop-proof") {
            return Ok(());
        }
        claim.and_then(|c| self.verify(hop, &c))
    }

    /// Counts a refused claim and logs it (at most once a second, with how
    /// many were not logged since).
    pub fn refuse(&self, protocol: Protocol, reason: Refused, peer: SocketAddr, claimed: &str) {
        self.refused
            .get_or_create(&RefusedLabel {
                protocol: protocol.label(),
                reason: reason.label(),
            })
            .inc();
        let now = tidegate_schema::time::unix_secs();
        if self.last_log.swap(now, Ordering::Relaxed) == now {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
        tracing::warn!(
            protocol = protocol.label(), %peer, claimed, reason = reason.describe(), unlogged,
            "a hop claim without a valid proof: served as a player's (policy asked with the real source)"
        );
    }

    /// Registers `tidegate_hop_refused_total`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tidegate_hop_refused",
            "Claims of an agent-to-agent hop (x-tidegate-hop, PROXY v2) without a valid proof, served as players'",
            self.refused.clone(),
        );
    }
}

/// The bytes a proof signs, each field fixed-width or length-prefixed.
fn message(hop: &Hop<'_>, t: u64, worker: &str, client: SocketAddr) -> Vec<u8> {
    let mut m = Vec::with_capacity(128);
    m.extend_from_slice(b"tidegate-hop v1\0");
    m.push(match hop.protocol {
        Protocol::Http => b'h',
        Protocol::Tcp => b't',
        Protocol::Pinned => b'p',
    });
    m.extend_from_slice(&t.to_be_bytes());
    m.extend_from_slice(&v6(hop.source).octets());
    let field = |m: &mut Vec<u8>, s: &str| {
        m.extend_from_slice(&(s.len() as u16).to_be_bytes());
        m.extend_from_slice(s.as_bytes());
    };
    field(&mut m, worker);
    m.extend_from_slice(&v6(hop.destination.ip()).octets());
    m.extend_from_slice(&hop.destination.port().to_be_bytes());
    field(&mut m, hop.instance);
    m.extend_from_slice(&v6(client.ip()).octets());
    m.extend_from_slice(&client.port().to_be_bytes());
    m
}

fn v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// The HTTP header's value: `v1;t=<secs>;w=<worker>;c=<client>;m=<hex MAC>`.
pub fn http_value(claim: &Claim) -> String {
    use std::fmt::Write;
    let mut value = String::with_capacity(160);
    // Writing to a String cannot fail.
    let _ = write!(
        value,
        "v1;t={};w={};c={};m=",
        claim.t, claim.worker, claim.client
    );
    for b in claim.mac {
        let _ = write!(value, "{b:02x}");
    }
    value
}

/// Reads a value [`http_value`] writes.
pub fn parse_http(value: &[u8]) -> Result<Claim, Refused> {
    let value = std::str::from_utf8(value).map_err(|_| Refused::Malformed)?;
    let mut parts = value.split(';');
    if parts.next() != Some("v1") {
        return Err(Refused::Malformed);
    }
    let mut field = |name: &str| {
        parts
            .next()
            .and_then(|p| p.strip_prefix(name))
            .ok_or(Refused::Malformed)
    };
    let t = field("t=")?.parse().map_err(|_| Refused::Malformed)?;
    let worker = field("w=")?.to_string();
    let client = field("c=")?.parse().map_err(|_| Refused::Malformed)?;
    let hex = field("m=")?.as_bytes();
    if parts.next().is_some() || hex.len() != 64 || worker.len() > 63 {
        return Err(Refused::Malformed);
    }
    let mut mac = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| Refused::Malformed)?;
        mac[i] = u8::from_str_radix(s, 16).map_err(|_| Refused::Malformed)?;
    }
    Ok(Claim {
        t,
        worker,
        client,
        mac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(instance: &str) -> Hop<'_> {
        Hop {
            protocol: Protocol::Http,
            source: "198.18.0.7".parse().unwrap(),
            destination: "198.18.0.2:8080".parse().unwrap(),
            instance,
        }
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_signed_hop_verifies_and_survives_the_header() {
        let hops = Hops::new(KEY, "worker-a").unwrap();
        let claim = hops.sign(&hop("i1"), "203.0.113.9:5555".parse().unwrap());
        assert_eq!(hops.verify(&hop("i1"), &claim), Ok(()));
        let back = parse_http(http_value(&claim).as_bytes()).unwrap();
        assert_eq!(back, claim);
        let owner = Hops::new(KEY, "worker-b").unwrap();
        assert_eq!(owner.verify(&hop("i1"), &back), Ok(()));
    }

    #[test]
    fn every_field_is_bound() {
        let hops = Hops::new(KEY, "worker-a").unwrap();
        let claim = hops.sign(&hop("i1"), "203.0.113.9:5555".parse().unwrap());
        let other_key = Hops::new(b"another key, long enough: 0123456789", "x").unwrap();
        assert_eq!(other_key.verify(&hop("i1"), &claim), Err(Refused::BadMac));
        assert_eq!(hops.verify(&hop("i2"), &claim), Err(Refused::BadMac));
        let mut h = hop("i1");
        h.source = "198.18.0.8".parse().unwrap();
        assert_eq!(hops.verify(&h, &claim), Err(Refused::BadMac));
        let mut h = hop("i1");
        h.destination = "198.18.0.2:8081".parse().unwrap();
        assert_eq!(hops.verify(&h, &claim), Err(Refused::BadMac));
        let mut h = hop("i1");
        h.protocol = Protocol::Tcp;
        assert_eq!(hops.verify(&h, &claim), Err(Refused::BadMac));
        let mut c = claim.clone();
        c.client = "203.0.113.10:5555".parse().unwrap();
        assert_eq!(hops.verify(&hop("i1"), &c), Err(Refused::BadMac));
        let mut c = claim.clone();
        c.worker = "worker-b".into();
        assert_eq!(hops.verify(&hop("i1"), &c), Err(Refused::BadMac));
        let mut c = claim.clone();
        c.mac[31] ^= 1;
        assert_eq!(hops.verify(&hop("i1"), &c), Err(Refused::BadMac));
        let mut c = claim.clone();
        c.t += 1;
        assert_eq!(hops.verify(&hop("i1"), &c), Err(Refused::BadMac));
        for skew in [MAX_SKEW + 1, 3600] {
            let mut c = claim.clone();
            c.t -= skew;
            assert_eq!(hops.verify(&hop("i1"), &c), Err(Refused::Stale));
        }
    }

    #[test]
    fn short_keys_and_malformed_headers_are_refused() {
        assert!(Hops::new(b"short", "a").is_err());
        let good = http_value(
            &Hops::random("a")
                .unwrap()
                .sign(&hop("i"), "1.2.3.4:5".parse().unwrap()),
        );
        assert!(parse_http(good.as_bytes()).is_ok());
        for bad in [
            "worker-a".to_string(),
            good.replace("v1;", "v2;"),
            good.replace(";c=", ";x="),
            good.replace("1.2.3.4:5", "1.2.3.4"),
            format!("{good};extra"),
            good[..good.len() - 2].to_string(),
            good.replace("m=", "m=zz")
                .chars()
                .take(good.len())
                .collect(),
        ] {
            assert_eq!(parse_http(bad.as_bytes()), Err(Refused::Malformed), "{bad}");
        }
    }
}
