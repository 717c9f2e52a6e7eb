//! The controller's configuration: TOML file, then environment, then flags.
//!
//! `validate()` runs before anything starts; a bad value exits 64 with the
//! field named (`tcp_ports: 30000-20000 is empty`).

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;
use tidegate_schema::{Hostname, Keyspace};

/// Command line; every flag also reads `TIDEGATE_<NAME>` from the environment
/// and overrides the same field of the `--config` file.
#[derive(Debug, Parser)]
#[command(
    name = "tidegate-controller",
    version,
    about = "tidegate control plane: REST API and elected scheduler"
)]
pub struct Cli {
    /// TOML config file (fields as below, snake_case).
    #[arg(long, env = "TIDEGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This replica's id, shown in `GET /v1/status` (default: the hostname).
    #[arg(long, env = "TIDEGATE_ID")]
    pub id: Option<String>,
    /// Address the REST API listens on.
    #[arg(long, env = "TIDEGATE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// URL other replicas and clients use to reach this one (default: http://{listen}).
    #[arg(long, env = "TIDEGATE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// etcd client URLs, comma-separated.
    #[arg(long, env = "TIDEGATE_ETCD", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// Wildcard domain of instance hostnames.
    #[arg(long, env = "TIDEGATE_DOMAIN")]
    pub domain: Option<String>,
    /// Admin (organizer) bearer token.
    #[arg(long, env = "TIDEGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Platform (CTF platform) bearer token.
    #[arg(long, env = "TIDEGATE_PLATFORM_TOKEN", hide_env_values = true)]
    pub platform_token: Option<String>,
    /// Secret the per-instance flags are derived from (at least 16 bytes).
    #[arg(long, env = "TIDEGATE_FLAG_SECRET", hide_env_values = true)]
    pub flag_secret: Option<String>,
    /// Port players use for HTTP instances (in the `url` of answers).
    #[arg(long, env = "TIDEGATE_PUBLIC_HTTP_PORT")]
    pub public_http_port: Option<u16>,
    /// Directory of policy plugin blobs (shared with the agents).
    #[arg(long, env = "TIDEGATE_ARTIFACT_DIR")]
    pub artifact_dir: Option<PathBuf>,
}

/// The whole configuration after merging.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This replica's id, shown in `GET /v1/status`.
    pub id: String,
    /// Address the REST API listens on.
    pub listen: SocketAddr,
    /// URL others use to reach this replica; standbys redirect writes to the leader's.
    pub advertise_url: Option<String>,
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// `[etcd_tls]`: CA of the etcd members and this daemon's client
    /// certificate; needed for `https://` endpoints.
    pub etcd_tls: Option<tidegate_schema::connect::EtcdTls>,
    /// `[etcd_auth]`: etcd user and a file with its password.
    pub etcd_auth: Option<tidegate_schema::connect::EtcdAuth>,
    /// Root of every key (several clusters can share one etcd).
    pub key_root: String,
    /// Wildcard domain of instance hostnames (`{id}.{domain}`).
    pub domain: String,
    /// Scheme and port players use for HTTP instances, for the `url` in answers.
    pub public_http_scheme: String,
    pub public_http_port: u16,
    /// Public TCP ports handed to instances, inclusive, e.g. `"20000-29999"`.
    pub tcp_ports: String,
    /// Election lease TTL in seconds: a dead leader is replaced within about this long.
    pub election_ttl_secs: i64,
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
}

impl Default for Config {
    fn default() -> Self {
        Self {
            id: std::fs::read_to_string("/etc/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "controller".into()),
            listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            advertise_url: None,
            etcd: vec!["http://127.0.0.1:2379".into()],
            etcd_tls: None,
            etcd_auth: None,
            key_root: tidegate_schema::keys::DEFAULT_ROOT.into(),
            domain: "ctf.localhost".into(),
            public_http_scheme: "http".into(),
            public_http_port: 80,
            tcp_ports: "20000-29999".into(),
            election_ttl_secs: 5,
            etcd_timeout_ms: 3000,
            admin_token: String::new(),
            platform_token: String::new(),
            flag_secret: String::new(),
            sweep_interval_secs: 5,
            worker_grace_secs: 60,
            artifact_dir: PathBuf::from("/var/lib/tidegate/artifacts"),
            plugin_deadline_ms: 5,
            plugin_memory_mib: 32,
            idle_check_secs: 30,
        }
    }
}

/// A config value that cannot be used, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

impl Config {
    /// File, then the flags and environment variables that were given.
    pub fn load(cli: Cli) -> Result<Self, ConfigError> {
        let mut cfg = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad("config", format!("{}: {e}", path.display())))?;
                toml::from_str(&text)
                    .map_err(|e| bad("config", format!("{}: {e}", path.display())))?
            }
            None => Config::default(),
        };
        macro_rules! overlay {
            ($($f:ident),*) => { $( if let Some(v) = cli.$f { cfg.$f = v; } )* };
        }
        overlay!(
            id,
            listen,
            etcd,
            domain,
            admin_token,
            platform_token,
            flag_secret,
            public_http_port,
            artifact_dir
        );
        if cli.advertise_url.is_some() {
            cfg.advertise_url = cli.advertise_url;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id.is_empty() || self.id.len() > 64 || self.id.chars().any(char::is_whitespace) {
            return Err(bad("id", "1-64 characters, no spaces"));
        }
        tidegate_schema::connect::check_config(&self.etcd, self.etcd_tls.as_ref())
            .map_err(|(field, message)| bad(field, message))?;
        Keyspace::new(&self.key_root).map_err(|e| bad("key_root", e.to_string()))?;
        Hostname::parse(&self.domain).map_err(|e| bad("domain", e.to_string()))?;
        self.tcp_port_range()?;
        if !(1..=300).contains(&self.election_ttl_secs) {
            return Err(bad("election_ttl_secs", "1 to 300"));
        }
        if !(100..=60_000).contains(&self.etcd_timeout_ms) {
            return Err(bad("etcd_timeout_ms", "100 to 60000"));
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
        if self.artifact_dir.as_os_str().is_empty() {
            return Err(bad("artifact_dir", "set a directory"));
        }
        Ok(())
    }

    /// `tcp_ports` parsed.
    pub fn tcp_port_range(&self) -> Result<RangeInclusive<u16>, ConfigError> {
        let (lo, hi) = self
            .tcp_ports
            .split_once('-')
            .ok_or_else(|| bad("tcp_ports", "a range like 20000-29999"))?;
        let parse = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p >= 1024);
        match (parse(lo), parse(hi)) {
            (Some(lo), Some(hi)) if lo <= hi => Ok(lo..=hi),
            _ => Err(bad(
                "tcp_ports",
                format!("{:?} is not a range of ports 1024-65535", self.tcp_ports),
            )),
        }
    }

    /// Where this replica is reached.
    pub fn advertise(&self) -> String {
        self.advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_config_in_deploy_names_every_field() {
        let missing = tidegate_lab::config::fields_not_in::<Config>(include_str!(
            "../../deploy/controller.toml"
        ));
        assert_eq!(
            missing,
            Ok(vec![]),
            "deploy/controller.toml does not document these"
        );
        // And it passes validation as written.
        let cfg: Config = toml::from_str(include_str!("../../deploy/controller.toml")).unwrap();
        assert!(cfg.validate().is_ok(), "{:?}", cfg.validate());
    }
}
