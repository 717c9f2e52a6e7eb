//! The tidegate control plane: the only writer of desired state in etcd.
//!
//! So far: the store layer — challenges written put-if-revision, and the
//! fenced spawn transaction that claims hostnames, TCP ports and a team
//! slot in one Txn bound to the instance's lease. The REST API, election
//! loop, renewals and CLI of issue #3 build on it.

pub mod challenges;
pub mod spawn;
mod txn;

pub use challenges::{ChallengeError, Challenges, Stored};
pub use spawn::{SpawnError, SpawnPlan, Spawned, spawn};
