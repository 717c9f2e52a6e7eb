//! What each host gets: files (binaries, configs written from the daemons'
//! typed configs, certificates, the etcd config, units) and services in
//! start order. Pure: the dry run prints a plan, a run applies it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tidegate_local::etcd::{CONTROLLER_USER, worker_user};
use tidegate_schema::config::{AgentConfig, ConfigFile, ControllerConfig, EtcdAuth, EtcdTls};

use super::secrets::Secrets;
use super::services::{AGENT_CAPS, Service};
use super::{Host, Init, Inventory, Role, at, etcd_metrics_urls, etcd_urls, url_host};

/// One file deploy keeps on a host.
pub(super) struct File {
    pub(super) path: String,
    pub(super) bytes: Arc<[u8]>,
    pub(super) mode: u32,
    /// The services that restart when it changes.
    pub(super) services: Vec<&'static str>,
}

/// Installed name, the bytes (none in the dry run), whether a change
/// restarts the service.
type Binary<'a> = (&'static str, Option<&'a Arc<[u8]>>, bool);

/// What a controller or agent host gets besides the shared files.
struct Daemon<'a> {
    /// `controller` or `agent`: names its config, binary and files.
    role: &'static str,
    /// Its etcd user (its client certificate's CN).
    user: String,
    password: String,
    /// The config file's text.
    config: String,
    binaries: Vec<Binary<'a>>,
    service: Service,
}

/// Everything one host gets.
pub(super) struct HostPlan<'a> {
    pub(super) host: &'a Host,
    pub(super) root: PathBuf,
    pub(super) files: Vec<File>,
    /// In start order.
    pub(super) services: Vec<Service>,
}

/// The binaries, read once (the same bytes go to every host).
pub(super) struct Built {
    controller: Arc<[u8]>,
    agent: Arc<[u8]>,
    cli: Arc<[u8]>,
}

