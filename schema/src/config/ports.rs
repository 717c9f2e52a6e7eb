//! `tcp_ports`: the public TCP ports handed to instances, and what they must
//! stay clear of. The agents' eBPF `sk_lookup` runs before the kernel's own
//! socket lookup, so an instance given a daemon's port would receive that
//! daemon's traffic; and a port inside the ephemeral range can be taken by
//! any outgoing connection of the host.

use std::ops::RangeInclusive;

use super::{ConfigError, bad};

/// Ports tidegate's daemons and etcd listen on by default.
pub const DAEMON_PORTS: [(u16, &str); 4] = [
    (2379, "etcd's client port"),
    (2380, "etcd's peer port"),
    (7080, "the controller API"),
    (9464, "the agent's metrics"),
];

/// Linux's default ephemeral range (`net.ipv4.ip_local_port_range`).
pub const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32768..=60999;

/// This host's ephemeral port range, where outgoing connections take their
/// local ports (the default if it cannot be read).
pub fn ephemeral_ports() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some(it.next()??..=it.next()??)
        })
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// The ports of `urls` (`scheme://host:port`), for the `taken` list.
pub fn url_ports(urls: &[String]) -> Vec<u16> {
    urls.iter()
        .filter_map(|u| u.rsplit_once(':')?.1.trim_end_matches('/').parse().ok())
        .collect()
}

/// Parses `value` (`"20000-29999"`, inclusive, 1024-65535) and checks that
/// it holds none of [`DAEMON_PORTS`], none of `taken` (this config's own
/// listeners, named) and nothing of `ephemeral`.
pub fn tcp_port_range(
    value: &str,
    taken: &[(u16, String)],
    ephemeral: RangeInclusive<u16>,
) -> Result<RangeInclusive<u16>, ConfigError> {
    let (lo, hi) = value
        .split_once('-')
        .ok_or_else(|| bad("tcp_ports", "a range like 20000-29999"))?;
    let parse = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p >= 1024);
    let range = match (parse(lo), parse(hi)) {
        (Some(lo), Some(hi)) if lo <= hi => lo..=hi,
        _ => {
            return Err(bad(
                "tcp_ports",
                format!("{value:?} is not a range of ports 1024-65535"),
            ));
        }
    };
    let daemons = DAEMON_PORTS.iter().map(|(p, what)| (*p, what.to_string()));
    for (port, what) in daemons.chain(taken.iter().cloned()) {
        if range.contains(&port) {
            return Err(bad(
                "tcp_ports",
                format!(
                    "{value:?} holds port {port}, {what}: an instance would receive its traffic"
                ),
            ));
        }
    }
    if range.start() <= ephemeral.end() && ephemeral.start() <= range.end() {
        return Err(bad(
            "tcp_ports",
            format!(
                "{value:?} overlaps the ephemeral port range {}-{} (net.ipv4.ip_local_port_range), \
                 from which outgoing connections take their ports: move tcp_ports below {} or the \
                 ephemeral range above {}",
                ephemeral.start(),
                ephemeral.end(),
                ephemeral.start(),
                range.end()
            ),
        ));
    }
    Ok(range)
}
