//! The tidegate control plane: the only writer of desired state in etcd.
//!
//! So far: challenges written put-if-revision, the fenced spawn transaction
//! that claims hostnames, TCP ports and a team slot in one Txn bound to the
//! instance's lease, and the election that yields the fencing token. The
//! REST API, scheduler loop, renewals and CLI of issue #3 build on them.

pub mod challenges;
pub mod election;
pub mod spawn;
mod txn;

pub use challenges::{ChallengeError, Challenges, Stored};
pub use election::{Leadership, campaign};
pub use spawn::{SpawnError, SpawnPlan, Spawned, spawn};
