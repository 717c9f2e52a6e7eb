//! Free loopback TCP ports for test servers.
//!
//! Ports are drawn at random from 10000–19999: below the kernel's
//! ephemeral range (32768–60999 by default), so no outgoing connection of
//! a busy test run can take a port between the moment it is chosen and
//! the moment its server binds it, and below the instances' `tcp_ports`
//! (20000–29999).

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

/// Where test servers' ports come from.
const RANGE: std::ops::RangeInclusive<u16> = 10000..=19999;

/// Ports this process handed out already (two servers of one test never
/// get the same one).
static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A TCP port that was free on every address a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(free_ports(1)?[0])
}

/// `n` distinct free ports (all held while choosing, so they differ).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    if given.len() > RANGE.len() / 2 {
        given.clear();
    }
    let mut held = Vec::with_capacity(n);
    for _ in 0..10_000 {
        if held.len() == n {
            break;
        }
        let port = rand::random_range(RANGE);
        if given.contains(&port) {
            continue;
        }
        // Free on every address: callers bind 127.0.0.x and test hosts'.
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)) {
            given.insert(port);
            held.push(listener);
        }
    }
    if held.len() < n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("no {n} free ports in {RANGE:?}"),
        ));
    }
    held.iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}
