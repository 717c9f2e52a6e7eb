//! Every etcd key tidegate uses, built and parsed in one place.
//!
//! ```text
//! {root}/challenges/{challenge}                    ChallengeRecord
//! {root}/challenge-secrets/{challenge}             ChallengeSecretRecord (controllers only)
//! {root}/instances/{id}                            InstanceRecord   (instance lease)
//! {root}/status/{worker}/{id}                      StatusRecord     (instance lease)
//! {root}/secrets/{worker}/{id}                     SecretRecord     (instance lease)
//! {root}/workers/{worker}                          WorkerRecord     (worker lease)
//! {root}/claims/hostnames/{hostname}               instance id      (instance lease)
//! {root}/claims/ports/{port}                       instance id      (instance lease)
//! {root}/claims/team-slots/{challenge}/{team}/{n}  instance id      (instance lease)
//! {root}/election/scheduler/{lease id, hex}        leader's id      (leader lease)
//! {root}/flag-owners/{challenge}/{sha256 of flag}  FlagOwnerRecord  (controllers only, no lease)
//! {root}/queue/{challenge}/{team}                  QueuedRecord     (controllers only, hold lease)
//! {root}/rollouts/{challenge}                      RolloutRecord    (controllers only, no lease)
//! {root}/election/shards/{shard}                   leader's id, URL (its controller's lease)
//! {root}/controllers/{id}                          id, URL, shards  (its controller's lease)
//! {root}/guards/workers/{worker}                   last instance id (controllers only, no lease)
//! {root}/guards/teams/{team}                       last instance id (controllers only, no lease)
//! ```
//!
//! The root defaults to `/tidegate`, so several clusters can share an etcd.
//!
//! What one worker may touch is a set of prefixes ([`Keyspace::worker_grants`]):
//! everything under `{worker}/` of `status/` and `secrets/` is that worker's
//! alone, so etcd's prefix roles can say "this worker" and nothing more.

use std::fmt;

use crate::names::{ChallengeName, Hostname, InstanceId, TeamId, WorkerId};

/// The default key root.
pub const DEFAULT_ROOT: &str = "/tidegate";

/// One parsed key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Challenge(ChallengeName),
    /// A challenge's `secret_env` values.
    ChallengeSecret(ChallengeName),
    Instance(InstanceId),
    /// Where an instance's container listens and how it is doing, as its
    /// agent (`worker`) reports it.
    Status {
        worker: WorkerId,
        instance: InstanceId,
    },
    /// What only the instance's own worker may read: its flag.
    Secret {
        worker: WorkerId,
        instance: InstanceId,
    },
    Worker(WorkerId),
    HostnameClaim(Hostname),
    PortClaim(u16),
    /// One of the `per_team_max` slots a team has for a challenge; claimed
    /// in the spawn Txn, so the limit holds under concurrency.
    TeamSlot {
        challenge: ChallengeName,
        team: TeamId,
        slot: u32,
    },
    /// A scheduler candidate's election key (the etcd election API's
    /// `{name}/{lease id in hex}`).
    ElectionCandidate(i64),
    /// Which instance (and team) a per-instance flag was made for, by the
    /// SHA-256 of the flag (64 lowercase hex characters). Written in the
    /// spawn Txn with no lease: it outlives the instance, so a flag copied
    /// from an ended instance is still recognised; removed with the challenge.
    FlagOwner {
        challenge: ChallengeName,
        digest: String,
    },
    /// A team's spawn of a challenge waiting for room (one per team and
    /// challenge; its create revision orders the queue).
    Queued {
        challenge: ChallengeName,
        team: TeamId,
    },
    /// A challenge's rollout of a new spec to its live instances (the last
    /// one, finished or not).
    Rollout(ChallengeName),
    /// Who leads shard N (`election/shards/{N}`, decimal): a controller's
    /// id and URL, on that controller's lease. Its create revision is the
    /// shard's fencing token.
    ShardLeader(u16),
    /// A live controller (`controllers/{id}`), on its lease: the shards
    /// are spread over these.
    Controller(WorkerId),
    /// Written by every spawn onto a worker (`guards/workers/{worker}`):
    /// a spawn compares it with the revision its placement saw, so the
    /// leaders of different shards never fill one worker past its room.
    WorkerGuard(WorkerId),
    /// Written by every spawn of a team (`guards/teams/{team}`): what a
    /// policy counted of the team's instances across every challenge is
    /// still true when the spawn commits.
    TeamGuard(TeamId),
}

