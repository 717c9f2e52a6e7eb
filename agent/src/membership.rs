//! Membership: `/workers/{id}` under a keep-alive lease. Re-registers when
//! the lease is lost (etcd unreachable past the TTL, or revoked); the
//! caller revokes it on clean shutdown.
//!
//! The key is created, never overwritten: a second agent started with a
//! live worker's id would run (and remove) that worker's instances. After
//! a crash the old key lives until its lease runs out (at most
//! `membership_ttl_secs`); the restarted agent waits for that.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tidegate_schema::config::planted;
use tidegate_schema::{Key, Keyspace, NetworkUse, Record, WorkerRecord};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// How soon a failed keep-alive is tried again.
const RETRY: Duration = Duration::from_millis(250);
/// How long one keep-alive may take before it counts as failed (one takes
/// milliseconds): a member cut off from the others holds it without an
/// answer, and the next attempt, on a new stream, may go to another.
const ATTEMPT: Duration = Duration::from_secs(1);

/// Why this worker could not register.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "worker_id {worker} is held by a live agent ({holder}): two agents with one worker_id would both run its instances; give this agent its own worker_id"
    )]
    Held { worker: String, holder: String },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

/// How often a holder's lease is looked at while deciding whether it lives.
const LOOK: Duration = Duration::from_millis(500);

/// Creates `record`'s key under a new lease (returned). If the key exists,
/// its lease is watched until it is renewed (a live agent holds the id:
/// [`ClaimError::Held`]) or runs out (a previous run of this worker that
/// died: its key goes with it, and the create is tried again). Another
/// agent's lease is never revoked.
///
/// `previous` is this process's own last lease, when it registers again: a
/// key still on it is this agent's, and is kept as it is (no delete, so
/// other agents never see the worker gone while etcd comes back).
pub async fn claim(
    client: &mut Client,
    key: &str,
    record: &WorkerRecord,
    ttl: i64,
    previous: Option<i64>,
) -> Result<i64, ClaimError> {
    loop {
        let id = client.lease_grant(ttl, None).await?.id();
        // (Planted: the pre-fix unguarded put, for `cargo xtask redteam`.)
        let guard = if planted("unique-worker") {
            Vec::new()
        } else {
            vec![Compare::version(key, CompareOp::Equal, 0)]
        };
        let txn = Txn::new()
            .when(guard)
            .and_then([TxnOp::put(
                key,
                record.encode(),
                Some(PutOptions::new().with_lease(id)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            return Ok(id);
        }
        let _ = client.lease_revoke(id).await;
        let Some(held) = tidegate_etcd::guard::else_get(&resp) else {
            continue; // gone in between
        };
        if previous.is_some_and(|p| p == held.lease()) {
            return Ok(held.lease());
        }
        let holder = WorkerRecord::decode(held.value()).ok();
        if held.lease() != 0 && is_kept_alive(client, held.lease(), ttl).await? {
            return Err(ClaimError::Held {
                worker: record.id.to_string(),
                holder: match holder {
                    Some(h) => format!(
                        "address {}, HTTP entry {}, started at unix {}",
                        h.address, h.http_entry, h.started_at
                    ),
                    None => "its record does not decode".into(),
                },
            });
        }
        if held.lease() == 0 {
            // Written by hand without a lease (no agent does that): it would
            // never go away by itself.
            tracing::warn!(worker = %record.id, "replacing a worker key that has no lease");
            client
                .txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            key,
                            CompareOp::Equal,
                            held.mod_revision(),
                        )])
                        .and_then([TxnOp::delete(key, None)]),
                )
                .await?;
        }
        // Otherwise its lease ran out (a previous run of this worker that
        // died): the key is gone, try again.
    }
}

/// Whether lease `id` is renewed before it runs out (a `ttl`-second lease
/// and a second of slack): true for a live holder, false once it expired.
async fn is_kept_alive(client: &mut Client, id: i64, ttl: i64) -> Result<bool, ClaimError> {
    let until = tokio::time::Instant::now() + Duration::from_secs(ttl.max(1) as u64 + 1);
    let mut last = i64::MAX;
    while tokio::time::Instant::now() < until {
        let left = client.lease_time_to_live(id, None).await?.ttl();
        if left <= 0 {
            return Ok(false);
        }
        if left > last {
            return Ok(true);
        }
        last = left;
        tokio::time::sleep(LOOK).await;
    }
    // Neither renewed nor expired in a whole TTL: etcd is not keeping time
    // as expected; do not take a key that may be live.
    Ok(true)
}

