//! The records stored under the keys of [`crate::keys`], as JSON.
//!
//! Every record carries `"v": 1` and rejects unknown fields, so a reader
//! never silently drops what a newer writer meant, and a value written by
//! hand that is not a record is reported, naming the field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::names::{ChallengeName, Hostname, InstanceId, PortName, ServiceName, TeamId, WorkerId};
use crate::spec::{ChallengeSpec, Limits, ReadySpec, TmpfsSpec};
use crate::validate::{FieldError, Validate, decode_json};

/// The record format version this build reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct V1;

impl Serialize for V1 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(1)
    }
}

impl<'de> Deserialize<'de> for V1 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match u32::deserialize(d)? {
            1 => Ok(V1),
            n => Err(serde::de::Error::custom(format!(
                "record version {n} is not supported; this build reads version 1"
            ))),
        }
    }
}

/// A record type: JSON with a version, validated on the way in.
pub trait Record: Serialize + serde::de::DeserializeOwned + Validate + Sized {
    /// Decodes and validates a stored value.
    fn decode(bytes: &[u8]) -> Result<Self, FieldError> {
        decode_json(bytes)
    }

    /// Encodes for storage.
    fn encode(&self) -> Vec<u8> {
        // Serializing plain structs of strings, numbers and maps cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Seconds since the Unix epoch.
pub type UnixSecs = u64;

/// A challenge as stored: the organizer's spec plus the pointer to its policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeRecord {
    pub v: V1,
    pub name: ChallengeName,
    pub spec: ChallengeSpec,
    /// The active policy plugin, by digest (the blob lives in the artifact store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyRef>,
}

/// Which policy plugin a challenge runs, and what happens when it fails.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRef {
    /// `sha256:` and 64 lowercase hex characters.
    pub digest: String,
    /// The hooks the plugin implements (`admit-spawn`, `renew`,
    /// `admit-connection`, `on-idle`), as it said at upload.
    #[serde(default)]
    pub hooks: Vec<String>,
    /// The component's size in bytes.
    #[serde(default)]
    pub size: u64,
    /// When it was uploaded (Unix seconds).
    #[serde(default)]
    pub uploaded_at: UnixSecs,
}

impl Validate for ChallengeRecord {
    fn validate(&self) -> Result<(), FieldError> {
        self.spec.validate().map_err(|e| FieldError {
            field: format!("spec.{}", e.field),
            ..e
        })?;
        if let Some(p) = &self.policy {
            let hex = p.digest.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return Err(FieldError::new(
                    "policy.digest",
                    format!(
                        "{:?} is not sha256: followed by 64 lowercase hex characters",
                        p.digest
                    ),
                ));
            }
        }
        Ok(())
    }
}
impl Record for ChallengeRecord {}

/// An HTTP route of an instance: `hostname` → the container's `target_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    pub port_name: PortName,
    pub hostname: Hostname,
    pub target_port: u16,
    /// The service serving it (None: the short form's one container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceName>,
}

/// A TCP route of an instance: public `port` on every agent → the container's `target_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    pub port_name: PortName,
    pub port: u16,
    pub target_port: u16,
    /// The service serving it (None: the short form's one container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceName>,
}

/// What the agent needs to run the container, frozen at spawn time so that
/// a later change to the challenge does not alter a running instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    pub image: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub limits: Limits,
    #[serde(default)]
    pub egress: bool,
    #[serde(default)]
    pub read_only_rootfs: bool,
    #[serde(default)]
    pub tmpfs: Vec<TmpfsSpec>,
    #[serde(default)]
    pub cap_add: Vec<String>,
    #[serde(default)]
    pub unsafe_caps: Vec<String>,
}

impl ContainerSpec {
    /// The container a one-image challenge's instances run (None for a
    /// challenge with `services`): what the scheduler writes in each record
    /// and what agents check it against.
    pub fn of(spec: &crate::ChallengeSpec) -> Option<Self> {
        spec.services.is_empty().then(|| Self {
            image: spec.image.clone(),
            env: spec.env.clone(),
            limits: spec.limits.clone(),
            egress: spec.egress,
            read_only_rootfs: spec.read_only_rootfs,
            tmpfs: spec.tmpfs.clone(),
            cap_add: spec.cap_add.clone(),
            unsafe_caps: spec.unsafe_caps.clone(),
        })
    }

