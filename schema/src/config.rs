//! The daemons' config files: one typed struct per daemon that both parses
//! (the daemon reads it) and serializes (`cargo xtask deploy`, the
//! benchmarks and the test harness write it). Every field has a default and
//! a doc line; `validate()` names the first bad field.
//!
//! The daemons add their command-line flags and environment variables on
//! top (`agent/src/config.rs`, `controller/src/config.rs`).

mod agent;
mod controller;
mod etcd;
mod ports;

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use agent::{AgentConfig, DataPath, Steering, UnknownName};
pub use controller::{ControllerConfig, Placement, Rate, RateLimits};
pub use etcd::{EtcdAuth, EtcdTls, check_etcd};
pub use ports::{DAEMON_PORTS, DEFAULT_EPHEMERAL, ephemeral_ports, tcp_port_range, url_ports};

/// A config value that cannot be used, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

pub(crate) fn bad(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

/// The limits both HTTP servers take (controller API, agent entry): the
/// header deadline, the largest head, and the connection caps.
pub(crate) fn check_http_limits(
    (header_bytes_field, header_bytes): (&'static str, usize),
    header_timeout_ms: u64,
    max_connections: usize,
    max_connections_per_source: usize,
) -> Result<(), ConfigError> {
    if !(1024..=1024 * 1024).contains(&header_bytes) {
        return Err(bad(header_bytes_field, "1024 to 1048576"));
    }
    if !(100..=300_000).contains(&header_timeout_ms) {
        return Err(bad("http_header_timeout_ms", "100 to 300000"));
    }
    if max_connections == 0 {
        return Err(bad("http_max_connections", "at least 1"));
    }
    if !(1..=max_connections).contains(&max_connections_per_source) {
        return Err(bad(
            "http_max_connections_per_source",
            "at least 1 and at most http_max_connections",
        ));
    }
    Ok(())
}

/// A config file format: TOML, every field defaulted.
pub trait ConfigFile: Serialize + DeserializeOwned + Default {
    /// Fields written even when they equal their default, because the
    /// default depends on the machine reading the file (its hostname).
    const ALWAYS_WRITTEN: &'static [&'static str];

    /// Parses a TOML file (unknown fields are errors).
    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("config", format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| bad("config", format!("{}: {e}", path.display())))
    }

    /// The TOML text of this config: the fields that differ from their
    /// defaults (and [`Self::ALWAYS_WRITTEN`]), so a file says what was chosen
    /// and a later release's defaults apply to the rest.
    fn to_toml(&self) -> Result<String, ConfigError> {
        let unwritable = |e: toml::ser::Error| bad("config", format!("cannot be written: {e}"));
        let mut table = toml::Table::try_from(self).map_err(unwritable)?;
        let defaults = toml::Table::try_from(Self::default()).map_err(unwritable)?;
        table.retain(|k, v| Self::ALWAYS_WRITTEN.contains(&k) || defaults.get(k) != Some(v));
        toml::to_string(&table).map_err(unwritable)
    }
}

impl ConfigFile for AgentConfig {
    const ALWAYS_WRITTEN: &'static [&'static str] = &["worker_id"];
}

impl ConfigFile for ControllerConfig {
    const ALWAYS_WRITTEN: &'static [&'static str] = &["id"];
}

/// The secret in the file `path` (config field `field`): its bytes without
/// trailing whitespace, at least `min` of them. Errors name the field.
pub fn read_secret_file(field: &str, path: &Path, min: usize) -> Result<Vec<u8>, String> {
    let raw = std::fs::read(path).map_err(|e| format!("{field} {}: {e}", path.display()))?;
    let secret = raw.trim_ascii_end();
    if secret.len() < min {
        return Err(format!(
            "{field} {}: {} bytes; at least {min} are needed",
            path.display(),
            secret.len()
        ));
    }
    Ok(secret.to_vec())
}

/// Whether `defence` is switched off for a positive control of `cargo
/// xtask redteam --planted` (each attack must then get through). Only
/// debug builds read `TIDEGATE_PLANTED` (defence names, comma-separated);
/// a release build never switches a defence off.
pub fn planted(defence: &str) -> bool {
    cfg!(debug_assertions)
        && std::env::var("TIDEGATE_PLANTED")
            .is_ok_and(|v| v.split(',').any(|d| d.trim() == defence))
}

/// The hostname (`/etc/hostname`), the default id of a daemon.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests;
