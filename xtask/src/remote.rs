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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::sh::http;

/// The inventory file: the cluster and its hosts.
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
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            api: 7080,
            http: 80,
            metrics: 9464,
            etcd_client: 2379,
            etcd_peer: 2380,
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
pub(crate) struct RemoteArgs {
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

// ---------------------------------------------------------------- secrets, PKI

/// What is generated once per cluster and kept on the deploying machine.
#[derive(Debug, serde::Serialize, Deserialize)]
struct Secrets {
    admin_token: String,
    platform_token: String,
    flag_secret: String,
    etcd_root_password: String,
    etcd_controller_password: String,
    etcd_agent_password: String,
}

impl Secrets {
    /// What the dry run and tests render configs with.
    fn placeholders() -> Self {
        Self {
            admin_token: "<admin token>".into(),
            platform_token: "<platform token>".into(),
            flag_secret: "<flag secret>".into(),
            etcd_root_password: "<password>".into(),
            etcd_controller_password: "<password>".into(),
            etcd_agent_password: "<password>".into(),
        }
    }
}

fn random_secret() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// `.<name>.deploy/` beside the inventory.
fn state_dir(inventory: &Path, inv: &Inventory) -> PathBuf {
    inventory
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!(".{}.deploy", inv.name))
}

fn secrets(dir: &Path) -> Result<Secrets> {
    let path = dir.join("secrets.toml");
    if let Ok(text) = std::fs::read_to_string(&path) {
        return toml::from_str(&text).with_context(|| path.display().to_string());
    }
    let s = Secrets {
        admin_token: random_secret(),
        platform_token: random_secret(),
        flag_secret: random_secret(),
        etcd_root_password: random_secret(),
        etcd_controller_password: random_secret(),
        etcd_agent_password: random_secret(),
    };
    write_private(&path, toml::to_string(&s)?.as_bytes())?;
    println!(
        "made the cluster's tokens and passwords: {}",
        path.display()
    );
    Ok(s)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| path.display().to_string())?;
    f.write_all(bytes)?;
    Ok(())
}

fn openssl(args: &[&str], dir: &Path) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The etcd CA, one certificate per member (server and peer, SANs = its
/// name and address) and client certificates for root, the controllers
/// and the agents (CN = the etcd user). Made once; a member added to the
/// inventory later gets its certificate on the next run.
fn pki(dir: &Path, inv: &Inventory) -> Result<PathBuf> {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    if !pki.join("ca.pem").exists() {
        let subject = format!("/CN=tidegate {} etcd CA", inv.name);
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
            "-days",
            "3650",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&args, &pki)?;
        println!("made the etcd CA: {}", pki.join("ca.pem").display());
    }
    for (name, san, usage) in certificates(inv) {
        if pki.join(format!("{name}.pem")).exists() {
            continue;
        }
        let cn = name
            .strip_prefix("client-")
            .or_else(|| name.strip_prefix("member-"))
            .unwrap_or(&name)
            .to_string();
        let ext = format!(
            "{san}\nextendedKeyUsage={usage}\nkeyUsage=critical,digitalSignature,keyEncipherment\nbasicConstraints=critical,CA:FALSE\n"
        );
        std::fs::write(pki.join(format!("{name}.ext")), ext)?;
        let (key, csr, pem, extfile) = (
            format!("{name}-key.pem"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        let subject = format!("/CN={cn}");
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
        openssl(&args, &pki)?;
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "825",
                "-extfile",
                &extfile,
            ],
            &pki,
        )?;
    }
    Ok(pki)
}

/// The certificates besides the CA: `(file stem, SANs, extended key usage)`.
/// One per etcd member (server and peer), one per etcd user (client).
fn certificates(inv: &Inventory) -> Vec<(String, String, &'static str)> {
    let mut certs: Vec<(String, String, &'static str)> = inv
        .with_role(Role::Etcd)
        .iter()
        .map(|h| {
            // 127.0.0.1 too: etcdctl on the member (backups) uses loopback.
            let san = format!(
                "subjectAltName=DNS:{},DNS:localhost,IP:{},IP:127.0.0.1",
                h.name, h.address
            );
            (format!("member-{}", h.name), san, "serverAuth,clientAuth")
        })
        .collect();
    for user in ["root", "tidegate-controller", "tidegate-agent"] {
        certs.push((
            format!("client-{user}"),
            format!("subjectAltName=DNS:{user}"),
            "clientAuth",
        ));
    }
    certs
}

// ---------------------------------------------------------------- services

/// One service: its unit, and the same command line for `init = "direct"`.
struct Service {
    /// `tidegate-etcd`, `tidegate-controller`, `tidegate-agent`.
    name: &'static str,
    description: &'static str,
    exec: Vec<String>,
    user: &'static str,
    groups: &'static [&'static str],
    /// Capabilities kept (bounding and ambient set); empty: none.
    caps: &'static [&'static str],
    /// Paths the service writes (everything else is read-only to it).
    writes: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
    after: &'static str,
    notify: bool,
}