    /// The fields where `self` and `other` differ, each with both values.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! field {
            ($($f:ident),*) => {$(
                if self.$f != other.$f {
                    out.push(format!("{}: {:?} vs {:?}", stringify!($f), self.$f, other.$f));
                }
            )*};
        }
        field!(
            image,
            limits,
            egress,
            read_only_rootfs,
            tmpfs,
            cap_add,
            unsafe_caps
        );
        if self.env != other.env {
            // Values may be secrets: names only.
            let names = |c: &Self| c.env.keys().cloned().collect::<Vec<_>>();
            out.push(format!(
                "env: {:?} vs {:?} (names; or a value differs)",
                names(self),
                names(other)
            ));
        }
        out
    }
}

/// One service of an instance of a challenge with `services`, frozen at
/// spawn time like [`ContainerSpec`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRecord {
    pub container: ContainerSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadySpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<ServiceName>,
    /// Whether it gets `FLAG` and the challenge's `secret_env`
    /// (`flag.services`).
    #[serde(default)]
    pub secrets: bool,
}

impl ServiceRecord {
    /// The services of a challenge's instances (empty for the short form):
    /// what the scheduler writes and what agents check records against.
    pub fn all_of(spec: &ChallengeSpec) -> BTreeMap<ServiceName, ServiceRecord> {
        spec.services
            .iter()
            .map(|(name, s)| {
                let secrets = spec
                    .flag
                    .services
                    .as_ref()
                    .is_none_or(|to| to.contains(name));
                let record = ServiceRecord {
                    container: ContainerSpec {
                        image: s.image.clone(),
                        env: s.env.clone(),
                        limits: s.limits.clone(),
                        egress: spec.egress,
                        read_only_rootfs: s.read_only_rootfs,
                        tmpfs: s.tmpfs.clone(),
                        cap_add: s.cap_add.clone(),
                        unsafe_caps: spec.unsafe_caps.clone(),
                    },
                    command: s.command.clone(),
                    ready: s.ready.clone(),
                    depends_on: s.depends_on.clone(),
                    secrets,
                };
                (name.clone(), record)
            })
            .collect()
    }

    /// The fields where `self` and `other` differ.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let mut out = self.container.differences(&other.container);
        if self.command != other.command {
            out.push(format!(
                "command: {:?} vs {:?}",
                self.command, other.command
            ));
        }
        if self.ready != other.ready {
            out.push(format!("ready: {:?} vs {:?}", self.ready, other.ready));
        }
        if self.depends_on != other.depends_on {
            out.push(format!(
                "depends_on: {:?} vs {:?}",
                self.depends_on, other.depends_on
            ));
        }
        if self.secrets != other.secrets {
            out.push(format!("secrets: {} vs {}", self.secrets, other.secrets));
        }
        out
    }
}

/// An instance: desired state, written only by the elected scheduler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    pub v: V1,
    pub id: InstanceId,
    pub challenge: ChallengeName,
    /// The team it is for; none while it waits in its challenge's warm
    /// pool (started, routed by nothing, counted as no team's) until a
    /// spawn claims it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<TeamId>,
    pub worker: WorkerId,
    /// The fencing token of the scheduler that wrote it (the creation
    /// revision of its election key).
    pub token: i64,
    pub created_at: UnixSecs,
    pub expires_at: UnixSecs,
    #[serde(default)]
    pub renewals: u32,
    /// Which of the team's `per_team_max` slots of the challenge it holds
    /// (`claims/team-slots/{challenge}/{team}/{slot}`).
    #[serde(default)]
    pub team_slot: u32,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Vec<TcpRoute>,
    /// The one container of a one-image challenge's instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSpec>,
    /// The containers of an instance of a challenge with `services`, on a
    /// network of the instance's own (instead of `container`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<ServiceName, ServiceRecord>,
    /// The mod revision of the challenge record whose spec `container` (or
    /// `services`) was made from ([`ContainerSpec::of`],
    /// [`ServiceRecord::all_of`]): agents make the containers from that
    /// spec and refuse a record that says otherwise. 0: the current spec
    /// (records written before this field, tests).
    #[serde(default)]
    pub spec_revision: i64,
    /// Only in records written before flags moved to `secrets/{worker}/{id}`
    /// ([`SecretRecord`]): read by agents and the flag check as a fallback,
    /// never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
    /// The challenge's `flag.file`: the flag is this read-only file in the
    /// containers that get it (written by the agent from the secret),
    /// not `FLAG` in their env.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag_file: Option<String>,
    /// The challenge's solver check, as made from its spec
    /// ([`SolverRecord::of`]): agents compare it with the spec like the
    /// containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver: Option<SolverRecord>,
}

