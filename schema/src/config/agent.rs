//! The agent's config file (`deploy/agent.toml` documents every field).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError, EtcdAuth, EtcdTls, bad, check_etcd, check_http_limits, ephemeral_ports,
    tcp_port_range, url_ports,
};
use crate::keys::{DEFAULT_ROOT, Keyspace};
use crate::names::WorkerId;

impl AgentConfig {
    /// The HTTP proxy's worker threads: `http_threads`, or one per core
    /// this process may run on when it is 0.
    pub fn http_threads(&self) -> usize {
        match self.http_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(64)),
            n => n,
        }
    }
}

/// How TCP connections reach the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Steering {
    /// eBPF `sk_lookup` if it loads, else listeners (one log line says which).
    Auto,
    /// eBPF `sk_lookup` or the agent does not start.
    Ebpf,
    /// One listener bound per instance port.
    Listeners,
}

/// How bytes move between a player and the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPath {
    /// splice(2) through a kernel pipe per direction.
    Splice,
    /// In-kernel sockhash + `sk_skb` redirect (needs eBPF).
    Sockhash,
    /// Userspace copy (tokio).
    Copy,
}

impl Steering {
    const ALL: [(Steering, &'static str); 3] = [
        (Steering::Auto, "auto"),
        (Steering::Ebpf, "ebpf"),
        (Steering::Listeners, "listeners"),
    ];
}

impl DataPath {
    const ALL: [(DataPath, &'static str); 3] = [
        (DataPath::Splice, "splice"),
        (DataPath::Sockhash, "sockhash"),
        (DataPath::Copy, "copy"),
    ];
}

/// A name that is none of an enum's (a flag or environment value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a {what}: one of {}", names.join(", "))]
pub struct UnknownName {
    given: String,
    what: &'static str,
    names: Vec<&'static str>,
}

/// `Display` and `FromStr` of a lowercase enum from its `ALL` table.
macro_rules! named_enum {
    ($t:ty, $what:literal) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let name = Self::ALL
                    .iter()
                    .find(|(v, _)| v == self)
                    .map_or("?", |(_, n)| *n);
                f.write_str(name)
            }
        }

        impl FromStr for $t {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, UnknownName> {
                Self::ALL
                    .iter()
                    .find(|(_, n)| *n == s)
                    .map(|(v, _)| *v)
                    .ok_or_else(|| UnknownName {
                        given: s.to_string(),
                        what: $what,
                        names: Self::ALL.iter().map(|(_, n)| *n).collect(),
                    })
            }
        }
    };
}

