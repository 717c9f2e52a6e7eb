//! Challenges' policy plugins on the controller.
//!
//! - `upload`: an organizer's component is validated, compiled, dry-run and
//!   stored by digest;
//! - `decide`: the `admit-spawn` and `renew` decisions, as domain outcomes
//!   (admit with a TTL, extend, or a refusal saying why), the challenge's
//!   fallback applied when a plugin fails;
//! - `idle`: the leader's periodic `on-idle` check of live instances;
//! - `calls`: latency and failures of plugin calls, per hook.
//!
//! Compiled plugins are cached by digest in the [`Host`]; a replica that
//! meets a digest it has not compiled (another replica took the upload)
//! fetches the blob from the artifact store, verifies and compiles it once.

mod calls;
mod decide;
mod idle;
mod upload;

use std::sync::Arc;

use tidegate_plugin_host::{ArtifactStore, Digest, DirStore, Host, Limits, Plugin};
use tidegate_schema::PolicyRef;

pub use calls::PluginCalls;
pub use decide::{Admission, PolicyNote, PolicyRefusal, RefusalKind, Renewal, admit_spawn, renew};
pub use idle::run_idle_checks;
pub use upload::UploadError;

/// The plugin machinery of one controller.
pub struct Policies {
    pub host: Host,
    pub store: Arc<dyn ArtifactStore>,
    pub calls: PluginCalls,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// Why a challenge's plugin could not be had: its digest is not one, the
/// blob is missing or corrupt in the store, or it does not compile.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error(transparent)]
    Digest(#[from] tidegate_plugin_host::DigestError),
    #[error(transparent)]
    Store(#[from] tidegate_plugin_host::StoreError),
    #[error("policy {digest}: {error}")]
    Compile {
        digest: Digest,
        error: tidegate_plugin_host::LoadError,
    },
    #[error("loading the policy: {0}")]
    Task(String),
}

/// Why the plugin machinery could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] tidegate_plugin_host::StoreError),
    #[error("the plugin engine: {0}")]
    Engine(String),
}

impl Policies {
    /// The engine with `limits`, and the artifact store in `dir`.
    pub fn new(dir: &std::path::Path, limits: Limits) -> Result<Self, StartError> {
        let store = DirStore::new(dir)?;
        let host = Host::new(limits).map_err(|e| StartError::Engine(format!("{e:#}")))?;
        Ok(Self {
            host,
            store: Arc::new(store),
            calls: PluginCalls::default(),
        })
    }

    /// The compiled plugin of a challenge's policy: cached, or fetched from
    /// the store, verified and compiled (off the runtime).
    pub async fn plugin(self: &Arc<Self>, policy: &PolicyRef) -> Result<Arc<Plugin>, Unavailable> {
        let digest = Digest::parse(&policy.digest)?;
        if let Some(p) = self.host.get(&digest) {
            return Ok(p);
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let bytes = me.store.get(&digest)?;
            me.host
                .load(&bytes)
                .map_err(|error| Unavailable::Compile { digest, error })
        })
        .await
        .map_err(|e| Unavailable::Task(e.to_string()))?
    }
}
