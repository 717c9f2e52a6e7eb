//! The challenge spec organizers write (the body of `PUT /v1/challenges/{name}`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Deserializer, Serialize};

use crate::names::{PortName, ServiceName};
use crate::validate::{FieldError, Validate, in_range};

/// At most this many ports per challenge.
pub const MAX_PORTS: usize = 16;
/// The longest instance lifetime any challenge may ask for: 7 days.
pub const MAX_TTL_SECS: u64 = 7 * 24 * 3600;
/// The shortest instance lifetime.
pub const MIN_TTL_SECS: u64 = 30;
/// The placeholder in a flag template replaced by the per-instance HMAC.
pub const FLAG_PLACEHOLDER: &str = "{hmac}";
/// Environment variable names the platform sets itself.
pub const RESERVED_ENV: &[&str] = &["FLAG"];

/// Capabilities a challenge may add back after `cap-drop ALL`.
pub const ALLOWED_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "AUDIT_WRITE",
    "SETFCAP",
    "SYS_PTRACE",
];

/// Capabilities that let an instance attack its neighbours (raw sockets:
/// ARP and IP spoofing on the shared bridge). A challenge gets one only by
/// naming it in `unsafe_caps` (docs/security.md).
pub const UNSAFE_CAPS: &[&str] = &["NET_RAW"];

/// At most this many tmpfs mounts per container.
pub const MAX_TMPFS: usize = 8;
/// At most this many services (containers) per instance.
pub const MAX_SERVICES: usize = 8;
/// The name of the one service of a challenge given in the short form
/// (`image` and the container fields at the top level).
pub const SHORT_FORM_SERVICE: &str = "app";
/// At most this many arguments in a service's `command`.
pub const MAX_COMMAND_ARGS: usize = 64;

/// A challenge: what to run for each team, and the rules for its instances.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeSpec {
    /// The container image (built or loaded into each worker's Docker
    /// engine) of a one-service challenge: the short form, whose service is
    /// named `app` and takes `env`, `limits`, `cap_add`, `read_only_rootfs`
    /// and `tmpfs` from the top level. Left out when `services` is given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub image: String,
    /// The containers of each instance by service name (at most 8), instead
    /// of `image`: each with its own image and container fields, reaching
    /// the others by their names on the instance's own network.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "each_service_once"
    )]
    pub services: BTreeMap<ServiceName, ServiceSpec>,
    /// The ports the instance serves, each exposed as a hostname (`http`)
    /// or a public TCP port (`tcp`).
    pub ports: Vec<PortSpec>,
    /// Extra environment for the container. `FLAG` is set by tidegate.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment whose values are secrets (API keys, an admin bot's
    /// password): kept apart from the challenge record, which every worker
    /// reads, and given to each instance through its worker's secret
    /// record. API answers list the names with empty values; a PUT sends
    /// the values again.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_env: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub ttl: TtlSpec,
    /// Live instances one team may have of this challenge at once.
    #[serde(default = "default_per_team_max")]
    pub per_team_max: u32,
    #[serde(default)]
    pub flag: FlagSpec,
    /// Let the container open outbound connections (off by default).
    #[serde(default)]
    pub egress: bool,
    /// Mount the image's root filesystem read-only (the default): the
    /// container writes only to its `tmpfs` mounts, each bounded. `false`
    /// gives it a writable layer, which the agent runs only where Docker
    /// can bound it or its config says `allow_unbounded_rootfs`.
    #[serde(default = "yes")]
    pub read_only_rootfs: bool,
    /// Writable in-memory mounts (counted in the memory limit). Default:
    /// `/tmp` of 64 MiB.
    #[serde(default = "default_tmpfs")]
    pub tmpfs: Vec<TmpfsSpec>,
    /// Capabilities added back after `cap-drop ALL` (from [`ALLOWED_CAPS`]).
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// Capabilities from [`UNSAFE_CAPS`], for a challenge that really needs
    /// one: set by the organizer on purpose (docs/security.md).
    #[serde(default)]
    pub unsafe_caps: Vec<String>,
    /// What a policy plugin's decision becomes when the plugin traps, runs
    /// past its deadline or its memory cap: `deny` (default) or `allow`.
    #[serde(default)]
    pub policy_fallback: PolicyFallback,
    /// A TCP connection to an instance that moves no byte either way for
    /// this many seconds is closed by the agent (10–86400).
    #[serde(
        default = "default_tcp_idle",
        skip_serializing_if = "is_default_tcp_idle"
    )]
    pub tcp_idle_timeout_secs: u32,
    /// How the agents serve this challenge's HTTP: `l7` (every request
    /// parsed, routed and counted) or `pinned` (the first request decides
    /// the instance for the whole connection, then bytes are spliced; no
    /// `X-Forwarded-*` headers). Unset: the agent's `http_mode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_mode: Option<HttpMode>,
    /// What a spawn gets when no worker has room, or when the challenge's
    /// policy says `queue`: a place in the scheduler's fair queue (202,
    /// default) or a refusal (503/429). `queue = false` turns it off;
    /// `queue = { hold_secs, max_waiting }` tunes it.
    #[serde(default, skip_serializing_if = "QueueSpec::is_default")]
    pub queue: QueueSpec,
    /// A warm pool: `min` instances started before any team asks, handed
    /// out at spawn in one Txn (no container to start). The target grows
    /// with the spawns of the last minute up to `max`. A per-instance flag
    /// then needs `flag.file` (env is fixed when a container starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolSpec>,
    /// A solver check: an image that, given one of the instance's ports,
    /// solves the challenge and prints the flag. The owning worker runs it
    /// once the instance runs and every `interval_secs`; an instance whose
    /// solver's output lacks its flag is shown `unhealthy` with the tail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub solver: Option<SolverSpec>,
}

