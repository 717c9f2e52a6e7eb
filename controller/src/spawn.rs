//! The spawn transaction: fencing, claims and the record in one Txn.
//!
//! One Txn, all bound to a new lease whose TTL is the instance's lifetime:
//! - compare: the scheduler's election key still has the create revision
//!   that is our fencing token (a paused ex-leader cannot commit);
//! - compare: the instance key, each hostname claim, each TCP port claim and
//!   the chosen team slot do not exist (so nothing is handed out twice and
//!   `per_team_max` holds under any concurrency);
//! - then: put the claims, the instance record and its secret
//!   (`secrets/{worker}/{id}`, the flag, readable only by that worker);
//!   and, with no lease, the flag's owner (`flag-owners/{challenge}/{sha256}`)
//!   so the flag check knows whose a flag is after the instance is gone.
//!
//! A lost race on a claim retries with fresh choices; a lost fence does not.

use std::collections::BTreeSet;
use std::ops::RangeInclusive;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use tidegate_schema::{
    ChallengeRecord, ChallengeSpec, ContainerSpec, FlagOwnerRecord, Hostname, HttpRoute,
    InstanceId, InstanceRecord, Key, Keyspace, PortSpec, Protocol, Record, SecretRecord,
    ServiceName, ServiceRecord, SolverRecord, TcpRoute, TeamId, V1, WorkerId,
};

/// How many times a spawn retries after losing a race for a claim.
const MAX_ATTEMPTS: u32 = 16;

/// Everything the scheduler decided before writing.
#[derive(Debug, Clone)]
pub struct SpawnPlan {
    pub keys: Keyspace,
    /// The scheduler's election key and its create revision (the token).
    pub leader_key: String,
    pub token: i64,
    pub challenge: ChallengeRecord,
    /// `challenge`'s mod revision (0: agents check against the current spec).
    pub challenge_revision: i64,
    /// The challenge's `secret_env` values (at `challenge_revision`), for
    /// the instance's secret record.
    pub secret_env: std::collections::BTreeMap<String, String>,
    pub team: TeamId,
    pub worker: WorkerId,
    /// Hostnames are `{id}.{domain}` (first HTTP port) and `{id}-{port}.{domain}`.
    pub domain: String,
    /// Public TCP ports are drawn from this range.
    pub tcp_ports: RangeInclusive<u16>,
    pub ttl_secs: u64,
    pub now: u64,
    /// Spawn guards (`guards/...`) and the revision up to which the
    /// decisions saw every write of each: the Txn fails if one was written
    /// after, and writes each.
    pub guards: Vec<(String, i64)>,
}

/// What the Txn wrote.
#[derive(Debug, Clone)]
pub struct Spawned {
    pub record: InstanceRecord,
    pub lease: i64,
    pub revision: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(
        "not the scheduler any more: fencing token {token} is stale ({})", fence_state(*current)
    )]
    Fenced { token: i64, current: i64 },
    #[error("team {team:?} already has {max} live instance(s) of {challenge:?}")]
    TeamLimit {
        team: String,
        challenge: String,
        max: u32,
    },
    #[error("could not claim free names and ports after {MAX_ATTEMPTS} attempts")]
    Contended,
    #[error("the TCP port range {0:?} is too small for this challenge")]
    PortRange(RangeInclusive<u16>),
    #[error("invalid {what}: {error}")]
    Invalid { what: &'static str, error: String },
    #[error("the queued spawn is no longer waiting (its place lapsed, or it was left or admitted)")]
    LeftQueue,
    #[error("the pooled instance was claimed or removed meanwhile")]
    PoolTaken,
    #[error(
        "another scheduler wrote {key} (revision {revision}) after this one decided; deciding again"
    )]
    Guarded { key: String, revision: i64 },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

fn fence_state(current: i64) -> String {
    if current == 0 {
        "its election key is gone".into()
    } else {
        format!("its election key was recreated at revision {current}")
    }
}

/// A queued spawn being admitted: the id it was promised and its queue
/// key, deleted in the spawn Txn (which fails if the key is gone, so a
/// place is admitted at most once).
#[derive(Debug, Clone)]
pub struct FromQueue {
    pub id: InstanceId,
    pub key: String,
    /// The place's create revision: the place itself, not a later one of
    /// the same team (left and joined again) under the same key.
    pub create_revision: i64,
}

/// A pooled instance being claimed: its record (no team) as last seen, at
/// that mod revision, on its pool lease.
#[derive(Debug, Clone)]
pub struct FromPool {
    pub id: InstanceId,
    pub mod_revision: i64,
    pub lease: i64,
    /// Its status key's mod revision as seen (running): a pooled instance
    /// that failed or restarted since is not handed out.
    pub status_revision: i64,
}

