//! Real-component test harness for tidegate: real etcd, real Docker, real netns.
//!
//! Everything a test starts is owned by a guard value that tears it down on
//! drop, also while a panic unwinds. Processes are additionally tied to the
//! test process through a watchdog pipe (see [`process`]), so even a test
//! killed with SIGKILL leaves no etcd behind.

pub mod config;
pub mod daemons;
pub mod docker;
pub mod etcd;
pub mod images;
pub mod netns;
pub mod plugins;
pub mod ports;
pub mod process;

mod error;

pub use error::{Error, Result, display as display_command};