/// A family of keys sharing a prefix (what a watcher lists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Challenges,
    ChallengeSecrets,
    Instances,
    Statuses,
    Secrets,
    Workers,
    HostnameClaims,
    PortClaims,
    TeamSlots,
    Election,
    FlagOwners,
    Queue,
    Rollouts,
    ShardLeaders,
    Controllers,
    Guards,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Challenges => "challenges",
            Kind::ChallengeSecrets => "challenge-secrets",
            Kind::Instances => "instances",
            Kind::Statuses => "status",
            Kind::Secrets => "secrets",
            Kind::Workers => "workers",
            Kind::HostnameClaims => "claims/hostnames",
            Kind::PortClaims => "claims/ports",
            Kind::TeamSlots => "claims/team-slots",
            Kind::Election => "election/scheduler",
            Kind::FlagOwners => "flag-owners",
            Kind::Queue => "queue",
            Kind::Rollouts => "rollouts",
            Kind::ShardLeaders => "election/shards",
            Kind::Controllers => "controllers",
            Kind::Guards => "guards",
        }
    }

    const ALL: [Kind; 16] = [
        Kind::Challenges,
        Kind::ChallengeSecrets,
        Kind::Instances,
        Kind::Statuses,
        Kind::Secrets,
        Kind::Workers,
        Kind::HostnameClaims,
        Kind::PortClaims,
        Kind::TeamSlots,
        Kind::Election,
        Kind::FlagOwners,
        Kind::Queue,
        Kind::Rollouts,
        Kind::ShardLeaders,
        Kind::Controllers,
        Kind::Guards,
    ];
}

/// One permission of an etcd role: read (or read and write) one key, or
/// every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub key: String,
    pub prefix: bool,
    pub write: bool,
}

impl Grant {
    /// The arguments of `etcdctl role grant-permission {role}` for it.
    pub fn etcdctl_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.prefix {
            args.push("--prefix=true".to_string());
        }
        args.push(if self.write { "readwrite" } else { "read" }.to_string());
        args.push(self.key.clone());
        args
    }
}

/// Why a string is not a tidegate key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key {key:?}: {reason}")]
pub struct KeyError {
    pub key: String,
    pub reason: String,
}

/// The key layout under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyspace {
    root: String,
}

impl Default for Keyspace {
    fn default() -> Self {
        Self {
            root: DEFAULT_ROOT.to_string(),
        }
    }
}

impl fmt::Display for Keyspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.root)
    }
}