/// Builds the daemons with `profile` (or takes `TIDEGATE_PREBUILT`'s) and reads them.
pub(super) fn build(profile: &str) -> Result<Built> {
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

/// Hex SHA-256, as `sha256sum` prints it.
pub(super) fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The plan of host `h`. Without `pki` (the dry run) certificates are
/// empty placeholders; without `built`, binaries are.
pub(super) fn plan_host<'a>(
    inv: &'a Inventory,
    h: &'a Host,
    secrets: &Secrets,
    pki: Option<&Path>,
    built: Option<&Built>,
) -> Result<HostPlan<'a>> {
    let mut p = Planner {
        inv,
        h,
        root: inv.root_of(h),
        pki,
        files: Vec::new(),
        services: Vec::new(),
    };
    let ca = p.path("/etc/tidegate/pki/ca.pem");
    let all = vec!["tidegate-etcd", "tidegate-controller", "tidegate-agent"];
    p.file(&ca, p.read_pki("ca.pem")?, 0o644, all);
    if h.roles.contains(&Role::Etcd) {
        p.etcd_member()?;
    }
    if h.roles.contains(&Role::Controller) {
        let config = ControllerConfig {
            id: h.name.clone(),
            listen: SocketAddr::new(h.address, inv.ports.api),
            advertise_url: Some(format!("http://{}:{}", url_host(h.address), inv.ports.api)),
            domain: inv.domain.clone(),
            public_http_port: inv.public_http_port,
            tcp_ports: inv.tcp_ports.clone(),
            admin_token: secrets.admin_token.clone(),
            platform_token: secrets.platform_token.clone(),
            flag_secret: secrets.flag_secret.clone(),
            artifact_dir: inv.artifact_dir.clone(),
            etcd: etcd_urls(inv, inv.ports.etcd_client),
            etcd_metrics: Some(etcd_metrics_urls(inv)),
            etcd_tls: Some(p.etcd_tls("controller")),
            etcd_auth: Some(p.etcd_auth("controller", CONTROLLER_USER)),
            scrape_token_file: Some(p.path("/etc/tidegate/scrape-token").into()),
            ..ControllerConfig::default()
        };
        let token = format!("{}\n", secrets.scrape_token).into_bytes();
        p.file(
            &p.path("/etc/tidegate/scrape-token"),
            token,
            0o640,
            vec!["tidegate-controller"],
        );
        p.daemon(Daemon {
            role: "controller",
            user: CONTROLLER_USER.to_string(),
            password: secrets.etcd_controller_password.clone(),
            config: p.config_text("Controller", "controller", &config)?,
            binaries: vec![
                ("tidegate-controller", built.map(|b| &b.controller), true),
                ("tidegate", built.map(|b| &b.cli), false),
            ],
            service: Service {
                name: "tidegate-controller",
                description: "tidegate controller (REST API and scheduler)",
                exec: p.daemon_command("controller"),
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
        let config = AgentConfig {
            worker_id: h.name.clone(),
            advertise_address: h.address,
            http_entry: SocketAddr::new(h.address, inv.ports.http),
            tcp_host: h.address,
            tcp_ports: inv.tcp_ports.clone(),
            metrics_listen: SocketAddr::new(h.address, inv.ports.metrics),
            capacity: h.capacity,
            artifact_dir: inv.artifact_dir.clone(),
            etcd: etcd_urls(inv, inv.ports.etcd_client),
            etcd_tls: Some(p.etcd_tls("agent")),
            etcd_auth: Some(p.etcd_auth("agent", &worker_user(&h.name))),
            hop_key_file: Some(p.path("/etc/tidegate/hop-key").into()),
            allow_host_access: inv.allow_host_access,
            scrape_token_file: Some(p.path("/etc/tidegate/scrape-token").into()),
            ..AgentConfig::default()
        };
        let hop_key = format!("{}\n", secrets.hop_key).into_bytes();
        p.file(
            &p.path("/etc/tidegate/hop-key"),
            hop_key,
            0o640,
            vec!["tidegate-agent"],
        );
        let token = format!("{}\n", secrets.scrape_token).into_bytes();
        p.file(
            &p.path("/etc/tidegate/scrape-token"),
            token,
            0o640,
            vec!["tidegate-agent"],
        );
        p.daemon(Daemon {
            role: "agent",
            // Its worker's own user: it reads only its own secrets and
            // writes only its own keys (Keyspace::worker_grants).
            user: worker_user(&h.name),
            password: secrets.worker_password(&h.name),
            config: p.config_text("Agent", "agent", &config)?,
            binaries: vec![("tidegate-agent", built.map(|b| &b.agent), true)],
            service: Service {
                name: "tidegate-agent",
                description: "tidegate agent (instances, HTTP proxy, eBPF TCP redirector)",
                exec: p.daemon_command("agent"),
                user: "tidegate",
                groups: &["docker"],
                caps: AGENT_CAPS,
                writes: vec![
                    inv.artifact_dir.display().to_string(),
                    config.flag_dir.display().to_string(),
                ],
                env: vec![("TIDEGATE_LOG_FORMAT", "json")],
                after: "docker.service tidegate-etcd.service",
                notify: false,
            },
        })?;
    }
    if inv.init == Init::Systemd {
        p.units();
    }
    Ok(HostPlan {
        host: h,
        root: p.root,
        files: p.files,
        services: p.services,
    })
}

/// The plan of one host while it is being made.
struct Planner<'a> {
    inv: &'a Inventory,
    h: &'a Host,
    root: PathBuf,
    pki: Option<&'a Path>,
    files: Vec<File>,
    services: Vec<Service>,
}

impl Planner<'_> {
    /// `path` on the host (under its root).
    fn path(&self, path: &str) -> String {
        at(&self.root, path)
    }

    fn file(&mut self, path: &str, bytes: Vec<u8>, mode: u32, services: Vec<&'static str>) {
        // One file for several daemons of the host (the scrape token of a
        // controller that is also an agent): written once, restarting each.
        if let Some(f) = self.files.iter_mut().find(|f| f.path == path) {
            f.services.extend(services);
            return;
        }
        self.files.push(File {
            path: path.to_string(),
            bytes: bytes.into(),
            mode,
            services,
        });
    }

    /// A file of the cluster's PKI (empty in the dry run).
    fn read_pki(&self, name: &str) -> Result<Vec<u8>> {
        match self.pki {
            Some(dir) => {
                let p = dir.join(name);
                std::fs::read(&p).with_context(|| p.display().to_string())
            }
            None => Ok(Vec::new()),
        }
    }

    /// An etcd member: its certificate, the root client certificate (for
    /// etcdctl), its config and its service.
    fn etcd_member(&mut self) -> Result<()> {
        let svc = "tidegate-etcd";
        let name = &self.h.name;
        for (from, to, mode, services) in [
            (
                format!("member-{name}.pem"),
                "etcd-member.pem",
                0o644,
                vec![svc],
            ),
            (
                format!("member-{name}-key.pem"),
                "etcd-member-key.pem",
                0o600,
                vec![svc],
            ),
            // etcdctl for the health check and auth set-up runs as root.
            ("client-root.pem".into(), "etcd-root.pem", 0o644, vec![]),
            (
                "client-root-key.pem".into(),
                "etcd-root-key.pem",
                0o600,
                vec![],
            ),
        ] {
            let bytes = self.read_pki(&from)?;
            self.file(
                &self.path(&format!("/etc/tidegate/pki/{to}")),
                bytes,
                mode,
                services,
            );
        }
        let yml = self.etcd_yml();
        self.file(
            &self.path("/etc/tidegate/etcd.yml"),
            yml.into_bytes(),
            0o644,
            vec![svc],
        );
        self.services.push(Service {
            name: svc,
            description: "etcd member for tidegate",
            exec: vec![
                "/usr/bin/etcd".into(),
                "--config-file".into(),
                self.path("/etc/tidegate/etcd.yml"),
            ],
            user: "etcd",
            groups: &[],
            caps: &[],
            writes: vec![self.path("/var/lib/tidegate/etcd")],
            env: vec![],
            after: "",
            notify: true,
        });
        Ok(())
    }

    /// The member's etcd config (YAML).
    fn etcd_yml(&self) -> String {
        let (inv, h) = (self.inv, self.h);
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
        format!(
            "# etcd member {name} (zone {zone}) of {cluster}. Written by `cargo xtask deploy`.\n\
name: {name}\n\
data-dir: {data}\n\
listen-client-urls: https://{addr}:{cport},https://127.0.0.1:{cport}\n\
advertise-client-urls: https://{addr}:{cport}\n\
listen-peer-urls: https://{addr}:{pport}\n\
initial-advertise-peer-urls: https://{addr}:{pport}\n\
# Numbers only (no keys), read by the controllers: tidegate_controller_etcd_member_*.\n\
listen-metrics-urls: http://{addr}:{mport}\n\
initial-cluster: {initial}\n\
initial-cluster-token: tidegate-{cluster}\n\
initial-cluster-state: new\n\
client-transport-security:\n  cert-file: {cert}\n  key-file: {key}\n  client-cert-auth: true\n  trusted-ca-file: {ca}\n\
peer-transport-security:\n  cert-file: {cert}\n  key-file: {key}\n  client-cert-auth: true\n  trusted-ca-file: {ca}\n\
# Keep an hour of history for watches that reconnect; cap the database.\n\
auto-compaction-mode: periodic\n\
auto-compaction-retention: \"1h\"\n\
quota-backend-bytes: 4294967296\n\
# A member back from a crash or a partition asks before it campaigns, so\n\
# its return does not depose a working leader (off by default in 3.4).\n\
pre-vote: true\n\
logger: zap\n\
log-outputs: [stderr]\n",
            name = h.name,
            zone = h.zone,
            cluster = inv.name,
            addr = url_host(h.address),
            data = self.path("/var/lib/tidegate/etcd"),
            cport = inv.ports.etcd_client,
            pport = inv.ports.etcd_peer,
            mport = inv.ports.etcd_metrics,
            initial = initial.join(","),
            cert = self.path("/etc/tidegate/pki/etcd-member.pem"),
            key = self.path("/etc/tidegate/pki/etcd-member-key.pem"),
            ca = self.path("/etc/tidegate/pki/ca.pem"),
        )
    }

    /// `[etcd_tls]` of daemon `role`: the cluster CA and its client certificate.
    fn etcd_tls(&self, role: &str) -> EtcdTls {
        EtcdTls {
            ca_file: self.path("/etc/tidegate/pki/ca.pem").into(),
            cert_file: Some(
                self.path(&format!("/etc/tidegate/pki/etcd-{role}.pem"))
                    .into(),
            ),
            key_file: Some(
                self.path(&format!("/etc/tidegate/pki/etcd-{role}-key.pem"))
                    .into(),
            ),
            server_name: None,
        }
    }

    /// `[etcd_auth]` of daemon `role`: its etcd user and password file.
    fn etcd_auth(&self, role: &str, user: &str) -> EtcdAuth {
        EtcdAuth {
            username: user.to_string(),
            password_file: self
                .path(&format!("/etc/tidegate/etcd-password-{role}"))
                .into(),
        }
    }

    /// A daemon's config file: a header saying where it comes from, then
    /// the fields of `config` that are not defaults.
    fn config_text(&self, what: &str, role: &str, config: &impl ConfigFile) -> Result<String> {
        Ok(format!(
            "# {what} {} of {} (zone {}). Written by `cargo xtask deploy`;\n# every field: deploy/{role}.toml.\n{}",
            self.h.name,
            self.inv.name,
            self.h.zone,
            config.to_toml()?
        ))
    }

    /// The command line of daemon `role`.
    fn daemon_command(&self, role: &str) -> Vec<String> {
        vec![
            self.path(&format!("/usr/local/bin/tidegate-{role}")),
            "--config".to_string(),
            self.path(&format!("/etc/tidegate/{role}.toml")),
        ]
    }

    /// A tidegate daemon: its etcd client certificate and password, its
    /// config, its binaries and its service.
    fn daemon(&mut self, d: Daemon<'_>) -> Result<()> {
        let (role, user, svc) = (d.role, &d.user, d.service.name);
        for (from, to, mode) in [
            (
                format!("client-{user}.pem"),
                format!("etcd-{role}.pem"),
                0o644,
            ),
            (
                format!("client-{user}-key.pem"),
                format!("etcd-{role}-key.pem"),
                0o640,
            ),
        ] {
            let bytes = self.read_pki(&from)?;
            self.file(
                &self.path(&format!("/etc/tidegate/pki/{to}")),
                bytes,
                mode,
                vec![svc],
            );
        }
        let password = format!("{}\n", d.password).into_bytes();
        let path = self.path(&format!("/etc/tidegate/etcd-password-{role}"));
        self.file(&path, password, 0o640, vec![svc]);
        let path = self.path(&format!("/etc/tidegate/{role}.toml"));
        self.file(&path, d.config.into_bytes(), 0o640, vec![svc]);
        for (name, local, restarts) in d.binaries {
            self.files.push(File {
                path: self.path(&format!("/usr/local/bin/{name}")),
                bytes: local.cloned().unwrap_or_else(|| Arc::from(Vec::new())),
                mode: 0o755,
                services: if restarts { vec![svc] } else { vec![] },
            });
        }
        self.services.push(d.service);
        Ok(())
    }

    /// The systemd unit of every service.
    fn units(&mut self) {
        let units: Vec<(String, String, &'static str)> = self
            .services
            .iter()
            .map(|s| {
                (
                    self.path(&format!("/etc/systemd/system/{}.service", s.name)),
                    s.unit(),
                    s.name,
                )
            })
            .collect();
        for (path, unit, svc) in units {
            self.file(&path, unit.into_bytes(), 0o644, vec![svc]);
        }
    }
}
