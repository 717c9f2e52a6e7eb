//! The controller's config file (`deploy/controller.toml` documents every field).

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    ConfigError, EtcdAuth, EtcdTls, bad, check_etcd, check_http_limits, ephemeral_ports,
    tcp_port_range, url_ports,
};
use crate::keys::{DEFAULT_ROOT, Keyspace};
use crate::names::Hostname;

/// The controller's config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControllerConfig {
    /// This replica's id, shown in `GET /v1/status`.
    pub id: String,
    /// Address the REST API listens on.
    pub listen: SocketAddr,
    /// `http://` URL the other replicas reach this one at; standbys forward
    /// spawns and renewals to the leader's.
    pub advertise_url: Option<String>,
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// `[etcd_tls]`: CA of the etcd members and this daemon's client
    /// certificate; needed for `https://` endpoints.
    pub etcd_tls: Option<EtcdTls>,
    /// `[etcd_auth]`: etcd user and a file with its password.
    pub etcd_auth: Option<EtcdAuth>,
    /// Plain-http URLs of the etcd members' own metrics (etcd's
    /// `--listen-metrics-urls`), read every 10 s and exported again as
    /// `tidegate_controller_etcd_member_*`. Default: the `http://` ones of
    /// `etcd` (etcd serves `/metrics` there too); `[]` turns it off.
    pub etcd_metrics: Option<Vec<String>>,
    /// Root of every key (several clusters can share one etcd).
    pub key_root: String,
    /// Wildcard domain of instance hostnames (`{id}.{domain}`).
    pub domain: String,
    /// Scheme and port players use for HTTP instances, for the `url` in answers.
    pub public_http_scheme: String,
    pub public_http_port: u16,
    /// Public TCP ports handed to instances, inclusive, e.g. `"20000-29999"`:
    /// below the ephemeral range, clear of the daemons' and etcd's ports.
    pub tcp_ports: String,
    /// Election lease TTL in seconds: a dead leader is replaced within about this long.
    pub election_ttl_secs: i64,
    /// How many shards the challenges are spread over (1-1024), each with
    /// its own elected scheduler; every controller of a cluster must say
    /// the same. 1: one scheduler for everything.
    pub shards: u16,
    /// How long an etcd call may take before the API answers 503.
    pub etcd_timeout_ms: u64,
    /// Bearer token of the `admin` scope (organizers).
    pub admin_token: String,
    /// Bearer token of the `platform` scope (the CTF platform).
    pub platform_token: String,
    /// Secret the per-instance flags are derived from (HMAC-SHA256).
    pub flag_secret: String,
    /// How often the leader sweeps expired instances and instances of vanished workers.
    pub sweep_interval_secs: u64,
    /// How long a worker may be absent before its instances are deleted.
    pub worker_grace_secs: u64,
    /// Where instances go among the workers they fit on: `spread` (the
    /// one with the most memory left, then the fewest of that challenge)
    /// or `pack` (the fullest one, so others stay empty).
    pub placement: Placement,
    /// A spawn that finds no room takes the room of a pooled instance of
    /// another challenge (removed; pools are a wish, not a reservation).
    /// Off: pooled instances keep their room and such spawns wait.
    pub pool_yields: bool,
    /// The artifact store of policy plugins: a directory (shared by every
    /// controller and agent, e.g. a network mount, when they are on several
    /// machines). Blobs are named by digest and verified when read.
    pub artifact_dir: PathBuf,
    /// How long one policy hook call may run, in milliseconds.
    pub plugin_deadline_ms: u64,
    /// How much memory one policy hook call may use, in MiB.
    pub plugin_memory_mib: usize,
    /// How often the leader asks `on-idle` policies about live instances.
    pub idle_check_secs: u64,
    /// File with the agents' scrape token (their `scrape_token_file`): the
    /// leader sends it to read agents' `/activity` for `on-idle` policies.
    pub scrape_token_file: Option<PathBuf>,
    /// Every request's head must arrive within this many milliseconds of
    /// the connection waiting for it (the first request and each kept-alive
    /// one); idle keep-alive connections close after the same time.
    pub http_header_timeout_ms: u64,
    /// Request heads larger than this are refused with 431.
    pub http_max_header_bytes: usize,
    /// Open API connections at most; past it a new one is closed at once.
    pub http_max_connections: usize,
    /// Open API connections from one address at most.
    pub http_max_connections_per_source: usize,
    /// `[rate_limits]`: token buckets for the platform's instance
    /// operations, per team and for the platform token overall.
    pub rate_limits: RateLimits,
}

