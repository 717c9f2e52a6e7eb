//! The Docker side: hardened containers through bollard.
//!
//! Every instance container: labels naming instance, challenge, team and
//! worker; the challenge's env plus, from the instance's secret record
//! (which only this worker may read), its `secret_env` values and `FLAG`; memory, CPU, pids, `nofile` and
//! `nproc` limits and an IO weight; its log in two rotated json-file parts
//! of `log_mib` in all; `cap-drop ALL` plus the spec's `cap_add` (and
//! `unsafe_caps`); `no-new-privileges`; a read-only rootfs with sized tmpfs
//! mounts (or a writable layer of `disk_mib`, which Docker bounds only on
//! xfs with `pquota`, unless `allow_unbounded_rootfs`); no published ports. It joins one of two networks with
//! inter-container traffic disabled: `isolated` (internal: no route out)
//! or, when the spec sets `egress`, `egress`. The host — and so the agent —
//! reaches every container's address on either.
//!
//! An instance of a challenge with `services` runs one such container per
//! service (`tidegate-{id}-{service}`, label `tidegate.service`) on a
//! network of its own instead ([`network`]): inter-container traffic on,
//! each container reachable by its service name, nothing else on it.

mod network;
mod solver;

pub use network::{INSTANCE_BRIDGE_PREFIXES, InstanceNetwork, Subnets, name as network_name};
pub use solver::{LABEL_SOLVER, MAX_OUTPUT, SolverRun, SolverTarget, solver_container};

use std::collections::{BTreeSet, HashMap};

use crate::hostnet::Neighbour;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, HostConfig, HostConfigLogConfig,
    NetworkCreateRequest, ResourcesUlimits,
};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, RemoveContainerOptions,
    StartContainerOptions,
};
use futures::StreamExt;
use tidegate_schema::records::ContainerSpec;
use tidegate_schema::{InstanceRecord, SecretRecord};

use tidegate_schema::config::{AgentConfig, planted};

pub const LABEL_INSTANCE: &str = "tidegate.instance";
pub const LABEL_CHALLENGE: &str = "tidegate.challenge";
pub const LABEL_TEAM: &str = "tidegate.team";
pub const LABEL_WORKER: &str = "tidegate.worker";
pub const LABEL_CLUSTER: &str = "tidegate.cluster";
pub const LABEL_SERVICE: &str = "tidegate.service";
/// The spec revision a container was made from: an agent that restarts
/// mid-rollout makes again what an older revision made.
pub const LABEL_SPEC_REVISION: &str = "tidegate.spec-revision";

/// Why a container could not be made to run.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("image {image} is not on this worker and could not be pulled: {reason}")]
    ImageMissing { image: String, reason: String },
    #[error(
        "this worker's Docker cannot bound a writable root filesystem ({reason}): give the challenge read_only_rootfs = true with tmpfs mounts, or set allow_unbounded_rootfs = true in this agent's config"
    )]
    NoDiskQuota { reason: String },
    #[error("docker: {0}")]
    Docker(#[from] DockerError),
}

/// A create error, named when it is the missing disk quota.
fn classify(e: DockerError) -> RuntimeError {
    match &e {
        DockerError::DockerResponseServerError { message, .. }
            if message.contains("storage-opt") =>
        {
            RuntimeError::NoDiskQuota {
                reason: message.clone(),
            }
        }
        _ => e.into(),
    }
}

/// A container of this worker, as Docker lists it.
#[derive(Debug, Clone)]
pub struct Observed {
    pub id: String,
    pub instance: String,
    /// Its service (None: the one container of a one-image instance).
    pub service: Option<String>,
    pub running: bool,
    pub exited: bool,
    pub address: Option<std::net::IpAddr>,
    /// The spec revision it was made from (None: made before the label).
    pub spec_revision: Option<i64>,
}

/// How long an image pull may take before the instance fails naming it
/// (a registry that takes the connection and never answers holds one
/// instance's step, and one of `reconcile_concurrency`, this long at most).
const PULL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct Runtime {
    docker: Docker,
    worker: String,
    cluster: Option<String>,
    isolated: String,
    egress: String,
    pull: bool,
    unbounded_rootfs: bool,
    /// Instance network name → its Linux bridge (known after `ensure_networks`).
    bridges: HashMap<String, String>,
    /// Where per-instance networks' subnets come from.
    subnets: Subnets,
    /// This worker's flag files: `{flag_dir}/{worker}/{instance}/flag`.
    flag_dir: std::path::PathBuf,
    /// Held from looking for an instance network to making it: steps run
    /// at once, and an engine speaking API 1.41 makes a second network of
    /// a name that exists (the red team's shared network is one name).
    network_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// One container to make: the record's one container, or a service's.
#[derive(Debug, Clone, Copy)]
pub struct Unit<'a> {
    /// None: the one container of a one-image instance.
    pub service: Option<&'a tidegate_schema::ServiceName>,
    pub container: &'a ContainerSpec,
    pub command: Option<&'a [String]>,
    /// Whether it gets `FLAG` and the secret env.
    pub secrets: bool,
}

