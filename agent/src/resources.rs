//! What this worker gives instances (`allocatable` in its membership
//! record): the configured amounts, else what the host has less a reserve.

use tidegate_schema::Resources;
use tidegate_schema::config::AgentConfig;

/// Processes kept for the host when `allocatable_pids` is unset.
const RESERVED_PIDS: u64 = 4096;

/// What the host has, as read from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    pub memory_mib: u64,
    pub cores: u64,
    pub pid_max: u64,
}

impl Host {
    /// Reads `/proc/meminfo`, the CPUs this process may use and
    /// `kernel.pid_max`; what cannot be read counts as 0 (and is then
    /// placed on only when configured).
    pub fn read() -> Self {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Self {
            memory_mib: memory_kib / 1024,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get() as u64),
            pid_max,
        }
    }
}

/// The worker's allocatable resources under `cfg` on `host`.
pub fn allocatable(cfg: &AgentConfig, host: Host) -> Resources {
    Resources {
        memory_mib: cfg
            .allocatable_memory_mib
            .unwrap_or_else(|| host.memory_mib.saturating_sub(cfg.reserved_memory_mib)),
        millicpus: cfg.allocatable_cpus.map_or_else(
            || (host.cores as f64 * cfg.cpu_overcommit * 1000.0).round() as u64,
            |c| (c * 1000.0).round() as u64,
        ),
        pids: cfg
            .allocatable_pids
            .unwrap_or_else(|| host.pid_max.saturating_sub(RESERVED_PIDS)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: Host = Host {
        memory_mib: 24 * 1024,
        cores: 2,
        pid_max: 4_194_304,
    };

    #[test]
    fn defaults_are_the_host_less_a_reserve_with_cpu_overcommitted() {
        let got = allocatable(&AgentConfig::default(), HOST);
        assert_eq!(
            got,
            Resources {
                memory_mib: 23 * 1024,
                millicpus: 16_000,
                pids: 4_194_304 - 4096,
            }
        );
    }

    #[test]
    fn configured_amounts_win() {
        let cfg = AgentConfig {
            allocatable_memory_mib: Some(1024),
            allocatable_cpus: Some(1.5),
            allocatable_pids: Some(500),
            ..AgentConfig::default()
        };
        assert_eq!(
            allocatable(&cfg, HOST),
            Resources {
                memory_mib: 1024,
                millicpus: 1500,
                pids: 500,
            }
        );
    }

    #[test]
    fn a_small_host_has_nothing_past_its_reserve() {
        let tiny = Host {
            memory_mib: 512,
            ..HOST
        };
        assert_eq!(allocatable(&AgentConfig::default(), tiny).memory_mib, 0);
    }

    #[test]
    fn this_host_reads() {
        let host = Host::read();
        assert!(
            host.memory_mib > 0 && host.cores > 0 && host.pid_max > 0,
            "{host:?}"
        );
    }
}
