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

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use agent::{AgentConfig, DataPath, Steering, UnknownName};
pub use controller::ControllerConfig;
pub use etcd::{EtcdAuth, EtcdTls, check_etcd};

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

/// A config file format: TOML, every field defaulted.
pub trait ConfigFile: Serialize + DeserializeOwned + Default {
    /// Parses a TOML file (unknown fields are errors).
    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad("config", format!("{}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| bad("config", format!("{}: {e}", path.display())))
    }

    /// The TOML text of this config, every field written out.
    fn to_toml(&self) -> String {
        // A struct of strings, numbers, paths and tables always serializes.
        toml::to_string(self).unwrap_or_default()
    }
}

impl ConfigFile for AgentConfig {}
impl ConfigFile for ControllerConfig {}

/// The hostname (`/etc/hostname`), the default id of a daemon.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests;