/// What an agent needs to run an instance's solver check: the image, and
/// the port (in the container, and its service) it is pointed at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverRecord {
    pub image: String,
    pub interval_secs: u32,
    pub timeout_secs: u32,
    /// The port inside the container.
    pub target_port: u16,
    /// The service serving it (instances with `services`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceName>,
    /// Replace the instance's containers when a check fails.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace_unhealthy: bool,
}

impl SolverRecord {
    /// The solver check of `spec`'s instances (none without `solver`).
    pub fn of(spec: &crate::ChallengeSpec) -> Option<Self> {
        let solver = spec.solver.as_ref()?;
        let port = match &solver.port {
            Some(name) => spec.ports.iter().find(|p| &p.name == name)?,
            None => spec.ports.first()?,
        };
        let service = if spec.services.is_empty() {
            None
        } else {
            port.service
                .clone()
                .or_else(|| spec.services.keys().next().cloned())
        };
        Some(Self {
            image: solver.image.clone(),
            interval_secs: solver.interval_secs,
            timeout_secs: solver.timeout_secs,
            target_port: port.port,
            service,
            replace_unhealthy: solver.replace_unhealthy,
        })
    }
}

impl InstanceRecord {
    /// Whether it waits in its challenge's pool (no team yet).
    pub fn is_pooled(&self) -> bool {
        self.team.is_none()
    }

    /// Whether it is `team`'s.
    pub fn is_of(&self, team: &TeamId) -> bool {
        self.team.as_ref() == Some(team)
    }

    /// Its team's id, or `""` while it is pooled (for labels and logs).
    pub fn team_str(&self) -> &str {
        self.team.as_ref().map_or("", TeamId::as_str)
    }
}

impl Validate for InstanceRecord {
    fn validate(&self) -> Result<(), FieldError> {
        if self.token <= 0 {
            return Err(FieldError::new("token", "must be a positive etcd revision"));
        }
        if self.expires_at < self.created_at {
            return Err(FieldError::new("expires_at", "is before created_at"));
        }
        let routed = !(self.http.is_empty() && self.tcp.is_empty());
        if self.is_pooled() && routed {
            return Err(FieldError::new(
                "team",
                "a pooled instance (no team) has no routes: it is reached by no hostname or port",
            ));
        }
        if !self.is_pooled() && !routed {
            return Err(FieldError::new(
                "http",
                "an instance needs at least one route",
            ));
        }
        if let Some(f) = &self.flag_file {
            crate::spec::validate_flag_file("flag_file", f, &[])?;
        }
        let mut names = BTreeSet::new();
        for (i, r) in self.http.iter().enumerate() {
            if r.target_port == 0 {
                return Err(FieldError::new(
                    format!("http[{i}].target_port"),
                    "must not be 0",
                ));
            }
            if !names.insert(r.port_name.as_str()) {
                return Err(FieldError::new(
                    format!("http[{i}].port_name"),
                    "listed twice",
                ));
            }
        }
        for (i, r) in self.tcp.iter().enumerate() {
            if r.port == 0 || r.target_port == 0 {
                return Err(FieldError::new(
                    format!("tcp[{i}].port"),
                    "ports must not be 0",
                ));
            }
            if !names.insert(r.port_name.as_str()) {
                return Err(FieldError::new(
                    format!("tcp[{i}].port_name"),
                    "listed twice",
                ));
            }
        }
        match (&self.container, self.services.is_empty()) {
            (Some(c), true) if c.image.trim().is_empty() => {
                return Err(FieldError::new("container.image", "must not be empty"));
            }
            (Some(_), true) => {}
            (None, true) => {
                return Err(FieldError::new(
                    "container",
                    "an instance needs a container or services",
                ));
            }
            (Some(_), false) => {
                return Err(FieldError::new(
                    "services",
                    "an instance has a container or services, not both",
                ));
            }
            (None, false) => {
                for (name, s) in &self.services {
                    if s.container.image.trim().is_empty() {
                        return Err(FieldError::new(
                            format!("services.{name}.container.image"),
                            "must not be empty",
                        ));
                    }
                    if let Some(dep) = s
                        .depends_on
                        .iter()
                        .find(|d| !self.services.contains_key(*d))
                    {
                        return Err(FieldError::new(
                            format!("services.{name}.depends_on"),
                            format!("no service named {:?}", dep.as_str()),
                        ));
                    }
                }
            }
        }
        for (i, service) in self
            .http
            .iter()
            .map(|r| &r.service)
            .chain(self.tcp.iter().map(|r| &r.service))
            .enumerate()
        {
            let known = match service {
                None => self.services.is_empty(),
                Some(s) => self.services.contains_key(s),
            };
            if !known {
                return Err(FieldError::new(
                    format!("routes[{i}].service"),
                    "must name one of the instance's services (none for a one-container instance)",
                ));
            }
        }
        Ok(())
    }
}
impl Record for InstanceRecord {}

