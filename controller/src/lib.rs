//! The tidegate control plane: the only writer of desired state in etcd.
//!
//! Where a spawn goes, in order: `api` takes the request (`api/instances.rs`
//! maps outcomes to HTTP); `policy` asks the challenge's plugin
//! (`policy/decide.rs`); `view` places it on a worker; `spawn` writes it in
//! one fenced Txn. `lifecycle` renews and deletes; `scheduler` keeps the
//! replica in the election (`election`) and sweeps while it leads;
//! `challenges` stores organizers' specs put-if-revision; `metrics` is what
//! `/metrics`, `/v1/status` and the dashboard show (`etcd_members` adds
//! etcd's own health, read from its members); `app` is the state they
//! all share; `config` merges the config file with flags.

pub mod api;
pub mod app;
pub mod challenges;
pub mod config;
pub mod election;
pub mod etcd_members;
pub mod flag;
pub mod lifecycle;
pub mod metrics;
pub mod policy;
pub mod ratelimit;
pub mod rollout;
pub mod scheduler;
pub mod serve;
pub mod shards;
pub mod spawn;
pub mod view;

pub use app::App;
pub use challenges::{ChallengeError, Challenges, Stored};
pub use election::{Leadership, campaign};
pub use spawn::{SpawnError, SpawnPlan, Spawned, spawn};