/// The agent's capabilities: attach eBPF sk_lookup (BPF, NET_ADMIN) and
/// bind a privileged HTTP port. Docker is reached through the socket
/// (group docker, which is root-equivalent: see deploy/README.md).
const AGENT_CAPS: &[&str] = &["CAP_BPF", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"];

impl Service {
    fn unit(&self) -> String {
        let mut u = String::new();
        let _ = writeln!(
            u,
            "# Written by `cargo xtask deploy`; changes here are replaced on the next run.\n[Unit]\nDescription={}\nDocumentation=https://example.invalid/tidegate/deploy/README.md\nWants=network-online.target\nAfter=network-online.target {}\n\n[Service]",
            self.description, self.after
        );
        let _ = writeln!(u, "Type={}", if self.notify { "notify" } else { "exec" });
        let _ = writeln!(u, "User={}", self.user);
        if !self.groups.is_empty() {
            let _ = writeln!(u, "SupplementaryGroups={}", self.groups.join(" "));
        }
        for (k, v) in &self.env {
            let _ = writeln!(u, "Environment={k}={v}");
        }
        let _ = writeln!(u, "ExecStart={}", self.exec.join(" "));
        let _ = writeln!(
            u,
            "Restart=always\nRestartSec=2\nLimitNOFILE=1048576\nTimeoutStopSec=30"
        );
        let _ = writeln!(u, "CapabilityBoundingSet={}", self.caps.join(" "));
        if !self.caps.is_empty() {
            let _ = writeln!(u, "AmbientCapabilities={}", self.caps.join(" "));
        }
        let _ = writeln!(
            u,
            "NoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\nProtectKernelModules=yes\nProtectControlGroups=yes\nRestrictSUIDSGID=yes\nLockPersonality=yes"
        );
        if !self.writes.is_empty() {
            let _ = writeln!(u, "ReadWritePaths={}", self.writes.join(" "));
        }
        let _ = writeln!(u, "\n[Install]\nWantedBy=multi-user.target");
        u
    }

    /// The `init = "direct"` command: the unit's command line under setpriv
    /// with the unit's capability bounding set.
    fn direct_command(&self) -> String {
        let caps = if self.caps.is_empty() {
            "-all".to_string()
        } else {
            let keep: Vec<String> = self
                .caps
                .iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
                .collect();
            format!("-all,{}", keep.join(","))
        };
        let env: String = self
            .env
            .iter()
            .map(|(k, v)| format!("{k}={} ", q(v)))
            .collect();
        let exec: Vec<String> = self.exec.iter().map(|a| q(a)).collect();
        format!(
            "env {env}setpriv --bounding-set={caps} -- {}",
            exec.join(" ")
        )
    }
}

/// One file deploy keeps on a host.
struct File {
    path: String,
    bytes: Arc<[u8]>,
    mode: u32,
    /// The services that restart when it changes.
    services: Vec<&'static str>,
}

/// Installed name, the bytes (none in the dry run), whether a change
/// restarts the service.
type Binary<'a> = (&'static str, Option<&'a Arc<[u8]>>, bool);

/// What a controller or agent host gets besides the shared files.
struct Daemon<'a> {
    /// `controller` or `agent`: names its etcd user, config and binary.
    role: &'static str,
    password: &'a str,
    config: String,
    /// Installed name, local file (none in the dry run), restarts the service.
    binaries: Vec<Binary<'a>>,
    service: Service,
}

/// Everything one host gets.
struct HostPlan<'a> {
    host: &'a Host,
    root: PathBuf,
    files: Vec<File>,
    /// In start order.
    services: Vec<Service>,
}

/// The binaries, read once (the same bytes go to every host).
struct Built {
    controller: Arc<[u8]>,
    agent: Arc<[u8]>,
    cli: Arc<[u8]>,
}

fn etcd_urls(inv: &Inventory, port: u16) -> Vec<String> {
    inv.with_role(Role::Etcd)
        .iter()
        .map(|h| format!("https://{}:{port}", url_host(h.address)))
        .collect()
}

fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

