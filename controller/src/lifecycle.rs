//! Renew and delete: the rest of an instance's life after its spawn Txn.
//!
//! Renew gives the instance a new lease and moves every key of it (record,
//! status, claims, team slot) onto it in one Txn, guarded by the record's
//! mod_revision and the scheduler's fence; the old lease is revoked after.
//! Delete revokes the lease, which removes every key at once.

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use tidegate_schema::{
    ChallengeName, FlagOwnerRecord, InstanceId, InstanceRecord, Key, Keyspace, Record,
    SecretRecord, TeamId, TtlSpec,
};

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("instance {0} does not exist")]
    NotFound(String),
    #[error("instance {id} was renewed {renewals} times; the challenge allows {max}")]
    MaxRenewals { id: String, renewals: u32, max: u32 },
    #[error("instance {id} already lives until its maximum lifetime ({max_secs} s after creation)")]
    MaxLifetime { id: String, max_secs: u64 },
    #[error(
        "renewing instance {id} now would not extend it (it expires at {expires_at}); try later"
    )]
    TooEarly { id: String, expires_at: u64 },
    #[error("instance {0} changed while renewing; try again")]
    Conflict(String),
    #[error("not the scheduler any more: fencing token {0} is stale")]
    Fenced(i64),
    #[error(
        "etcd did not confirm renewing instance {id} ({error}); GET it to see whether its expiry moved"
    )]
    Unsettled { id: String, error: String },
    #[error(
        "etcd did not confirm deleting instance {id} ({error}); GET it to see whether it is gone"
    )]
    DeleteUnsettled { id: String, error: String },
    #[error("stored instance {key}: {error}")]
    Corrupt { key: String, error: String },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

/// An instance record with the etcd metadata renew and delete need.
#[derive(Debug, Clone)]
pub struct Current {
    pub record: InstanceRecord,
    pub lease: i64,
    pub mod_revision: i64,
}

/// Reads an instance from etcd (linearizable).
pub async fn get(
    client: &Client,
    ks: &Keyspace,
    id: &InstanceId,
) -> Result<Current, LifecycleError> {
    let key = ks.key(&Key::Instance(id.clone()));
    let resp = client.clone().get(key.as_str(), None).await?;
    let kv = resp
        .kvs()
        .first()
        .ok_or_else(|| LifecycleError::NotFound(id.to_string()))?;
    let record = InstanceRecord::decode(kv.value()).map_err(|e| LifecycleError::Corrupt {
        key: key.clone(),
        error: e.to_string(),
    })?;
    Ok(Current {
        record,
        lease: kv.lease(),
        mod_revision: kv.mod_revision(),
    })
}

/// The instance's flag: its secret record, or the flag inline in a record
/// written before secrets/ existed; `None` when it has neither.
pub async fn flag(
    client: &Client,
    ks: &Keyspace,
    rec: &InstanceRecord,
) -> Result<Option<String>, LifecycleError> {
    let key = ks.key(&Key::Secret {
        worker: rec.worker.clone(),
        instance: rec.id.clone(),
    });
    let resp = client.clone().get(key.as_str(), None).await?;
    match resp.kvs().first() {
        Some(kv) => SecretRecord::decode(kv.value())
            .map(|s| Some(s.flag))
            .map_err(|e| LifecycleError::Corrupt {
                key,
                error: e.to_string(),
            }),
        None => Ok(rec.flag.clone()),
    }
}

/// Whose instance the flag with SHA-256 `digest` was made for, if any
/// instance of `challenge` had it (live or ended).
pub async fn flag_owner(
    client: &Client,
    ks: &Keyspace,
    challenge: &ChallengeName,
    digest: &str,
) -> Result<Option<FlagOwnerRecord>, LifecycleError> {
    let key = ks.key(&Key::FlagOwner {
        challenge: challenge.clone(),
        digest: digest.to_string(),
    });
    let resp = client.clone().get(key.as_str(), None).await?;
    resp.kvs()
        .first()
        .map(|kv| {
            FlagOwnerRecord::decode(kv.value()).map_err(|e| LifecycleError::Corrupt {
                key: key.clone(),
                error: e.to_string(),
            })
        })
        .transpose()
}

