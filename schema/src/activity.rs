//! What an agent's `GET /activity` answers: the last traffic of every
//! instance it runs. The elected controller reads it for `on-idle`
//! policies; it never goes to etcd.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names::InstanceId;

/// One agent's report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityReport {
    /// The agent's clock when it answered (Unix milliseconds).
    #[serde(default)]
    pub now_ms: u64,
    /// The etcd revision of the agent's route table.
    #[serde(default)]
    pub revision: i64,
    /// Every instance whose container runs on that agent.
    #[serde(default)]
    pub instances: BTreeMap<InstanceId, InstanceActivity>,
}

/// The traffic an agent saw for one instance it runs (the owner sees all
/// of it, also what other agents forwarded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceActivity {
    /// Unix milliseconds of the last request or connection byte (0: none yet).
    #[serde(default)]
    pub last_activity_ms: u64,
    /// TCP connections open now.
    #[serde(default)]
    pub open_connections: u32,
}