/// [`ChallengeSpec::solver`]: what checks that an instance can still be
/// solved. The solver runs hardened (as the challenge's containers: no
/// capabilities, read-only root, 128 MiB, 0.5 CPU), on the instance's
/// network, with `TARGET` = `host:port` of its port (and `TARGET_HOST`,
/// `TARGET_PORT`); it never gets the flag.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SolverSpec {
    /// The solver's image (on each worker, like the challenge's).
    pub image: String,
    /// The port it is pointed at, by name (default: the first port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortName>,
    /// Seconds between two checks of a running instance (10–86400,
    /// default 300); the first runs once the instance runs.
    #[serde(default = "default_solver_interval")]
    pub interval_secs: u32,
    /// A run taking longer is stopped and fails the check (1–300 s,
    /// default 30, at most `interval_secs`).
    #[serde(default = "default_solver_timeout")]
    pub timeout_secs: u32,
    /// Replace an instance whose check failed: its worker removes its
    /// containers and makes them again (same id, hostnames, ports, team,
    /// expiry and flag; a fresh state), at most
    /// [`MAX_SOLVER_REPLACEMENTS`] times, then leaves it unhealthy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace_unhealthy: bool,
}

/// How many times a worker replaces one unhealthy instance before it
/// leaves it as it is ([`SolverSpec::replace_unhealthy`]).
pub const MAX_SOLVER_REPLACEMENTS: u32 = 3;

/// Default [`SolverSpec::interval_secs`].
pub const DEFAULT_SOLVER_INTERVAL_SECS: u32 = 300;
/// Default [`SolverSpec::timeout_secs`].
pub const DEFAULT_SOLVER_TIMEOUT_SECS: u32 = 30;

fn default_solver_interval() -> u32 {
    DEFAULT_SOLVER_INTERVAL_SECS
}

fn default_solver_timeout() -> u32 {
    DEFAULT_SOLVER_TIMEOUT_SECS
}

/// [`ChallengeSpec::pool`]: how many unassigned instances the scheduler
/// keeps started.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// Kept started while no spawn needs the room (0–100).
    pub min: u32,
    /// At most this many when spawns come fast (1–100, at least `min`).
    pub max: u32,
}

/// At most this many pooled instances per challenge.
pub const MAX_POOL: u32 = 100;

/// [`ChallengeSpec::queue`]: whether spawns that find no room wait in the
/// scheduler's queue, how long a place is held without being asked about,
/// and how many may wait for this challenge at once.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueSpec {
    /// Spawns that find no room wait (default true).
    pub enabled: bool,
    /// A place is lost when its id is not asked about (`GET
    /// /v1/instances/{id}`) for this many seconds (5–3600, default 60).
    pub hold_secs: u32,
    /// At most this many spawns of this challenge wait at once; past it,
    /// 503 (1–100000, default 1000).
    pub max_waiting: u32,
}

/// [`QueueSpec::hold_secs`] when a spec does not say.
pub const DEFAULT_QUEUE_HOLD_SECS: u32 = 60;
/// [`QueueSpec::max_waiting`] when a spec does not say.
pub const DEFAULT_QUEUE_MAX_WAITING: u32 = 1000;

impl Default for QueueSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            hold_secs: DEFAULT_QUEUE_HOLD_SECS,
            max_waiting: DEFAULT_QUEUE_MAX_WAITING,
        }
    }
}

impl QueueSpec {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The table form of `queue`; every field optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueTable {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default = "default_queue_hold")]
    hold_secs: u32,
    #[serde(default = "default_queue_max")]
    max_waiting: u32,
}