/// The expiry a renewal at `now` extending by `extend_secs` (the
/// challenge's default TTL, or what its `renew` policy granted) gives, or
/// why there is none: the renewal count and the maximum lifetime still cap.
pub fn renewed_expiry(
    record: &InstanceRecord,
    ttl: &TtlSpec,
    now: u64,
    extend_secs: u64,
) -> Result<u64, LifecycleError> {
    let id = record.id.to_string();
    if record.renewals >= ttl.max_renewals {
        return Err(LifecycleError::MaxRenewals {
            id,
            renewals: record.renewals,
            max: ttl.max_renewals,
        });
    }
    let ceiling = record.created_at + ttl.max_secs;
    if record.expires_at >= ceiling {
        return Err(LifecycleError::MaxLifetime {
            id,
            max_secs: ttl.max_secs,
        });
    }
    let wanted = (now + extend_secs).min(ceiling);
    if wanted <= record.expires_at {
        return Err(LifecycleError::TooEarly {
            id,
            expires_at: record.expires_at,
        });
    }
    Ok(wanted)
}

/// The TTL of a renewal's new lease: until `expires_at` by this replica's
/// clock, at least 1 s, and never less than the `remaining` seconds of the
/// lease it replaces.
pub fn lease_secs(expires_at: u64, now: u64, remaining: i64) -> i64 {
    let wanted = i64::try_from(expires_at.saturating_sub(now)).unwrap_or(i64::MAX);
    wanted.max(remaining).max(1)
}

/// A committed renewal.
#[derive(Debug, Clone)]
pub struct Renewed {
    pub record: InstanceRecord,
    /// etcd's answer was lost and the renewal was found committed after.
    pub settled: bool,
}

