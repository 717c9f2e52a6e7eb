//! `cargo xtask deploy --inventory FILE`: a cluster on real hosts over SSH.
//!
//! Builds the daemons (the agent embeds the eBPF object), makes the
//! cluster's secrets and etcd PKI once (kept beside the inventory in
//! `.<name>.deploy/`), renders every host's files (binaries, TOML configs,
//! etcd config, certificates, systemd units), copies only what differs from
//! what the host has (by SHA-256), and (re)starts only the services whose
//! files changed or that are not running: etcd, then auth, then the
//! controllers, then the agents; then it checks health. A second run with
//! nothing changed touches nothing and says so. `--dry-run` prints every
//! step and contacts no host. `--down` stops the services (`--purge` also
//! removes what deploy installed, etcd's data included).
//!
//! `init = "direct"` (in the inventory) runs the services without systemd,
//! from the same command lines as the units, with the same capability
//! bounding sets (via setpriv): for hosts without an init system, e.g. the
//! network-namespace hosts of this repository's test.

mod apply;
mod cluster;
mod down;
mod dry_run;
mod plan;
mod secrets;
mod services;
mod ssh;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// `cargo xtask deploy --inventory FILE [--dry-run | --down [--purge]]`.
pub(crate) fn run(inventory: &Path, args: &InventoryArgs) -> Result<()> {
    let inv = Inventory::load(inventory)?;
    let state = secrets::state_dir(inventory, &inv);
    if args.dry_run {
        dry_run::print(&inv, &state, args)
    } else if args.down {
        down::down(&inv, args.purge)
    } else {
        apply::apply(&inv, &state, &args.profile)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Inventory {
    /// Cluster name: etcd's cluster token and the state directory's name.
    name: String,
    /// Wildcard domain of instance hostnames (`*.domain` points at the load balancer).
    domain: String,
    /// Port players use for HTTP (on the load balancer).
    #[serde(default = "default_public_http_port")]
    public_http_port: u16,
    /// Public TCP ports handed to instances.
    #[serde(default = "default_tcp_ports")]
    tcp_ports: String,
    #[serde(default)]
    ssh: Ssh,
    /// `systemd` (default) or `direct` (no init system: see the module docs).
    #[serde(default)]
    init: Init,
    /// Prefix of every path deploy writes on a host (default `/`); a host's
    /// own `root` overrides it. Tests give each host a directory.
    #[serde(default = "default_root")]
    root: PathBuf,
    /// The policy plugins' artifact store: the same directory on every
    /// controller and agent host (a shared mount), not under `root`.
    #[serde(default = "default_artifact_dir")]
    artifact_dir: PathBuf,
    /// Register the demo challenges (and copy their images to agents that lack them).
    #[serde(default = "default_true")]
    demo: bool,
    #[serde(default)]
    ports: Ports,
    /// Let instances open connections to their agent's host (each agent's
    /// `allow_host_access`). Off: agents keep the host firewall. Only for
    /// hosts that share one Docker engine from network namespaces of their
    /// own (the deploy tests), where an agent cannot see the engine's
    /// bridges to firewall them.
    #[serde(default)]
    allow_host_access: bool,
    #[serde(rename = "host")]
    hosts: Vec<Host>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ssh {
    #[serde(default = "default_ssh_user")]
    user: String,
    #[serde(default = "default_ssh_port")]
    port: u16,
    /// Private key file (default: ssh's own choice).
    identity: Option<PathBuf>,
    /// Extra `ssh` options, e.g. `["-o", "StrictHostKeyChecking=accept-new"]`.
    #[serde(default)]
    options: Vec<String>,
}

impl Default for Ssh {
    fn default() -> Self {
        Self {
            user: default_ssh_user(),
            port: default_ssh_port(),
            identity: None,
            options: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Init {
    #[default]
    Systemd,
    Direct,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Ports {
    api: u16,
    http: u16,
    metrics: u16,
    etcd_client: u16,
    etcd_peer: u16,
    /// etcd's plain-http `/metrics` (`listen-metrics-urls`), read by the
    /// controllers.
    etcd_metrics: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            api: 7080,
            http: 80,
            metrics: 9464,
            etcd_client: 2379,
            etcd_peer: 2380,
            etcd_metrics: 2381,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Host {
    /// A DNS label: etcd member name, controller id, worker id.
    name: String,
    /// Where SSH, peers, the load balancer and Prometheus reach it.
    address: IpAddr,
    /// Failure domain; etcd members should each be in their own.
    zone: String,
    roles: Vec<Role>,
    root: Option<PathBuf>,
    /// Instances this worker runs at most (agents).
    #[serde(default = "default_capacity")]
    capacity: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    Etcd,
    Controller,
    Agent,
}

fn default_public_http_port() -> u16 {
    80
}
fn default_tcp_ports() -> String {
    "20000-29999".into()
}
fn default_root() -> PathBuf {
    PathBuf::from("/")
}
fn default_artifact_dir() -> PathBuf {
    PathBuf::from("/var/lib/tidegate/artifacts")
}
fn default_true() -> bool {
    true
}
fn default_ssh_user() -> String {
    "root".into()
}
fn default_ssh_port() -> u16 {
    22
}
fn default_capacity() -> u32 {
    32
}

#[derive(Debug, clap::Args)]
pub(crate) struct InventoryArgs {
    /// Print every step; build nothing, contact no host.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Stop every service (agents, controllers, etcd).
    #[arg(long)]
    pub(crate) down: bool,
    /// With --down: also remove what deploy installed, etcd's data included.
    #[arg(long, requires = "down")]
    pub(crate) purge: bool,
    /// Cargo profile of the binaries (release for production; the test uses dev).
    #[arg(long, default_value = "release")]
    pub(crate) profile: String,
}

impl Inventory {
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("inventory {}", path.display()))?;
        let inv: Inventory =
            toml::from_str(&text).with_context(|| format!("inventory {}", path.display()))?;
        inv.validate()
            .with_context(|| format!("inventory {}", path.display()))?;
        Ok(inv)
    }

    fn validate(&self) -> Result<()> {
        let label = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        };
        if !label(&self.name) {
            bail!(
                "name {:?}: a DNS label (a-z, 0-9, -; at most 63)",
                self.name
            );
        }
        if self.hosts.is_empty() {
            bail!("no [[host]]");
        }
        let mut names = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for h in &self.hosts {
            if !label(&h.name) {
                bail!("host {:?}: name must be a DNS label (a-z, 0-9, -)", h.name);
            }
            if !names.insert(&h.name) {
                bail!("host {:?} is listed twice", h.name);
            }
            if !addrs.insert(h.address) {
                bail!("host {}: address {} is used twice", h.name, h.address);
            }
            if h.roles.is_empty() {
                bail!("host {}: roles is empty (etcd, controller, agent)", h.name);
            }
            if h.zone.is_empty() {
                bail!("host {}: zone is empty", h.name);
            }
        }
        let etcd = self.with_role(Role::Etcd);
        if etcd.len().is_multiple_of(2) {
            bail!(
                "{} etcd members: use an odd number (3 across three zones tolerates one zone down)",
                etcd.len()
            );
        }
        let zones: BTreeSet<_> = etcd.iter().map(|h| &h.zone).collect();
        if zones.len() < etcd.len() {
            eprintln!(
                "warning: etcd members share zones ({zones:?}): losing one zone may lose quorum"
            );
        }
        if self.with_role(Role::Controller).is_empty() {
            bail!("no host has the controller role");
        }
        if self.with_role(Role::Agent).is_empty() {
            bail!("no host has the agent role");
        }
        if !self.artifact_dir.is_absolute() {
            bail!(
                "artifact_dir {}: an absolute path",
                self.artifact_dir.display()
            );
        }
        Ok(())
    }

    fn with_role(&self, role: Role) -> Vec<&Host> {
        self.hosts
            .iter()
            .filter(|h| h.roles.contains(&role))
            .collect()
    }

    fn root_of(&self, h: &Host) -> PathBuf {
        h.root.clone().unwrap_or_else(|| self.root.clone())
    }
}

/// A path on a host under its root.
fn at(root: &Path, path: &str) -> String {
    root.join(path.trim_start_matches('/'))
        .display()
        .to_string()
}

/// Single-quotes `s` for a POSIX shell.
fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn etcd_urls(inv: &Inventory, port: u16) -> Vec<String> {
    inv.with_role(Role::Etcd)
        .iter()
        .map(|h| format!("https://{}:{port}", url_host(h.address)))
        .collect()
}

/// Every member's metrics URL (plain http: numbers only, no keys).
fn etcd_metrics_urls(inv: &Inventory) -> Vec<String> {
    inv.with_role(Role::Etcd)
        .iter()
        .map(|h| format!("http://{}:{}", url_host(h.address), inv.ports.etcd_metrics))
        .collect()
}

fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}