/// How an instance's container is doing, as its agent last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase", deny_unknown_fields)]
pub enum InstanceStatus {
    Starting,
    Running,
    Failed { reason: String },
}

impl InstanceStatus {
    /// The state's name (`starting`, `running`, `failed`), for labels.
    pub fn name(&self) -> &'static str {
        match self {
            InstanceStatus::Starting => "starting",
            InstanceStatus::Running => "running",
            InstanceStatus::Failed { .. } => "failed",
        }
    }
}

/// An instance's status (key `status/{worker}/{id}`): where its container
/// listens and how it is doing. Written by its agent under the instance's
/// lease, so it vanishes with the instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRecord {
    pub v: V1,
    pub instance: InstanceId,
    pub worker: WorkerId,
    /// The team of the record it was written for (none: a pooled
    /// instance); routers use a status only for a record of that team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<TeamId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// The container's address, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    pub status: InstanceStatus,
    pub updated_at: UnixSecs,
    /// Each service of an instance with `services`: its container, address
    /// on the instance's network, restarts and state.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<ServiceName, ServiceStatus>,
    /// The last solver check (challenges with a `solver`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver: Option<SolverHealth>,
    /// The spec revision of the record its containers were made from (0:
    /// an agent from before rollouts): a rollout counts an instance as
    /// replaced once its status says the new revision and running.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub spec_revision: i64,
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

/// The outcome of an instance's last solver check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverHealth {
    /// Whether the solver's output held the instance's flag.
    pub healthy: bool,
    pub checked_at: UnixSecs,
    /// Why not (the run's error, or the tail of its output, at most
    /// [`SolverHealth::MAX_DETAIL`] bytes); empty when healthy.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// How many times its worker replaced its containers after a failed
    /// check (`replace_unhealthy`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replacements: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl SolverHealth {
    /// At most this many bytes of a failed run's output are kept.
    pub const MAX_DETAIL: usize = 512;
}

/// How one service of an instance is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceStatus {
    pub state: ServiceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    #[serde(default)]
    pub restarts: u32,
}

/// A service's state: `waiting` for the services it depends on,
/// `starting` (created, or not ready yet), `ready`, `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceState {
    Waiting,
    Starting,
    Ready,
    Failed,
}

impl Validate for StatusRecord {
    fn validate(&self) -> Result<(), FieldError> {
        if matches!(self.status, InstanceStatus::Running) && self.address.is_none() {
            return Err(FieldError::new(
                "address",
                "a running instance needs an address",
            ));
        }
        Ok(())
    }
}
impl Record for StatusRecord {}