/// Moves the instance onto a new lease lasting until `expires_at`.
pub async fn renew(
    client: &Client,
    ks: &Keyspace,
    fence: (&str, i64),
    current: &Current,
    expires_at: u64,
    now: u64,
) -> Result<Renewed, LifecycleError> {
    let mut client = client.clone();
    let rec = &current.record;
    let mut record = rec.clone();
    record.expires_at = expires_at;
    record.renewals += 1;
    // A record from before secrets/ carries its flag inline, where every
    // worker reads it: the renewal moves it to the secret.
    record.flag = None;

    let instance_key = ks.key(&Key::Instance(rec.id.clone()));
    let status_key = ks.key(&Key::Status {
        worker: rec.worker.clone(),
        instance: rec.id.clone(),
    });
    let secret_key = ks.key(&Key::Secret {
        worker: rec.worker.clone(),
        instance: rec.id.clone(),
    });

    // The new lease never ends before the current one would: the record's
    // expiry is a date on this replica's clock, the lease a duration. A
    // replica whose clock runs ahead, capped at the maximum lifetime,
    // would otherwise grant less than another replica already promised
    // (found by the chaos clock-skew phase).
    let remaining = old_lease_left(&mut client, rec.id.as_str(), current.lease).await;
    let ttl = lease_secs(expires_at, now, remaining);
    let lease = client.lease_grant(ttl, None).await?.id();
    let opts = || Some(PutOptions::new().with_lease(lease));
    let id = rec.id.to_string();
    let mut compares = vec![
        Compare::create_revision(fence.0, CompareOp::Equal, fence.1),
        Compare::mod_revision(
            instance_key.as_str(),
            CompareOp::Equal,
            current.mod_revision,
        ),
    ];
    // The owning agent writes the instance's status (its container's state
    // and address) whenever that changes, so its value and revision are not
    // compared: the status moves to the new lease with whatever value it has when
    // the Txn commits (or is not there yet: the agent writes it on the new
    // lease once its watch shows the renewal). The secret moves the same
    // way (records written before secrets/ existed have none).
    let move_if_there = |key: &str| {
        TxnOp::txn(
            Txn::new()
                .when([Compare::version(key, CompareOp::Greater, 0)])
                .and_then([TxnOp::put(
                    key,
                    "",
                    Some(PutOptions::new().with_lease(lease).with_ignore_value()),
                )]),
        )
    };
    let move_secret = match &rec.flag {
        None => move_if_there(&secret_key),
        Some(flag) => {
            let secret = SecretRecord {
                v: tidegate_schema::V1,
                instance: rec.id.clone(),
                worker: rec.worker.clone(),
                flag: flag.clone(),
                env: Default::default(),
            };
            TxnOp::txn(
                Txn::new()
                    .when([Compare::version(secret_key.as_str(), CompareOp::Greater, 0)])
                    .and_then([TxnOp::put(
                        secret_key.as_str(),
                        "",
                        Some(PutOptions::new().with_lease(lease).with_ignore_value()),
                    )])
                    .or_else([TxnOp::put(secret_key.as_str(), secret.encode(), opts())]),
            )
        }
    };
    let mut ops = vec![
        TxnOp::put(instance_key.as_str(), record.encode(), opts()),
        move_if_there(&status_key),
        move_secret,
    ];
    let mut claims: Vec<String> = rec
        .http
        .iter()
        .map(|r| ks.key(&Key::HostnameClaim(r.hostname.clone())))
        .collect();
    claims.extend(rec.tcp.iter().map(|r| ks.key(&Key::PortClaim(r.port))));
    // A pooled instance holds no team slot.
    if let Some(team) = &rec.team {
        claims.push(ks.key(&Key::TeamSlot {
            challenge: rec.challenge.clone(),
            team: team.clone(),
            slot: rec.team_slot,
        }));
    }
    for claim in &claims {
        // The claim must still be ours (same lease) before it moves.
        compares.push(Compare::lease(
            claim.as_str(),
            CompareOp::Equal,
            current.lease,
        ));
        ops.push(TxnOp::put(claim.as_str(), id.as_str(), opts()));
    }
    let txn = Txn::new()
        .when(compares)
        .and_then(ops)
        .or_else([TxnOp::get(fence.0, None)]);
    let resp = match client.txn(txn).await {
        Ok(r) => r,
        // The Txn may have committed even though no answer came (a timeout,
        // a reset connection, a member paused mid-request): settle it before
        // touching any lease.
        Err(e) => {
            return match settle(&client, ks, current, lease).await {
                Settled::Renewed(record) => {
                    tracing::info!(instance = %id, error = %e, "etcd's answer to a renewal was lost; it had committed");
                    revoke_old(&mut client, &id, current.lease).await;
                    Ok(Renewed {
                        record: *record,
                        settled: true,
                    })
                }
                Settled::NotRenewed => Err(e.into()),
                Settled::Unknown(why) => Err(LifecycleError::Unsettled { id, error: why }),
            };
        }
    };
    if !resp.succeeded() {
        let _ = client.lease_revoke(lease).await;
        let leader = tidegate_etcd::guard::else_get(&resp).map_or(0, |kv| kv.create_revision());
        if leader != fence.1 {
            return Err(LifecycleError::Fenced(fence.1));
        }
        return Err(LifecycleError::Conflict(id));
    }
    revoke_old(&mut client, &id, current.lease).await;
    Ok(Renewed {
        record,
        settled: false,
    })
}

