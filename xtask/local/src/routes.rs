//! Hand-made routes for the benchmarks: a worker no agent runs and HTTP
//! instances it owns, as the records the controller and the agents write,
//! so that agents route to them without a container being started.

use std::net::{IpAddr, SocketAddr};

use tidegate_schema::{
    ChallengeName, ContainerSpec, Hostname, HttpRoute, InstanceId, InstanceRecord, Invalid, Limits,
    PortName, TeamId, V1, WorkerId, WorkerRecord,
};

/// Worker `id`, reached at `http_entry` (its other addresses that one's).
pub fn ghost_worker(id: &WorkerId, http_entry: SocketAddr) -> WorkerRecord {
    WorkerRecord {
        v: V1,
        id: id.clone(),
        address: http_entry.ip(),
        http_entry,
        tcp_host: http_entry.ip(),
        capacity: 100_000,
        allocatable: None,
        metrics: None,
        networks: None,
        version: "bench".into(),
        started_at: 0,
    }
}

/// Instance `id` of challenge `bench` for `team` on `worker`, serving
/// `hostname` (port 8080 of a container nobody runs), never expiring.
pub fn ghost_instance(
    id: &InstanceId,
    team: &TeamId,
    worker: &WorkerId,
    hostname: Hostname,
) -> Result<InstanceRecord, Invalid> {
    Ok(InstanceRecord {
        v: V1,
        id: id.clone(),
        challenge: ChallengeName::parse("bench")?,
        team: Some(team.clone()),
        worker: worker.clone(),
        token: 1,
        created_at: 0,
        expires_at: 9_999_999_999,
        renewals: 0,
        team_slot: 0,
        http: vec![HttpRoute {
            port_name: PortName::parse("web")?,
            hostname,
            target_port: 8080,
            service: None,
        }],
        tcp: Vec::new(),
        services: Default::default(),
        container: Some(ContainerSpec {
            image: "none".into(),
            env: Default::default(),
            limits: Limits::default(),
            egress: false,
            read_only_rootfs: false,
            tmpfs: Vec::new(),
            cap_add: Vec::new(),
            unsafe_caps: Vec::new(),
        }),
        spec_revision: 0,
        flag: None,
        flag_file: None,
        solver: None,
    })
}

/// The address a ghost worker's instances report (nothing listens there).
pub const GHOST_ADDRESS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 19, 0, 9));