fn default_queue_hold() -> u32 {
    DEFAULT_QUEUE_HOLD_SECS
}

fn default_queue_max() -> u32 {
    DEFAULT_QUEUE_MAX_WAITING
}

/// `queue` is `true`, `false`, or a table of [`QueueSpec`]'s fields.
impl<'de> Deserialize<'de> for QueueSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Form;
        impl<'de> serde::de::Visitor<'de> for Form {
            type Value = QueueSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or a table with enabled, hold_secs and max_waiting")
            }
            fn visit_bool<E: serde::de::Error>(self, enabled: bool) -> Result<QueueSpec, E> {
                Ok(QueueSpec {
                    enabled,
                    ..QueueSpec::default()
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<QueueSpec, A::Error> {
                let t = QueueTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(QueueSpec {
                    enabled: t.enabled,
                    hold_secs: t.hold_secs,
                    max_waiting: t.max_waiting,
                })
            }
        }
        d.deserialize_any(Form)
    }
}

/// [`ChallengeSpec::tcp_idle_timeout_secs`] when a spec does not say.
pub const DEFAULT_TCP_IDLE_SECS: u32 = 600;

fn default_tcp_idle() -> u32 {
    DEFAULT_TCP_IDLE_SECS
}

fn is_default_tcp_idle(secs: &u32) -> bool {
    *secs == DEFAULT_TCP_IDLE_SECS
}

/// How an agent serves HTTP/1.1 connections (see docs/architecture.md,
/// "Pinned HTTP").
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpMode {
    /// Every request goes through the L7 proxy: routed by its own Host,
    /// counted, given `X-Forwarded-*`.
    #[default]
    L7,
    /// The first request head routes the connection; the rest of it is
    /// spliced to that instance unparsed.
    Pinned,
}

/// The decision used when a challenge's policy plugin fails.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyFallback {
    /// Refuse the spawn, renewal or connection (the answer names the failure).
    #[default]
    Deny,
    /// Go on as if the challenge had no policy.
    Allow,
}

fn default_per_team_max() -> u32 {
    1
}

fn yes() -> bool {
    true
}

fn default_tmpfs() -> Vec<TmpfsSpec> {
    vec![TmpfsSpec {
        path: "/tmp".into(),
        size_mib: 64,
    }]
}

/// One container of a challenge with `services`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// The container image (built or loaded into each worker's Docker engine).
    pub image: String,
    /// Extra environment. `FLAG` and the challenge's `secret_env` are set
    /// in the services `flag.services` names.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: Limits,
    /// Capabilities added back after `cap-drop ALL` (from [`ALLOWED_CAPS`]).
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// Mount the image's root filesystem read-only (the default).
    #[serde(default = "yes")]
    pub read_only_rootfs: bool,
    /// Writable in-memory mounts (counted in the memory limit). Default:
    /// `/tmp` of 64 MiB.
    #[serde(default = "default_tmpfs")]
    pub tmpfs: Vec<TmpfsSpec>,
    /// The command and its arguments, instead of the image's own (at most
    /// 64 arguments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// When the service is ready: a TCP port that accepts, or an HTTP path
    /// that answers. Without it, once its container runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadySpec>,
    /// Services started (and ready) before this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<ServiceName>,
}

/// How a service shows it is ready.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ReadySpec {
    /// This port accepts a TCP connection.
    Tcp(u16),
    /// `GET path` on this port answers 2xx or 3xx.
    Http { port: u16, path: String },
}

/// `services` from a JSON object, refusing a name given twice (which a
/// map would otherwise keep the last of, silently).
fn each_service_once<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<ServiceName, ServiceSpec>, D::Error> {
    struct Once;
    impl<'de> serde::de::Visitor<'de> for Once {
        type Value = BTreeMap<ServiceName, ServiceSpec>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map from service names to services")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(name) = map.next_key::<ServiceName>()? {
                if out.contains_key(&name) {
                    return Err(serde::de::Error::custom(format!(
                        "service {:?} listed twice",
                        name.as_str()
                    )));
                }
                let service = map.next_value()?;
                out.insert(name, service);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Once)
}

/// One writable in-memory mount of each instance.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TmpfsSpec {
    /// Where it is mounted: an absolute path, not `/`.
    pub path: String,
    /// Its size in MiB (1 to 4096; all mounts together at most `limits.memory_mib`).
    pub size_mib: u32,
}

/// One port of a challenge.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub name: PortName,
    /// The port inside the container.
    pub port: u16,
    pub protocol: Protocol,
    /// The service that serves it: required when `services` lists more
    /// than one (the short form's service is `app`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceName>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