/// Seconds the old lease has left, read best-effort: a read that fails
/// twice (a connection reset by a lost answer just before, a member
/// restarting) leaves the renewal to its own clock rather than failing it.
async fn old_lease_left(client: &mut Client, id: &str, lease: i64) -> i64 {
    let mut last = None;
    for pause in [0, 200] {
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        match client.lease_time_to_live(lease, None).await {
            Ok(r) => return r.ttl().max(0),
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        tracing::warn!(instance = %id, lease, error = %e, "could not read what the old lease has left; renewing by this replica's clock");
    }
    0
}

/// Revokes the lease a renewal moved every key off.
async fn revoke_old(client: &mut Client, id: &str, lease: i64) {
    if let Err(e) = client.lease_revoke(lease).await {
        // The old lease expires by itself at the old expiry; nothing is bound to it now.
        tracing::warn!(instance = %id, lease, error = %e, "could not revoke the old lease");
    }
}

/// How a renewal whose Txn got no answer turned out.
#[derive(Debug)]
pub enum Settled {
    /// It committed: every key is on the new lease (the record as stored).
    Renewed(Box<InstanceRecord>),
    /// It did not commit and now never can; the new lease was revoked.
    NotRenewed,
    /// etcd did not answer the check either; both leases are left alone
    /// (the new one holds nothing, or everything, and expires by itself).
    Unknown(String),
}

/// Pauses between the attempts to settle an unanswered renewal.
const SETTLE_PAUSES_MS: [u64; 4] = [0, 200, 500, 1000];

/// Finds out whether an unanswered renewal Txn committed, and makes sure
/// one that did not never will.
///
/// The check is itself a Txn: if the record still has the revision the
/// renewal compared, it is rewritten in place (same value, same lease),
/// which moves its revision on, so the renewal Txn, however late it
/// reaches etcd, fails its compare. Only then is the new lease revoked. A
/// lease that holds the record is never revoked.
pub async fn settle(client: &Client, ks: &Keyspace, current: &Current, new_lease: i64) -> Settled {
    let mut client = client.clone();
    let instance_key = ks.key(&Key::Instance(current.record.id.clone()));
    let instance_key = instance_key.as_str();
    let check = || {
        Txn::new()
            .when([Compare::mod_revision(
                instance_key,
                CompareOp::Equal,
                current.mod_revision,
            )])
            .and_then([TxnOp::put(
                instance_key,
                "",
                Some(PutOptions::new().with_ignore_value().with_ignore_lease()),
            )])
            .or_else([TxnOp::get(instance_key, None)])
    };
    let mut last = String::new();
    for pause in SETTLE_PAUSES_MS {
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        let resp = match client.txn(check()).await {
            Ok(r) => r,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let stored = tidegate_etcd::guard::else_get(&resp);
        if let Some(kv) = stored.filter(|kv| !resp.succeeded() && kv.lease() == new_lease) {
            return match InstanceRecord::decode(kv.value()) {
                Ok(record) => Settled::Renewed(Box::new(record)),
                // Ours, but unreadable: keep the lease, say so.
                Err(e) => Settled::Unknown(format!("the renewed record does not decode: {e}")),
            };
        }
        // Not renewed (the record is unchanged and now fenced off, or it
        // changed or went another way): the new lease holds nothing.
        if let Err(e) = client.lease_revoke(new_lease).await {
            tracing::debug!(lease = new_lease, error = %e, "could not revoke an unused lease; it expires by itself");
        }
        return Settled::NotRenewed;
    }
    Settled::Unknown(last)
}

/// [`get`], tried again at once while the request had no effect (it met a
/// member that is down or has no raft leader): the read after a revoke
/// must come back.
async fn get_retrying(
    client: &Client,
    ks: &Keyspace,
    id: &InstanceId,
) -> Result<Current, LifecycleError> {
    let mut pause = std::time::Duration::from_millis(10);
    for _ in 0..8 {
        match get(client, ks, id).await {
            Err(LifecycleError::Etcd(e)) if tidegate_etcd::never_sent(&e) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(200));
            }
            other => return other,
        }
    }
    get(client, ks, id).await
}