/// Aborts its task when dropped (with the membership task).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps the registration's `networks` equal to what the reconciler
/// publishes: puts the record again (same lease, only while the key is on
/// this agent's current lease), at most once a second, each write bounded
/// by a timeout. A task of its own: a slow etcd must never hold up the
/// keep-alive.
async fn publish_networks(
    mut client: Client,
    key: String,
    mut record: WorkerRecord,
    mut lease: watch::Receiver<i64>,
    mut networks: watch::Receiver<Option<NetworkUse>>,
) {
    let mut written: Option<(Option<NetworkUse>, i64)> = None;
    // Whether the last write did not land: tried again every 2 s, not
    // only on the next change (which may not come).
    let mut behind = false;
    loop {
        let retry = async {
            if behind {
                tokio::time::sleep(Duration::from_secs(2)).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            changed = networks.changed() => if changed.is_err() { return },
            changed = lease.changed() => if changed.is_err() { return },
            () = retry => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        record.networks = *networks.borrow_and_update();
        let id = *lease.borrow_and_update();
        behind = false;
        if id == 0 || written == Some((record.networks, id)) {
            continue;
        }
        behind = true;
        let txn = Txn::new()
            .when([Compare::lease(key.as_str(), CompareOp::Equal, id)])
            .and_then([TxnOp::put(
                key.as_str(),
                record.encode(),
                Some(PutOptions::new().with_lease(id)),
            )]);
        match tokio::time::timeout(Duration::from_secs(2), client.txn(txn)).await {
            Ok(Ok(r)) if r.succeeded() => {
                written = Some((record.networks, id));
                behind = false;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "could not update this worker's record"),
            Err(_) => tracing::debug!("updating this worker's record timed out"),
        }
    }
}

/// How often a healthy worker's lease is kept alive: a sixth of its TTL
/// (at least 1 s), so a cut from etcd shorter than 5/6 of the TTL never
/// lets it lapse (at a third, a 4 s cut could lapse a 6 s lease, and
/// every agent then answered 503 for the worker's instances until it
/// registered again: found by `cargo xtask chaos`).
pub(crate) fn keep_alive_period(ttl: i64) -> Duration {
    (Duration::from_secs(ttl.max(1) as u64) / 6).max(Duration::from_secs(1))
}

/// Keeps the worker registered until the task is dropped, starting from
/// the lease [`claim`] returned; publishes the current lease in `lease` (0
/// while unregistered). The record's `networks` follows `networks`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: Client,
    ks: Keyspace,
    record: WorkerRecord,
    ttl: i64,
    metrics: Arc<Metrics>,
    lease: watch::Sender<i64>,
    first: i64,
    networks: watch::Receiver<Option<NetworkUse>>,
) {
    let key = ks.key(&Key::Worker(record.id.clone()));
    let publisher = tokio::spawn(publish_networks(
        client.clone(),
        key.clone(),
        record.clone(),
        lease.subscribe(),
        networks,
    ));
    let _publisher = AbortOnDrop(publisher);
    let period = keep_alive_period(ttl);
    let mut client = client;
    let mut first = Some(first);
    let mut previous = None;
    loop {
        let claimed = match first.take() {
            Some(id) => Ok(id),
            None => claim(&mut client, &key, &record, ttl, previous).await,
        };
        let id = match claimed {
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
        //
        // The first keep-alive goes out at once: a lease kept from before
        // (`previous`, after etcd came back) may have little time left — a
        // new etcd leader extends every lease by about one TTL from its
        // election, which can be long before this agent got through.
        let mut last_ok = tokio::time::Instant::now();
        let mut wait = Duration::ZERO;
        loop {
            tokio::time::sleep(wait).await;
            let attempt = async {
                let (mut keeper, mut stream) = client.lease_keep_alive(id).await.ok()?;
                keeper.keep_alive().await.ok()?;
                stream.message().await.ok().flatten().map(|r| r.ttl())
            };
            // Without a bound, a keep-alive sent to an etcd member cut off
            // from the others waited for the whole TTL and the worker lost
            // its membership (players got 503 for its instances): chaos,
            // "etcd raft leader cut off from the other members".
            let answer = tokio::time::timeout(ATTEMPT, attempt).await.ok().flatten();
            wait = if answer.is_none() { RETRY } else { period };
            match answer {
                Some(t) if t > 0 => last_ok = tokio::time::Instant::now(),
                Some(_) => break,
                None if last_ok.elapsed() >= Duration::from_secs(ttl as u64) => break,
                None => {}
            }
        }
        let _ = lease.send(0);
        previous = Some(id);
        tracing::warn!(worker = %record.id, "membership lease lost; registering again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_shorter_than_five_sixths_of_the_ttl_never_lapses_the_lease() {
        for ttl in [2, 3, 6, 10, 60, 300] {
            let period = keep_alive_period(ttl);
            let ttl_d = Duration::from_secs(ttl as u64);
            assert!(period >= Duration::from_secs(1), "{ttl}: {period:?}");
            // The last keep-alive before a cut is at most a period old.
            if ttl >= 6 {
                assert!(ttl_d - period >= ttl_d * 5 / 6, "{ttl}: {period:?}");
            }
        }
        assert_eq!(keep_alive_period(6), Duration::from_secs(1));
    }
}