named_enum!(Steering, "TCP steering");
named_enum!(DataPath, "TCP data path");

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This worker's id (a DNS label, unique in the cluster).
    pub worker_id: String,
    /// Address other agents use to reach this one.
    pub advertise_address: IpAddr,
    /// The HTTP entry point players' requests arrive on.
    pub http_entry: SocketAddr,
    /// The address whose ports the TCP redirector serves.
    pub tcp_host: IpAddr,
    /// The public TCP ports this agent serves for instances (the
    /// controllers' `tcp_ports`): a record naming another port is not
    /// routed. Below the ephemeral range, clear of the daemons' ports.
    pub tcp_ports: String,
    /// How many instances this worker runs at most (a cap beside the
    /// resources below).
    pub capacity: u32,
    /// Memory instances' limits may add up to, in MiB. Unset: the host's
    /// memory less `reserved_memory_mib`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocatable_memory_mib: Option<u64>,
    /// Memory kept for the host, the engine and the agent when
    /// `allocatable_memory_mib` is unset.
    pub reserved_memory_mib: u64,
    /// CPUs instances' limits may add up to. Unset: the host's cores times
    /// `cpu_overcommit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocatable_cpus: Option<f64>,
    /// How far CPU limits (ceilings on shared cores, not reservations) may
    /// add up past the cores when `allocatable_cpus` is unset; 1 gives each
    /// instance its cores for itself.
    pub cpu_overcommit: f64,
    /// Processes instances' limits may add up to. Unset: the kernel's
    /// `pid_max` less 4096 for the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocatable_pids: Option<u64>,
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// `[etcd_tls]`: CA of the etcd members and this daemon's client
    /// certificate; needed for `https://` endpoints.
    pub etcd_tls: Option<EtcdTls>,
    /// `[etcd_auth]`: etcd user and a file with its password.
    pub etcd_auth: Option<EtcdAuth>,
    /// Root of every key (as the controller's `key_root`).
    pub key_root: String,
    /// The Docker engine's socket.
    pub docker_socket: String,
    /// Pull images that are not present. Off where no registry is reachable.
    pub pull_images: bool,
    /// Run challenges with `read_only_rootfs = false` even where Docker
    /// cannot bound the writable layer (overlay2 on anything but xfs with
    /// `pquota`): an instance can then fill this worker's disk. Off by
    /// default: such a challenge's instances fail, naming this setting.
    pub allow_unbounded_rootfs: bool,
    /// Let instances open connections to this host's addresses (its
    /// daemons, etcd, anything listening on 0.0.0.0). Off by default: the
    /// agent keeps firewall rules dropping them (`TIDEGATE-HOST`) and
    /// starts no instance while it cannot, saying why.
    pub allow_host_access: bool,
    /// Run instances on a Docker engine without `userns-remap`, where root
    /// in a container is root on the host once it escapes. Off by default:
    /// such an agent starts no instance and says why.
    pub allow_host_root: bool,
    /// Networks egress instances may not open connections to (CIDRs; IPv4
    /// only, as the instance networks): where a cluster's own machines and
    /// a cloud's metadata service are.
    pub egress_deny: Vec<String>,
    /// Docker network of instances without egress (internal, no inter-container traffic).
    pub isolated_network: String,
    /// Docker network of instances whose spec sets `egress` (outbound allowed, no inter-container traffic).
    pub egress_network: String,
    /// Where the networks of instances with `services` come from: one /28
    /// of this IPv4 network per instance (a /17 holds 2,048), allocated by
    /// the agent so it knows how many are free. Agents sharing one Docker
    /// engine need disjoint ranges; keep it apart from the engine's
    /// `default-address-pools`.
    pub instance_networks: String,
    /// Extra label `tidegate.cluster=<value>` on every container (used by `deploy local`).
    pub cluster_label: Option<String>,
    /// How many times an exited container is restarted before its status is `failed`.
    pub max_restarts: u32,
    /// How often Docker's state is compared with the desired state, in milliseconds.
    pub reconcile_interval_ms: u64,
    /// How many instances one pass moves at once (their creates, starts and
    /// status writes; each instance's own steps stay in order), 1 to 64.
    pub reconcile_concurrency: usize,
    /// TTL of this worker's membership lease in seconds.
    pub membership_ttl_secs: i64,
    /// Where the Prometheus metrics are served.
    pub metrics_listen: SocketAddr,
    /// Worker threads of the HTTP proxy; 0 (the default) means one per
    /// core this process may run on.
    pub http_threads: usize,
    /// How HTTP/1.1 connections are served unless a challenge's spec says
    /// otherwise: `l7` (the default: every request routed by its own
    /// Host) or `pinned` (the first request's Host routes the whole
    /// connection, then its bytes are spliced; see docs/architecture.md,
    /// "Pinned HTTP", for why `l7` is the default).
    pub http_mode: crate::spec::HttpMode,
    /// Largest request body the proxy forwards, in bytes (413 above).
    pub max_body_bytes: u64,
    /// Largest request head (request line and headers), in bytes: counted
    /// as it arrives, the connection gets a 431 and is closed past it.
    pub max_header_bytes: usize,
    /// How long a request head may take to arrive, in milliseconds, from
    /// its first byte (from the accept for a connection's first request);
    /// the connection is closed after it.
    pub http_header_timeout_ms: u64,
    /// How long a kept-alive HTTP connection may stay idle between
    /// requests, in seconds.
    pub http_keepalive_timeout_secs: u64,
    /// HTTP connections this agent holds open at once; past it a new one
    /// gets a 503 and is closed.
    pub http_max_connections: usize,
    /// HTTP connections one source address may hold open at once; past it
    /// a new one gets a 503 and is closed.
    pub http_max_connections_per_source: usize,
    /// TCP connections one player address may hold open through this
    /// agent at once; past it a new one is closed at accept.
    pub tcp_max_connections_per_source: u32,
    /// TCP connections one instance may have open through this agent at
    /// once; past it a new one is closed at accept.
    pub tcp_max_connections_per_instance: u32,
    /// How long connecting to an instance may take, in milliseconds (504 after).
    pub upstream_connect_timeout_ms: u64,
    /// How long an instance may stay silent mid-request, in milliseconds (504 after).
    pub upstream_read_timeout_ms: u64,
    /// File with the cluster's hop key: at least 32 bytes (a trailing
    /// newline is not part of it), the same on every agent, readable by the
    /// agent only. Requests and connections one agent forwards to another
    /// carry an HMAC made with it; without a valid one the owner serves
    /// them as players' (the edge policy is asked again). Unset: a key of
    /// this agent's own, so no forwarded hop is trusted.
    pub hop_key_file: Option<PathBuf>,
    /// File with the scrape token (at least 16 bytes; a trailing newline is
    /// not part of it). Per-instance series on `/metrics` and `/activity`
    /// name instances, and an instance's id is its hostname: they are
    /// served only to `Authorization: Bearer <token>` (Prometheus'
    /// `bearer_token_file`, the controllers' `scrape_token_file`). Others
    /// get the agent's own series only. Unset: per-instance data is served
    /// to no one, and `on-idle` policies keep this worker's instances.
    pub scrape_token_file: Option<PathBuf>,
    /// Optional TLS entry point (HTTP/1.1 and HTTP/2) with a wildcard certificate.
    pub https_entry: Option<SocketAddr>,
    /// PEM certificate chain for `https_entry` and `tls_tcp_entry`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `https_entry` and `tls_tcp_entry`.
    pub tls_key: Option<PathBuf>,
    /// Optional entry point for TCP over TLS: the agent terminates TLS with
    /// `tls_cert` and routes by SNI (`{instance}-{port name}.{domain}`, the
    /// `tls_hostname` the API gives for each TCP port) to that TCP port of
    /// the instance, in plaintext. One port (e.g. 443 on an address of its
    /// own) for every TCP challenge, for players behind strict firewalls.
    pub tls_tcp_entry: Option<SocketAddr>,
    /// How TCP connections reach the agent: `auto` (eBPF sk_lookup if it
    /// loads, else one listener per port, said in one log line), `ebpf`
    /// (refuse to start without it) or `listeners`.
    pub tcp_steering: Steering,
    /// How TCP bytes move: `splice` (splice(2) through a pipe per direction,
    /// the default), `sockhash` (in-kernel redirect; no backpressure, see
    /// docs/architecture.md) or `copy` (userspace copy).
    pub tcp_data_path: DataPath,
    /// Pipe size per direction of the splice path, in bytes: what one
    /// direction of one connection holds in flight at most.
    pub tcp_pipe_bytes: usize,
    /// The artifact store of policy plugins (the same directory the
    /// controllers write; a shared mount across machines). Blobs are
    /// verified against their digest when read.
    pub artifact_dir: PathBuf,
    /// Where the agent keeps the flag files of instances whose challenge
    /// sets `flag.file` (`{flag_dir}/{cluster_label}/{worker}/{instance}/flag`,
    /// bind-mounted read-only into the containers; directories 0711, files
    /// 0444). The agent's user must be able to write it (the deploy makes it
    /// and lists it in the unit's ReadWritePaths).
    pub flag_dir: PathBuf,
    /// How long one `admit-connection` call may run, in milliseconds.
    pub plugin_deadline_ms: u64,
    /// How much memory one policy hook call may use, in MiB.
    pub plugin_memory_mib: usize,
    /// Threads that run `admit-connection` calls (none of the runtime's or
    /// the HTTP proxy's), and how many decisions may wait for one; past
    /// that the challenge's `policy_fallback` applies at once.
    pub edge_policy_threads: usize,
    pub edge_policy_queue: usize,
    /// CPU time those threads may use together, as a share of one core
    /// (0.01 to 64); past it the fallback applies until it refills.
    pub edge_policy_cpu_share: f64,
    /// How long an edge decision is reused for the same instance, player
    /// address and host, in milliseconds (0: every request is asked).
    pub edge_decision_cache_ms: u64,
}