impl Keyspace {
    /// A keyspace under `root` (`/` followed by segments of `a-z0-9-_.`,
    /// no trailing `/`).
    pub fn new(root: &str) -> Result<Self, KeyError> {
        let valid = root.len() > 1
            && root.len() <= 128
            && root.starts_with('/')
            && root[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)
                    })
            });
        if !valid {
            return Err(KeyError {
                key: root.to_string(),
                reason: "a key root is '/' and segments of a-z, 0-9, '-', '_' and '.', with no trailing '/'".into(),
            });
        }
        Ok(Self {
            root: root.to_string(),
        })
    }

    /// The prefix of every key of `kind`, ending in `/`.
    pub fn prefix(&self, kind: Kind) -> String {
        format!("{}/{}/", self.root, kind.path())
    }

    /// The prefix of every key of this keyspace (`{root}/`).
    pub fn root_prefix(&self) -> String {
        format!("{}/", self.root)
    }

    /// The prefix of every claim (hostnames, ports, team slots), ending in `/`.
    pub fn claims_prefix(&self) -> String {
        format!("{}/claims/", self.root)
    }

    /// A key of `kind` ending in `rest` as given, unchecked: for tests and
    /// tools that write what the parser must refuse (a malformed id), or
    /// ids of their own making. Everything else builds keys with [`Self::key`].
    pub fn key_of(&self, kind: Kind, rest: &str) -> String {
        format!("{}{rest}", self.prefix(kind))
    }

    /// The prefix of one worker's keys of `kind` (statuses, secrets),
    /// ending in `/`.
    pub fn worker_prefix(&self, kind: Kind, worker: &WorkerId) -> String {
        format!("{}{worker}/", self.prefix(kind))
    }

    /// What worker `worker`'s etcd role is granted, and nothing else: read
    /// what routing and making containers need (instances, workers,
    /// challenges), read its own secrets, write its own membership and its
    /// own statuses. Deploy and the lab's auth mode grant exactly these.
    pub fn worker_grants(&self, worker: &WorkerId) -> Vec<Grant> {
        let read = |key: String| Grant {
            key,
            prefix: true,
            write: false,
        };
        vec![
            read(self.prefix(Kind::Instances)),
            read(self.prefix(Kind::Workers)),
            read(self.prefix(Kind::Challenges)),
            read(self.worker_prefix(Kind::Secrets, worker)),
            Grant {
                key: self.worker_prefix(Kind::Statuses, worker),
                prefix: true,
                write: true,
            },
            // The exact key: a prefix grant on `workers/w1` would also
            // cover `workers/w10`.
            Grant {
                key: self.key(&Key::Worker(worker.clone())),
                prefix: false,
                write: true,
            },
        ]
    }

    /// The prefix of one team's slots of one challenge, ending in `/`.
    pub fn team_slots_prefix(&self, challenge: &ChallengeName, team: &TeamId) -> String {
        format!("{}{challenge}/{team}/", self.prefix(Kind::TeamSlots))
    }

    /// The prefix of one challenge's flag owners, ending in `/`.
    pub fn flag_owners_prefix(&self, challenge: &ChallengeName) -> String {
        format!("{}{challenge}/", self.prefix(Kind::FlagOwners))
    }

    /// The name to campaign on with etcd's election API.
    pub fn election_name(&self) -> String {
        format!("{}/{}", self.root, Kind::Election.path())
    }

    /// The key as a string.
    pub fn key(&self, key: &Key) -> String {
        match key {
            Key::Challenge(n) => format!("{}{n}", self.prefix(Kind::Challenges)),
            Key::ChallengeSecret(n) => format!("{}{n}", self.prefix(Kind::ChallengeSecrets)),
            Key::Instance(id) => format!("{}{id}", self.prefix(Kind::Instances)),
            Key::Status { worker, instance } => {
                format!("{}{instance}", self.worker_prefix(Kind::Statuses, worker))
            }
            Key::Secret { worker, instance } => {
                format!("{}{instance}", self.worker_prefix(Kind::Secrets, worker))
            }
            Key::Worker(w) => format!("{}{w}", self.prefix(Kind::Workers)),
            Key::HostnameClaim(h) => format!("{}{h}", self.prefix(Kind::HostnameClaims)),
            Key::PortClaim(p) => format!("{}{p}", self.prefix(Kind::PortClaims)),
            Key::TeamSlot {
                challenge,
                team,
                slot,
            } => format!("{}{slot}", self.team_slots_prefix(challenge, team)),
            Key::ElectionCandidate(lease) => format!("{}{lease:x}", self.prefix(Kind::Election)),
            Key::FlagOwner { challenge, digest } => {
                format!("{}{digest}", self.flag_owners_prefix(challenge))
            }
            Key::Queued { challenge, team } => {
                format!("{}{challenge}/{team}", self.prefix(Kind::Queue))
            }
            Key::Rollout(n) => format!("{}{n}", self.prefix(Kind::Rollouts)),
            Key::ShardLeader(n) => format!("{}{n}", self.prefix(Kind::ShardLeaders)),
            Key::Controller(id) => format!("{}{id}", self.prefix(Kind::Controllers)),
            Key::WorkerGuard(w) => format!("{}workers/{w}", self.prefix(Kind::Guards)),
            Key::TeamGuard(t) => format!("{}teams/{t}", self.prefix(Kind::Guards)),
        }
    }

    /// Parses a key; the error says what is wrong with it.
    pub fn parse(&self, key: &str) -> Result<Key, KeyError> {
        let err = |reason: String| KeyError {
            key: key.to_string(),
            reason,
        };
        for kind in Kind::ALL {
            let Some(rest) = key.strip_prefix(&self.prefix(kind)) else {
                continue;
            };
            let parsed = match kind {
                Kind::Challenges => ChallengeName::parse(rest).map(Key::Challenge),
                Kind::ChallengeSecrets => ChallengeName::parse(rest).map(Key::ChallengeSecret),
                Kind::Instances => InstanceId::parse(rest).map(Key::Instance),
                Kind::Statuses | Kind::Secrets => {
                    let Some((w, id)) = rest.split_once('/') else {
                        return Err(err(format!(
                            "a {} key is {{worker}}/{{instance id}}",
                            kind.path()
                        )));
                    };
                    WorkerId::parse(w).and_then(|worker| {
                        let instance = InstanceId::parse(id)?;
                        Ok(if kind == Kind::Statuses {
                            Key::Status { worker, instance }
                        } else {
                            Key::Secret { worker, instance }
                        })
                    })
                }
                Kind::Workers => WorkerId::parse(rest).map(Key::Worker),
                Kind::HostnameClaims => Hostname::parse(rest).map(Key::HostnameClaim),
                Kind::PortClaims => {
                    return parse_decimal(rest)
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p != 0)
                        .map(Key::PortClaim)
                        .ok_or_else(|| err(format!("{rest:?} is not a port (1-65535)")));
                }
                Kind::TeamSlots => {
                    let mut parts = rest.split('/');
                    let (Some(c), Some(t), Some(s), None) =
                        (parts.next(), parts.next(), parts.next(), parts.next())
                    else {
                        return Err(err("a team slot key is {challenge}/{team}/{slot}".into()));
                    };
                    let slot = parse_decimal(s)
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| err(format!("slot {s:?} is not a number")))?;
                    ChallengeName::parse(c).and_then(|challenge| {
                        Ok(Key::TeamSlot {
                            challenge,
                            team: TeamId::parse(t)?,
                            slot,
                        })
                    })
                }
                Kind::Election => {
                    let valid = !rest.is_empty()
                        && rest.len() <= 16
                        && !rest.starts_with('0')
                        && rest
                            .bytes()
                            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                    return i64::from_str_radix(rest, 16)
                        .ok()
                        .filter(|l| valid && *l > 0)
                        .map(Key::ElectionCandidate)
                        .ok_or_else(|| err(format!("{rest:?} is not a lease id in hex")));
                }
                Kind::FlagOwners => {
                    let Some((c, digest)) = rest.split_once('/') else {
                        return Err(err("a flag owner key is {challenge}/{sha256}".into()));
                    };
                    if !is_sha256_hex(digest) {
                        return Err(err(format!("{digest:?} is not a SHA-256 in lowercase hex")));
                    }
                    ChallengeName::parse(c).map(|challenge| Key::FlagOwner {
                        challenge,
                        digest: digest.to_string(),
                    })
                }
                Kind::Queue => {
                    let Some((c, t)) = rest.split_once('/') else {
                        return Err(err("a queue key is {challenge}/{team}".into()));
                    };
                    ChallengeName::parse(c).and_then(|challenge| {
                        Ok(Key::Queued {
                            challenge,
                            team: TeamId::parse(t)?,
                        })
                    })
                }
                Kind::Rollouts => ChallengeName::parse(rest).map(Key::Rollout),
                Kind::ShardLeaders => {
                    return parse_decimal(rest)
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|n| *n < crate::shards::MAX_SHARDS)
                        .map(Key::ShardLeader)
                        .ok_or_else(|| {
                            err(format!(
                                "{rest:?} is not a shard (0-{})",
                                crate::shards::MAX_SHARDS - 1
                            ))
                        });
                }
                Kind::Controllers => WorkerId::parse(rest).map(Key::Controller),
                Kind::Guards => match rest.split_once('/') {
                    Some(("workers", w)) => WorkerId::parse(w).map(Key::WorkerGuard),
                    Some(("teams", t)) => TeamId::parse(t).map(Key::TeamGuard),
                    _ => return Err(err("a guard key is workers/{worker} or teams/{team}".into())),
                },
            };
            return parsed.map_err(|e| err(e.to_string()));
        }
        Err(err(format!("not under a known prefix of {}", self.root)))
    }
}

