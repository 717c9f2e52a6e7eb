//! An organizer's upload: the bytes must be a component of the policy
//! world; it is compiled, dry-run on a sample `admit-spawn` request, and
//! stored by digest. Any failure changes nothing.

use std::sync::Arc;

use tidegate_plugin_host::{CallError, LoadError, Plugin, SpawnRequest};

use super::Policies;

/// The team name of the upload's dry-run request.
const DRY_RUN_TEAM: &str = "tidegate-dry-run";

/// Why an upload is refused (a 400 each; 500 for the store).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("the dry run of admit-spawn failed: {0}")]
    DryRun(CallError),
    #[error("{0}")]
    Store(String),
}

impl Policies {
    /// Validates an upload, compiles it, dry-runs `admit-spawn` on a sample
    /// request for `challenge`, and stores the blob. Blocking (compiling
    /// takes tens of milliseconds): call off the async runtime.
    pub fn upload(&self, challenge: &str, bytes: &[u8]) -> Result<Arc<Plugin>, UploadError> {
        let plugin = self.host.load(bytes)?;
        if let Some(Err(e)) = plugin.admit_spawn(&dry_run_request(challenge)) {
            return Err(UploadError::DryRun(e));
        }
        self.store
            .put(bytes)
            .map_err(|e| UploadError::Store(e.to_string()))?;
        Ok(plugin)
    }
}

/// The sample request of the upload's dry run.
fn dry_run_request(challenge: &str) -> SpawnRequest {
    SpawnRequest {
        team: DRY_RUN_TEAM.into(),
        challenge: challenge.into(),
        team_live: 0,
        team_live_all: 0,
        team_recent: 0,
        cluster_free_slots: 1,
        cluster_capacity: 1,
        now_ms: tidegate_plugin_host::unix_ms(),
    }
}
