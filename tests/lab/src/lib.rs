//! Real-component test harness for tidegate: real etcd, real Docker, real netns.
//!
//! Everything a test starts is owned by a guard value that tears it down on
//! drop, also while a panic unwinds. Processes are additionally tied to the
//! test process through a watchdog pipe (see [`process`]), so even a test
//! killed with SIGKILL leaves no etcd behind. The components themselves
//! (processes, etcd, the Docker engine, images, plugin builds) come from
//! `tidegate-local`, which `cargo xtask` uses too; this crate adds what only
//! tests need: daemons with test settings, test containers and test plugins.

pub mod daemons;
pub mod docker;
pub mod faults;
pub mod keys;
pub mod plugins;
pub mod slow;

pub use tidegate_local::{
    Error, Result, display_command, etcd, http, images, netns, ports, process, routes,
};