/// Whether `s` is a SHA-256 digest in lowercase hex (one spelling per digest).
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A decimal number without sign or leading zeros (so each number has one key).
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 10 || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ks() -> Keyspace {
        Keyspace::default()
    }

    #[test]
    fn layout_is_as_documented() {
        let id = InstanceId::parse("a3f4b92c8d").unwrap();
        assert_eq!(
            ks().key(&Key::Instance(id.clone())),
            "/tidegate/instances/a3f4b92c8d"
        );
        let worker = WorkerId::parse("w1").unwrap();
        assert_eq!(
            ks().key(&Key::Status {
                worker: worker.clone(),
                instance: id.clone()
            }),
            "/tidegate/status/w1/a3f4b92c8d"
        );
        assert_eq!(
            ks().key(&Key::Secret {
                worker,
                instance: id
            }),
            "/tidegate/secrets/w1/a3f4b92c8d"
        );
        assert_eq!(
            ks().key(&Key::PortClaim(31337)),
            "/tidegate/claims/ports/31337"
        );
        assert_eq!(
            ks().key(&Key::TeamSlot {
                challenge: ChallengeName::parse("web").unwrap(),
                team: TeamId::parse("t1").unwrap(),
                slot: 0
            }),
            "/tidegate/claims/team-slots/web/t1/0"
        );
        assert_eq!(
            ks().key(&Key::ElectionCandidate(0x694d8a1b)),
            "/tidegate/election/scheduler/694d8a1b"
        );
        assert_eq!(ks().election_name(), "/tidegate/election/scheduler");
        assert_eq!(
            ks().key(&Key::ShardLeader(15)),
            "/tidegate/election/shards/15"
        );
        assert_eq!(
            ks().parse("/tidegate/election/shards/15").unwrap(),
            Key::ShardLeader(15)
        );
        for bad in [
            "/tidegate/election/shards/015",
            "/tidegate/election/shards/1024",
            "/tidegate/election/shards/x",
        ] {
            assert!(ks().parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            ks().parse("/tidegate/guards/teams/t1").unwrap(),
            Key::TeamGuard(TeamId::parse("t1").unwrap())
        );
        assert_eq!(
            ks().key(&Key::WorkerGuard(WorkerId::parse("w1").unwrap())),
            "/tidegate/guards/workers/w1"
        );
        assert!(ks().parse("/tidegate/guards/w1").is_err());
        assert_eq!(
            ks().parse("/tidegate/controllers/c1").unwrap(),
            Key::Controller(WorkerId::parse("c1").unwrap())
        );
        let digest = "ab".repeat(32);
        assert_eq!(
            ks().key(&Key::FlagOwner {
                challenge: ChallengeName::parse("web").unwrap(),
                digest: digest.clone()
            }),
            format!("/tidegate/flag-owners/web/{digest}")
        );
        assert_eq!(ks().root_prefix(), "/tidegate/");
        assert!(
            ks().prefix(Kind::HostnameClaims)
                .starts_with(&ks().claims_prefix())
        );
        assert!(
            ks().prefix(Kind::TeamSlots)
                .starts_with(&ks().claims_prefix())
        );
    }

    #[test]
    fn rejects_foreign_and_malformed_keys() {
        for bad in [
            "",
            "/tidegate",
            "/tidegate/instances/",
            "/tidegate/instances/XYZ",
            "/tidegate/instances/a3f4b92c8d/extra",
            "/tidegate/claims/ports/0",
            "/tidegate/claims/ports/080",
            "/tidegate/claims/ports/65536",
            "/tidegate/claims/team-slots/web/t1",
            "/tidegate/election/scheduler/0abc",
            "/tidegate/status/a3f4b92c8d",
            "/tidegate/secrets/w1/",
            "/tidegate/secrets/w1/a3f4b92c8d/x",
            "/other/instances/a3f4b92c8d",
            "/tidegate/unknown/x",
            "/tidegate/flag-owners/web",
            "/tidegate/flag-owners/web/abc",
            "/tidegate/flag-owners/web/ABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABABAB",
        ] {
            let e = ks().parse(bad).unwrap_err();
            assert_eq!(e.key, bad);
        }
    }

    #[test]
    fn roots() {
        assert!(Keyspace::new("/ctf-2026/tidegate").is_ok());
        for bad in [
            "",
            "/",
            "tidegate",
            "/tidegate/",
            "/Tide",
            "/a//b",
            "/a/../b",
        ] {
            assert!(Keyspace::new(bad).is_err(), "{bad}");
        }
        let other = Keyspace::new("/t2").unwrap();
        assert!(other.parse("/tidegate/workers/w1").is_err());
        assert_eq!(
            other.parse("/t2/workers/w1").unwrap(),
            Key::Worker(WorkerId::parse("w1").unwrap())
        );
    }

    #[test]
    fn a_workers_grants_cover_its_own_keys_only() {
        let (w1, w10) = (
            WorkerId::parse("w1").unwrap(),
            WorkerId::parse("w10").unwrap(),
        );
        let id = InstanceId::parse("a3f4b92c8d").unwrap();
        let grants = ks().worker_grants(&w1);
        let allows = |key: &Key, write: bool| {
            let k = ks().key(key);
            grants.iter().any(|g| {
                (g.write || !write)
                    && if g.prefix {
                        k.starts_with(&g.key)
                    } else {
                        k == g.key
                    }
            })
        };
        let secret = |w: &WorkerId| Key::Secret {
            worker: w.clone(),
            instance: id.clone(),
        };
        let status = |w: &WorkerId| Key::Status {
            worker: w.clone(),
            instance: id.clone(),
        };
        assert!(allows(&secret(&w1), false) && !allows(&secret(&w1), true));
        assert!(!allows(&secret(&w10), false));
        assert!(allows(&status(&w1), true) && !allows(&status(&w10), false));
        assert!(allows(&Key::Worker(w1.clone()), true));
        assert!(!allows(&Key::Worker(w10.clone()), true) && allows(&Key::Worker(w10), false));
        assert!(allows(&Key::Instance(id.clone()), false) && !allows(&Key::Instance(id), true));
        assert!(!allows(&Key::PortClaim(31337), false));
        assert!(!allows(&Key::ElectionCandidate(7), false));
        let owner = Key::FlagOwner {
            challenge: ChallengeName::parse("web").unwrap(),
            digest: "0".repeat(64),
        };
        assert!(!allows(&owner, false));
        let c = Key::Challenge(ChallengeName::parse("web").unwrap());
        assert!(allows(&c, false) && !allows(&c, true));
        let c = Key::ChallengeSecret(ChallengeName::parse("web").unwrap());
        assert!(!allows(&c, false));
        assert_eq!(
            grants[5].etcdctl_args(),
            ["readwrite", "/tidegate/workers/w1"]
        );
    }

    fn dns_label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"
    }

    fn any_key() -> impl Strategy<Value = Key> {
        prop_oneof![
            dns_label().prop_map(|s| Key::Challenge(ChallengeName::parse(&s).unwrap())),
            dns_label().prop_map(|s| Key::ChallengeSecret(ChallengeName::parse(&s).unwrap())),
            any::<u64>().prop_map(|b| Key::Instance(InstanceId::from_random(b))),
            (dns_label(), any::<u64>()).prop_map(|(w, b)| Key::Status {
                worker: WorkerId::parse(&w).unwrap(),
                instance: InstanceId::from_random(b)
            }),
            (dns_label(), any::<u64>()).prop_map(|(w, b)| Key::Secret {
                worker: WorkerId::parse(&w).unwrap(),
                instance: InstanceId::from_random(b)
            }),
            dns_label().prop_map(|s| Key::Worker(WorkerId::parse(&s).unwrap())),
            prop::collection::vec(dns_label(), 1..5)
                .prop_map(|l| Key::HostnameClaim(Hostname::parse(&l.join(".")).unwrap())),
            (1u16..=u16::MAX).prop_map(Key::PortClaim),
            (dns_label(), "[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", any::<u32>()).prop_map(
                |(c, t, slot)| {
                    Key::TeamSlot {
                        challenge: ChallengeName::parse(&c).unwrap(),
                        team: TeamId::parse(&t).unwrap(),
                        slot,
                    }
                }
            ),
            (1i64..=i64::MAX).prop_map(Key::ElectionCandidate),
            (dns_label(), "[0-9a-f]{64}").prop_map(|(c, digest)| Key::FlagOwner {
                challenge: ChallengeName::parse(&c).unwrap(),
                digest
            }),
            (dns_label(), "[A-Za-z0-9][A-Za-z0-9_.-]{0,20}").prop_map(|(c, t)| Key::Queued {
                challenge: ChallengeName::parse(&c).unwrap(),
                team: TeamId::parse(&t).unwrap(),
            }),
            dns_label().prop_map(|c| Key::Rollout(ChallengeName::parse(&c).unwrap())),
        ]
    }

    proptest! {
        #[test]
        fn every_key_round_trips(key in any_key()) {
            let s = ks().key(&key);
            prop_assert_eq!(ks().parse(&s).unwrap(), key);
        }

        #[test]
        fn parse_then_build_is_identity(s in "/tidegate/(instances|status|secrets|workers|challenges|challenge-secrets|claims/ports|claims/hostnames|claims/team-slots|election/scheduler|flag-owners|queue)/[a-zA-Z0-9./_-]{0,30}") {
            // Whatever parses must build back to the same bytes: one key per value.
            if let Ok(key) = ks().parse(&s) {
                prop_assert_eq!(ks().key(&key), s);
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = ks().parse(&s);
        }
    }
}
