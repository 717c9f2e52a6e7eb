//! Free loopback TCP ports for test servers.
//!
//! Ports are drawn at random from 10000–19999: below the kernel's
//! ephemeral range (32768–60999 by default), so no outgoing connection of
//! a busy test run can take a port between the moment it is chosen and
//! the moment its server binds it, and below the instances' `tcp_ports`
//! (20000–29999).
//!
//! A port is also claimed for the whole life of the process that chose
//! it, across processes (a locked file per port): nextest runs each test
//! in a process of its own, and one test took a port that another's
//! killed etcd member was about to bind again.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
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
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            && claim(port)
        {
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

/// Where the claims of every process live.
fn claims_dir() -> PathBuf {
    std::env::temp_dir().join("tidegate-ports")
}

/// The claim files this process holds locked, for its whole life: the
/// kernel releases the locks when it ends, however it ends.
static CLAIMS: Mutex<BTreeMap<u16, File>> = Mutex::new(BTreeMap::new());

/// Claims `port` for this process: false if another live process holds
/// it. True also when claims cannot be made at all (the bind check alone
/// then, as before).
fn claim(port: u16) -> bool {
    let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    if claims.contains_key(&port) {
        return true;
    }
    let dir = claims_dir();
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    match claim_in(&dir, port) {
        Ok(Some(file)) => {
            claims.insert(port, file);
            true
        }
        Ok(None) => false,
        Err(_) => true,
    }
}

/// An exclusive lock on `dir/port`: `None` while another open file holds
/// it.
fn claim_in(dir: &Path, port: u16) -> std::io::Result<Option<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_port_is_not_claimed_again_until_its_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let held = claim_in(dir.path(), 10_001).unwrap();
        assert!(held.is_some());
        // Another holder (as another process would be) is refused.
        assert!(claim_in(dir.path(), 10_001).unwrap().is_none());
        assert!(claim_in(dir.path(), 10_002).unwrap().is_some());
        // A holder that ends lets the port go.
        drop(held);
        assert!(claim_in(dir.path(), 10_001).unwrap().is_some());
    }
}