/// Resource limits of each instance's container.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Memory limit in MiB (16 to 65536; default 256).
    pub memory_mib: u32,
    /// CPU limit in cores (0.01 to 64; default 0.5).
    pub cpus: f64,
    /// Process limit (16 to 32768; default 128).
    pub pids: u32,
    /// Container log kept on the worker in MiB, in two rotated files (1 to
    /// 1024; default 8). Older output is dropped.
    pub log_mib: u32,
    /// Open files per process, the `nofile` ulimit (64 to 65536; default 1024).
    pub nofile: u32,
    /// Processes per user inside the instance, the `nproc` ulimit (16 to
    /// 32768; default 256).
    pub nproc: u32,
    /// Size of the writable layer in MiB when `read_only_rootfs = false`
    /// (64 to 65536; default 512). Docker bounds it only on overlay2 over
    /// xfs with `pquota`; elsewhere such a challenge fails to start unless
    /// the agent's config says `allow_unbounded_rootfs`.
    pub disk_mib: u32,
    /// Relative block IO weight (10 to 1000; default 100). Applied where
    /// the kernel's IO scheduler supports weights (BFQ); Docker logs and
    /// drops it elsewhere.
    pub io_weight: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: 256,
            cpus: 0.5,
            pids: 128,
            log_mib: 8,
            disk_mib: 512,
            nofile: 1024,
            nproc: 256,
            io_weight: 100,
        }
    }
}

/// How long instances live.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtlSpec {
    /// Lifetime of a new instance, in seconds (default 1800).
    pub default_secs: u64,
    /// The longest total lifetime renewals may reach, in seconds (default 7200).
    pub max_secs: u64,
    /// How many times an instance may be renewed (default 3).
    pub max_renewals: u32,
}

impl Default for TtlSpec {
    fn default() -> Self {
        Self {
            default_secs: 1800,
            max_secs: 7200,
            max_renewals: 3,
        }
    }
}

/// How each instance's flag is made.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlagSpec {
    /// The flag text; `{hmac}` is replaced by an HMAC of a server secret,
    /// the team, the challenge and the instance. Default `flag{{hmac}}`.
    pub template: String,
    /// The services given the flag (`FLAG`) and `secret_env` (an XSS
    /// challenge's admin bot, not its app); default: every service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<ServiceName>>,
    /// Give the flag as this read-only file in the container (an absolute
    /// path, e.g. `/flag`) instead of `FLAG` in env. The agent writes it
    /// when the instance is handed to a team, so a pooled instance (started
    /// before any team had it) gets its own flag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

impl Default for FlagSpec {
    fn default() -> Self {
        Self {
            template: format!("flag{{{FLAG_PLACEHOLDER}}}"),
            services: None,
            file: None,
        }
    }
}

/// The container fields one service has, wherever the spec gives them
/// (the top level in the short form, or an entry of `services`), and the
/// prefix that names them in errors.
struct Container<'a> {
    prefix: String,
    image: &'a str,
    env: &'a BTreeMap<String, String>,
    limits: &'a Limits,
    cap_add: &'a [String],
    tmpfs: &'a [TmpfsSpec],
}