/// Deletes an instance by revoking its lease (every key goes with it).
///
/// A renewal moves the keys to a new lease and then revokes the old one, so
/// a delete racing it may revoke a lease that no longer holds the keys (or
/// one already gone). The record is therefore read again after each revoke
/// until it is gone: a renewal that read the record before the revoke and
/// commits after it fails its mod-revision compare, so this converges.
///
/// With `team`, an instance of another team is `NotFound`, as a missing one.
pub async fn delete(
    client: &Client,
    ks: &Keyspace,
    id: &InstanceId,
    team: Option<&TeamId>,
) -> Result<(), LifecycleError> {
    let mut revoked = false;
    for _ in 0..5 {
        let current = match get_retrying(client, ks, id).await {
            Ok(c) if team.is_some_and(|t| !c.record.is_of(t)) => {
                return Err(LifecycleError::NotFound(id.to_string()));
            }
            Ok(c) => c,
            // Gone after our revoke (or one racing it): deleted as asked.
            Err(LifecycleError::NotFound(_)) if revoked => return Ok(()),
            // After a revoke, an error must not read as "nothing happened"
            // (the caller would try the whole delete again, find nothing
            // and answer 404 for an instance this call deleted).
            Err(e) if revoked => {
                return Err(LifecycleError::DeleteUnsettled {
                    id: id.to_string(),
                    error: e.to_string(),
                });
            }
            Err(e) => return Err(e),
        };
        let mut client = client.clone();
        if current.lease == 0 {
            // A record written by hand without a lease: remove the record itself.
            client
                .delete(ks.key(&Key::Instance(id.clone())).as_str(), None)
                .await?;
            return Ok(());
        }
        match client.lease_revoke(current.lease).await {
            Ok(_) => {}
            // Already revoked: by a renewal that moved the keys, or by expiry.
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::NotFound => {}
            // Nothing done yet: the caller may try it all again.
            Err(e) if !revoked => return Err(e.into()),
            Err(e) => {
                return Err(LifecycleError::DeleteUnsettled {
                    id: id.to_string(),
                    error: e.to_string(),
                });
            }
        }
        revoked = true;
    }
    Err(LifecycleError::Conflict(id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(created: u64, expires: u64, renewals: u32) -> InstanceRecord {
        let json = serde_json::json!({
            "v": 1, "id": "0000000001", "challenge": "web", "team": "t", "worker": "w",
            "token": 1, "created_at": created, "expires_at": expires, "renewals": renewals,
            "http": [{"port_name": "web", "hostname": "0000000001.ctf.localhost", "target_port": 80}],
            "container": {"image": "x", "limits": {"memory_mib": 256, "cpus": 0.5, "pids": 128}},
            "flag": "f"
        });
        InstanceRecord::decode(json.to_string().as_bytes()).unwrap()
    }

    fn renewed_expiry_default(
        r: &InstanceRecord,
        ttl: &TtlSpec,
        now: u64,
    ) -> Result<u64, LifecycleError> {
        renewed_expiry(r, ttl, now, ttl.default_secs)
    }

    #[test]
    fn a_renewal_lease_never_ends_before_the_one_it_replaces() {
        // 30 s left by this clock: 30 s.
        assert_eq!(lease_secs(1_030, 1_000, 12), 30);
        // This clock runs 30 s ahead and the expiry is capped: the old
        // lease's 25 s left win over the 5 s this clock would give.
        assert_eq!(lease_secs(1_035, 1_030, 25), 25);
        // Past its expiry by this clock, the old lease gone: 1 s.
        assert_eq!(lease_secs(990, 1_000, 0), 1);
        assert_eq!(lease_secs(u64::MAX, 0, 0), i64::MAX);
    }

    #[test]
    fn renewal_math() {
        let ttl = TtlSpec {
            default_secs: 600,
            max_secs: 1000,
            max_renewals: 2,
        };
        // Extends to now + default.
        assert_eq!(
            renewed_expiry_default(&rec(0, 600, 0), &ttl, 300).unwrap(),
            900
        );
        // Capped at created + max.
        assert_eq!(
            renewed_expiry_default(&rec(0, 900, 1), &ttl, 800).unwrap(),
            1000
        );
        // Already at the cap.
        assert!(matches!(
            renewed_expiry_default(&rec(0, 1000, 1), &ttl, 900),
            Err(LifecycleError::MaxLifetime { .. })
        ));
        // Would not extend yet.
        assert!(matches!(
            renewed_expiry_default(&rec(0, 900, 1), &ttl, 100),
            Err(LifecycleError::TooEarly {
                expires_at: 900,
                ..
            })
        ));
        // Out of renewals.
        assert!(matches!(
            renewed_expiry_default(&rec(0, 600, 2), &ttl, 100),
            Err(LifecycleError::MaxRenewals { max: 2, .. })
        ));
    }
}