fn plan_host<'a>(
    inv: &'a Inventory,
    h: &'a Host,
    secrets: &Secrets,
    pki: Option<&Path>,
    built: Option<&Built>,
) -> Result<HostPlan<'a>> {
    let root = inv.root_of(h);
    let r = |p: &str| at(&root, p);
    // Without a PKI (the dry run) certificates are empty placeholders.
    let read_pki = |name: &str| -> Result<Vec<u8>> {
        match pki {
            Some(dir) => {
                let p = dir.join(name);
                std::fs::read(&p).with_context(|| p.display().to_string())
            }
            None => Ok(Vec::new()),
        }
    };
    let mut files = Vec::new();
    let mut services = Vec::new();
    let etcd_clients = etcd_urls(inv, inv.ports.etcd_client);
    let list = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ca = r("/etc/tidegate/pki/ca.pem");
    let all: Vec<&'static str> = vec!["tidegate-etcd", "tidegate-controller", "tidegate-agent"];
    files.push(File {
        path: ca.clone(),
        bytes: read_pki("ca.pem")?.into(),
        mode: 0o644,
        services: all,
    });
    let addr = url_host(h.address);

    if h.roles.contains(&Role::Etcd) {
        let svc = "tidegate-etcd";
        for (from, to, mode) in [
            (format!("member-{}.pem", h.name), "etcd-member.pem", 0o644),
            (
                format!("member-{}-key.pem", h.name),
                "etcd-member-key.pem",
                0o600,
            ),
        ] {
            files.push(File {
                path: r(&format!("/etc/tidegate/pki/{to}")),
                bytes: read_pki(&from)?.into(),
                mode,
                services: vec![svc],
            });
        }
        // etcdctl for the health check and auth set-up runs as root.
        for (from, to, mode) in [
            ("client-root.pem", "etcd-root.pem", 0o644),
            ("client-root-key.pem", "etcd-root-key.pem", 0o600),
        ] {
            files.push(File {
                path: r(&format!("/etc/tidegate/pki/{to}")),
                bytes: read_pki(from)?.into(),
                mode,
                services: vec![],
            });
        }
        let initial: Vec<String> = inv
            .with_role(Role::Etcd)
            .iter()
            .map(|m| {
                format!(
                    "{}=https://{}:{}",
                    m.name,
                    url_host(m.address),
                    inv.ports.etcd_peer
                )
            })
            .collect();
        let yml = format!(
            "# etcd member {name} (zone {zone}) of {cluster}. Written by `cargo xtask deploy`.\n\
name: {name}\n\
data-dir: {data}\n\
listen-client-urls: https://{addr}:{cport},https://127.0.0.1:{cport}\n\
advertise-client-urls: https://{addr}:{cport}\n\
listen-peer-urls: https://{addr}:{pport}\n\
initial-advertise-peer-urls: https://{addr}:{pport}\n\
initial-cluster: {initial}\n\
initial-cluster-token: tidegate-{cluster}\n\
initial-cluster-state: new\n\
client-transport-security:\n  cert-file: {cert}\n  key-file: {key}\n  client-cert-auth: true\n  trusted-ca-file: {ca}\n\
peer-transport-security:\n  cert-file: {cert}\n  key-file: {key}\n  client-cert-auth: true\n  trusted-ca-file: {ca}\n\
# Keep an hour of history for watches that reconnect; cap the database.\n\
auto-compaction-mode: periodic\n\
auto-compaction-retention: \"1h\"\n\
quota-backend-bytes: 4294967296\n\
logger: zap\n\
log-outputs: [stderr]\n",
            name = h.name,
            zone = h.zone,
            cluster = inv.name,
            data = r("/var/lib/tidegate/etcd"),
            cport = inv.ports.etcd_client,
            pport = inv.ports.etcd_peer,
            initial = initial.join(","),
            cert = r("/etc/tidegate/pki/etcd-member.pem"),
            key = r("/etc/tidegate/pki/etcd-member-key.pem"),
        );
        files.push(File {
            path: r("/etc/tidegate/etcd.yml"),
            bytes: yml.into_bytes().into(),
            mode: 0o644,
            services: vec![svc],
        });
        services.push(Service {
            name: svc,
            description: "etcd member for tidegate",
            exec: vec![
                "/usr/bin/etcd".into(),
                "--config-file".into(),
                r("/etc/tidegate/etcd.yml"),
            ],
            user: "etcd",
            groups: &[],
            caps: &[],
            writes: vec![r("/var/lib/tidegate/etcd")],
            env: vec![],
            after: "",
            notify: true,
        });
    }

    let etcd_access = |role: &str| {
        format!(
            "etcd = [{}]\n\n[etcd_tls]\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n\n[etcd_auth]\nusername = \"tidegate-{role}\"\npassword_file = {:?}\n",
            list(&etcd_clients),
            ca,
            r(&format!("/etc/tidegate/pki/etcd-{role}.pem")),
            r(&format!("/etc/tidegate/pki/etcd-{role}-key.pem")),
            r(&format!("/etc/tidegate/etcd-password-{role}")),
        )
    };
    // A tidegate daemon: its etcd client certificate and password, its
    // config, its binary and its service.
    let mut daemon = |d: Daemon<'_>| -> Result<()> {
        let (role, svc) = (d.role, d.service.name);
        for (from, to, mode) in [
            (
                format!("client-tidegate-{role}.pem"),
                format!("etcd-{role}.pem"),
                0o644,
            ),
            (
                format!("client-tidegate-{role}-key.pem"),
                format!("etcd-{role}-key.pem"),
                0o640,
            ),
        ] {
            files.push(File {
                path: r(&format!("/etc/tidegate/pki/{to}")),
                bytes: read_pki(&from)?.into(),
                mode,
                services: vec![svc],
            });
        }
        files.push(File {
            path: r(&format!("/etc/tidegate/etcd-password-{role}")),
            bytes: format!("{}\n", d.password).into_bytes().into(),
            mode: 0o640,
            services: vec![svc],
        });
        files.push(File {
            path: r(&format!("/etc/tidegate/{role}.toml")),
            bytes: d.config.into_bytes().into(),
            mode: 0o640,
            services: vec![svc],
        });
        for (name, local, restarts) in d.binaries {
            files.push(File {
                path: r(&format!("/usr/local/bin/{name}")),
                bytes: local.cloned().unwrap_or_else(|| Arc::from(Vec::new())),
                mode: 0o755,
                services: if restarts { vec![svc] } else { vec![] },
            });
        }
        services.push(d.service);
        Ok(())
    };
    let daemon_service = |role: &str| {
        vec![
            r(&format!("/usr/local/bin/tidegate-{role}")),
            "--config".to_string(),
            r(&format!("/etc/tidegate/{role}.toml")),
        ]
    };

    if h.roles.contains(&Role::Controller) {
        let config = format!(
            "# Controller {name} of {cluster} (zone {zone}). Written by `cargo xtask deploy`;\n# every field: deploy/controller.toml.\n\
id = {name:?}\n\
listen = \"{addr}:{api}\"\n\
advertise_url = \"http://{addr}:{api}\"\n\
domain = {domain:?}\n\
public_http_port = {public}\n\
tcp_ports = {tcp:?}\n\
admin_token = {admin:?}\n\
platform_token = {platform:?}\n\
flag_secret = {flag:?}\n\
artifact_dir = {artifacts:?}\n\
{etcd}",
            name = h.name,
            cluster = inv.name,
            zone = h.zone,
            api = inv.ports.api,
            domain = inv.domain,
            public = inv.public_http_port,
            tcp = inv.tcp_ports,
            admin = secrets.admin_token,
            platform = secrets.platform_token,
            flag = secrets.flag_secret,
            artifacts = inv.artifact_dir.display().to_string(),
            etcd = etcd_access("controller"),
        );
        daemon(Daemon {
            role: "controller",
            password: &secrets.etcd_controller_password,
            config,
            binaries: vec![
                ("tidegate-controller", built.map(|b| &b.controller), true),
                ("tidegate", built.map(|b| &b.cli), false),
            ],
            service: Service {
                name: "tidegate-controller",
                description: "tidegate controller (REST API and scheduler)",
                exec: daemon_service("controller"),
                user: "tidegate",
                groups: &[],
                caps: &[],
                writes: vec![inv.artifact_dir.display().to_string()],
                env: vec![("TIDEGATE_LOG_FORMAT", "json")],
                after: "tidegate-etcd.service",
                notify: false,
            },
        })?;
    }

    if h.roles.contains(&Role::Agent) {
        let config = format!(
            "# Agent {name} of {cluster} (zone {zone}). Written by `cargo xtask deploy`;\n# every field: deploy/agent.toml.\n\
worker_id = {name:?}\n\
advertise_address = \"{ip}\"\n\
http_entry = \"{addr}:{http}\"\n\
tcp_host = \"{ip}\"\n\
metrics_listen = \"{addr}:{metrics}\"\n\
capacity = {capacity}\n\
artifact_dir = {artifacts:?}\n\
{etcd}",
            name = h.name,
            cluster = inv.name,
            zone = h.zone,
            ip = h.address,
            http = inv.ports.http,
            metrics = inv.ports.metrics,
            capacity = h.capacity,
            artifacts = inv.artifact_dir.display().to_string(),
            etcd = etcd_access("agent"),
        );
        daemon(Daemon {
            role: "agent",
            password: &secrets.etcd_agent_password,
            config,
            binaries: vec![("tidegate-agent", built.map(|b| &b.agent), true)],
            service: Service {
                name: "tidegate-agent",
                description: "tidegate agent (instances, HTTP proxy, eBPF TCP redirector)",
                exec: daemon_service("agent"),
                user: "tidegate",
                groups: &["docker"],
                caps: AGENT_CAPS,
                writes: vec![inv.artifact_dir.display().to_string()],
                env: vec![("TIDEGATE_LOG_FORMAT", "json")],
                after: "docker.service tidegate-etcd.service",
                notify: false,
            },
        })?;
    }
    if inv.init == Init::Systemd {
        for s in &services {
            files.push(File {
                path: r(&format!("/etc/systemd/system/{}.service", s.name)),
                bytes: s.unit().into_bytes().into(),
                mode: 0o644,
                services: vec![s.name],
            });
        }
    }
    Ok(HostPlan {
        host: h,
        root,
        files,
        services,
    })
}

