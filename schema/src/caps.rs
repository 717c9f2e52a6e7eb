//! Caps on open connections, shared by the controller's API and the
//! agents' HTTP entries: at most `max_total` at once and `max_per_source`
//! from one source, an IPv4 address or an IPv6 /64 (what one host is
//! usually given, so an attacker cannot spread over its own addresses).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// Which cap refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_total` connections were open.
    Total,
    /// `max_per_source` were open from the connection's source.
    PerSource,
}

/// Open connections, in all and per source.
#[derive(Debug)]
pub struct ConnectionCaps {
    max_total: usize,
    max_per_source: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl ConnectionCaps {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_source,
            open: Mutex::default(),
        })
    }

    /// Admits a connection from `source`, or says which cap it hit;
    /// `exempt_per_source` holds it to the total only (a peer that carries
    /// many clients' connections, such as another agent forwarding).
    pub fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        exempt_per_source: bool,
    ) -> Result<Slot, Refused> {
        let key = source_key(source);
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if o.total >= self.max_total {
            return Err(Refused::Total);
        }
        let from_source = o.by_source.get(&key).copied().unwrap_or(0);
        if from_source >= self.max_per_source && !exempt_per_source {
            return Err(Refused::PerSource);
        }
        o.total += 1;
        *o.by_source.entry(key).or_default() += 1;
        Ok(Slot {
            caps: self.clone(),
            key,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }

    /// Sources with a connection open now.
    pub fn sources(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_source
            .len()
    }
}

/// What a source is counted under: an IPv4 address (also when mapped into
/// IPv6) itself, an IPv6 address its /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        IpAddr::V4(_) => ip,
    }
}

/// One admitted connection's place; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    caps: Arc<ConnectionCaps>,
    key: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.caps.open.lock().unwrap_or_else(|e| e.into_inner());
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.by_source.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                o.by_source.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_in_all_and_per_source_and_free_on_drop() {
        let caps = ConnectionCaps::new(3, 2);
        let a: IpAddr = [198, 18, 0, 1].into();
        let b: IpAddr = [198, 18, 0, 2].into();
        let a1 = caps.admit(a, false).unwrap();
        let _a2 = caps.admit(a, false).unwrap();
        assert_eq!(caps.admit(a, false).err(), Some(Refused::PerSource));
        let _b1 = caps.admit(b, false).unwrap();
        assert_eq!(caps.admit(b, false).err(), Some(Refused::Total));
        drop(a1);
        assert_eq!(caps.open(), 2);
        assert!(caps.admit(a, false).is_ok());
        assert_eq!(caps.sources(), 2);
    }

    #[test]
    fn an_exempt_source_is_held_to_the_total_only() {
        let caps = ConnectionCaps::new(3, 1);
        let agent: IpAddr = [198, 18, 0, 9].into();
        let held: Vec<_> = (0..3).map(|_| caps.admit(agent, true).unwrap()).collect();
        assert_eq!(caps.admit(agent, true).err(), Some(Refused::Total));
        drop(held);
        assert_eq!((caps.open(), caps.sources()), (0, 0));
    }

    #[test]
    fn ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() {
        let caps = ConnectionCaps::new(10, 1);
        let one: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8:1:2:ffff::7".parse().unwrap();
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _x = caps.admit(one, false).unwrap();
        assert_eq!(caps.admit(same_64, false).err(), Some(Refused::PerSource));
        assert!(caps.admit(other_64, false).is_ok());
        let v4: IpAddr = [198, 18, 0, 1].into();
        let mapped: IpAddr = "::ffff:198.18.0.1".parse().unwrap();
        let _y = caps.admit(v4, false).unwrap();
        assert_eq!(caps.admit(mapped, false).err(), Some(Refused::PerSource));
    }
}