/// What only an instance's own worker may read (key
/// `secrets/{worker}/{id}`): its flag. Written by the scheduler in the spawn
/// Txn, under the instance's lease, so it exists exactly as long as the
/// record; the agent reads it once, when it makes the container.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRecord {
    pub v: V1,
    pub instance: InstanceId,
    pub worker: WorkerId,
    /// Given to the container as `FLAG` (or its `flag_file`); empty while
    /// the instance waits in its challenge's pool.
    pub flag: String,
    /// The challenge's `secret_env` (values), given to the container.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

impl fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the flag: a record printed in a log must not leak it.
        f.debug_struct("SecretRecord")
            .field("instance", &self.instance)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

/// A challenge's `secret_env` values (key `challenge-secrets/{challenge}`),
/// written with the challenge record in one Txn and read only by the
/// controllers: the challenge record every worker reads holds the names.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeSecretRecord {
    pub v: V1,
    pub challenge: ChallengeName,
    pub env: BTreeMap<String, String>,
}

impl fmt::Debug for ChallengeSecretRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: a record printed in a log must not leak a value.
        f.debug_struct("ChallengeSecretRecord")
            .field("challenge", &self.challenge)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Validate for ChallengeSecretRecord {
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}
impl Record for ChallengeSecretRecord {}

impl Validate for SecretRecord {
    fn validate(&self) -> Result<(), FieldError> {
        // Empty only in a pooled instance's secret: its flag comes at claim.
        if self.flag.contains('\0') {
            return Err(FieldError::new("flag", "must be without NUL"));
        }
        Ok(())
    }
}
impl Record for SecretRecord {}

/// Which instance a per-instance flag was made for (key
/// `flag-owners/{challenge}/{sha256 of the flag}`): written by the scheduler
/// in the spawn Txn, with no lease, and read only by the controllers'
/// flag check, so that a flag copied from another team's instance, live or
/// ended, is recognised as that team's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagOwnerRecord {
    pub v: V1,
    pub challenge: ChallengeName,
    pub team: TeamId,
    pub instance: InstanceId,
    pub worker: WorkerId,
    pub created_at: UnixSecs,
}

impl Validate for FlagOwnerRecord {
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}
impl Record for FlagOwnerRecord {}

/// A spawn waiting for room (`queue/{challenge}/{team}`): written by the
/// scheduler with its fence when no worker has room (or the challenge's
/// policy said `queue`), on a lease of the challenge's `queue.hold_secs`
/// that each poll of its id renews (a team that stops asking loses its
/// place). The key makes it one per team and challenge; its etcd create
/// revision is its arrival. Admitted by the scheduler in one fenced Txn
/// that deletes it and writes the instance under the same id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueuedRecord {
    pub v: V1,
    /// The id the instance will have.
    pub id: InstanceId,
    pub challenge: ChallengeName,
    pub team: TeamId,
    /// When it joined (Unix seconds).
    pub queued_at: UnixSecs,
    /// The scheduler's fencing token when it joined.
    pub token: i64,
    /// Why it waits: `no_capacity`, `no_network` or `policy`.
    pub reason: String,
    /// The words of the refusal it would have had (what is short).
    #[serde(default)]
    pub detail: String,
    /// Its hold: the lease's TTL, renewed by each poll.
    pub hold_secs: u32,
    /// Its round: 1 + the places its team already held when it joined.
    /// The queue is admitted by round, then by arrival (round-robin across
    /// teams), and a place keeps its round, so positions only go down.
    pub round: u32,
}

impl Validate for QueuedRecord {
    fn validate(&self) -> Result<(), FieldError> {
        if !matches!(
            self.reason.as_str(),
            "no_capacity" | "no_network" | "policy"
        ) {
            return Err(FieldError::new(
                "reason",
                format!("{:?} is not no_capacity, no_network or policy", self.reason),
            ));
        }
        crate::validate::in_range("hold_secs", self.hold_secs, 5, 3600)
    }
}
impl Record for QueuedRecord {}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    /// Replacing the canaries.
    Canary,
    /// Waiting for the canaries' solver checks (or `continue`).
    Gate,
    /// Replacing the other instances, `batch` at a time.
    Batches,
    /// Every instance that was live runs the new revision.
    Done,
    /// Rolling the replaced instances back to the spec restored.
    Aborting,
    /// Rolled back.
    Aborted,
}