// ---------------------------------------------------------------- SSH

struct Remote<'a> {
    inv: &'a Inventory,
    host: &'a Host,
}

impl Remote<'_> {
    fn command(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
        cmd.arg("-p").arg(self.inv.ssh.port.to_string());
        if let Some(id) = &self.inv.ssh.identity {
            cmd.arg("-i").arg(id);
        }
        cmd.args(&self.inv.ssh.options);
        cmd.arg(format!("{}@{}", self.inv.ssh.user, self.host.address));
        cmd
    }

    /// Runs `script` with the remote shell; its stdout, or an error naming
    /// the host and carrying stderr.
    fn run(&self, script: &str, stdin: Option<&[u8]>) -> Result<String> {
        let mut cmd = self.command();
        cmd.arg(script)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("host {}: starting ssh", self.host.name))?;
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(bytes)
                .with_context(|| format!("host {}: sending over ssh", self.host.name))?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "host {} ({}): `{}` failed ({}): {}",
                self.host.name,
                self.host.address,
                script.lines().next().unwrap_or(""),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

// ---------------------------------------------------------------- the run

fn build(profile: &str) -> Result<Built> {
    // TIDEGATE_PREBUILT: tests use binaries already built (a directory of
    // them, or those next to this xtask binary).
    let dir = if let Some(prebuilt) = std::env::var_os("TIDEGATE_PREBUILT") {
        // A directory holding them, or (any other value) this binary's own.
        let named = PathBuf::from(prebuilt);
        if named.is_dir() {
            named
        } else {
            std::env::current_exe()?
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
        }
    } else {
        crate::sh::run(
            crate::sh::build_daemons(&crate::workspace_root()).args(["--profile", profile]),
        )?;
        crate::target_dir().join(if profile == "dev" { "debug" } else { profile })
    };
    let find = |name: &str| -> Result<Arc<[u8]>> {
        let p = dir.join(name);
        let bytes =
            std::fs::read(&p).with_context(|| format!("{name} is not built at {}", p.display()))?;
        Ok(bytes.into())
    };
    Ok(Built {
        controller: find("tidegate-controller")?,
        agent: find("tidegate-agent")?,
        cli: find("tidegate")?,
    })
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Shell lines that say `running` or `stopped` for a service.
fn status_script(init: Init, root: &Path, svc: &str) -> String {
    match init {
        Init::Systemd => format!(
            "if systemctl is-active --quiet {svc}; then echo running; else echo stopped; fi"
        ),
        Init::Direct => {
            let pid = q(&at(root, &format!("/run/tidegate/{svc}.pid")));
            format!(
                "p=$(cat {pid} 2>/dev/null); if [ -n \"$p\" ] && kill -0 \"$p\" 2>/dev/null; then echo running; else echo stopped; fi"
            )
        }
    }
}

fn stop_script(init: Init, root: &Path, svc: &str) -> String {
    match init {
        Init::Systemd => format!("systemctl stop {svc} || true"),
        Init::Direct => {
            let pid = q(&at(root, &format!("/run/tidegate/{svc}.pid")));
            format!(
                "p=$(cat {pid} 2>/dev/null); if [ -n \"$p\" ] && kill -0 \"$p\" 2>/dev/null; then kill \"$p\"; \
for i in $(seq 1 100); do kill -0 \"$p\" 2>/dev/null || break; sleep 0.1; done; kill -9 \"$p\" 2>/dev/null || true; fi; rm -f {pid}"
            )
        }
    }
}

fn start_script(init: Init, root: &Path, s: &Service) -> String {
    match init {
        Init::Systemd => format!(
            "systemctl daemon-reload && systemctl enable --quiet {0} && systemctl restart {0}",
            s.name
        ),
        Init::Direct => {
            let pid = at(root, &format!("/run/tidegate/{}.pid", s.name));
            let log = at(root, &format!("/var/log/tidegate/{}.log", s.name));
            let inner = format!("echo $$ > {}; exec {}", q(&pid), s.direct_command());
            format!(
                "{stop}; mkdir -p {run} {logs} && nohup setsid sh -c {inner} >> {log} 2>&1 < /dev/null &",
                stop = stop_script(init, root, s.name),
                run = q(&at(root, "/run/tidegate")),
                logs = q(&at(root, "/var/log/tidegate")),
                inner = q(&inner),
                log = q(&log),
            )
        }
    }
}

/// What one run did, for the closing line.
#[derive(Default)]
struct Tally {
    files_changed: usize,
    files_same: usize,
    started: usize,
    running: usize,
    other: usize,
}

pub(crate) fn run(inventory: &Path, args: &RemoteArgs) -> Result<()> {
    let inv = Inventory::load(inventory)?;
    let state = state_dir(inventory, &inv);
    if args.dry_run {
        return dry_run(&inv, &state, args);
    }
    if args.down {
        return down(&inv, args.purge);
    }
    std::fs::create_dir_all(&state)?;
    let began = Instant::now();
    let built = build(&args.profile)?;
    let built_at = began.elapsed();
    let secrets = secrets(&state)?;
    let pki = pki(&state, &inv)?;
    let plans: Vec<HostPlan> = inv
        .hosts
        .iter()
        .map(|h| plan_host(&inv, h, &secrets, Some(&pki), Some(&built)))
        .collect::<Result<_>>()?;
    let mut tally = Tally::default();

    // 1. Every host answers and has what its roles need.
    for p in &plans {
        let r = Remote {
            inv: &inv,
            host: p.host,
        };
        let mut check = String::from("set -e; uname -n >/dev/null");
        if p.host.roles.contains(&Role::Etcd) {
            check.push_str("; command -v etcd >/dev/null || { echo 'etcd is not installed (Debian: apt-get install etcd-server etcd-client)' >&2; exit 1; }; command -v etcdctl >/dev/null || { echo 'etcdctl is not installed (apt-get install etcd-client)' >&2; exit 1; }");
        }
        if p.host.roles.contains(&Role::Agent) {
            check.push_str("; docker info >/dev/null 2>&1 || { echo 'no Docker engine answers (apt-get install docker.io; systemctl start docker)' >&2; exit 1; }");
        }
        if inv.init == Init::Direct {
            check.push_str("; command -v setpriv >/dev/null");
        } else {
            check.push_str("; command -v systemctl >/dev/null || { echo 'no systemctl: set init = \"direct\" in the inventory' >&2; exit 1; }");
        }
        r.run(&check, None)?;
        println!(
            "host {:<12} {} reachable; prerequisites present",
            p.host.name, p.host.address
        );
    }

    // 2. Files: copy what differs.
    let mut changed: BTreeMap<&str, BTreeSet<&'static str>> = BTreeMap::new();
    for p in &plans {
        let r = Remote {
            inv: &inv,
            host: p.host,
        };
        if inv.init == Init::Systemd {
            r.run(
                "id tidegate >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin tidegate; \
                 if getent group docker >/dev/null; then usermod -aG docker tidegate; fi",
                None,
            )?;
        }
        let list: String = p.files.iter().map(|f| format!("{} ", q(&f.path))).collect();
        let have = r.run(
            &format!("for f in {list}; do [ -f \"$f\" ] && sha256sum \"$f\"; done; true"),
            None,
        )?;
        let remote: BTreeMap<&str, &str> = have
            .lines()
            .filter_map(|l| l.split_once("  "))
            .map(|(h, f)| (f, h))
            .collect();
        for f in &p.files {
            if remote.get(f.path.as_str()) == Some(&sha256(&f.bytes).as_str()) {
                tally.files_same += 1;
                continue;
            }
            let dir = Path::new(&f.path)
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_else(|| "/".into());
            let tmp = format!("{}.deploy-tmp", f.path);
            r.run(
                &format!(
                    "mkdir -p {d} && cat > {t} && chmod {m:o} {t} && mv -f {t} {p}",
                    d = q(&dir),
                    t = q(&tmp),
                    m = f.mode,
                    p = q(&f.path)
                ),
                Some(&f.bytes),
            )?;
            println!("host {:<12} wrote {}", p.host.name, f.path);
            tally.files_changed += 1;
            changed
                .entry(p.host.name.as_str())
                .or_default()
                .extend(f.services.iter().copied());
        }
        if inv.init == Init::Systemd {
            r.run(&format!(
                "chown -R root:tidegate {etc} && chmod 750 {etc} && \
                 {{ ! id etcd >/dev/null 2>&1 || {{ mkdir -p {data} && chown -R etcd:etcd {data} && chmod 700 {data} && chown etcd {key}; }}; }} 2>/dev/null; \
                 mkdir -p {art} && chown tidegate:tidegate {art}",
                etc = q(&at(&p.root, "/etc/tidegate")),
                data = q(&at(&p.root, "/var/lib/tidegate/etcd")),
                key = q(&at(&p.root, "/etc/tidegate/pki/etcd-member-key.pem")),
                art = q(&inv.artifact_dir.display().to_string()),
            ), None)?;
        } else {
            r.run(
                &format!("mkdir -p {}", q(&inv.artifact_dir.display().to_string())),
                None,
            )?;
        }
    }

    // 3. Services, in order: etcd everywhere, auth, controllers, agents.
    // A restart is rolling: the next host's service restarts only once this
    // one's is back (`back`), so an upgrade never takes a whole tier down
    // (etcd keeps quorum; the load balancer always has agents). Services
    // that were not running start without waiting: a new etcd member cannot
    // be healthy before the others start.
    let ensure =
        |svc: &str, tally: &mut Tally, back: &dyn Fn(&HostPlan) -> bool| -> Result<Vec<&Host>> {
            let mut started = Vec::new();
            for p in &plans {
                let Some(s) = p.services.iter().find(|s| s.name == svc) else {
                    continue;
                };
                let r = Remote {
                    inv: &inv,
                    host: p.host,
                };
                let status = r.run(&status_script(inv.init, &p.root, svc), None)?;
                let dirty = changed
                    .get(p.host.name.as_str())
                    .is_some_and(|c| c.contains(svc));
                if status.trim() == "running" && !dirty {
                    tally.running += 1;
                    continue;
                }
                let why = if status.trim() == "running" {
                    "restarted (its files changed)"
                } else {
                    "started"
                };
                r.run(&start_script(inv.init, &p.root, s), None)?;
                println!("host {:<12} {svc} {why}", p.host.name);
                if status.trim() == "running" {
                    wait(
                        &format!("host {} {svc} back", p.host.name),
                        Duration::from_secs(60),
                        || back(p),
                    )?;
                }
                tally.started += 1;
                started.push(p.host);
            }
            Ok(started)
        };
    ensure("tidegate-etcd", &mut tally, &|p| {
        let member = format!(
            "https://{}:{}",
            url_host(p.host.address),
            inv.ports.etcd_client
        );
        let one = etcdctl_prefix(&inv, &p.root).replacen(
            &etcd_urls(&inv, inv.ports.etcd_client).join(","),
            &member,
            1,
        );
        Remote {
            inv: &inv,
            host: p.host,
        }
        .run(&format!("{one} endpoint health"), None)
        .is_ok()
    })?;
    let first_etcd = inv.with_role(Role::Etcd)[0];
    let etcd_root = plans
        .iter()
        .find(|p| p.host.name == first_etcd.name)
        .map(|p| p.root.clone())
        .unwrap_or_default();
    let etcdctl = etcdctl_prefix(&inv, &etcd_root);
    wait(
        "etcd: every member healthy",
        Duration::from_secs(60),
        || {
            Remote {
                inv: &inv,
                host: first_etcd,
            }
            .run(&format!("{etcdctl} endpoint health"), None)
            .is_ok()
        },
    )?;
    if etcd_auth(&inv, first_etcd, &etcdctl, &secrets, &state)? {
        tally.other += 1;
    }
    let api_of = |h: &Host| format!("{}:{}", url_host(h.address), inv.ports.api);
    let status_ok = |addr: &str| {
        http(addr, "GET", "/v1/status", Some(&secrets.admin_token), "")
            .is_some_and(|(s, body)| s == 200 && body.contains("\"leader\":{"))
    };
    ensure("tidegate-controller", &mut tally, &|p| {
        status_ok(&api_of(p.host))
    })?;
    let api: Vec<String> = inv
        .with_role(Role::Controller)
        .into_iter()
        .map(api_of)
        .collect();
    wait(
        "controllers: answering, a scheduler elected",
        Duration::from_secs(60),
        || api.iter().all(|a| status_ok(a)),
    )?;
    let registered = |workers: &[&str]| {
        http(
            &api[0],
            "GET",
            "/v1/workers",
            Some(&secrets.admin_token),
            "",
        )
        .is_some_and(|(s, body)| {
            s == 200
                && workers
                    .iter()
                    .all(|w| body.contains(&format!("\"id\":\"{w}\"")))
        })
    };
    ensure("tidegate-agent", &mut tally, &|p| {
        let metrics = format!("{}:{}", url_host(p.host.address), inv.ports.metrics);
        http(&metrics, "GET", "/metrics", None, "").is_some_and(|(s, _)| s == 200)
            && registered(&[p.host.name.as_str()])
    })?;
    let agents: Vec<&str> = inv
        .with_role(Role::Agent)
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    wait(
        "agents: every worker registered",
        Duration::from_secs(60),
        || registered(&agents),
    )?;
    if inv.demo {
        tally.other += demo(&inv, &api[0], &secrets)?;
    }

    println!(
        "deploy {}: {} file(s) written, {} unchanged; {} service(s) (re)started, {} already running; {} other change(s); {:.1} s (build {:.1} s)",
        inv.name,
        tally.files_changed,
        tally.files_same,
        tally.started,
        tally.running,
        tally.other,
        began.elapsed().as_secs_f64(),
        built_at.as_secs_f64(),
    );
    if tally.files_changed + tally.started + tally.other == 0 {
        println!("deploy {}: nothing changed", inv.name);
    }
    println!(
        "API: http://{}   admin token and passwords: {}   dashboard: http://{}/dashboard",
        api[0],
        state.join("secrets.toml").display(),
        api[0]
    );
    Ok(())
}

/// `etcdctl` with the root client certificate against every member.
fn etcdctl_prefix(inv: &Inventory, root: &Path) -> String {
    format!(
        "ETCDCTL_API=3 etcdctl --endpoints={} --cacert={} --cert={} --key={} --command-timeout=5s",
        etcd_urls(inv, inv.ports.etcd_client).join(","),
        q(&at(root, "/etc/tidegate/pki/ca.pem")),
        q(&at(root, "/etc/tidegate/pki/etcd-root.pem")),
        q(&at(root, "/etc/tidegate/pki/etcd-root-key.pem")),
    )
}

/// Turns on etcd auth once: users root, tidegate-controller and
/// tidegate-agent, each but root with a role reading and writing the key
/// root. Remembered in the state dir; checked again (users listed) on
/// every run. Whether it changed anything.
fn etcd_auth(
    inv: &Inventory,
    host: &Host,
    etcdctl: &str,
    s: &Secrets,
    state: &Path,
) -> Result<bool> {
    let r = Remote { inv, host };
    let marker = state.join("etcd-auth-enabled");
    // With client-cert-auth the root certificate's CN authenticates as root
    // once auth is on (and anyone may list users while it is off).
    let users = r.run(&format!("{etcdctl} user list"), None)?;
    let has = |u: &str| users.lines().any(|l| l.trim() == u);
    let want = ["root", "tidegate-controller", "tidegate-agent"];
    if marker.exists() && want.iter().all(|u| has(u)) {
        return Ok(false);
    }
    let mut script = String::from("set -e\n");
    for (user, password) in [
        ("root", &s.etcd_root_password),
        ("tidegate-controller", &s.etcd_controller_password),
        ("tidegate-agent", &s.etcd_agent_password),
    ] {
        if !has(user) {
            let _ = writeln!(
                script,
                "{etcdctl} user add {user} --interactive=false --new-user-password={}",
                q(password)
            );
        }
    }
    let _ = writeln!(
        script,
        "{etcdctl} role add root >/dev/null 2>&1 || true\n{etcdctl} user grant-role root root >/dev/null 2>&1 || true"
    );
    for role in ["tidegate-controller", "tidegate-agent"] {
        let _ = writeln!(
            script,
            "{etcdctl} role add {role} >/dev/null 2>&1 || true\n{etcdctl} role grant-permission {role} --prefix=true readwrite /tidegate/ >/dev/null\n{etcdctl} user grant-role {role} {role} >/dev/null 2>&1 || true"
        );
    }
    let _ = writeln!(script, "{etcdctl} auth enable");
    r.run(&script, None)?;
    std::fs::write(&marker, "etcd auth was enabled by cargo xtask deploy\n")?;
    println!("etcd: auth enabled (users root, tidegate-controller, tidegate-agent)");
    Ok(true)
}

/// Registers the demo challenges that are missing or differ, and copies
/// their images to agents that lack them. How many changes it made.
fn demo(inv: &Inventory, api: &str, s: &Secrets) -> Result<usize> {
    let mut changes = 0;
    for h in inv.with_role(Role::Agent) {
        let r = Remote { inv, host: h };
        for image in ["tidegate/demo-http:1", "tidegate/demo-tcp:1"] {
            if r.run(
                &format!("docker image inspect {image} >/dev/null 2>&1"),
                None,
            )
            .is_ok()
            {
                continue;
            }
            let saved = Command::new("docker")
                .args(["save", image])
                .output()
                .context("docker save (run cargo xtask setup for the demo images)")?;
            if !saved.status.success() {
                bail!(
                    "docker save {image}: {}",
                    String::from_utf8_lossy(&saved.stderr)
                );
            }
            r.run("docker load -q", Some(&saved.stdout))?;
            println!("host {:<12} loaded {image}", h.name);
            changes += 1;
        }
    }
    // Only missing ones: an organizer's later change to them stays.
    for (name, spec) in crate::deploy::DEMO_CHALLENGES {
        let path = format!("/v1/challenges/{name}");
        match http(api, "GET", &path, Some(&s.admin_token), "") {
            Some((200, _)) => continue,
            Some((404, _)) => {}
            other => bail!("reading challenge {name}: {other:?}"),
        }
        match http(api, "PUT", &path, Some(&s.admin_token), spec) {
            Some((200 | 201, _)) => {
                println!("challenge   {name} registered");
                changes += 1;
            }
            other => bail!("registering {name}: {other:?}"),
        }
    }
    Ok(changes)
}

fn wait(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if ok() {
            println!(
                "healthy     {what} ({:.1} s)",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("not healthy after {limit:?}: {what}")
}

fn down(inv: &Inventory, purge: bool) -> Result<()> {
    for role in [Role::Agent, Role::Controller, Role::Etcd] {
        let svc = match role {
            Role::Agent => "tidegate-agent",
            Role::Controller => "tidegate-controller",
            Role::Etcd => "tidegate-etcd",
        };
        for h in inv.with_role(role) {
            let root = inv.root_of(h);
            let mut script = stop_script(inv.init, &root, svc);
            if inv.init == Init::Systemd {
                let _ = write!(
                    script,
                    "; systemctl disable --quiet {svc} 2>/dev/null || true"
                );
            }
            Remote { inv, host: h }.run(&script, None)?;
            println!("host {:<12} {svc} stopped", h.name);
        }
    }
    if purge {
        for h in &inv.hosts {
            let root = inv.root_of(h);
            let paths = [
                "/etc/tidegate",
                "/var/lib/tidegate/etcd",
                "/usr/local/bin/tidegate",
                "/usr/local/bin/tidegate-controller",
                "/usr/local/bin/tidegate-agent",
                "/etc/systemd/system/tidegate-etcd.service",
                "/etc/systemd/system/tidegate-controller.service",
                "/etc/systemd/system/tidegate-agent.service",
                "/run/tidegate",
                "/var/log/tidegate",
            ]
            .map(|p| q(&at(&root, p)))
            .join(" ");
            Remote { inv, host: h }.run(&format!("rm -rf {paths}"), None)?;
            println!("host {:<12} purged", h.name);
        }
    }
    Ok(())
}

fn dry_run(inv: &Inventory, state: &Path, args: &RemoteArgs) -> Result<()> {
    if args.down {
        for role in [Role::Agent, Role::Controller, Role::Etcd] {
            for h in inv.with_role(role) {
                println!("would stop {role:?} on {} ({})", h.name, h.address);
            }
        }
        if args.purge {
            println!(
                "would remove /etc/tidegate, etcd's data, the binaries and units on every host"
            );
        }
        return Ok(());
    }
    println!(
        "would build tidegate-controller, tidegate-agent (with the eBPF object) and tidegate ({} profile)",
        args.profile
    );
    println!(
        "would make (once) tokens and etcd passwords in {} and the etcd CA and certificates in {}",
        state.join("secrets.toml").display(),
        state.join("pki").display()
    );
    let fake = Secrets::placeholders();
    for h in &inv.hosts {
        let roles: Vec<String> = h
            .roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect();
        println!(
            "host {} ({}, zone {}, roles {}): check ssh {}@{}:{} and its prerequisites",
            h.name,
            h.address,
            h.zone,
            roles.join("+"),
            inv.ssh.user,
            h.address,
            inv.ssh.port
        );
        if inv.init == Init::Systemd {
            println!("  would create the system user tidegate (group docker) if missing");
        }
        for f in plan_host(inv, h, &fake, None, None)?.files {
            println!("  would copy {} if it differs (sha256)", f.path);
        }
    }
    for (step, role) in [
        (
            "start or restart (if its files changed) tidegate-etcd",
            Role::Etcd,
        ),
        ("start or restart tidegate-controller", Role::Controller),
        ("start or restart tidegate-agent", Role::Agent),
    ] {
        for h in inv.with_role(role) {
            println!("would {step} on {} ({:?})", h.name, inv.init);
        }
        match role {
            Role::Etcd => {
                println!("would wait for `etcdctl endpoint health` on every member");
                println!(
                    "would enable etcd auth once: users root, tidegate-controller, tidegate-agent; roles readwrite on /tidegate/"
                );
            }
            Role::Controller => println!(
                "would wait until every controller answers /v1/status and a scheduler is elected"
            ),
            Role::Agent => println!("would wait until every agent is in /v1/workers"),
        }
    }
    if inv.demo {
        println!(
            "would register demo-http and demo-tcp if missing, and load their images on agents that lack them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const INVENTORY: &str = r#"
name = "ctf"
domain = "ctf.example.org"
[[host]]
name = "a"
address = "198.18.200.2"
zone = "z1"
roles = ["etcd", "controller", "agent"]
[[host]]
name = "b"
address = "198.18.200.6"
zone = "z2"
roles = ["etcd", "controller", "agent"]
[[host]]
name = "c"
address = "198.18.200.10"
zone = "z3"
roles = ["etcd", "agent"]
"#;

    /// Empty files for every certificate and key the plan reads.
    fn fake_pki(inv: &Inventory) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "").unwrap();
        for (name, _, _) in certificates(inv) {
            for file in [format!("{name}.pem"), format!("{name}-key.pem")] {
                std::fs::write(dir.path().join(file), "").unwrap();
            }
        }
        dir
    }

    fn inventory(text: &str) -> Result<Inventory> {
        let inv: Inventory = toml::from_str(text)?;
        inv.validate()?;
        Ok(inv)
    }

    #[test]
    fn inventories_are_checked_with_the_culprit_named() {
        assert!(inventory(INVENTORY).is_ok());
        let two_etcd =
            INVENTORY.replacen("roles = [\"etcd\", \"agent\"]", "roles = [\"agent\"]", 1);
        let e = inventory(&two_etcd).unwrap_err().to_string();
        assert!(e.contains("2 etcd members: use an odd number"), "{e}");
        let twice = INVENTORY.replace("\"198.18.200.6\"", "\"198.18.200.2\"");
        let e = inventory(&twice).unwrap_err().to_string();
        assert!(e.contains("address 198.18.200.2 is used twice"), "{e}");
        let bad_name = INVENTORY.replace("name = \"c\"", "name = \"C_1\"");
        let e = inventory(&bad_name).unwrap_err().to_string();
        assert!(e.contains("\"C_1\": name must be a DNS label"), "{e}");
        let unknown = format!(
            "{INVENTORY}\n[[host]]\nname = \"d\"\naddress = \"198.18.200.14\"\nzone = \"z\"\nroles = [\"db\"]\n"
        );
        assert!(inventory(&unknown).is_err());
    }

    #[test]
    fn units_keep_only_the_agents_capabilities() {
        let inv = inventory(INVENTORY).unwrap();
        let (secrets, dir) = (Secrets::placeholders(), fake_pki(&inv));
        let plan = plan_host(&inv, &inv.hosts[0], &secrets, Some(dir.path()), None).unwrap();
        let unit = |n: &str| {
            String::from_utf8(
                plan.files
                    .iter()
                    .find(|f| f.path == format!("/etc/systemd/system/{n}.service"))
                    .unwrap()
                    .bytes
                    .to_vec(),
            )
            .unwrap()
        };
        let agent = unit("tidegate-agent");
        assert!(
            agent.contains("CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n"),
            "{agent}"
        );
        assert!(
            agent.contains("AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n"),
            "{agent}"
        );
        assert!(agent.contains("SupplementaryGroups=docker\n"), "{agent}");
        assert!(agent.contains("User=tidegate\n"), "{agent}");
        let controller = unit("tidegate-controller");
        assert!(
            controller.contains("CapabilityBoundingSet=\n"),
            "{controller}"
        );
        assert!(!controller.contains("AmbientCapabilities"), "{controller}");
        let etcd = unit("tidegate-etcd");
        assert!(
            etcd.contains("Type=notify\n") && etcd.contains("User=etcd\n"),
            "{etcd}"
        );
        // The direct mode runs the same command with the same bounding set.
        let s = plan
            .services
            .iter()
            .find(|s| s.name == "tidegate-agent")
            .unwrap();
        let cmd = s.direct_command();
        assert!(cmd.contains("setpriv --bounding-set=-all,+bpf,+net_admin,+net_bind_service -- '/usr/local/bin/tidegate-agent' '--config' '/etc/tidegate/agent.toml'"), "{cmd}");
        // Every etcd endpoint is in the configs, over TLS, with auth.
        let toml = String::from_utf8(
            plan.files
                .iter()
                .find(|f| f.path == "/etc/tidegate/agent.toml")
                .unwrap()
                .bytes
                .to_vec(),
        )
        .unwrap();
        assert!(toml.contains("etcd = [\"https://198.18.200.2:2379\", \"https://198.18.200.6:2379\", \"https://198.18.200.10:2379\"]"), "{toml}");
        assert!(
            toml.contains("[etcd_auth]\nusername = \"tidegate-agent\""),
            "{toml}"
        );
    }

    /// deploy/systemd/*.service and deploy/etcd/etcd.example.yml are what
    /// deploy writes for the first host of deploy/inventory.example.toml.
    /// `TIDEGATE_UPDATE_DEPLOY=1 cargo test -p xtask` rewrites them.
    #[test]
    fn the_files_in_deploy_are_what_deploy_writes() {
        let deploy = crate::workspace_root().join("deploy");
        let inv = Inventory::load(&deploy.join("inventory.example.toml")).unwrap();
        let (secrets, pki) = (Secrets::placeholders(), fake_pki(&inv));
        let plan = plan_host(&inv, &inv.hosts[0], &secrets, Some(pki.path()), None).unwrap();
        let update = std::env::var_os("TIDEGATE_UPDATE_DEPLOY").is_some();
        let mut compared = 0;
        for f in &plan.files {
            let committed = if let Some(unit) = f.path.strip_prefix("/etc/systemd/system/") {
                deploy.join("systemd").join(unit)
            } else if f.path == "/etc/tidegate/etcd.yml" {
                deploy.join("etcd/etcd.example.yml")
            } else {
                continue;
            };
            if update {
                std::fs::create_dir_all(committed.parent().unwrap()).unwrap();
                std::fs::write(&committed, &f.bytes).unwrap();
            }
            let text = std::fs::read(&committed).unwrap_or_default();
            assert!(
                text[..] == f.bytes[..],
                "{} differs from what deploy writes to {}; TIDEGATE_UPDATE_DEPLOY=1 cargo test -p xtask rewrites it",
                committed.display(),
                f.path
            );
            compared += 1;
        }
        assert_eq!(compared, 4, "three units and etcd.yml");
    }

    /// systemd's own checker finds nothing wrong in the units but the
    /// binaries not being installed on this machine.
    #[test]
    fn systemd_accepts_the_units() {
        let deploy = crate::workspace_root().join("deploy");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .args(
                [
                    "systemd/tidegate-etcd.service",
                    "systemd/tidegate-controller.service",
                    "systemd/tidegate-agent.service",
                    "etcd/tidegate-etcd-backup.service",
                    "etcd/tidegate-etcd-backup.timer",
                ]
                .map(|u| deploy.join(u)),
            )
            .output()
            .expect("systemd-analyze (cargo xtask setup installs systemd)");
        let text = String::from_utf8_lossy(&out.stderr);
        let complaints: Vec<&str> = text
            .lines()
            .filter(|l| !l.contains("is not executable: No such file or directory"))
            .collect();
        assert!(complaints.is_empty(), "{text}");
    }

    #[test]
    fn the_example_load_balancer_config_is_valid() {
        let cfg = crate::workspace_root().join("deploy/haproxy.example.cfg");
        let out = Command::new("haproxy")
            .arg("-c")
            .arg("-f")
            .arg(&cfg)
            .output()
            .expect("haproxy (cargo xtask setup installs it)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && !text.contains("WARNING"), "{text}");
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(q("a b"), "'a b'");
        assert_eq!(q("it's"), r"'it'\''s'");
    }
}
