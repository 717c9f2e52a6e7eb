//! The replica's background work while it leads shards: sweep their
//! instances past their expiry and those of vanished workers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidegate_schema::WorkerId;

use crate::App;

/// What this replica holds while it leads.
#[derive(Debug, Clone)]
pub struct LeaderInfo {
    /// Its election key and the key's create revision (the fencing token).
    pub key: String,
    pub token: i64,
    pub lease: i64,
}

/// How long past its expiry an instance must be before the sweep revokes
/// it. Its lease ends it on time anyway (a lease is a duration, not a date);
/// the sweep is only a backstop for a lease that somehow outlived it, so it
/// must not trust this replica's wall clock to the second: a controller whose
/// clock runs ahead would otherwise end instances another replica granted.
pub const SWEEP_GRACE_SECS: u64 = 60;

/// While leading: revoke the leases of instances more than
/// [`SWEEP_GRACE_SECS`] past their expiry (etcd normally did already), and
/// delete the instances of workers that have been gone longer than
/// `worker_grace_secs` — their containers died with
/// the worker or will be removed as orphans when it returns; deleting frees
/// the team's slot so the team can spawn again elsewhere. Each deletion is
/// logged with its reason.
pub async fn run_sweeps(app: Arc<App>) {
    let mut gone_since: BTreeMap<WorkerId, Instant> = BTreeMap::new();
    let grace = Duration::from_secs(app.cfg.worker_grace_secs);
    loop {
        tokio::time::sleep(Duration::from_secs(app.cfg.sweep_interval_secs)).await;
        if !app.leads_any() {
            gone_since.clear();
            continue;
        }
        let now = tidegate_schema::time::unix_secs();
        let (expired, orphaned) = {
            let view = app.view.lock();
            let absent: Vec<WorkerId> = view
                .instances
                .values()
                .map(|i| i.record.worker.clone())
                .filter(|w| !view.workers.contains_key(w))
                .collect();
            gone_since.retain(|w, _| absent.contains(w));
            for w in absent {
                gone_since.entry(w).or_insert_with(Instant::now);
            }
            // Each shard's leader sweeps its own challenges' instances.
            let expired: Vec<_> = view
                .instances
                .values()
                .filter(|i| app.lead(&i.record.challenge).is_some())
                .filter(|i| i.record.expires_at.saturating_add(SWEEP_GRACE_SECS) < now)
                .map(|i| (i.record.id.clone(), i.lease))
                .collect();
            let orphaned: Vec<_> = view
                .instances
                .values()
                .filter(|i| app.lead(&i.record.challenge).is_some())
                .filter(|i| {
                    gone_since
                        .get(&i.record.worker)
                        .is_some_and(|t| t.elapsed() >= grace)
                })
                .map(|i| (i.record.id.clone(), i.lease, i.record.worker.clone()))
                .collect();
            (expired, orphaned)
        };
        let mut client = app.client.clone();
        for (id, lease) in expired {
            tracing::info!(instance = %id, "revoking the lease of an instance past its expiry");
            let _ = client.lease_revoke(lease).await;
        }
        for (id, lease, worker) in orphaned {
            tracing::warn!(instance = %id, %worker, grace_secs = grace.as_secs(),
                "deleting instance: its worker has been gone longer than the grace period");
            let _ = client.lease_revoke(lease).await;
            app.metrics.worker_gone_deletions.inc();
        }
    }
}
