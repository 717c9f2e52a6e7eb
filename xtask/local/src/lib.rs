//! tidegate's real components on this machine, for `cargo xtask` (setup,
//! `deploy local`, benchmarks) and for the test harness (`tidegate-lab`):
//! processes tied to their owner's life, etcd members, the Docker engine
//! and the demo images, the policy plugins' build, free ports, network
//! namespaces as hosts, the daemons' config files written from their
//! typed structs, and HTTP answers read off a raw connection.

pub mod daemons;
pub mod docker;
pub mod etcd;
pub mod http;
pub mod images;
pub mod netns;
pub mod plugins;
pub mod ports;
pub mod process;
pub mod routes;

mod error;

pub use error::{Error, Result, display as display_command, run};