/// Writes one instance; `flag` makes the flag of a chosen instance id.
pub async fn spawn(
    client: &Client,
    plan: &SpawnPlan,
    flag: impl Fn(&InstanceId) -> String,
) -> Result<Spawned, SpawnError> {
    spawn_from(client, plan, None, flag).await
}

/// [`spawn`], or the admission of a queued spawn (`queued`) under its id.
pub async fn spawn_from(
    client: &Client,
    plan: &SpawnPlan,
    queued: Option<&FromQueue>,
    flag: impl Fn(&InstanceId) -> String,
) -> Result<Spawned, SpawnError> {
    write(client, plan, queued, None, flag).await
}

/// Hands a pooled instance (running, no team) to `plan.team` in one Txn:
/// the record gets the team, its hostnames, ports, team slot, lease and
/// expiry; its secret the team's flag; its status is deleted (the agent
/// reports it again once the flag file holds the flag). `plan.worker` and
/// `plan.challenge_revision` are the pooled record's. `PoolTaken` when
/// another spawn claimed it first, or it was removed.
pub async fn claim(
    client: &Client,
    plan: &SpawnPlan,
    pooled: &FromPool,
    flag: impl Fn(&InstanceId) -> String,
) -> Result<Spawned, SpawnError> {
    let spawned = write(client, plan, None, Some(pooled), flag).await?;
    // Every key moved off the pool lease; nothing is bound to it now.
    if let Err(e) = client.clone().lease_revoke(pooled.lease).await {
        tracing::debug!(instance = %pooled.id, error = %e, "could not revoke a claimed instance's pool lease; it runs out by itself");
    }
    Ok(spawned)
}

async fn write(
    client: &Client,
    plan: &SpawnPlan,
    queued: Option<&FromQueue>,
    pooled: Option<&FromPool>,
    flag: impl Fn(&InstanceId) -> String,
) -> Result<Spawned, SpawnError> {
    let mut client = client.clone();
    let spec = &plan.challenge.spec;
    let tcp_needed = spec
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .count();
    if tcp_needed > plan.tcp_ports.len() {
        return Err(SpawnError::PortRange(plan.tcp_ports.clone()));
    }
    for _ in 0..MAX_ATTEMPTS {
        let slot = free_team_slot(&mut client, plan).await?;
        let mut record = draft(
            plan,
            queued
                .map(|q| q.id.clone())
                .or(pooled.map(|p| p.id.clone())),
        )?;
        record.team_slot = slot;
        let secret = SecretRecord {
            v: V1,
            flag: flag(&record.id),
            instance: record.id.clone(),
            worker: record.worker.clone(),
            env: plan.secret_env.clone(),
        };
        let lease = client.lease_grant(plan.ttl_secs as i64, None).await?.id();
        match commit(
            &mut client,
            plan,
            &record,
            &secret,
            slot,
            lease,
            queued,
            pooled,
        )
        .await
        {
            Ok(revision) => {
                return Ok(Spawned {
                    record,
                    lease,
                    revision,
                });
            }
            Err(e) => {
                // Nothing is bound to the lease; drop it now rather than at expiry.
                let _ = client.lease_revoke(lease).await;
                match e {
                    Some(e) => return Err(e),
                    None => tracing::debug!(instance = %record.id, "lost a claim race; retrying"),
                }
            }
        }
    }
    Err(SpawnError::Contended)
}

/// Pauses between the reads that settle an unanswered spawn Txn.
const SETTLE_PAUSES_MS: [u64; 3] = [0, 200, 500];

/// The revision at which a spawn whose Txn got no answer committed: its
/// instance key is there on its lease. `None` when it is not (or etcd does
/// not answer): the caller then revokes the lease, so that the Txn cannot
/// commit later either.
async fn committed(client: &mut Client, key: &str, lease: i64) -> Option<i64> {
    for pause in SETTLE_PAUSES_MS {
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
        if let Ok(resp) = client.get(key, None).await {
            return resp
                .kvs()
                .first()
                .filter(|kv| kv.lease() == lease)
                .map(|kv| kv.mod_revision());
        }
    }
    None
}