impl RolloutPhase {
    /// Whether the rollout still moves (or can be made to).
    pub fn active(self) -> bool {
        !matches!(self, Self::Done | Self::Aborted)
    }
}

/// A challenge's rollout of a new spec to its live instances (key
/// `rollouts/{challenge}`). Organizers' commands (continue, pause, abort)
/// set their flag put-if-revision; the scheduler moves it on with writes
/// fenced by its token and put-if-revision, so a deposed scheduler moves
/// nothing and the next one resumes from here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutRecord {
    pub v: V1,
    pub challenge: ChallengeName,
    /// The spec revision live instances ran before (what abort restores).
    pub from_revision: i64,
    /// The spec revision instances are moved to.
    pub to_revision: i64,
    /// Instances replaced first; the gate waits for their solver checks.
    pub canary: u32,
    /// Instances replaced at once after the gate.
    pub batch: u32,
    pub phase: RolloutPhase,
    /// An organizer paused it: nothing more is replaced until resumed.
    #[serde(default)]
    pub paused: bool,
    /// An organizer's `continue`, until the scheduler acts on it (opens
    /// the gate, or leaves the instances failed in a batch behind).
    #[serde(default)]
    pub continued: bool,
    /// An organizer asked for the canaries (and every replaced instance)
    /// back on the old spec.
    #[serde(default)]
    pub abort: bool,
    /// The canaries, in the order they were picked.
    #[serde(default)]
    pub canaries: Vec<InstanceId>,
    /// Every instance picked for replacement so far (canaries first); one
    /// is rewritten only while its record is not at `to_revision`, so none
    /// is replaced twice.
    #[serde(default)]
    pub replaced: Vec<InstanceId>,
    /// Picked instances that failed on the new revision and that an
    /// organizer's `continue` left behind: they hold the batches no more.
    #[serde(default)]
    pub skipped: Vec<InstanceId>,
    /// The revision the abort wrote the old spec back at (0: not yet).
    #[serde(default)]
    pub restored_revision: i64,
    /// What it waits for now, for people.
    #[serde(default)]
    pub detail: String,
    pub started_at: UnixSecs,
    pub updated_at: UnixSecs,
    /// The spec at `from_revision` and at `to_revision`, copied at the
    /// start: the rollout never reads etcd's history, which compaction
    /// ends (absent: read at those revisions, a record from before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_spec: Option<ChallengeSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_spec: Option<ChallengeSpec>,
}

impl RolloutRecord {
    /// At most this many canaries, and instances per batch.
    pub const MAX_STEP: u32 = 1000;
    /// At most this many bytes of `detail`.
    pub const MAX_DETAIL: usize = 512;
}

impl Validate for RolloutRecord {
    fn validate(&self) -> Result<(), FieldError> {
        crate::validate::in_range("canary", self.canary, 1, Self::MAX_STEP)?;
        crate::validate::in_range("batch", self.batch, 1, Self::MAX_STEP)?;
        if self.from_revision <= 0 || self.to_revision <= self.from_revision {
            return Err(FieldError::new(
                "to_revision",
                format!(
                    "a rollout moves from a revision to a later one, not {} to {}",
                    self.from_revision, self.to_revision
                ),
            ));
        }
        if self.detail.len() > Self::MAX_DETAIL {
            return Err(FieldError::new(
                "detail",
                format!("at most {} bytes", Self::MAX_DETAIL),
            ));
        }
        for (field, spec) in [("from_spec", &self.from_spec), ("to_spec", &self.to_spec)] {
            if let Some(spec) = spec {
                spec.validate()
                    .map_err(|e| FieldError::new(field, e.to_string()))?;
            }
        }
        Ok(())
    }
}
impl Record for RolloutRecord {}

/// Memory, CPU and processes: what a worker gives instances
/// (`allocatable`), or what an instance's limits take, summed over its
/// containers. CPU is in thousandths of a core, so sums are exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Resources {
    pub memory_mib: u64,
    pub millicpus: u64,
    pub pids: u64,
}

