//! The tidegate data plane on one worker.
//!
//! `membership` keeps the worker registered; `reconcile` drives Docker
//! (through `runtime`) until the containers equal the instance records
//! assigned to this worker; `metrics` serves Prometheus text. The HTTP
//! proxy (#5) and the TCP redirector (#6) join here.

pub mod config;
pub mod membership;
pub mod metrics;
pub mod reconcile;
pub mod runtime;

pub use config::{Cli, Config, ConfigError};