impl<'a> Unit<'a> {
    /// Every container of `rec`, services in dependency order (each after
    /// those it depends on, then by name), so one reconcile pass can start
    /// a service right after its dependencies turned ready.
    pub fn all(rec: &'a InstanceRecord) -> Vec<Unit<'a>> {
        if let Some(c) = &rec.container {
            return vec![Unit {
                service: None,
                container: c,
                command: None,
                secrets: true,
            }];
        }
        let mut order: Vec<&tidegate_schema::ServiceName> = Vec::new();
        while order.len() < rec.services.len() {
            let before = order.len();
            for (name, s) in &rec.services {
                if !order.contains(&name) && s.depends_on.iter().all(|d| order.contains(&d)) {
                    order.push(name);
                }
            }
            if order.len() == before {
                // A cycle (specs refuse them; a record written by hand):
                // the rest by name.
                order.extend(
                    rec.services
                        .keys()
                        .filter(|n| !order.contains(n))
                        .collect::<Vec<_>>(),
                );
            }
        }
        order
            .into_iter()
            .filter_map(|name| {
                let s = rec.services.get(name)?;
                Some(Unit {
                    service: Some(name),
                    container: &s.container,
                    command: s.command.as_deref(),
                    secrets: s.secrets,
                })
            })
            .collect()
    }
}

/// The Docker name of an instance's container (of `service`, or its only one).
pub fn container_name(id: &tidegate_schema::InstanceId, service: Option<&str>) -> String {
    match service {
        Some(s) => format!("tidegate-{id}-{s}"),
        None => format!("tidegate-{id}"),
    }
}

fn not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl Runtime {
    /// Connects (negotiating the API version: Debian's engine speaks 1.41).
    pub async fn connect(cfg: &AgentConfig) -> Result<Self, DockerError> {
        let docker =
            Docker::connect_with_unix(&cfg.docker_socket, 60, bollard::API_DEFAULT_VERSION)?
                .negotiate_version()
                .await?;
        Ok(Self {
            docker,
            worker: cfg.worker_id.clone(),
            cluster: cfg.cluster_label.clone(),
            isolated: cfg.isolated_network.clone(),
            egress: cfg.egress_network.clone(),
            pull: cfg.pull_images,
            unbounded_rootfs: cfg.allow_unbounded_rootfs,
            bridges: HashMap::new(),
            subnets: Subnets::parse(&cfg.instance_networks).unwrap_or_default(),
            flag_dir: cfg.worker_flag_dir(),
            network_lock: std::sync::Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The host file bind-mounted at an instance's `flag_file`.
    pub fn flag_path(&self, id: &tidegate_schema::InstanceId) -> std::path::PathBuf {
        self.flag_dir.join(id.as_str()).join("flag")
    }

    /// Writes an instance's flag file in place (the bind mount keeps the
    /// inode, so running containers see the new content): readable by
    /// anyone in the container (0444), its directories root's (0711).
    /// The red team's control `flag-file` makes it writable by anyone.
    pub async fn write_flag(
        &self,
        id: &tidegate_schema::InstanceId,
        flag: &str,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        let path = self.flag_path(id);
        let flag = flag.to_string();
        let mode = if planted("flag-file") { 0o666 } else { 0o444 };
        tokio::task::spawn_blocking(move || {
            if let Some(dir) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o711)
                    .create(dir)?;
            }
            // Unchanged (an agent restarted over running containers): left
            // alone, so no reader ever sees it half written.
            if std::fs::read(&path).is_ok_and(|now| now == flag.as_bytes()) {
                return Ok(());
            }
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(mode)
                .open(&path)?;
            std::io::Write::write_all(&mut f, flag.as_bytes())?;
            f.set_len(flag.len() as u64)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))?;
            f.sync_data()
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Removes an instance's flag file and its directory (gone is fine).
    pub async fn remove_flag(&self, id: &tidegate_schema::InstanceId) -> std::io::Result<()> {
        let dir = self.flag_dir.join(id.as_str());
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .map_err(std::io::Error::other)?;
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The instances that have a flag directory on this worker.
    pub async fn flag_dirs(&self) -> Vec<String> {
        let dir = self.flag_dir.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Creates the two instance networks if they do not exist, and learns
    /// their bridges.
    pub async fn ensure_networks(&mut self) -> Result<(), DockerError> {
        for (name, internal) in [(self.isolated.clone(), true), (self.egress.clone(), false)] {
            self.create_network(&name, internal).await?;
            let net = self.docker.inspect_network(&name, None).await?;
            let bridge = net
                .options
                .as_ref()
                .and_then(|o| o.get("com.docker.network.bridge.name").cloned())
                .or_else(|| Some(format!("br-{}", net.id.as_deref()?.get(..12)?)));
            if let Some(bridge) = bridge {
                self.bridges.insert(name, bridge);
            }
        }
        Ok(())
    }

    /// The instance networks' bridges: network name → Linux bridge.
    pub fn bridges(&self) -> &HashMap<String, String> {
        &self.bridges
    }

    /// Every container on the instance networks (this worker's or not, as
    /// Docker lists them): bridge, address, MAC.
    pub async fn endpoints(&self) -> Result<BTreeSet<Neighbour>, DockerError> {
        let mut all = BTreeSet::new();
        for (network, bridge) in &self.bridges {
            let net = self.docker.inspect_network(network, None).await?;
            for e in net.containers.unwrap_or_default().into_values() {
                let addr = e
                    .ipv4_address
                    .as_deref()
                    .and_then(|a| a.split('/').next())
                    .and_then(|a| a.parse().ok());
                if let (Some(addr), Some(mac)) = (addr, e.mac_address.filter(|m| !m.is_empty())) {
                    all.insert((bridge.clone(), addr, mac));
                }
            }
        }
        Ok(all)
    }

    /// Creates one instance network (inter-container traffic off) unless it exists.
    async fn create_network(&self, name: &str, internal: bool) -> Result<(), DockerError> {
        match self.docker.inspect_network(name, None).await {
            Ok(_) => return Ok(()),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e),
        }
        let mut options = HashMap::new();
        options.insert(
            "com.docker.network.bridge.enable_icc".to_string(),
            "false".to_string(),
        );
        let req = NetworkCreateRequest {
            name: name.to_string(),
            driver: Some("bridge".into()),
            internal: Some(internal),
            options: Some(options),
            labels: Some(HashMap::from([(
                "tidegate.network".to_string(),
                "instances".to_string(),
            )])),
            ..Default::default()
        };
        match self.docker.create_network(req).await {
            Ok(_) => tracing::info!(network = %name, internal, "created instance network"),
            // Another agent on the same engine made it first.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Every container carrying this worker's label (and this agent's
    /// cluster label, when it has one: another cluster's agent of the same
    /// worker id on a shared engine must not take them for orphans).
    pub async fn list(&self) -> Result<Vec<Observed>, DockerError> {
        self.list_labelled(None).await
    }

    /// The containers of one instance (as [`Runtime::list`] sees them).
    pub async fn list_instance(
        &self,
        id: &tidegate_schema::InstanceId,
    ) -> Result<Vec<Observed>, DockerError> {
        self.list_labelled(Some(format!("{LABEL_INSTANCE}={id}")))
            .await
    }

    async fn list_labelled(&self, extra: Option<String>) -> Result<Vec<Observed>, DockerError> {
        let mut labels = vec![format!("{LABEL_WORKER}={}", self.worker)];
        labels.extend(self.cluster.iter().map(|c| format!("{LABEL_CLUSTER}={c}")));
        labels.extend(extra);
        let filters = HashMap::from([("label".to_string(), labels)]);
        let list = self
            .docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.as_ref()?;
                let instance = labels.get(LABEL_INSTANCE)?.clone();
                let service = labels.get(LABEL_SERVICE).cloned();
                let address = c
                    .network_settings
                    .as_ref()
                    .and_then(|n| n.networks.as_ref())
                    .and_then(|n| n.values().find_map(|e| e.ip_address.clone()))
                    .and_then(|ip| ip.parse().ok());
                Some(Observed {
                    id: c.id?,
                    instance,
                    service,
                    running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                    exited: matches!(
                        c.state,
                        Some(ContainerSummaryStateEnum::EXITED | ContainerSummaryStateEnum::DEAD)
                    ),
                    address,
                    spec_revision: labels.get(LABEL_SPEC_REVISION).and_then(|r| r.parse().ok()),
                })
            })
            .collect())
    }

    fn body(
        &self,
        rec: &InstanceRecord,
        unit: Unit<'_>,
        secret: &SecretRecord,
    ) -> ContainerCreateBody {
        let c = unit.container;
        let secret_env = if unit.secrets {
            &secret.env
        } else {
            &Default::default()
        };
        let mut env: Vec<String> = c
            .env
            .iter()
            .chain(secret_env)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        // The flag as a read-only file (written by the reconciler, at
        // claim for a pooled instance), or in env.
        let flag_mount = match &rec.flag_file {
            Some(target) if unit.secrets => Some(bollard::models::Mount {
                target: Some(target.clone()),
                source: Some(self.flag_path(&rec.id).to_string_lossy().into_owned()),
                typ: Some(bollard::models::MountType::BIND),
                read_only: Some(!planted("flag-file")),
                ..Default::default()
            }),
            _ => None,
        };
        if unit.secrets && flag_mount.is_none() {
            env.push(format!("FLAG={}", secret.flag));
        }
        let mut labels = self.labels(rec);
        let Some(service) = unit.service else {
            let network = if c.egress {
                &self.egress
            } else {
                &self.isolated
            };
            return ContainerCreateBody {
                image: Some(c.image.clone()),
                env: Some(env),
                labels: Some(labels),
                hostname: Some(rec.id.to_string()),
                host_config: Some(self.host_config(c, network, flag_mount)),
                ..Default::default()
            };
        };
        labels.insert(LABEL_SERVICE.to_string(), service.to_string());
        let network = network::name(&rec.id);
        // Reached by its service name on the instance's network (Docker's
        // embedded DNS), by nothing else.
        let endpoint = bollard::models::EndpointSettings {
            aliases: Some(vec![service.to_string()]),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(c.image.clone()),
            env: Some(env),
            cmd: unit.command.map(<[String]>::to_vec),
            labels: Some(labels),
            hostname: Some(service.to_string()),
            host_config: Some(self.host_config(c, &network, flag_mount)),
            networking_config: Some(bollard::models::NetworkingConfig {
                endpoints_config: Some(HashMap::from([(network.clone(), endpoint)])),
            }),
            ..Default::default()
        }
    }

    /// The labels of everything made for `rec`: instance, challenge, team,
    /// worker (and cluster).
    fn labels(&self, rec: &InstanceRecord) -> HashMap<String, String> {
        let mut labels = HashMap::from([
            (LABEL_INSTANCE.to_string(), rec.id.to_string()),
            (LABEL_CHALLENGE.to_string(), rec.challenge.to_string()),
            (LABEL_TEAM.to_string(), rec.team_str().to_string()),
            (LABEL_WORKER.to_string(), self.worker.clone()),
            (
                LABEL_SPEC_REVISION.to_string(),
                rec.spec_revision.to_string(),
            ),
        ]);
        if let Some(cluster) = &self.cluster {
            labels.insert(LABEL_CLUSTER.to_string(), cluster.clone());
        }
        labels
    }

    /// The limits and hardening of one container (see the module doc).
    fn host_config(
        &self,
        c: &ContainerSpec,
        network: &str,
        flag: Option<bollard::models::Mount>,
    ) -> HostConfig {
        let l = &c.limits;
        let mib = |n: u32| i64::from(n) * 1024 * 1024;
        let ulimit = |name: &str, n: u32| ResourcesUlimits {
            name: Some(name.into()),
            soft: Some(i64::from(n)),
            hard: Some(i64::from(n)),
        };
        let tmpfs = c
            .tmpfs
            .iter()
            .map(|t| {
                let opts = if planted("tmpfs-size") {
                    "rw,nosuid,nodev,mode=1777".to_string()
                } else {
                    format!("rw,nosuid,nodev,size={}m,mode=1777", t.size_mib)
                };
                (t.path.clone(), opts)
            })
            .collect();
        // Two files of half the budget each: what is on disk never exceeds it.
        let part_kib = (u64::from(l.log_mib) * 1024 / 2).max(1);
        let log = HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_string(), format!("{part_kib}k")),
                ("max-file".to_string(), "2".to_string()),
            ])),
        };
        let storage = (!c.read_only_rootfs && !self.unbounded_rootfs)
            .then(|| HashMap::from([("size".to_string(), format!("{}m", l.disk_mib))]));
        HostConfig {
            memory: Some(mib(l.memory_mib)),
            memory_swap: Some(mib(l.memory_mib)),
            nano_cpus: Some((l.cpus * 1e9) as i64),
            pids_limit: Some(i64::from(l.pids)),
            ulimits: Some(vec![ulimit("nofile", l.nofile), ulimit("nproc", l.nproc)]),
            blkio_weight: Some(l.io_weight),
            log_config: (!planted("log-limit")).then_some(log),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(
                c.cap_add
                    .iter()
                    .chain(&c.unsafe_caps)
                    .map(|cap| cap.trim_start_matches("CAP_").to_string())
                    .collect(),
            ),
            security_opt: Some(vec!["no-new-privileges".into()]),
            readonly_rootfs: Some(c.read_only_rootfs),
            tmpfs: Some(tmpfs),
            mounts: flag.map(|m| vec![m]),
            storage_opt: storage,
            network_mode: Some(network.to_string()),
            publish_all_ports: Some(false),
            init: Some(false),
            // The red team's positive control of userns-remap: this
            // container's root is the host's root.
            userns_mode: planted("userns").then(|| "host".to_string()),
            ..Default::default()
        }
    }

    /// Whether the engine maps container root to an unprivileged range of
    /// the host (`userns-remap`, or a rootless engine).
    pub async fn remaps_root(&self) -> Result<bool, DockerError> {
        let info = self.docker.info().await?;
        Ok(info
            .security_options
            .unwrap_or_default()
            .iter()
            .any(|o| o.contains("name=userns") || o.contains("name=rootless")))
    }

    /// Creates (not starts) one container of `rec` (pulling its image if
    /// allowed), with its secret's flag as `FLAG` and its secret env values
    /// where the unit gets them.
    pub async fn create(
        &self,
        rec: &InstanceRecord,
        unit: Unit<'_>,
        secret: &SecretRecord,
    ) -> Result<String, RuntimeError> {
        let name = container_name(&rec.id, unit.service.map(|s| s.as_str()));
        let options = || {
            Some(CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            })
        };
        match self
            .docker
            .create_container(options(), self.body(rec, unit, secret))
            .await
        {
            Ok(r) => return Ok(r.id),
            Err(e) if not_found(&e) => {}
            // A container of that name without our labels' record: replace it.
            Err(DockerError::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                self.remove(&name).await?;
                return Ok(self
                    .docker
                    .create_container(options(), self.body(rec, unit, secret))
                    .await?
                    .id);
            }
            Err(e) => return Err(classify(e)),
        }
        self.pull(&unit.container.image).await?;
        Ok(self
            .docker
            .create_container(options(), self.body(rec, unit, secret))
            .await?
            .id)
    }

    /// Pulls `image` (bounded by [`PULL_TIMEOUT`]), or `ImageMissing` when
    /// this worker does not pull or the pull failed.
    async fn pull(&self, image: &str) -> Result<(), RuntimeError> {
        let image = image.to_string();
        if !self.pull {
            return Err(RuntimeError::ImageMissing {
                image,
                reason: "pulling is disabled on this worker (pull_images = false)".into(),
            });
        }
        let mut pull = self.docker.create_image(
            Some(bollard::query_parameters::CreateImageOptions {
                from_image: Some(image.clone()),
                ..Default::default()
            }),
            None,
            None,
        );
        let pulled = tokio::time::timeout(PULL_TIMEOUT, async {
            while let Some(step) = pull.next().await {
                step?;
            }
            Ok::<_, DockerError>(())
        })
        .await;
        let reason = match pulled {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "the pull did not finish within {} s",
                PULL_TIMEOUT.as_secs()
            )),
        };
        match reason {
            Some(reason) => Err(RuntimeError::ImageMissing { image, reason }),
            None => Ok(()),
        }
    }

    pub async fn start(&self, id: &str) -> Result<(), DockerError> {
        self.docker
            .start_container(id, None::<StartContainerOptions>)
            .await
    }

    /// The exit code of a stopped container.
    pub async fn exit_code(&self, id: &str) -> Result<i64, DockerError> {
        let info = self
            .docker
            .inspect_container(id, None::<InspectContainerOptions>)
            .await?;
        Ok(info.state.and_then(|s| s.exit_code).unwrap_or(-1))
    }

    /// Removes a container (and its anonymous volumes); gone already is fine.
    pub async fn remove(&self, id: &str) -> Result<(), DockerError> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.docker.remove_container(id, Some(options)).await {
            Err(e) if not_found(&e) => Ok(()),
            other => other,
        }
    }
}
