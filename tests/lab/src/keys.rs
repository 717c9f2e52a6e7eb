//! The etcd keys of the lab's daemons (the default key root), for tests
//! that read or write etcd directly: built from `tidegate_schema::Keyspace`,
//! with ids taken as given so that a test can also write keys that are not
//! valid on purpose.

use tidegate_schema::{Keyspace, Kind};

/// The daemons' keyspace.
pub fn ks() -> Keyspace {
    Keyspace::default()
}

/// The prefix of every key of `kind`.
pub fn prefix(kind: Kind) -> String {
    ks().prefix(kind)
}

/// Every key (`{root}/`).
pub fn all() -> String {
    ks().root_prefix()
}

/// Every claim.
pub fn claims() -> String {
    ks().claims_prefix()
}

/// Instance `id`'s record.
pub fn instance(id: &str) -> String {
    ks().key_of(Kind::Instances, id)
}

/// Instance `id`'s status, as worker `worker` reports it.
pub fn status(worker: &str, id: &str) -> String {
    ks().key_of(Kind::Statuses, &format!("{worker}/{id}"))
}

/// Instance `id`'s secret (its flag), readable only by worker `worker`.
pub fn secret(worker: &str, id: &str) -> String {
    ks().key_of(Kind::Secrets, &format!("{worker}/{id}"))
}

/// Worker `id`'s membership.
pub fn worker(id: &str) -> String {
    ks().key_of(Kind::Workers, id)
}

/// Challenge `name`'s record.
pub fn challenge(name: &str) -> String {
    ks().key_of(Kind::Challenges, name)
}

/// The claim of `hostname` (holds the instance id).
pub fn hostname_claim(hostname: &str) -> String {
    format!("{}hostnames/{hostname}", ks().claims_prefix())
}
