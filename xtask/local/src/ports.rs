//! Free loopback TCP ports for test servers.
//!
//! Ports are drawn at random from 10000–19999: below the kernel's
//! ephemeral range (32768–60999 by default), so no outgoing connection of
//! a busy test run can take a port between the moment it is chosen and
//! the moment its server binds it, and below the instances' `tcp_ports`
//! (20000–29999).
//!
//! A port is also claimed for the whole life of the process that chose
//! it, across processes (a file per port naming the process): nextest runs
//! each test in a process of its own, and one test took a port that
//! another's killed etcd member was about to bind again.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
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
        if given.contains(&port) || !claim(port) {
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

/// Where the claims of every process live.
fn claims_dir() -> PathBuf {
    std::env::temp_dir().join("tidegate-ports")
}

/// Claims `port` for this process: false if a live process other than
/// this one holds it. A claim of a process that is gone is taken over.
fn claim(port: u16) -> bool {
    let dir = claims_dir();
    if std::fs::create_dir_all(&dir).is_err() {
        // No claims possible: the bind check alone, as before.
        return true;
    }
    let path = dir.join(port.to_string());
    let me = std::process::id();
    for _ in 0..2 {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(mut f) => return write!(f, "{me}").is_ok(),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let owner = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                match owner {
                    Some(pid) if pid == me => return true,
                    Some(pid) if std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                        return false;
                    }
                    // Its owner is gone (or it is being written: the
                    // next attempt sees it whole or takes it).
                    _ => {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
            Err(_) => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_claimed_by_a_live_process_is_not_given_and_a_dead_ones_is() {
        // Port 0 is outside the range: no test server is ever given it.
        let port = 0;
        let path = claims_dir().join(port.to_string());
        std::fs::create_dir_all(claims_dir()).unwrap();
        // pid 1 is always alive.
        std::fs::write(&path, "1").unwrap();
        assert!(!claim(port));
        // A pid above the kernel's maximum is never alive.
        std::fs::write(&path, "4294967295").unwrap();
        assert!(claim(port));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            std::process::id().to_string()
        );
        assert!(claim(port), "its own claim");
        let _ = std::fs::remove_file(&path);
    }
}
