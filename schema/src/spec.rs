//! The challenge spec organizers write (the body of `PUT /v1/challenges/{name}`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::names::PortName;
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

/// At most this many tmpfs mounts per challenge.
pub const MAX_TMPFS: usize = 8;

/// A challenge: what to run for each team, and the rules for its instances.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChallengeSpec {
    /// The container image (built or loaded into each worker's Docker engine).
    pub image: String,
    /// The ports the container serves, each exposed as a hostname (`http`)
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
}

/// [`ChallengeSpec::tcp_idle_timeout_secs`] when a spec does not say.
pub const DEFAULT_TCP_IDLE_SECS: u32 = 600;

fn default_tcp_idle() -> u32 {
    DEFAULT_TCP_IDLE_SECS
}

fn is_default_tcp_idle(secs: &u32) -> bool {
    *secs == DEFAULT_TCP_IDLE_SECS
}

/// The decision used when a challenge's policy plugin fails.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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
}

impl Default for FlagSpec {
    fn default() -> Self {
        Self {
            template: format!("flag{{{FLAG_PLACEHOLDER}}}"),
        }
    }
}

impl Validate for ChallengeSpec {
    fn validate(&self) -> Result<(), FieldError> {
        let image = self.image.as_str();
        if image.is_empty()
            || image.len() > 255
            || image.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(FieldError::new(
                "image",
                format!("{image:?} is not an image reference (1-255 characters, no spaces)"),
            ));
        }
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
        self.validate_ports()?;
        self.validate_env()?;
        self.validate_limits_and_ttl()?;
        in_range("per_team_max", self.per_team_max, 1, 100)?;
        in_range(
            "tcp_idle_timeout_secs",
            self.tcp_idle_timeout_secs,
            10,
            86_400,
        )?;
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
        self.validate_caps()?;
        self.validate_tmpfs()
    }
}

impl ChallengeSpec {
    /// Each port: a number, a name and a number used once.
    fn validate_ports(&self) -> Result<(), FieldError> {
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
            if !numbers.insert(p.port) {
                return Err(FieldError::new(
                    format!("ports[{i}].port"),
                    format!("port {} listed twice", p.port),
                ));
            }
        }
        Ok(())
    }

    /// `cap_add` from [`ALLOWED_CAPS`], `unsafe_caps` from [`UNSAFE_CAPS`].
    fn validate_caps(&self) -> Result<(), FieldError> {
        for (i, cap) in self.cap_add.iter().enumerate() {
            let bare = cap.strip_prefix("CAP_").unwrap_or(cap);
            if UNSAFE_CAPS.contains(&bare) {
                return Err(FieldError::new(
                    format!("cap_add[{i}]"),
                    format!(
                        "{cap:?} lets an instance spoof its neighbours; a challenge that really needs it \
                         names it in unsafe_caps (docs/security.md)"
                    ),
                ));
            }
            if !ALLOWED_CAPS.contains(&bare) {
                return Err(FieldError::new(
                    format!("cap_add[{i}]"),
                    format!("{cap:?} is not one of {}", ALLOWED_CAPS.join(", ")),
                ));
            }
        }
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

    /// Absolute, distinct paths; sizes within the memory limit.
    fn validate_tmpfs(&self) -> Result<(), FieldError> {
        if self.tmpfs.len() > MAX_TMPFS {
            return Err(FieldError::new(
                "tmpfs",
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
                    format!("tmpfs[{i}].path"),
                    format!("{p:?} is not an absolute path below / (no '..', ',' or ':')"),
                ));
            }
            if !paths.insert(p) {
                return Err(FieldError::new(
                    format!("tmpfs[{i}].path"),
                    format!("{p:?} listed twice"),
                ));
            }
            in_range(&format!("tmpfs[{i}].size_mib"), t.size_mib, 1, 4096)?;
            total += u64::from(t.size_mib);
        }
        if total > u64::from(self.limits.memory_mib) {
            return Err(FieldError::new(
                "tmpfs",
                format!(
                    "{total} MiB in all is more than limits.memory_mib ({}): tmpfs is memory",
                    self.limits.memory_mib
                ),
            ));
        }
        Ok(())
    }

    /// At most 64 variables in `env` and `secret_env` together, with names
    /// and values the container can have, each name in one of them.
    fn validate_env(&self) -> Result<(), FieldError> {
        if self.env.len() + self.secret_env.len() > 64 {
            return Err(FieldError::new(
                "env",
                "at most 64 variables (env and secret_env together)",
            ));
        }
        if let Some(k) = self.secret_env.keys().find(|k| self.env.contains_key(*k)) {
            return Err(FieldError::new(
                format!("secret_env.{k}"),
                "is in env too: name it in one of them",
            ));
        }
        let all = self
            .env
            .iter()
            .map(|kv| ("env", kv))
            .chain(self.secret_env.iter().map(|kv| ("secret_env", kv)));
        for (map, (k, v)) in all {
            let field = format!("{map}.{k}");
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
            if RESERVED_ENV.contains(&k.as_str()) {
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
        }
        Ok(())
    }

    fn validate_limits_and_ttl(&self) -> Result<(), FieldError> {
        in_range("limits.memory_mib", self.limits.memory_mib, 16, 65536)?;
        if !self.limits.cpus.is_finite() {
            return Err(FieldError::new("limits.cpus", "must be a number"));
        }
        in_range("limits.cpus", self.limits.cpus, 0.01, 64.0)?;
        in_range("limits.pids", self.limits.pids, 16, 32768)?;
        in_range("limits.log_mib", self.limits.log_mib, 1, 1024)?;
        in_range("limits.disk_mib", self.limits.disk_mib, 64, 65536)?;
        in_range("limits.nofile", self.limits.nofile, 64, 65536)?;
        in_range("limits.nproc", self.limits.nproc, 16, 32768)?;
        in_range("limits.io_weight", self.limits.io_weight, 10, 1000)?;
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

    /// The flag of one instance, given the HMAC text for it.
    pub fn render_flag(&self, hmac_hex: &str) -> String {
        self.flag.template.replace(FLAG_PLACEHOLDER, hmac_hex)
    }
}

#[cfg(test)]
mod tests;