impl Resources {
    /// What one container with `limits` takes.
    pub fn of_limits(limits: &Limits) -> Self {
        Self {
            memory_mib: u64::from(limits.memory_mib),
            millicpus: (limits.cpus * 1000.0).round().max(0.0) as u64,
            pids: u64::from(limits.pids),
        }
    }

    /// What an instance of `spec` takes: its one container, or the sum of
    /// its services'.
    pub fn of_spec(spec: &ChallengeSpec) -> Self {
        if spec.services.is_empty() {
            return Self::of_limits(&spec.limits);
        }
        spec.services
            .values()
            .map(|s| Self::of_limits(&s.limits))
            .fold(Self::default(), Self::plus)
    }

    /// What the instance of `record` takes (its containers as written).
    pub fn of_record(record: &InstanceRecord) -> Self {
        match &record.container {
            Some(c) => Self::of_limits(&c.limits),
            None => record
                .services
                .values()
                .map(|s| Self::of_limits(&s.container.limits))
                .fold(Self::default(), Self::plus),
        }
    }

    pub fn plus(self, o: Self) -> Self {
        Self {
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            millicpus: self.millicpus.saturating_add(o.millicpus),
            pids: self.pids.saturating_add(o.pids),
        }
    }

    pub fn minus(self, o: Self) -> Self {
        Self {
            memory_mib: self.memory_mib.saturating_sub(o.memory_mib),
            millicpus: self.millicpus.saturating_sub(o.millicpus),
            pids: self.pids.saturating_sub(o.pids),
        }
    }

    /// The first resource of which `self` needs more than `room` holds:
    /// (name, needed, available), in people's units.
    pub fn short_of(self, room: Self) -> Option<Shortfall> {
        [
            ("memory", self.memory_mib, room.memory_mib, "MiB"),
            ("cpu", self.millicpus, room.millicpus, "millicpus"),
            ("pids", self.pids, room.pids, "processes"),
        ]
        .into_iter()
        .find(|(_, need, have, _)| need > have)
        .map(|(resource, need, have, unit)| Shortfall {
            resource,
            need,
            have,
            unit,
        })
    }
}

/// A resource an instance needs more of than there is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Shortfall {
    /// `memory`, `cpu` or `pids`.
    pub resource: &'static str,
    pub need: u64,
    pub have: u64,
    pub unit: &'static str,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.resource == "cpu" {
            return write!(
                f,
                "cpu: needs {} CPUs, {} available",
                self.need as f64 / 1000.0,
                self.have as f64 / 1000.0
            );
        }
        write!(
            f,
            "{}: needs {} {}, {} available",
            self.resource, self.need, self.unit, self.have
        )
    }
}

/// A worker's membership, under its keep-alive lease. Unknown fields are
/// ignored, not refused: during a rolling upgrade an older agent or
/// controller must still read a newer agent's record (else it forwards
/// nothing to that worker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub v: V1,
    pub id: WorkerId,
    /// Where other agents reach this one.
    pub address: IpAddr,
    /// The Pingora HTTP entry point.
    pub http_entry: SocketAddr,
    /// The address whose ports the TCP redirector serves.
    pub tcp_host: IpAddr,
    /// How many instances it may run at once.
    pub capacity: u32,
    /// Where the agent serves `/metrics` and `/activity` (the last traffic
    /// of each instance it runs, read by the leader for `on-idle` policies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
    /// The per-instance networks (of instances with `services`) it has in
    /// use and free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<NetworkUse>,
    /// What it gives instances in all (their summed limits are placed
    /// within it); absent from agents older than resource placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocatable: Option<Resources>,
    /// The agent's version, for mixed-version clusters.
    pub version: String,
    pub started_at: UnixSecs,
}

/// A worker's per-instance networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkUse {
    pub used: u32,
    pub free: u32,
}

impl Validate for WorkerRecord {
    fn validate(&self) -> Result<(), FieldError> {
        if self.capacity == 0 {
            return Err(FieldError::new("capacity", "must be at least 1"));
        }
        if self.http_entry.port() == 0 {
            return Err(FieldError::new("http_entry", "needs a port"));
        }
        Ok(())
    }
}
impl Record for WorkerRecord {}

#[cfg(test)]
mod tests;
