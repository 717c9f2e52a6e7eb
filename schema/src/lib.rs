//! The etcd key schema shared by controller and agent: keys, records, their
//! validation, and the list-then-watch watcher.

pub mod connect;
pub mod endpoints;
pub mod keys;
pub mod names;
pub mod records;
pub mod spec;
pub mod telemetry;
pub mod validate;
pub mod watch;

pub use keys::{Key, KeyError, Keyspace, Kind};
pub use names::{ChallengeName, Hostname, InstanceId, PortName, TeamId, WorkerId};
pub use records::{
    ChallengeRecord, ContainerSpec, EndpointRecord, HttpRoute, InstanceRecord, InstanceStatus,
    PolicyRef, Record, TcpRoute, V1, WorkerRecord,
};
pub use spec::{ChallengeSpec, FlagSpec, Limits, PolicyFallback, PortSpec, Protocol, TtlSpec};
pub use validate::{FieldError, Invalid, Validate, decode_json};
pub use watch::{Event, Kv, Watcher};