impl AgentConfig {
    /// This agent's flag files: `{flag_dir}/{cluster_label}/{worker_id}`
    /// (clusters and workers sharing a host keep apart).
    pub fn worker_flag_dir(&self) -> PathBuf {
        let mut dir = self.flag_dir.clone();
        if let Some(label) = &self.cluster_label {
            dir.push(label);
        }
        dir.join(&self.worker_id)
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            worker_id: super::hostname()
                .map(|h| h.to_ascii_lowercase())
                .unwrap_or_else(|| "worker".into()),
            advertise_address: IpAddr::from([127, 0, 0, 1]),
            http_entry: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tcp_host: IpAddr::from([127, 0, 0, 1]),
            tcp_ports: "20000-29999".into(),
            capacity: 32,
            allocatable_memory_mib: None,
            reserved_memory_mib: 1024,
            allocatable_cpus: None,
            cpu_overcommit: 8.0,
            allocatable_pids: None,
            etcd: vec!["http://127.0.0.1:2379".into()],
            etcd_tls: None,
            etcd_auth: None,
            key_root: DEFAULT_ROOT.into(),
            docker_socket: "unix:///var/run/docker.sock".into(),
            pull_images: true,
            allow_unbounded_rootfs: false,
            allow_host_access: false,
            allow_host_root: false,
            egress_deny: [
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "169.254.0.0/16",
            ]
            .map(String::from)
            .to_vec(),
            isolated_network: "tidegate-isolated".into(),
            egress_network: "tidegate-egress".into(),
            instance_networks: "198.19.128.0/17".into(),
            cluster_label: None,
            max_restarts: 5,
            reconcile_concurrency: 8,
            reconcile_interval_ms: 500,
            membership_ttl_secs: 10,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            http_threads: 0,
            http_mode: crate::spec::HttpMode::L7,
            max_body_bytes: 10 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            http_header_timeout_ms: 10_000,
            http_keepalive_timeout_secs: 60,
            http_max_connections: 16_384,
            http_max_connections_per_source: 256,
            tcp_max_connections_per_source: 256,
            tcp_max_connections_per_instance: 1024,
            upstream_connect_timeout_ms: 3000,
            upstream_read_timeout_ms: 60_000,
            https_entry: None,
            hop_key_file: None,
            scrape_token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_tcp_entry: None,
            tcp_steering: Steering::Auto,
            tcp_data_path: DataPath::Splice,
            tcp_pipe_bytes: 1024 * 1024,
            artifact_dir: PathBuf::from("/var/lib/tidegate/artifacts"),
            flag_dir: PathBuf::from("/var/lib/tidegate/flags"),
            plugin_deadline_ms: 5,
            plugin_memory_mib: 32,
            edge_policy_threads: 2,
            edge_policy_queue: 64,
            edge_policy_cpu_share: 0.5,
            edge_decision_cache_ms: 1000,
        }
    }
}

