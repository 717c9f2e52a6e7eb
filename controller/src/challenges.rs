//! Challenges in etcd, written put-if-revision.
//!
//! A spec's `secret_env` values go to `challenge-secrets/{name}` in the
//! same Txn as the record, which keeps only their names (every worker reads
//! challenge records; only controllers read challenge secrets).
//!
//! A write with `if_match: Some(r)` lands only while the stored record's
//! mod_revision is still `r`; `Some(0)` means "only if it does not exist".
//! Without `if_match` the write is unconditional (last writer wins), as an
//! organizer's plain `PUT` expects.

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, Txn, TxnOp};
use tidegate_schema::{
    ChallengeName, ChallengeRecord, ChallengeSecretRecord, ChallengeSpec, Key, Keyspace, PolicyRef,
    Record, V1,
};

/// Why a challenge operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    #[error("challenge {name:?} is at revision {current}, not {expected} (If-Match)")]
    RevisionMismatch {
        name: String,
        expected: i64,
        /// 0 when it does not exist.
        current: i64,
    },
    #[error("challenge {0:?} does not exist")]
    NotFound(String),
    #[error("stored challenge {key}: {error}")]
    Corrupt { key: String, error: String },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

/// How often a plain PUT (no If-Match) retries after losing a race.
const MAX_PLAIN_PUT_ATTEMPTS: u32 = 64;

/// A record with the revision it was stored at.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<T> {
    pub value: T,
    pub revision: i64,
}

/// Challenge records under one keyspace.
#[derive(Clone)]
pub struct Challenges {
    client: Client,
    keys: Keyspace,
}