/// How the scheduler chooses among the workers an instance fits on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// Most memory left first: load evens out over the workers.
    #[default]
    Spread,
    /// Fullest first: workers fill one after another.
    Pack,
}

/// One token bucket: `burst` calls at once, refilled at `per_minute`.
/// `per_minute = 0` turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub per_minute: u32,
    pub burst: u32,
}

impl Rate {
    /// No limit.
    pub const OFF: Rate = Rate {
        per_minute: 0,
        burst: 0,
    };

    pub fn enabled(self) -> bool {
        self.per_minute > 0
    }
}

/// The buckets of the platform token's instance operations. The admin
/// token is not limited. A refused call is answered 429 with Retry-After.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Spawns per team, which is also its rate of container creations (a
    /// boot/destroy loop creates no more containers than this).
    pub spawn: Rate,
    /// Renewals per team.
    pub renew: Rate,
    /// Deletes per team.
    pub delete: Rate,
    /// Flag checks per team.
    pub flag: Rate,
    /// Every instance operation of the platform token together.
    pub platform: Rate,
}

impl RateLimits {
    /// Every bucket off.
    pub fn off() -> Self {
        Self {
            spawn: Rate::OFF,
            renew: Rate::OFF,
            delete: Rate::OFF,
            flag: Rate::OFF,
            platform: Rate::OFF,
        }
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        let rate = |per_minute, burst| Rate { per_minute, burst };
        Self {
            spawn: rate(20, 10),
            renew: rate(30, 10),
            delete: rate(30, 10),
            flag: rate(60, 20),
            platform: rate(60_000, 2_000),
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            id: super::hostname().unwrap_or_else(|| "controller".into()),
            listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            advertise_url: None,
            etcd: vec!["http://127.0.0.1:2379".into()],
            etcd_tls: None,
            etcd_auth: None,
            etcd_metrics: None,
            key_root: DEFAULT_ROOT.into(),
            domain: "ctf.localhost".into(),
            public_http_scheme: "http".into(),
            public_http_port: 80,
            tcp_ports: "20000-29999".into(),
            election_ttl_secs: 5,
            shards: 1,
            etcd_timeout_ms: 3000,
            admin_token: String::new(),
            platform_token: String::new(),
            flag_secret: String::new(),
            sweep_interval_secs: 5,
            worker_grace_secs: 60,
            placement: Placement::Spread,
            pool_yields: true,
            artifact_dir: PathBuf::from("/var/lib/tidegate/artifacts"),
            plugin_deadline_ms: 5,
            plugin_memory_mib: 32,
            idle_check_secs: 30,
            scrape_token_file: None,
            http_header_timeout_ms: 10_000,
            http_max_header_bytes: 16 * 1024,
            http_max_connections: 4096,
            http_max_connections_per_source: 256,
            rate_limits: RateLimits::default(),
        }
    }
}

