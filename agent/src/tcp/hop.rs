//! Agent-to-agent TCP hops. An agent that forwards a player's connection to
//! the instance's owner connects from its own registered address and first
//! sends a PROXY protocol v2 header naming the player, with a proof (a TLV
//! of type 0xE0, see [`crate::hop`]). The owner, seeing a connection from a
//! registered agent's address that starts with such a header, takes it off
//! the stream. With a valid proof it knows:
//! - who the player is (for logs), and that the edge agent already admitted
//!   the connection through the challenge's edge policy (not asked twice:
//!   a rate-limiting policy would count the player twice);
//! - that the connection was forwarded once already, so it must not be
//!   forwarded again: a stale or misconfigured table (two workers
//!   registered with one address) cannot loop.
//!
//! A header without a valid proof is taken off too (its bytes never reach
//! the instance) and the connection is served as the peer's own. Only
//! connections from registered agents' addresses are looked at (the wait
//! for a header stays off players' connections); nothing is taken off a
//! stream that does not start with a whole, well-formed header.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::hop::{Claim, Refused};

/// The PROXY v2 signature.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const PROXY_V2: u8 = 0x21;
const TCP_V4: u8 = 0x11;
const TCP_V6: u8 = 0x21;
/// The TLV type of a hop's proof (the first of the custom range).
const PROOF_TLV: u8 = 0xE0;
/// The proof TLV's value: version, time, worker id (length-prefixed, at
/// most 63 bytes), MAC.
const PROOF_VERSION: u8 = 1;
const MAX_PROOF: usize = 1 + 8 + 1 + 63 + 32;
/// The longest header read: IPv6 addresses and the longest proof.
const MAX_LEN: usize = 16 + 36 + 3 + MAX_PROOF;

/// How long a connection from an agent's address may take to show whether
/// it starts with a header. Forwarding agents send it with the first
/// segment; only a player on an agent's own host, speaking a protocol where
/// the server talks first (SSH), waits this long.
const HEADER_WAIT: Duration = Duration::from_millis(300);

/// The PROXY v2 header for a connection from `source` to `destination`,
/// with `proof` (whose client is `source`) as a TLV.
pub fn header(source: SocketAddr, destination: SocketAddr, proof: Option<&Claim>) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_LEN);
    out.extend_from_slice(&SIGNATURE);
    out.push(PROXY_V2);
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(TCP_V4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        (s, d) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(TCP_V6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
    if let Some(claim) = proof.filter(|c| c.worker.len() <= 63) {
        let len = 1 + 8 + 1 + claim.worker.len() + 32;
        out.push(PROOF_TLV);
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.push(PROOF_VERSION);
        out.extend_from_slice(&claim.t.to_be_bytes());
        out.push(claim.worker.len() as u8);
        out.extend_from_slice(claim.worker.as_bytes());
        out.extend_from_slice(&claim.mac);
        let body = (out.len() - 16) as u16;
        out[14..16].copy_from_slice(&body.to_be_bytes());
    }
    out
}

/// What the start of a stream says.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `len` bytes from a player at `source`, with the
    /// proof it carries (`Err`: none, or not one this module writes).
    Header {
        len: usize,
        source: SocketAddr,
        proof: Result<Claim, Refused>,
    },
    /// Could still become a header: wait for more bytes.
    Partial,
    /// Not a header (the stream is the player's own bytes).
    Not,
}

/// Reads a header this module writes off the start of `bytes`.
pub fn parse(bytes: &[u8]) -> Parsed {
    let sig = bytes.len().min(SIGNATURE.len());
    if bytes[..sig] != SIGNATURE[..sig] {
        return Parsed::Not;
    }
    if bytes.len() < 16 {
        return Parsed::Partial;
    }
    let len = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let addresses = match bytes[13] {
        TCP_V4 => 12,
        TCP_V6 => 36,
        _ => return Parsed::Not,
    };
    if bytes[12] != PROXY_V2 || len < addresses || 16 + len > MAX_LEN {
        return Parsed::Not;
    }
    let Some(body) = bytes.get(16..16 + len) else {
        return Parsed::Partial;
    };
    let source = if addresses == 12 {
        let ip: [u8; 4] = [body[0], body[1], body[2], body[3]];
        SocketAddr::new(IpAddr::from(ip), u16::from_be_bytes([body[8], body[9]]))
    } else {
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&body[..16]);
        let ip = std::net::Ipv6Addr::from(ip);
        let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
        SocketAddr::new(ip, u16::from_be_bytes([body[32], body[33]]))
    };
    Parsed::Header {
        len: 16 + len,
        source,
        proof: proof(&body[addresses..], source),
    }
}