impl std::fmt::Debug for Challenges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenges")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Challenges {
    pub fn new(client: Client, keys: Keyspace) -> Self {
        Self { client, keys }
    }

    fn key(&self, name: &ChallengeName) -> String {
        self.keys.key(&Key::Challenge(name.clone()))
    }

    fn secret_key(&self, name: &ChallengeName) -> String {
        self.keys.key(&Key::ChallengeSecret(name.clone()))
    }

    /// The `secret_env` values of challenge `name` as they were at
    /// `revision` (the challenge record's: both are written in one Txn), or
    /// the current ones when etcd compacted that revision away.
    pub async fn secret_env(
        &self,
        name: &ChallengeName,
        revision: i64,
    ) -> Result<BTreeMap<String, String>, ChallengeError> {
        let key = self.secret_key(name);
        let mut client = self.client.clone();
        let at = Some(GetOptions::new().with_revision(revision));
        let resp = match client.get(key.as_str(), at).await {
            Err(e) if e.to_string().contains("compacted") => client.get(key.as_str(), None).await,
            other => other,
        }?;
        match resp.kvs().first() {
            None => Ok(BTreeMap::new()),
            Some(kv) => ChallengeSecretRecord::decode(kv.value())
                .map(|r| r.env)
                .map_err(|e| ChallengeError::Corrupt {
                    key,
                    error: e.to_string(),
                }),
        }
    }

    /// Stores `spec` as challenge `name` (keeping its policy pointer).
    /// Returns the new revision and whether the challenge was created.
    /// Without `if_match`, a concurrent write in between is retried (last
    /// writer wins); with it, the mismatch is the answer.
    pub async fn put(
        &self,
        name: &ChallengeName,
        spec: ChallengeSpec,
        if_match: Option<i64>,
    ) -> Result<(i64, bool), ChallengeError> {
        let mut attempts = 0;
        loop {
            match self.put_once(name, spec.clone(), if_match).await {
                // Each lost race means another writer won, so this ends; the
                // bound and the jitter only guard against a pathological storm.
                Err(ChallengeError::RevisionMismatch { .. })
                    if if_match.is_none() && attempts < MAX_PLAIN_PUT_ATTEMPTS =>
                {
                    attempts += 1;
                    let jitter = rand::random_range(1..=5u64 * u64::from(attempts.min(8)));
                    tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
                }
                other => return other,
            }
        }
    }

    async fn put_once(
        &self,
        name: &ChallengeName,
        spec: ChallengeSpec,
        if_match: Option<i64>,
    ) -> Result<(i64, bool), ChallengeError> {
        let key = self.key(name);
        let mut client = self.client.clone();
        // Read first only to carry the policy pointer over; the Txn below
        // guards against anything changing in between.
        let current = self.get(name).await;
        let (policy, seen) = match current {
            Ok(s) => (s.value.policy, s.revision),
            Err(ChallengeError::NotFound(_)) => (None, 0),
            Err(e) => return Err(e),
        };
        if let Some(expected) = if_match.filter(|e| *e != seen) {
            return Err(ChallengeError::RevisionMismatch {
                name: name.to_string(),
                expected,
                current: seen,
            });
        }
        let (spec, values) = spec.without_secret_values();
        let record = ChallengeRecord {
            v: V1,
            name: name.clone(),
            spec,
            policy,
        };
        let secret_key = self.secret_key(name);
        let secrets = if values.is_empty() {
            TxnOp::delete(secret_key.as_str(), None)
        } else {
            let secrets = ChallengeSecretRecord {
                v: V1,
                challenge: name.clone(),
                env: values,
            };
            TxnOp::put(secret_key.as_str(), secrets.encode(), None)
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, seen)])
            .and_then([TxnOp::put(key.as_str(), record.encode(), None), secrets])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = client.txn(txn).await?;
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| h.revision());
            return Ok((revision, seen == 0));
        }
        let current = tidegate_etcd::guard::else_get(&resp).map_or(0, |kv| kv.mod_revision());
        Err(ChallengeError::RevisionMismatch {
            name: name.to_string(),
            expected: if_match.unwrap_or(seen),
            current,
        })
    }

    /// Sets (or with `None` removes) the challenge's policy pointer, keeping
    /// its spec; put-if-revision like [`Challenges::put`]. Returns the new
    /// revision and the pointer it replaced.
    pub async fn set_policy(
        &self,
        name: &ChallengeName,
        policy: Option<PolicyRef>,
        if_match: Option<i64>,
    ) -> Result<(i64, Option<PolicyRef>), ChallengeError> {
        let mut attempts = 0;
        loop {
            let current = self.get(name).await?;
            let expected = if_match.unwrap_or(current.revision);
            if expected != current.revision {
                return Err(ChallengeError::RevisionMismatch {
                    name: name.to_string(),
                    expected,
                    current: current.revision,
                });
            }
            let mut record = current.value;
            let previous = std::mem::replace(&mut record.policy, policy.clone());
            let key = self.key(name);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    expected,
                )])
                .and_then([TxnOp::put(key.as_str(), record.encode(), None)])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = self.client.clone().txn(txn).await?;
            if resp.succeeded() {
                return Ok((resp.header().map_or(0, |h| h.revision()), previous));
            }
            let current = tidegate_etcd::guard::else_get(&resp).map_or(0, |kv| kv.mod_revision());
            if current == 0 {
                return Err(ChallengeError::NotFound(name.to_string()));
            }
            if if_match.is_some() || attempts >= MAX_PLAIN_PUT_ATTEMPTS {
                return Err(ChallengeError::RevisionMismatch {
                    name: name.to_string(),
                    expected,
                    current,
                });
            }
            attempts += 1;
        }
    }

    /// The stored challenge and its revision.
    pub async fn get(
        &self,
        name: &ChallengeName,
    ) -> Result<Stored<ChallengeRecord>, ChallengeError> {
        let key = self.key(name);
        let resp = self.client.clone().get(key.as_str(), None).await?;
        let kv = resp
            .kvs()
            .first()
            .ok_or_else(|| ChallengeError::NotFound(name.to_string()))?;
        let value = ChallengeRecord::decode(kv.value()).map_err(|e| ChallengeError::Corrupt {
            key: key.clone(),
            error: e.to_string(),
        })?;
        Ok(Stored {
            value,
            revision: kv.mod_revision(),
        })
    }

    /// Deletes the challenge, optionally only at revision `if_match`.
    pub async fn delete(
        &self,
        name: &ChallengeName,
        if_match: Option<i64>,
    ) -> Result<(), ChallengeError> {
        let key = self.key(name);
        let mut compares = vec![Compare::version(key.as_str(), CompareOp::Greater, 0)];
        if let Some(r) = if_match {
            compares.push(Compare::mod_revision(key.as_str(), CompareOp::Equal, r));
        }
        let txn = Txn::new()
            .when(compares)
            .and_then([
                TxnOp::delete(key.as_str(), None),
                TxnOp::delete(self.secret_key(name).as_str(), None),
                // A rollout of it has nothing left to move (and must not
                // act on a challenge made again under its name).
                TxnOp::delete(self.keys.key(&Key::Rollout(name.clone())).as_str(), None),
                // Its flags are nobody's any more.
                TxnOp::delete(
                    self.keys.flag_owners_prefix(name).as_str(),
                    Some(DeleteOptions::new().with_prefix()),
                ),
            ])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.client.clone().txn(txn).await?;
        if resp.succeeded() {
            return Ok(());
        }
        let current = tidegate_etcd::guard::else_get(&resp).map_or(0, |kv| kv.mod_revision());
        match (current, if_match) {
            (0, _) => Err(ChallengeError::NotFound(name.to_string())),
            (current, Some(expected)) => Err(ChallengeError::RevisionMismatch {
                name: name.to_string(),
                expected,
                current,
            }),
            (_, None) => Err(ChallengeError::NotFound(name.to_string())),
        }
    }
}
