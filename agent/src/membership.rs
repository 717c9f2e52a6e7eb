//! Membership: `/workers/{id}` under a keep-alive lease. Re-registers when
//! the lease is lost (etcd unreachable past the TTL, or revoked); the
//! caller revokes it on clean shutdown.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tidegate_schema::{Key, Keyspace, Record, WorkerRecord};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// How soon a failed keep-alive is tried again.
const RETRY: Duration = Duration::from_millis(250);

/// Keeps the worker registered until the task is dropped; publishes the
/// current lease in `lease` (0 while unregistered).
pub async fn run(
    client: Client,
    ks: Keyspace,
    record: WorkerRecord,
    ttl: i64,
    metrics: Arc<Metrics>,
    lease: watch::Sender<i64>,
) {
    let key = ks.key(&Key::Worker(record.id.clone()));
    let period = Duration::from_secs(ttl.max(3) as u64) / 3;
    let mut client = client;
    loop {
        let id = match register(&mut client, &key, &record, ttl).await {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "could not register this worker; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        metrics.registered();
        let _ = lease.send(id);
        tracing::info!(worker = %record.id, lease = id, "registered");
        // Keep alive until etcd says the lease is gone or stays unreachable
        // for a TTL. After a failed keep-alive, try again every 250 ms: a
        // short cut from etcd must not cost the lease (other agents would
        // briefly see this worker gone and answer 503 for its instances).
        let mut last_ok = tokio::time::Instant::now();
        let mut failing = false;
        loop {
            tokio::time::sleep(if failing { RETRY } else { period }).await;
            let answer = match client.lease_keep_alive(id).await {
                Ok((mut keeper, mut stream)) => match keeper.keep_alive().await {
                    Ok(()) => stream.message().await.ok().flatten().map(|r| r.ttl()),
                    Err(_) => None,
                },
                Err(_) => None,
            };
            failing = answer.is_none();
            match answer {
                Some(t) if t > 0 => last_ok = tokio::time::Instant::now(),
                Some(_) => break,
                None if last_ok.elapsed() >= Duration::from_secs(ttl as u64) => break,
                None => {}
            }
        }
        let _ = lease.send(0);
        tracing::warn!(worker = %record.id, "membership lease lost; registering again");
    }
}

async fn register(
    client: &mut Client,
    key: &str,
    record: &WorkerRecord,
    ttl: i64,
) -> Result<i64, etcd_client::Error> {
    let id = client.lease_grant(ttl, None).await?.id();
    client
        .put(key, record.encode(), Some(PutOptions::new().with_lease(id)))
        .await?;
    Ok(id)
}
