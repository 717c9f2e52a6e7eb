//! The shapes every tidegate process agrees on, with their validation: the
//! etcd keys (`Keyspace`) and the records under them, the challenge spec,
//! the agents' `/activity` report, and the daemons' config files. No
//! network and no etcd client (that is `tidegate-etcd`); the only I/O is
//! reading a config file (and `/etc/hostname` for a default id).

pub mod activity;
pub mod caps;
pub mod config;
pub mod keys;
pub mod names;
pub mod records;
pub mod shards;
pub mod spec;
pub mod time;
pub mod validate;

pub use activity::{ActivityReport, InstanceActivity};
pub use keys::{Grant, Key, KeyError, Keyspace, Kind};
pub use names::{ChallengeName, Hostname, InstanceId, PortName, ServiceName, TeamId, WorkerId};
pub use records::{
    ChallengeRecord, ChallengeSecretRecord, ContainerSpec, FlagOwnerRecord, HttpRoute,
    InstanceRecord, InstanceStatus, NetworkUse, PolicyRef, QueuedRecord, Record, Resources,
    RolloutPhase, RolloutRecord, SecretRecord, ServiceRecord, ServiceState, ServiceStatus,
    Shortfall, SolverHealth, SolverRecord, StatusRecord, TcpRoute, V1, WorkerRecord,
};
pub use spec::{
    ChallengeSpec, FlagSpec, Limits, PolicyFallback, PortSpec, Protocol, QueueSpec, ReadySpec,
    ServiceSpec, SolverSpec, TtlSpec,
};
pub use validate::{FieldError, Invalid, Validate, decode_json};
