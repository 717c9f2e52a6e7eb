//! The tidegate data plane on one worker.
//!
//! `membership` keeps the worker registered; `reconcile` drives Docker
//! (through `runtime`) until the containers equal the instance records
//! assigned to this worker; `routes` keeps the hostname table every agent
//! serves from; `http` is the Pingora proxy using it (with `policy`, the
//! edge admission hook, and `stats`, per-instance counters); `metrics`
//! serves Prometheus text; `tcp` is the userspace TCP path (a listener per
//! instance port), the fallback of the eBPF redirector of #6.

pub mod config;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod routes;
pub mod runtime;
pub mod stats;
pub mod tcp;

pub use config::{Cli, Config, ConfigError};