impl AgentConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        WorkerId::parse(&self.worker_id).map_err(|e| bad("worker_id", e.to_string()))?;
        if self.capacity == 0 {
            return Err(bad("capacity", "at least 1"));
        }
        if self.allocatable_memory_mib.is_some_and(|m| m < 16) {
            return Err(bad("allocatable_memory_mib", "at least 16 (MiB)"));
        }
        if self
            .allocatable_cpus
            .is_some_and(|c| !c.is_finite() || c < 0.01)
        {
            return Err(bad("allocatable_cpus", "at least 0.01"));
        }
        if !self.cpu_overcommit.is_finite() || !(0.1..=1000.0).contains(&self.cpu_overcommit) {
            return Err(bad("cpu_overcommit", "from 0.1 to 1000"));
        }
        if self.allocatable_pids.is_some_and(|p| p < 16) {
            return Err(bad("allocatable_pids", "at least 16"));
        }
        if !(1..=64).contains(&self.reconcile_concurrency) {
            return Err(bad("reconcile_concurrency", "from 1 to 64"));
        }
        if self.http_entry.port() == 0 {
            return Err(bad("http_entry", "needs a port"));
        }
        check_etcd(&self.etcd, self.etcd_tls.as_ref())?;
        self.tcp_port_range()?;
        Keyspace::new(&self.key_root).map_err(|e| bad("key_root", e.to_string()))?;
        if !self.docker_socket.starts_with("unix://") {
            return Err(bad("docker_socket", "a unix:// socket path"));
        }
        for (field, name) in [
            ("isolated_network", &self.isolated_network),
            ("egress_network", &self.egress_network),
        ] {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(bad(field, "a Docker network name"));
            }
        }
        for (i, cidr) in self.egress_deny.iter().enumerate() {
            if !is_ipv4_cidr(cidr) {
                return Err(bad(
                    "egress_deny",
                    format!(
                        "entry {i}: {cidr:?} is not an IPv4 network like 10.0.0.0/8 (no host bits set)"
                    ),
                ));
            }
        }
        match self.instance_networks.split_once('/') {
            Some((_, len)) if is_ipv4_cidr(&self.instance_networks) => {
                if !len.parse::<u32>().is_ok_and(|n| (8..=28).contains(&n)) {
                    return Err(bad(
                        "instance_networks",
                        "a network of /8 to /28 (each instance takes a /28)",
                    ));
                }
            }
            _ => {
                return Err(bad(
                    "instance_networks",
                    format!(
                        "{:?} is not an IPv4 network like 198.19.128.0/17 (no host bits set)",
                        self.instance_networks
                    ),
                ));
            }
        }
        if self.isolated_network == self.egress_network {
            return Err(bad("egress_network", "must differ from isolated_network"));
        }
        if !(50..=60_000).contains(&self.reconcile_interval_ms) {
            return Err(bad("reconcile_interval_ms", "50 to 60000"));
        }
        if !(2..=300).contains(&self.membership_ttl_secs) {
            return Err(bad("membership_ttl_secs", "2 to 300"));
        }
        if self.http_threads > 64 {
            return Err(bad("http_threads", "0 (one per core) to 64"));
        }
        check_http_limits(
            ("max_header_bytes", self.max_header_bytes),
            self.http_header_timeout_ms,
            self.http_max_connections,
            self.http_max_connections_per_source,
        )?;
        if !(1..=3600).contains(&self.http_keepalive_timeout_secs) {
            return Err(bad("http_keepalive_timeout_secs", "1 to 3600"));
        }
        if self.tcp_max_connections_per_source == 0 {
            return Err(bad("tcp_max_connections_per_source", "at least 1"));
        }
        if self.tcp_max_connections_per_instance == 0 {
            return Err(bad("tcp_max_connections_per_instance", "at least 1"));
        }
        if self.upstream_connect_timeout_ms == 0 || self.upstream_read_timeout_ms == 0 {
            return Err(bad("upstream_read_timeout_ms", "timeouts must be above 0"));
        }
        if !(1..=1000).contains(&self.plugin_deadline_ms) {
            return Err(bad("plugin_deadline_ms", "1 to 1000"));
        }
        if !(1..=64).contains(&self.edge_policy_threads) {
            return Err(bad("edge_policy_threads", "1 to 64"));
        }
        if !(1..=65_536).contains(&self.edge_policy_queue) {
            return Err(bad("edge_policy_queue", "1 to 65536"));
        }
        if !(0.01..=64.0).contains(&self.edge_policy_cpu_share) {
            return Err(bad("edge_policy_cpu_share", "0.01 to 64 (cores)"));
        }
        if self.edge_decision_cache_ms > 60_000 {
            return Err(bad("edge_decision_cache_ms", "0 to 60000"));
        }
        if !(1..=1024).contains(&self.plugin_memory_mib) {
            return Err(bad("plugin_memory_mib", "1 to 1024"));
        }
        if !(4096..=64 * 1024 * 1024).contains(&self.tcp_pipe_bytes) {
            return Err(bad("tcp_pipe_bytes", "4096 to 67108864"));
        }
        if self.tcp_data_path == DataPath::Sockhash && self.tcp_steering == Steering::Listeners {
            return Err(bad(
                "tcp_data_path",
                "sockhash needs eBPF; set tcp_steering to auto or ebpf",
            ));
        }
        if self.tcp_steering != Steering::Listeners && self.tcp_host.is_ipv6() {
            return Err(bad(
                "tcp_host",
                "eBPF steering serves IPv4 only; use an IPv4 address or tcp_steering = \"listeners\"",
            ));
        }
        if let Some(p) = &self.hop_key_file
            && !p.exists()
        {
            return Err(bad(
                "hop_key_file",
                format!("{} does not exist", p.display()),
            ));
        }
        for (entry, set) in [
            ("https_entry", self.https_entry.is_some()),
            ("tls_tcp_entry", self.tls_tcp_entry.is_some()),
        ] {
            if !set {
                continue;
            }
            for (field, path) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
                match path {
                    Some(p) if p.exists() => {}
                    Some(p) => return Err(bad(field, format!("{} does not exist", p.display()))),
                    None => return Err(bad(field, format!("required with {entry}"))),
                }
            }
        }
        Ok(())
    }

    /// Where the leader can reach this agent's `/activity` (for `on-idle`
    /// policies): the metrics listener, with the advertised address when it
    /// listens on all addresses; none when it listens on loopback while
    /// other machines would have to reach it (then `on-idle` keeps this
    /// worker's instances, and the agent says so at start).
    pub fn activity_address(&self) -> Option<SocketAddr> {
        let ip = self.metrics_listen.ip();
        if ip.is_unspecified() {
            Some(SocketAddr::new(
                self.advertise_address,
                self.metrics_listen.port(),
            ))
        } else if ip.is_loopback() && !self.advertise_address.is_loopback() {
            None
        } else {
            Some(self.metrics_listen)
        }
    }

    /// `tcp_ports` parsed, checked against the daemons' ports, this agent's
    /// own listeners, the etcd endpoints and this host's ephemeral range.
    pub fn tcp_port_range(&self) -> Result<RangeInclusive<u16>, ConfigError> {
        let mut taken = vec![
            (
                self.http_entry.port(),
                "this agent's http_entry".to_string(),
            ),
            (
                self.metrics_listen.port(),
                "this agent's metrics_listen".into(),
            ),
        ];
        for (entry, what) in [
            (self.https_entry, "this agent's https_entry"),
            (self.tls_tcp_entry, "this agent's tls_tcp_entry"),
        ] {
            taken.extend(entry.map(|e| (e.port(), what.to_string())));
        }
        taken.extend(
            url_ports(&self.etcd)
                .into_iter()
                .map(|p| (p, "an etcd endpoint".into())),
        );
        tcp_port_range(&self.tcp_ports, &taken, ephemeral_ports())
    }

    /// The worker id, parsed.
    pub fn worker(&self) -> Result<WorkerId, ConfigError> {
        WorkerId::parse(&self.worker_id).map_err(|e| bad("worker_id", e.to_string()))
    }
}

/// `a.b.c.d/n` with n at most 32.
/// `a.b.c.d/n` with no host bits set (iptables stores the network
/// address; anything else would never match the rule the agent checks).
fn is_ipv4_cidr(s: &str) -> bool {
    s.split_once('/').is_some_and(|(ip, len)| {
        let (Ok(ip), Ok(n)) = (ip.parse::<std::net::Ipv4Addr>(), len.parse::<u32>()) else {
            return false;
        };
        let mask = u32::MAX.checked_shl(32 - n.min(32)).unwrap_or(0);
        n <= 32 && u32::from(ip) & !mask == 0
    })
}
