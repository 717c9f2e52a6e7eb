//! Scheduler election on an etcd lease, with the fencing token it yields.
//!
//! A candidate grants a lease of `ttl` seconds, keeps it alive every
//! `ttl / 3`, and campaigns on the keyspace's election name. When it wins,
//! its token is the creation revision of its election key. If keep-alives
//! stop succeeding for a whole TTL (etcd unreachable, process paused), the
//! leadership is reported lost: the caller must stop scheduling, and every
//! write it still tries fails the fencing compare anyway.

use std::time::{Duration, Instant};

use etcd_client::Client;
use serde::{Deserialize, Serialize};
use tidegate_schema::Keyspace;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The value a candidate puts on its election key: who it is and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub id: String,
    pub url: String,
}

/// Who leads, as the election key says (`None` while nobody does).
pub async fn current_leader(
    client: &Client,
    ks: &Keyspace,
) -> Result<Option<Candidate>, etcd_client::Error> {
    match client.clone().leader(ks.election_name()).await {
        Ok(resp) => Ok(resp
            .kv()
            .and_then(|kv| serde_json::from_slice::<Candidate>(kv.value()).ok())),
        // etcd answers "election: no leader" as an error (not to be taken
        // for "etcdserver: no leader", a member without a raft leader).
        Err(e) if e.to_string().contains("election: no leader") => Ok(None),
        Err(e) => Err(e),
    }
}

/// A won election. Dropping it stops the keep-alive (the lease then expires).
#[derive(Debug)]
pub struct Leadership {
    /// The election key (`{root}/election/scheduler/{lease hex}`).
    pub key: String,
    /// The fencing token: the creation revision of `key`.
    pub token: i64,
    pub lease: i64,
    lost: watch::Receiver<bool>,
    keeper: JoinHandle<()>,
}

impl Leadership {
    /// Whether the lease could not be kept alive for a whole TTL.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the leadership is lost.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Stops keeping the lease alive, as a crashed or paused leader would.
    pub fn abandon(&self) {
        self.keeper.abort();
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Campaigns until this candidate leads; `id` is stored as the key's value
/// (what `GET /v1/status` shows as the leader).
pub async fn campaign(
    client: &Client,
    keys: &Keyspace,
    id: &str,
    ttl_secs: i64,
) -> Result<Leadership, etcd_client::Error> {
    let mut client = client.clone();
    let lease = client.lease_grant(ttl_secs, None).await?.id();
    let (tx, rx) = watch::channel(false);
    let keeper = tokio::spawn(keep_alive(client.clone(), lease, ttl_secs, tx));
    let resp = client.campaign(keys.election_name(), id, lease).await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            keeper.abort();
            return Err(e);
        }
    };
    let leader = resp.leader().ok_or_else(|| {
        etcd_client::Error::ElectError("campaign answered without a leader key".into())
    })?;
    Ok(Leadership {
        key: String::from_utf8_lossy(leader.key()).into_owned(),
        token: leader.rev(),
        lease,
        lost: rx,
        keeper,
    })
}

pub(crate) async fn keep_alive(
    mut client: Client,
    lease: i64,
    ttl_secs: i64,
    lost: watch::Sender<bool>,
) {
    let ttl = Duration::from_secs(ttl_secs.max(1) as u64);
    let period = ttl / 3;
    let mut last_ok = Instant::now();
    loop {
        // Some(ttl) from etcd; None when it could not be asked.
        let answer = match client.lease_keep_alive(lease).await {
            Ok((mut keeper, mut stream)) => match keeper.keep_alive().await {
                Ok(()) => stream.message().await.ok().flatten().map(|r| r.ttl()),
                Err(_) => None,
            },
            Err(_) => None,
        };
        match answer {
            Some(ttl) if ttl > 0 => last_ok = Instant::now(),
            // etcd says the lease is gone: someone else may lead already.
            Some(_) => {
                tracing::warn!(lease, "election lease expired: leadership lost");
                let _ = lost.send(true);
                return;
            }
            None if last_ok.elapsed() >= ttl => {
                tracing::warn!(
                    lease,
                    "etcd unreachable for a whole lease TTL: leadership lost"
                );
                let _ = lost.send(true);
                return;
            }
            None => {}
        }
        tokio::time::sleep(period).await;
    }
}