/// The lowest team slot not taken, or `TeamLimit`.
async fn free_team_slot(client: &mut Client, plan: &SpawnPlan) -> Result<u32, SpawnError> {
    let prefix = plan
        .keys
        .team_slots_prefix(&plan.challenge.name, &plan.team);
    let taken: BTreeSet<String> = client
        .get(
            prefix.as_str(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await?
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect();
    let max = plan.challenge.spec.per_team_max;
    (0..max)
        .find(|slot| !taken.contains(&slot_key(plan, *slot)))
        .ok_or_else(|| SpawnError::TeamLimit {
            team: plan.team.to_string(),
            challenge: plan.challenge.name.to_string(),
            max,
        })
}

fn slot_key(plan: &SpawnPlan, slot: u32) -> String {
    plan.keys.key(&Key::TeamSlot {
        challenge: plan.challenge.name.clone(),
        team: plan.team.clone(),
        slot,
    })
}

/// A record with a fresh id (or the one given), hostnames and random
/// free-looking TCP ports.
fn draft(plan: &SpawnPlan, id: Option<InstanceId>) -> Result<InstanceRecord, SpawnError> {
    let spec = &plan.challenge.spec;
    let id = id.unwrap_or_else(|| InstanceId::from_random(rand::random()));
    let mut http = Vec::new();
    let mut tcp: Vec<TcpRoute> = Vec::new();
    for p in &spec.ports {
        match p.protocol {
            Protocol::Http => {
                let label = if http.is_empty() {
                    id.to_string()
                } else {
                    format!("{id}-{}", p.name)
                };
                let hostname =
                    Hostname::parse(&format!("{label}.{}", plan.domain)).map_err(|e| {
                        SpawnError::Invalid {
                            what: "domain",
                            error: e.to_string(),
                        }
                    })?;
                http.push(HttpRoute {
                    port_name: p.name.clone(),
                    hostname,
                    target_port: p.port,
                    service: service_of(spec, p),
                });
            }
            Protocol::Tcp => {
                let port = loop {
                    let candidate = rand::random_range(plan.tcp_ports.clone());
                    if !tcp.iter().any(|r| r.port == candidate) {
                        break candidate;
                    }
                };
                tcp.push(TcpRoute {
                    port_name: p.name.clone(),
                    port,
                    target_port: p.port,
                    service: service_of(spec, p),
                });
            }
        }
    }
    Ok(InstanceRecord {
        v: V1,
        flag: None,
        id,
        challenge: plan.challenge.name.clone(),
        team: Some(plan.team.clone()),
        worker: plan.worker.clone(),
        token: plan.token,
        created_at: plan.now,
        expires_at: plan.now + plan.ttl_secs,
        renewals: 0,
        team_slot: 0,
        http,
        tcp,
        container: ContainerSpec::of(spec),
        services: ServiceRecord::all_of(spec),
        spec_revision: plan.challenge_revision,
        flag_file: spec.flag.file.clone(),
        solver: SolverRecord::of(spec),
    })
}

/// The service a port goes to: none for a one-image challenge; the one
/// named, or the only service.
pub(crate) fn service_of(spec: &ChallengeSpec, port: &PortSpec) -> Option<ServiceName> {
    if spec.services.is_empty() {
        return None;
    }
    port.service
        .clone()
        .or_else(|| spec.services.keys().next().cloned())
}

/// Runs the Txn: the record, its claims and its secret (readable only by
/// the record's worker) under one lease. `Ok(revision)` on success;
/// `Err(None)` when a claim was taken (retry); `Err(Some(e))` when retrying
/// cannot help.
#[allow(clippy::too_many_arguments)]
async fn commit(
    client: &mut Client,
    plan: &SpawnPlan,
    record: &InstanceRecord,
    secret: &SecretRecord,
    slot: u32,
    lease: i64,
    queued: Option<&FromQueue>,
    pooled: Option<&FromPool>,
) -> Result<i64, Option<SpawnError>> {
    let ks = &plan.keys;
    let id = record.id.to_string();
    let mut claims = vec![
        ks.key(&Key::Instance(record.id.clone())),
        slot_key(plan, slot),
    ];
    claims.extend(
        record
            .http
            .iter()
            .map(|r| ks.key(&Key::HostnameClaim(r.hostname.clone()))),
    );
    claims.extend(record.tcp.iter().map(|r| ks.key(&Key::PortClaim(r.port))));
    let mut compares = vec![Compare::create_revision(
        plan.leader_key.as_str(),
        CompareOp::Equal,
        plan.token,
    )];
    // A pooled instance's record is there: it must be as seen (no team).
    compares.push(match pooled {
        Some(p) => Compare::mod_revision(claims[0].as_str(), CompareOp::Equal, p.mod_revision),
        None => Compare::version(claims[0].as_str(), CompareOp::Equal, 0),
    });
    compares.extend(
        claims[1..]
            .iter()
            .map(|k| Compare::version(k.as_str(), CompareOp::Equal, 0)),
    );
    let with_lease = || Some(PutOptions::new().with_lease(lease));
    let mut puts = vec![TxnOp::put(
        claims[0].as_str(),
        record.encode(),
        with_lease(),
    )];
    puts.extend(
        claims[1..]
            .iter()
            .map(|k| TxnOp::put(k.as_str(), id.as_str(), with_lease())),
    );
    // No compare of its own: the record key (a fresh id's at version 0, or
    // the pooled record as seen) already guards it.
    puts.push(TxnOp::put(
        ks.key(&Key::Secret {
            worker: record.worker.clone(),
            instance: record.id.clone(),
        }),
        secret.encode(),
        with_lease(),
    ));
    if plan.challenge.spec.per_instance_flag() {
        let owner = FlagOwnerRecord {
            v: V1,
            challenge: record.challenge.clone(),
            team: plan.team.clone(),
            instance: record.id.clone(),
            worker: record.worker.clone(),
            created_at: record.created_at,
        };
        puts.push(TxnOp::put(
            ks.key(&Key::FlagOwner {
                challenge: record.challenge.clone(),
                digest: crate::flag::digest(&secret.flag),
            }),
            owner.encode(),
            None,
        ));
    }
    for (key, seen) in &plan.guards {
        compares.push(Compare::mod_revision(
            key.as_str(),
            CompareOp::Less,
            seen.saturating_add(1),
        ));
        puts.push(TxnOp::put(key.as_str(), id.as_str(), None));
    }
    let mut otherwise = vec![TxnOp::get(plan.leader_key.as_str(), None)];
    if let Some(p) = pooled {
        // Reported again by the agent once the flag file holds the team's
        // flag: no route before.
        let status = ks.key(&Key::Status {
            worker: record.worker.clone(),
            instance: record.id.clone(),
        });
        compares.push(Compare::mod_revision(
            status.as_str(),
            CompareOp::Equal,
            p.status_revision,
        ));
        puts.push(TxnOp::delete(status.as_str(), None));
        otherwise.push(TxnOp::get(claims[0].as_str(), None));
        otherwise.push(TxnOp::get(status.as_str(), None));
    }
    if let Some(q) = queued {
        compares.push(Compare::create_revision(
            q.key.as_str(),
            CompareOp::Equal,
            q.create_revision,
        ));
        puts.push(TxnOp::delete(q.key.as_str(), None));
        otherwise.push(TxnOp::get(q.key.as_str(), None));
    }
    // Last, so the pooled and queued reads keep their places.
    otherwise.extend(
        plan.guards
            .iter()
            .map(|(key, _)| TxnOp::get(key.as_str(), None)),
    );
    let txn = Txn::new().when(compares).and_then(puts).or_else(otherwise);
    let resp = match client.txn(txn).await {
        Ok(r) => r,
        // No answer does not mean no commit (a reset connection, a member
        // gone mid-request): look before the caller revokes the lease.
        Err(e) => {
            let key = ks.key(&Key::Instance(record.id.clone()));
            return match committed(client, &key, lease).await {
                Some(revision) => {
                    tracing::info!(instance = %id, error = %e, "etcd's answer to a spawn was lost; it had committed");
                    Ok(revision)
                }
                None => Err(Some(e.into())),
            };
        }
    };
    if resp.succeeded() {
        return Ok(resp.header().map_or(0, |h| h.revision()));
    }
    let current = tidegate_etcd::guard::else_get(&resp).map_or(0, |kv| kv.create_revision());
    if current != plan.token {
        tracing::warn!(token = plan.token, current, instance = %record.id, "spawn refused: fenced");
        return Err(Some(SpawnError::Fenced {
            token: plan.token,
            current,
        }));
    }
    for op in resp.op_responses() {
        let etcd_client::TxnOpResponse::Get(g) = op else {
            continue;
        };
        for kv in g.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if let Some((_, seen)) = plan.guards.iter().find(|(k, _)| *k == key)
                && kv.mod_revision() > *seen
            {
                return Err(Some(SpawnError::Guarded {
                    key: key.into_owned(),
                    revision: kv.mod_revision(),
                }));
            }
        }
    }
    if let Some(p) = pooled {
        let revision_of = |n: usize| {
            resp.op_responses().into_iter().nth(n).map(|op| match op {
                etcd_client::TxnOpResponse::Get(g) => {
                    g.kvs().first().map_or(0, |kv| kv.mod_revision())
                }
                _ => 0,
            })
        };
        // Claimed, removed, or its status changed (failed, restarting).
        if revision_of(1) != Some(p.mod_revision) || revision_of(2) != Some(p.status_revision) {
            return Err(Some(SpawnError::PoolTaken));
        }
    }
    if let Some(q_revision) = queued.map(|q| q.create_revision) {
        let waiting = resp.op_responses().into_iter().nth(1).is_some_and(|op| {
            matches!(op, etcd_client::TxnOpResponse::Get(g)
                if g.kvs().first().is_some_and(|kv| kv.create_revision() == q_revision))
        });
        if !waiting {
            return Err(Some(SpawnError::LeftQueue));
        }
    }
    Err(None)
}