impl Validate for ChallengeSpec {
    fn validate(&self) -> Result<(), FieldError> {
        if self.ports.is_empty() {
            return Err(FieldError::new(
                "ports",
                "a challenge needs at least one port",
            ));
        }
        if self.ports.len() > MAX_PORTS {
            return Err(FieldError::new(
                "ports",
                format!("at most {MAX_PORTS} ports"),
            ));
        }
        self.validate_services()?;
        for c in self.containers() {
            c.validate(&self.secret_env)?;
        }
        self.validate_ports()?;
        self.validate_secret_env()?;
        self.validate_ttl()?;
        in_range("per_team_max", self.per_team_max, 1, 100)?;
        in_range(
            "tcp_idle_timeout_secs",
            self.tcp_idle_timeout_secs,
            10,
            86_400,
        )?;
        self.validate_flag()?;
        in_range("queue.hold_secs", self.queue.hold_secs, 5, 3600)?;
        in_range("queue.max_waiting", self.queue.max_waiting, 1, 100_000)?;
        self.validate_pool()?;
        self.validate_solver()?;
        for (i, cap) in self.unsafe_caps.iter().enumerate() {
            let bare = cap.strip_prefix("CAP_").unwrap_or(cap);
            if !UNSAFE_CAPS.contains(&bare) {
                return Err(FieldError::new(
                    format!("unsafe_caps[{i}]"),
                    format!("{cap:?} is not one of {}", UNSAFE_CAPS.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

impl<'a> Container<'a> {
    fn field(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn validate(&self, secret_env: &BTreeMap<String, String>) -> Result<(), FieldError> {
        let image = self.image;
        if image.is_empty()
            || image.len() > 255
            || image.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(FieldError::new(
                self.field("image"),
                format!("{image:?} is not an image reference (1-255 characters, no spaces)"),
            ));
        }
        self.validate_env(secret_env)?;
        self.validate_limits()?;
        self.validate_caps()?;
        self.validate_tmpfs()
    }

    /// At most 64 variables in `env` and `secret_env` together, with names
    /// and values the container can have.
    fn validate_env(&self, secret_env: &BTreeMap<String, String>) -> Result<(), FieldError> {
        if self.env.len() + secret_env.len() > 64 {
            return Err(FieldError::new(
                self.field("env"),
                "at most 64 variables (env and secret_env together)",
            ));
        }
        for (k, v) in self.env {
            check_env(&self.field(&format!("env.{k}")), k, v)?;
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), FieldError> {
        let l = self.limits;
        let f = |name: &str| self.field(&format!("limits.{name}"));
        in_range(&f("memory_mib"), l.memory_mib, 16, 65536)?;
        if !l.cpus.is_finite() {
            return Err(FieldError::new(f("cpus"), "must be a number"));
        }
        in_range(&f("cpus"), l.cpus, 0.01, 64.0)?;
        in_range(&f("pids"), l.pids, 16, 32768)?;
        in_range(&f("log_mib"), l.log_mib, 1, 1024)?;
        in_range(&f("disk_mib"), l.disk_mib, 64, 65536)?;
        in_range(&f("nofile"), l.nofile, 64, 65536)?;
        in_range(&f("nproc"), l.nproc, 16, 32768)?;
        in_range(&f("io_weight"), l.io_weight, 10, 1000)?;
        Ok(())
    }

    /// `cap_add` from [`ALLOWED_CAPS`].
    fn validate_caps(&self) -> Result<(), FieldError> {
        for (i, cap) in self.cap_add.iter().enumerate() {
            let bare = cap.strip_prefix("CAP_").unwrap_or(cap);
            if UNSAFE_CAPS.contains(&bare) {
                return Err(FieldError::new(
                    self.field(&format!("cap_add[{i}]")),
                    format!(
                        "{cap:?} lets an instance spoof its neighbours; a challenge that really needs it \
                         names it in unsafe_caps (docs/security.md)"
                    ),
                ));
            }
            if !ALLOWED_CAPS.contains(&bare) {
                return Err(FieldError::new(
                    self.field(&format!("cap_add[{i}]")),
                    format!("{cap:?} is not one of {}", ALLOWED_CAPS.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// Absolute, distinct paths; sizes within the memory limit.
    fn validate_tmpfs(&self) -> Result<(), FieldError> {
        if self.tmpfs.len() > MAX_TMPFS {
            return Err(FieldError::new(
                self.field("tmpfs"),
                format!("at most {MAX_TMPFS} mounts"),
            ));
        }
        let mut paths = BTreeSet::new();
        let mut total = 0u64;
        for (i, t) in self.tmpfs.iter().enumerate() {
            let p = t.path.as_str();
            let clean = p.starts_with('/')
                && p.len() > 1
                && p.len() <= 255
                && !p.ends_with('/')
                && p.split('/')
                    .skip(1)
                    .all(|c| !c.is_empty() && c != "." && c != "..")
                && p.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b',' && b != b':');
            if !clean {
                return Err(FieldError::new(
                    self.field(&format!("tmpfs[{i}].path")),
                    format!("{p:?} is not an absolute path below / (no '..', ',' or ':')"),
                ));
            }
            if !paths.insert(p) {
                return Err(FieldError::new(
                    self.field(&format!("tmpfs[{i}].path")),
                    format!("{p:?} listed twice"),
                ));
            }
            in_range(
                &self.field(&format!("tmpfs[{i}].size_mib")),
                t.size_mib,
                1,
                4096,
            )?;
            total += u64::from(t.size_mib);
        }
        if total > u64::from(self.limits.memory_mib) {
            return Err(FieldError::new(
                self.field("tmpfs"),
                format!(
                    "{total} MiB in all is more than limits.memory_mib ({}): tmpfs is memory",
                    self.limits.memory_mib
                ),
            ));
        }
        Ok(())
    }
}

/// One environment variable: a name and a value the container can have,
/// not one tidegate sets.
fn check_env(field: &str, k: &str, v: &str) -> Result<(), FieldError> {
    let valid_name = !k.is_empty()
        && k.len() <= 128
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !k.as_bytes()[0].is_ascii_digit();
    if !valid_name {
        return Err(FieldError::new(
            field,
            "names are letters, digits and '_', not starting with a digit",
        ));
    }
    if RESERVED_ENV.contains(&k) {
        return Err(FieldError::new(
            field,
            "is set by tidegate (the instance's flag)",
        ));
    }
    if v.len() > 4096 || v.contains('\0') {
        return Err(FieldError::new(
            field,
            "values are at most 4096 bytes, without NUL",
        ));
    }
    Ok(())
}

impl ChallengeSpec {
    /// The service names: `services`' keys, or the short form's `app`.
    pub fn service_names(&self) -> Vec<&str> {
        if self.services.is_empty() {
            vec![SHORT_FORM_SERVICE]
        } else {
            self.services.keys().map(ServiceName::as_str).collect()
        }
    }

    /// Every container's tmpfs mount paths.
    fn tmpfs_paths(&self) -> Vec<&str> {
        self.containers()
            .iter()
            .flat_map(|c| c.tmpfs.iter().map(|t| t.path.as_str()))
            .collect()
    }

    /// Each service's container fields, with the prefix naming them.
    fn containers(&self) -> Vec<Container<'_>> {
        if self.services.is_empty() {
            return vec![Container {
                prefix: String::new(),
                image: &self.image,
                env: &self.env,
                limits: &self.limits,
                cap_add: &self.cap_add,
                tmpfs: &self.tmpfs,
            }];
        }
        self.services
            .iter()
            .map(|(name, s)| Container {
                prefix: format!("services.{name}."),
                image: &s.image,
                env: &s.env,
                limits: &s.limits,
                cap_add: &s.cap_add,
                tmpfs: &s.tmpfs,
            })
            .collect()
    }

    /// `image` or `services`, not both; with `services`, the container
    /// fields per service and not at the top level; each service's
    /// command, readiness and dependencies (known names, no cycle).
    fn validate_services(&self) -> Result<(), FieldError> {
        if self.services.is_empty() {
            if self.image.is_empty() {
                return Err(FieldError::new(
                    "image",
                    "a challenge needs an image (one service) or services",
                ));
            }
            return Ok(());
        }
        if !self.image.is_empty() {
            return Err(FieldError::new(
                "image",
                "give image (one service) or services, not both",
            ));
        }
        if self.services.len() > MAX_SERVICES {
            return Err(FieldError::new(
                "services",
                format!("at most {MAX_SERVICES} services"),
            ));
        }
        let top_level: [(&str, bool); 5] = [
            ("env", !self.env.is_empty()),
            ("limits", self.limits != Limits::default()),
            ("cap_add", !self.cap_add.is_empty()),
            ("read_only_rootfs", !self.read_only_rootfs),
            ("tmpfs", self.tmpfs != default_tmpfs()),
        ];
        if let Some((field, _)) = top_level.iter().find(|(_, set)| *set) {
            return Err(FieldError::new(
                *field,
                format!("with services, each service has its own {field}"),
            ));
        }
        for (name, s) in &self.services {
            let field = |f: &str| format!("services.{name}.{f}");
            if let Some(cmd) = &s.command {
                if cmd.is_empty() || cmd.len() > MAX_COMMAND_ARGS {
                    return Err(FieldError::new(
                        field("command"),
                        format!("1 to {MAX_COMMAND_ARGS} arguments"),
                    ));
                }
                if cmd.iter().any(|a| a.len() > 4096 || a.contains('\0')) {
                    return Err(FieldError::new(
                        field("command"),
                        "arguments are at most 4096 bytes, without NUL",
                    ));
                }
            }
            match &s.ready {
                Some(ReadySpec::Tcp(0)) => {
                    return Err(FieldError::new(field("ready.tcp"), "must be 1 to 65535"));
                }
                Some(ReadySpec::Http { port, path }) => {
                    if *port == 0 {
                        return Err(FieldError::new(
                            field("ready.http.port"),
                            "must be 1 to 65535",
                        ));
                    }
                    if !path.starts_with('/')
                        || path.len() > 255
                        || !path.bytes().all(|b| b.is_ascii_graphic())
                    {
                        return Err(FieldError::new(
                            field("ready.http.path"),
                            format!(
                                "{path:?} is not a path (starting with '/', at most 255 printable characters)"
                            ),
                        ));
                    }
                }
                _ => {}
            }
            let mut seen = BTreeSet::new();
            for (i, dep) in s.depends_on.iter().enumerate() {
                let at = field(&format!("depends_on[{i}]"));
                if dep == name {
                    return Err(FieldError::new(at, "a service cannot depend on itself"));
                }
                if !self.services.contains_key(dep) {
                    return Err(FieldError::new(
                        at,
                        format!("no service named {:?}", dep.as_str()),
                    ));
                }
                if !seen.insert(dep) {
                    return Err(FieldError::new(
                        at,
                        format!("{:?} listed twice", dep.as_str()),
                    ));
                }
            }
        }
        if let Some(cycle) = self.dependency_cycle() {
            return Err(FieldError::new(
                format!("services.{}.depends_on", cycle[0]),
                format!("a cycle: {}", cycle.join(" → ")),
            ));
        }
        Ok(())
    }

    /// A cycle in `depends_on`, as the names along it (the first again at
    /// the end), if there is one.
    fn dependency_cycle(&self) -> Option<Vec<&str>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        fn visit<'a>(
            spec: &'a ChallengeSpec,
            name: &'a ServiceName,
            marks: &mut BTreeMap<&'a ServiceName, Mark>,
            path: &mut Vec<&'a ServiceName>,
        ) -> Option<Vec<&'a str>> {
            match marks.get(name).copied().unwrap_or(Mark::New) {
                Mark::Done => return None,
                Mark::OnPath => {
                    let from = path.iter().position(|n| *n == name).unwrap_or(0);
                    let mut cycle: Vec<&str> = path[from..].iter().map(|n| n.as_str()).collect();
                    cycle.push(name.as_str());
                    return Some(cycle);
                }
                Mark::New => {}
            }
            marks.insert(name, Mark::OnPath);
            path.push(name);
            for dep in spec.services.get(name).map_or(&[][..], |s| &s.depends_on) {
                if let Some(cycle) = visit(spec, dep, marks, path) {
                    return Some(cycle);
                }
            }
            path.pop();
            marks.insert(name, Mark::Done);
            None
        }
        let mut marks = BTreeMap::new();
        for name in self.services.keys() {
            if let Some(cycle) = visit(self, name, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
        None
    }

    /// Each port: a number, a name used once, the service that serves it
    /// (named when there are several), and a number used once per service.
    fn validate_ports(&self) -> Result<(), FieldError> {
        let services = self.service_names();
        let mut names = BTreeSet::new();
        let mut numbers = BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                return Err(FieldError::new(
                    format!("ports[{i}].port"),
                    "must be 1 to 65535",
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(FieldError::new(
                    format!("ports[{i}].name"),
                    format!("{:?} listed twice", p.name.as_str()),
                ));
            }
            let service = match &p.service {
                Some(s) if services.contains(&s.as_str()) => s.as_str(),
                Some(s) => {
                    return Err(FieldError::new(
                        format!("ports[{i}].service"),
                        format!(
                            "no service named {:?} (the services: {})",
                            s.as_str(),
                            services.join(", ")
                        ),
                    ));
                }
                None if services.len() == 1 => services[0],
                None => {
                    return Err(FieldError::new(
                        format!("ports[{i}].service"),
                        format!(
                            "name the service that serves it: one of {}",
                            services.join(", ")
                        ),
                    ));
                }
            };
            if !numbers.insert((service, p.port)) {
                return Err(FieldError::new(
                    format!("ports[{i}].port"),
                    format!("port {} of {service} listed twice", p.port),
                ));
            }
        }
        Ok(())
    }

    /// `secret_env`: names and values a container can have, none also in
    /// the `env` of a service it goes to.
    fn validate_secret_env(&self) -> Result<(), FieldError> {
        let containers = self.containers();
        for (k, v) in &self.secret_env {
            let field = format!("secret_env.{k}");
            check_env(&field, k, v)?;
            if containers.iter().any(|c| c.env.contains_key(k)) {
                return Err(FieldError::new(
                    field,
                    "is in env too: name it in one of them",
                ));
            }
        }
        Ok(())
    }

    fn validate_flag(&self) -> Result<(), FieldError> {
        let t = &self.flag.template;
        if t.is_empty() || t.len() > 256 || t.chars().any(char::is_control) {
            return Err(FieldError::new(
                "flag.template",
                "1-256 printable characters",
            ));
        }
        if t.matches(FLAG_PLACEHOLDER).count() > 1 {
            return Err(FieldError::new(
                "flag.template",
                format!("{FLAG_PLACEHOLDER} may appear once"),
            ));
        }
        if let Some(file) = &self.flag.file {
            validate_flag_file("flag.file", file, &self.tmpfs_paths())?;
        }
        let Some(to) = &self.flag.services else {
            return Ok(());
        };
        if to.is_empty() {
            return Err(FieldError::new(
                "flag.services",
                "name at least one service (or leave it out: every service)",
            ));
        }
        let services = self.service_names();
        let mut seen = BTreeSet::new();
        for (i, s) in to.iter().enumerate() {
            if !services.contains(&s.as_str()) {
                return Err(FieldError::new(
                    format!("flag.services[{i}]"),
                    format!(
                        "no service named {:?} (the services: {})",
                        s.as_str(),
                        services.join(", ")
                    ),
                ));
            }
            if !seen.insert(s) {
                return Err(FieldError::new(
                    format!("flag.services[{i}]"),
                    format!("{:?} listed twice", s.as_str()),
                ));
            }
        }
        Ok(())
    }

    fn validate_pool(&self) -> Result<(), FieldError> {
        let Some(pool) = self.pool else {
            return Ok(());
        };
        in_range("pool.min", pool.min, 0, MAX_POOL)?;
        in_range("pool.max", pool.max, 1, MAX_POOL)?;
        if pool.min > pool.max {
            return Err(FieldError::new(
                "pool.min",
                format!("{} is more than pool.max ({})", pool.min, pool.max),
            ));
        }
        if self.per_instance_flag() && self.flag.file.is_none() {
            return Err(FieldError::new(
                "flag.file",
                "a pooled challenge with a per-instance flag takes it from a file (env is fixed when the container starts, before a team has it): set flag.file, e.g. \"/flag\"",
            ));
        }
        Ok(())
    }

    fn validate_solver(&self) -> Result<(), FieldError> {
        let Some(solver) = &self.solver else {
            return Ok(());
        };
        let image = &solver.image;
        if image.is_empty()
            || image.len() > 255
            || image.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(FieldError::new(
                "solver.image",
                format!("{image:?} is not an image reference (1-255 characters, no spaces)"),
            ));
        }
        if let Some(port) = &solver.port
            && !self.ports.iter().any(|p| &p.name == port)
        {
            return Err(FieldError::new(
                "solver.port",
                format!("{:?} is not one of the challenge's ports", port.as_str()),
            ));
        }
        in_range("solver.interval_secs", solver.interval_secs, 10, 86_400)?;
        in_range("solver.timeout_secs", solver.timeout_secs, 1, 300)?;
        if solver.timeout_secs > solver.interval_secs {
            return Err(FieldError::new(
                "solver.timeout_secs",
                format!(
                    "{} is more than solver.interval_secs ({})",
                    solver.timeout_secs, solver.interval_secs
                ),
            ));
        }
        Ok(())
    }

    fn validate_ttl(&self) -> Result<(), FieldError> {
        in_range(
            "ttl.default_secs",
            self.ttl.default_secs,
            MIN_TTL_SECS,
            MAX_TTL_SECS,
        )?;
        in_range(
            "ttl.max_secs",
            self.ttl.max_secs,
            MIN_TTL_SECS,
            MAX_TTL_SECS,
        )?;
        if self.ttl.default_secs > self.ttl.max_secs {
            return Err(FieldError::new(
                "ttl.default_secs",
                format!(
                    "{} is more than ttl.max_secs ({})",
                    self.ttl.default_secs, self.ttl.max_secs
                ),
            ));
        }
        in_range("ttl.max_renewals", self.ttl.max_renewals, 0, 1000)?;
        Ok(())
    }

    /// The spec as stored in the challenge record and shown in API answers
    /// (`secret_env` values emptied), and the secret values apart.
    pub fn without_secret_values(mut self) -> (Self, BTreeMap<String, String>) {
        let values = std::mem::take(&mut self.secret_env);
        self.secret_env = values.keys().map(|k| (k.clone(), String::new())).collect();
        (self, values)
    }

    /// Whether each instance has its own flag (the template has `{hmac}`);
    /// otherwise every instance has the template itself.
    pub fn per_instance_flag(&self) -> bool {
        self.flag.template.contains(FLAG_PLACEHOLDER)
    }

    /// The flag of one instance, given the HMAC text for it.
    pub fn render_flag(&self, hmac_hex: &str) -> String {
        self.flag.template.replace(FLAG_PLACEHOLDER, hmac_hex)
    }
}

/// `flag.file`: an absolute path of plain components, outside the
/// kernel's and the engine's own trees and not a tmpfs mount itself;
/// `field` names it in the error (records check it too).
pub fn validate_flag_file(field: &str, file: &str, tmpfs: &[&str]) -> Result<(), FieldError> {
    let plain = |c: &str| {
        !c.is_empty()
            && c != "."
            && c != ".."
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    let Some(rest) = file.strip_prefix('/') else {
        return Err(FieldError::new(
            field,
            "must be an absolute path, e.g. \"/flag\"",
        ));
    };
    if file.len() > 128 || !rest.split('/').all(plain) {
        return Err(FieldError::new(
            field,
            "at most 128 characters: '/' then components of A-Z, a-z, 0-9, '.', '_' and '-' (no '.' or '..')",
        ));
    }
    let top = rest.split('/').next().unwrap_or_default();
    if ["proc", "sys", "dev"].contains(&top) {
        return Err(FieldError::new(
            field,
            "must not be under /proc, /sys or /dev",
        ));
    }
    if tmpfs.contains(&file) {
        return Err(FieldError::new(field, "is a tmpfs mount: name a file"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
