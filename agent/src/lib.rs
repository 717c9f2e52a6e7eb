//! The tidegate data plane on one worker.
//!
//! Where things happen: `membership` keeps the worker registered;
//! `reconcile` drives Docker (through `runtime`, where a record becomes a
//! hardened container) until the containers equal the instance records
//! assigned to this worker, and reports each one's status; `routes` keeps
//! the table every agent routes from (hostname and public port → the
//! instance, here or on its owner); `http` is the Pingora proxy that routes
//! a request by its Host; `tcp` routes a connection by its public port
//! (eBPF `sk_lookup` steering, then splice(2), sockhash or copy) and serves
//! TCP over TLS by SNI; `policy` is the edge admission hook both ask;
//! `metrics` is what `/metrics` and `/activity` serve; `hostnet` is what
//! the agent sets in the host's kernel for the instance networks
//! (neighbour pinning); `config` merges the config file with flags.

pub mod config;
pub mod hop;
pub mod hostnet;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod policy;
pub mod reconcile;
pub mod resources;
pub mod routes;
pub mod runtime;
pub mod tcp;
