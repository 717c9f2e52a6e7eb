//! The shapes every tidegate process agrees on, with their validation and
//! no I/O: the etcd keys (`Keyspace`) and the records under them, the
//! challenge spec, the agents' `/activity` report, and the daemons' config
//! files. The etcd client that reads and writes them is `tidegate-etcd`.

pub mod activity;
pub mod config;
pub mod keys;
pub mod names;
pub mod records;
pub mod spec;
pub mod time;
pub mod validate;

pub use activity::{ActivityReport, InstanceActivity};
pub use keys::{Key, KeyError, Keyspace, Kind};
pub use names::{ChallengeName, Hostname, InstanceId, PortName, TeamId, WorkerId};
pub use records::{
    ChallengeRecord, ContainerSpec, HttpRoute, InstanceRecord, InstanceStatus, PolicyRef, Record,
    StatusRecord, TcpRoute, V1, WorkerRecord,
};
pub use spec::{ChallengeSpec, FlagSpec, Limits, PolicyFallback, PortSpec, Protocol, TtlSpec};
pub use validate::{FieldError, Invalid, Validate, decode_json};
