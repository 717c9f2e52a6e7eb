//! The etcd client runtime of tidegate's daemons, on top of the key schema
//! in `tidegate-schema`: how a daemon connects, rides through the loss of
//! one member, watches a prefix, reads why a guarded write failed, and
//! measures etcd.

pub mod connect;
pub mod guard;
pub mod health;
pub mod members;
pub mod watch;

pub use connect::{ConnectError, connect};
pub use health::{EtcdHealth, probe_etcd};
pub use members::{never_sent, prune_dead_members};
pub use watch::{Event, Kv, Watcher};