impl ControllerConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id.is_empty() || self.id.len() > 64 || self.id.chars().any(char::is_whitespace) {
            return Err(bad("id", "1-64 characters, no spaces"));
        }
        check_etcd(&self.etcd, self.etcd_tls.as_ref())?;
        if let Some(urls) = &self.etcd_metrics {
            if urls.len() > 16 {
                return Err(bad("etcd_metrics", "at most 16 URLs (one per etcd member)"));
            }
            if let Some(u) = urls.iter().find(|u| {
                u.strip_prefix("http://")
                    .is_none_or(|rest| rest.is_empty() || rest.starts_with('/'))
            }) {
                return Err(bad(
                    "etcd_metrics",
                    format!(
                        "{u:?} is not a plain http:// URL with a host (etcd's --listen-metrics-urls)"
                    ),
                ));
            }
        }
        Keyspace::new(&self.key_root).map_err(|e| bad("key_root", e.to_string()))?;
        Hostname::parse(&self.domain).map_err(|e| bad("domain", e.to_string()))?;
        self.tcp_port_range()?;
        if !(1..=300).contains(&self.election_ttl_secs) {
            return Err(bad("election_ttl_secs", "1 to 300"));
        }
        if !(1..=crate::shards::MAX_SHARDS).contains(&self.shards) {
            return Err(bad("shards", "1 to 1024"));
        }
        if !(100..=60_000).contains(&self.etcd_timeout_ms) {
            return Err(bad("etcd_timeout_ms", "100 to 60000"));
        }
        // Standbys forward spawns and renewals to this URL over plain HTTP
        // (the replicas' network; TLS is the platform-facing proxy's).
        if let Some(url) = &self.advertise_url {
            let rest = url.strip_prefix("http://").ok_or_else(|| {
                bad(
                    "advertise_url",
                    "an http:// URL the other replicas reach (they forward to it)",
                )
            })?;
            if rest.is_empty() || rest.contains(['?', '#', ' ']) {
                return Err(bad("advertise_url", "http://host:port, nothing after"));
            }
        }
        for (field, token) in [
            ("admin_token", &self.admin_token),
            ("platform_token", &self.platform_token),
        ] {
            if token.len() < 16 {
                return Err(bad(field, "set a token of at least 16 characters"));
            }
        }
        if self.admin_token == self.platform_token {
            return Err(bad("platform_token", "must differ from admin_token"));
        }
        if self.flag_secret.len() < 16 {
            return Err(bad("flag_secret", "set a secret of at least 16 bytes"));
        }
        if !["http", "https"].contains(&self.public_http_scheme.as_str()) {
            return Err(bad("public_http_scheme", "http or https"));
        }
        if self.sweep_interval_secs == 0 {
            return Err(bad("sweep_interval_secs", "at least 1"));
        }
        if !(1..=1000).contains(&self.plugin_deadline_ms) {
            return Err(bad("plugin_deadline_ms", "1 to 1000"));
        }
        if !(1..=1024).contains(&self.plugin_memory_mib) {
            return Err(bad("plugin_memory_mib", "1 to 1024"));
        }
        if self.idle_check_secs == 0 {
            return Err(bad("idle_check_secs", "at least 1"));
        }
        check_http_limits(
            ("http_max_header_bytes", self.http_max_header_bytes),
            self.http_header_timeout_ms,
            self.http_max_connections,
            self.http_max_connections_per_source,
        )?;
        for (field, rate) in [
            ("rate_limits.spawn", self.rate_limits.spawn),
            ("rate_limits.renew", self.rate_limits.renew),
            ("rate_limits.delete", self.rate_limits.delete),
            ("rate_limits.flag", self.rate_limits.flag),
            ("rate_limits.platform", self.rate_limits.platform),
        ] {
            if rate.enabled() && rate.burst == 0 {
                return Err(bad(
                    field,
                    "burst must be at least 1 when per_minute is set",
                ));
            }
        }
        if self.artifact_dir.as_os_str().is_empty() {
            return Err(bad("artifact_dir", "set a directory"));
        }
        Ok(())
    }

    /// `tcp_ports` parsed, checked against the daemons' ports, this
    /// replica's listener, the etcd endpoints and this host's ephemeral range.
    pub fn tcp_port_range(&self) -> Result<RangeInclusive<u16>, ConfigError> {
        let mut taken = vec![(self.listen.port(), "this controller's listen".to_string())];
        taken.extend(
            url_ports(&self.etcd)
                .into_iter()
                .map(|p| (p, "an etcd endpoint".into())),
        );
        tcp_port_range(&self.tcp_ports, &taken, ephemeral_ports())
    }

    /// Where this replica is reached.
    pub fn advertise(&self) -> String {
        self.advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}