/// The proof in `tlvs` (after the addresses): exactly one proof TLV, of
/// this version and its own length, and nothing else.
fn proof(tlvs: &[u8], client: SocketAddr) -> Result<Claim, Refused> {
    let [kind, hi, lo, value @ ..] = tlvs else {
        return Err(if tlvs.is_empty() {
            Refused::NoProof
        } else {
            Refused::Malformed
        });
    };
    let len = usize::from(u16::from_be_bytes([*hi, *lo]));
    if *kind != PROOF_TLV || value.len() != len || len < 1 + 8 + 1 + 32 {
        return Err(Refused::Malformed);
    }
    let (version, rest) = value.split_at(1);
    let (t, rest) = rest.split_at(8);
    let (wlen, rest) = rest.split_at(1);
    let wlen = usize::from(wlen[0]);
    if version[0] != PROOF_VERSION || rest.len() != wlen + 32 {
        return Err(Refused::Malformed);
    }
    let (worker, mac) = rest.split_at(wlen);
    let worker = std::str::from_utf8(worker).map_err(|_| Refused::Malformed)?;
    let mut t_bytes = [0u8; 8];
    t_bytes.copy_from_slice(t);
    let mut m = [0u8; 32];
    m.copy_from_slice(mac);
    Ok(Claim {
        t: u64::from_be_bytes(t_bytes),
        worker: worker.to_string(),
        client,
        mac: m,
    })
}

/// What the start of a connection from an agent's address held.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// No header: every byte is still on the stream.
    Nothing,
    /// A header, taken off: the claimed player and the proof.
    Header {
        source: SocketAddr,
        proof: Result<Claim, Refused>,
    },
}

/// If `client` (from an agent's address) starts with a header, takes it
/// off the stream and returns what it claims; otherwise leaves every byte
/// where it is.
pub async fn take_header(client: &mut TcpStream) -> std::io::Result<Taken> {
    let deadline = tokio::time::Instant::now() + HEADER_WAIT;
    let mut buf = [0u8; MAX_LEN];
    loop {
        let Ok(n) = tokio::time::timeout_at(deadline, client.peek(&mut buf)).await else {
            return Ok(Taken::Nothing);
        };
        let n = n?;
        if n == 0 {
            return Ok(Taken::Nothing);
        }
        match parse(&buf[..n]) {
            Parsed::Not => return Ok(Taken::Nothing),
            Parsed::Header { len, source, proof } => {
                client.read_exact(&mut buf[..len]).await?;
                return Ok(Taken::Header { source, proof });
            }
            // A header arrives in one segment; a split one is rare enough
            // to poll for.
            Parsed::Partial if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Parsed::Partial => return Ok(Taken::Nothing),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(client: SocketAddr) -> Claim {
        Claim {
            t: 1_800_000_000,
            worker: "worker-a".into(),
            client,
            mac: [7; 32],
        }
    }

    #[test]
    fn headers_round_trip_for_v4_v6_and_mixed_with_and_without_proof() {
        for (s, d) in [
            ("198.18.0.7:40000", "198.18.0.2:31337"),
            ("[2001:db8::7]:40000", "[2001:db8::2]:31337"),
            ("198.18.0.7:40000", "[2001:db8::2]:31337"),
        ] {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            for proof in [None, Some(claim(s))] {
                let h = header(s, d, proof.as_ref());
                assert!(h.len() <= MAX_LEN);
                let mut stream = h.clone();
                stream.extend_from_slice(b"SSH-2.0-player\r\n");
                assert_eq!(
                    parse(&stream),
                    Parsed::Header {
                        len: h.len(),
                        source: s,
                        proof: proof.clone().ok_or(Refused::NoProof),
                    },
                    "{s} → {d}"
                );
                for cut in 1..h.len() {
                    assert_eq!(parse(&h[..cut]), Parsed::Partial, "{s} cut at {cut}");
                }
            }
        }
    }

    #[test]
    fn a_players_own_bytes_are_not_a_header() {
        let good = header(
            "198.18.0.7:1".parse().unwrap(),
            "198.18.0.2:2".parse().unwrap(),
            None,
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::Not);
        assert_eq!(parse(b"\r\n\r\nhello"), Parsed::Not);
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"), Parsed::Not);
        let mut v1_cmd = good.clone();
        v1_cmd[12] = 0x20; // LOCAL, not PROXY
        assert_eq!(parse(&v1_cmd), Parsed::Not);
        let mut udp = good.clone();
        udp[13] = 0x12;
        assert_eq!(parse(&udp), Parsed::Not);
        let mut long = good;
        long[14] = 1; // longer than any header an agent writes
        assert_eq!(parse(&long), Parsed::Not);
    }

    #[test]
    fn forged_or_foreign_tlvs_carry_no_proof() {
        let s: SocketAddr = "198.18.0.7:1".parse().unwrap();
        let d: SocketAddr = "198.18.0.2:2".parse().unwrap();
        let signed = header(s, d, Some(&claim(s)));
        let proof_of = |h: &[u8]| match parse(h) {
            Parsed::Header { proof, .. } => proof,
            other => panic!("{other:?}"),
        };
        // Another TLV type (e.g. a PROXY-speaking load balancer's).
        let mut other = signed.clone();
        other[28] = 0x04;
        assert_eq!(proof_of(&other), Err(Refused::Malformed));
        // Another proof version.
        let mut version = signed.clone();
        version[31] = 2;
        assert_eq!(proof_of(&version), Err(Refused::Malformed));
        // A TLV length that disagrees with the header's.
        let mut tlv_len = signed.clone();
        tlv_len[30] -= 1;
        assert_eq!(proof_of(&tlv_len), Err(Refused::Malformed));
    }
}
