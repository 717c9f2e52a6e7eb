//! The JSON bodies of the API: what requests carry and answers hold. The
//! handlers build these types and the OpenAPI document is generated from
//! them, so the two cannot drift apart.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use tidegate_schema::{
    ChallengeName, ChallengeSpec, FieldError, Hostname, InstanceId, InstanceRecord, PolicyFallback,
    PolicyRef, PortName, Resources, TeamId, Validate, WorkerId, WorkerRecord,
};
use utoipa::{IntoParams, ToSchema};

use crate::App;

/// Every 4xx and 5xx answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    /// What is wrong, and what to do.
    pub(crate) error: String,
    /// The request field at fault (a 400).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub(crate) field: Option<String>,
    /// The scheduler's URL (a 503 from a standby that could not reach it).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub(crate) leader: Option<String>,
    /// Which policy refused, and how (a 403 or 429 from a policy).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub(crate) policy: Option<PolicyDecision>,
    /// A stable word for why a spawn, renewal or other instance operation
    /// was refused, for integrations to act on (the `error` text is for
    /// people): `team_limit`, `max_renewals`, `max_lifetime`, `too_early`,
    /// `not_found`, `policy_deny`, `policy_queue`, `policy_refuse`,
    /// `policy_fallback_deny`, `rate_limited`, `no_capacity`, `too_large`, `no_worker`,
    /// `no_network`, `unknown_challenge`, and `unavailable` for any other
    /// 503 (retry after `Retry-After`); the same words as
    /// `tidegate_controller_refusals_total{reason}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub(crate) reason: Option<String>,
}

impl ErrorBody {
    pub(crate) fn new(error: String) -> Self {
        Self {
            error,
            field: None,
            leader: None,
            policy: None,
            reason: None,
        }
    }
}

/// `POST /v1/instances`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpawnRequest {
    pub(crate) challenge: ChallengeName,
    pub(crate) team: TeamId,
}

impl Validate for SpawnRequest {
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

/// `POST /v1/instances/{id}/flag`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FlagCheck {
    /// The submitted flag (at most 1024 bytes; surrounding spaces ignored).
    #[schema(max_length = 1024)]
    pub(crate) flag: String,
}

impl Validate for FlagCheck {
    fn validate(&self) -> Result<(), FieldError> {
        if self.flag.len() > 1024 {
            return Err(FieldError::new("flag", "at most 1024 bytes"));
        }
        Ok(())
    }
}

/// Whether a submitted flag is the instance's.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FlagResult {
    pub(crate) correct: bool,
}

/// `POST /v1/flags/check`: a team's submission for a challenge.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FlagSubmission {
    pub(crate) challenge: ChallengeName,
    /// The submitting team.
    pub(crate) team: TeamId,
    /// The submitted flag (at most 1024 bytes; surrounding spaces ignored).
    #[schema(max_length = 1024)]
    pub(crate) flag: String,
}

impl Validate for FlagSubmission {
    fn validate(&self) -> Result<(), FieldError> {
        if self.flag.len() > 1024 {
            return Err(FieldError::new("flag", "at most 1024 bytes"));
        }
        Ok(())
    }
}

/// The verdict on a submission.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FlagVerdict {
    /// The flag is the submitting team's: of one of its instances of the
    /// challenge (live or ended), or the challenge's static flag.
    pub(crate) correct: bool,
    /// The flag is another team's instance flag: flag sharing.
    pub(crate) shared: bool,
    /// Whose instance the flag was made for (absent for a static flag or a
    /// flag that is nobody's).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub(crate) owner: Option<FlagOwner>,
}

/// The instance a per-instance flag was made for.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct FlagOwner {
    pub(crate) team: TeamId,
    pub(crate) instance: InstanceId,
    pub(crate) worker: WorkerId,
    /// Unix seconds: when the instance was spawned.
    pub(crate) created_at: u64,
}

/// `?team=` on one instance's operations: the team the platform acts for.
/// Given, an instance of another team is answered 404, worded exactly as
/// for an id that does not exist.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct TeamQuery {
    /// The team whose instance this must be.
    pub(crate) team: Option<String>,
}

/// `GET /v1/instances` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only this team's instances.
    pub(crate) team: Option<String>,
    /// Only instances of this challenge.
    pub(crate) challenge: Option<String>,
}

/// A policy's decision, as an answer names it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct PolicyDecision {
    /// The plugin's digest (`sha256:...`).
    pub(crate) digest: String,
    /// `admit-spawn` or `renew`.
    pub(crate) hook: String,
    /// `deny`, `queue`, `refuse`, `fallback-deny` or `fallback-allow`.
    pub(crate) decision: String,
    /// Why the plugin failed (a fallback's decision).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub(crate) error: Option<String>,
}

/// An instance.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Instance {
    id: InstanceId,
    challenge: ChallengeName,
    /// Absent for a pooled instance (no team's yet: organizers see these
    /// in `GET /v1/pools`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    team: Option<TeamId>,
    worker: WorkerId,
    /// Unix seconds.
    created_at: u64,
    /// Unix seconds; renewals move it.
    expires_at: u64,
    renewals: u32,
    http: Vec<HttpAddress>,
    tcp: Vec<TcpAddress>,
    /// `pending`, `starting`, `running` or `failed: <reason>`.
    status: String,
    /// Each service's state (`waiting`, `starting`, `ready`, `failed`), of
    /// an instance of a challenge with `services`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    services: BTreeMap<String, String>,
    /// The last solver check (challenges with a `solver`, once one ended).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    solver: Option<SolverCheck>,
    /// Set when a failed policy's fallback allowed the spawn.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub(crate) policy: Option<PolicyDecision>,
}

/// An instance's last solver check.
#[derive(Debug, Serialize, ToSchema)]
struct SolverCheck {
    /// `healthy` (its output held the instance's flag) or `unhealthy`.
    state: &'static str,
    /// Unix seconds.
    checked_at: u64,
    /// Why it is unhealthy (the run's error, or its output's last bytes):
    /// to the admin token only, since a solver's output may show the way
    /// to the flag.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    detail: Option<String>,
    /// How many times its worker made its containers again after a failed
    /// check (`solver.replace_unhealthy`).
    #[serde(skip_serializing_if = "is_zero")]
    replacements: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Where players reach an HTTP port of an instance.
#[derive(Debug, Serialize, ToSchema)]
struct HttpAddress {
    port_name: PortName,
    hostname: Hostname,
    url: String,
}

/// Where players reach a TCP port of an instance.
#[derive(Debug, Serialize, ToSchema)]
struct TcpAddress {
    port_name: PortName,
    /// The public port on every agent.
    port: u16,
    /// The SNI that reaches this port through an agent's `tls_tcp_entry`.
    tls_hostname: String,
}

impl Instance {
    /// `rec` as players and platforms see it, with its `status`.
    pub(crate) fn new(app: &App, rec: &InstanceRecord, status: String) -> Self {
        let scheme = app.cfg.public_http_scheme.as_str();
        let port = match (scheme, app.cfg.public_http_port) {
            ("http", 80) | ("https", 443) => String::new(),
            (_, p) => format!(":{p}"),
        };
        Self {
            id: rec.id.clone(),
            challenge: rec.challenge.clone(),
            team: rec.team.clone(),
            worker: rec.worker.clone(),
            created_at: rec.created_at,
            expires_at: rec.expires_at,
            renewals: rec.renewals,
            http: rec
                .http
                .iter()
                .map(|r| HttpAddress {
                    port_name: r.port_name.clone(),
                    hostname: r.hostname.clone(),
                    url: format!("{scheme}://{}{port}/", r.hostname),
                })
                .collect(),
            tcp: rec
                .tcp
                .iter()
                .map(|r| TcpAddress {
                    port_name: r.port_name.clone(),
                    port: r.port,
                    tls_hostname: format!("{}-{}.{}", rec.id, r.port_name, app.cfg.domain),
                })
                .collect(),
            status,
            services: BTreeMap::new(),
            solver: None,
            policy: None,
        }
    }

    /// With its last solver check; the reason only for `admin`.
    pub(crate) fn with_solver(
        mut self,
        health: Option<&tidegate_schema::SolverHealth>,
        admin: bool,
    ) -> Self {
        self.solver = health.map(|h| SolverCheck {
            state: if h.healthy { "healthy" } else { "unhealthy" },
            checked_at: h.checked_at,
            detail: (admin && !h.healthy).then(|| h.detail.clone()),
            replacements: h.replacements,
        });
        self
    }

    /// With its services' states.
    pub(crate) fn with_services(
        mut self,
        states: BTreeMap<tidegate_schema::ServiceName, tidegate_schema::ServiceState>,
    ) -> Self {
        self.services = states
            .into_iter()
            .map(|(name, state)| {
                let state = serde_json::to_value(state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                (name.to_string(), state)
            })
            .collect();
        self
    }
}

/// A spawn waiting for room (`202` to `POST /v1/instances`, and `GET
/// /v1/instances/{id}` until it is admitted; each such `GET` holds its
/// place for another `hold_secs`).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Queued {
    /// The id the instance will have once admitted.
    pub(crate) id: InstanceId,
    pub(crate) challenge: ChallengeName,
    pub(crate) team: TeamId,
    /// Always `queued`.
    pub(crate) status: &'static str,
    /// 1 is next, in the scheduler's fair order (round-robin across
    /// teams, then arrival).
    pub(crate) position: usize,
    /// Spawns waiting in all (every challenge).
    pub(crate) waiting: usize,
    /// `no_capacity`, `no_network` or `policy`.
    pub(crate) reason: String,
    /// What is short (the words a refusal would have had).
    pub(crate) detail: String,
    /// Unix seconds.
    pub(crate) queued_at: u64,
    /// The place is lost when its id is not asked about for this long.
    pub(crate) hold_secs: u32,
}

/// The waiting queue in admission order.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QueueList {
    pub(crate) queued: Vec<Queued>,
    /// The etcd revision the view reflects.
    pub(crate) revision: i64,
}

/// Live instances, as this replica's view holds them.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct InstanceList {
    pub(crate) instances: Vec<Instance>,
    /// The etcd revision the view reflects.
    pub(crate) revision: i64,
}

/// A stored challenge.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Challenge {
    pub(crate) name: ChallengeName,
    /// Its etcd revision (the ETag; If-Match takes it).
    pub(crate) revision: i64,
    pub(crate) spec: ChallengeSpec,
    pub(crate) policy: Option<PolicyRef>,
}

/// A challenge just written.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ChallengeWritten {
    pub(crate) name: ChallengeName,
    pub(crate) revision: i64,
    /// Whether it did not exist before.
    pub(crate) created: bool,
    pub(crate) spec: ChallengeSpec,
    /// What will not work as written, though it was stored (an instance
    /// larger than any registered worker).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) warnings: Vec<String>,
    /// The rollout this write started (`?rollout=gated`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rollout: Option<Rollout>,
}

/// `PUT /v1/challenges/{name}?rollout=gated&canary=2&batch=10`: the new
/// spec also starts a rollout to the live instances.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct RolloutQuery {
    /// `gated` (the only strategy): canaries, a gate, batches.
    pub(crate) rollout: Option<String>,
    /// Canaries (default 2, 1 to 1000).
    pub(crate) canary: Option<u32>,
    /// Instances per batch after the gate (default 10, 1 to 1000).
    pub(crate) batch: Option<u32>,
}

/// `POST /v1/challenges/{name}/rollout`: roll the challenge's current spec
/// out to its live instances.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RolloutRequest {
    /// `gated` (the only strategy, and the default).
    #[serde(default)]
    pub(crate) strategy: Option<String>,
    #[serde(default)]
    pub(crate) canary: Option<u32>,
    #[serde(default)]
    pub(crate) batch: Option<u32>,
}

impl Validate for RolloutRequest {
    fn validate(&self) -> Result<(), FieldError> {
        Ok(())
    }
}

/// A challenge's rollout and how far it got.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Rollout {
    pub(crate) challenge: ChallengeName,
    /// The spec revision instances ran before, and the one they move to.
    pub(crate) from_revision: i64,
    pub(crate) to_revision: i64,
    pub(crate) canary: u32,
    pub(crate) batch: u32,
    /// canary, gate, batches, done, aborting or aborted.
    #[schema(value_type = String)]
    pub(crate) phase: tidegate_schema::RolloutPhase,
    pub(crate) paused: bool,
    /// An organizer's `continue` the scheduler has not acted on yet (at the
    /// gate: open it; in batches: leave the failed instances behind).
    pub(crate) continued: bool,
    /// An organizer asked for the abort.
    pub(crate) abort: bool,
    pub(crate) canaries: Vec<InstanceId>,
    /// Every instance picked so far, canaries first.
    pub(crate) replaced: Vec<InstanceId>,
    /// Picked instances that failed on the new revision and that an
    /// organizer's `continue` left behind.
    pub(crate) skipped: Vec<InstanceId>,
    /// Where the abort wrote the old spec back (0: no abort).
    pub(crate) restored_revision: i64,
    /// What it waits for now.
    pub(crate) detail: String,
    pub(crate) started_at: u64,
    pub(crate) updated_at: u64,
    /// Live instances of the challenge, and those running `to_revision`.
    pub(crate) live: usize,
    pub(crate) running_new: usize,
    /// The record's etcd revision.
    pub(crate) revision: i64,
}

/// Every challenge, and the stored values that are not one.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ChallengeList {
    pub(crate) challenges: Vec<Challenge>,
    pub(crate) errors: Vec<StoredError>,
}

/// A stored value that does not decode (written by hand, or by a newer version).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StoredError {
    pub(crate) key: String,
    pub(crate) error: String,
}

/// A challenge's policy plugin.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Policy {
    pub(crate) challenge: ChallengeName,
    pub(crate) digest: String,
    /// The hooks the plugin implements.
    pub(crate) hooks: Vec<String>,
    /// The component's size in bytes.
    pub(crate) size: u64,
    /// Unix seconds.
    pub(crate) uploaded_at: u64,
    pub(crate) fallback: PolicyFallback,
    /// The challenge's etcd revision.
    pub(crate) revision: i64,
}

/// A registered worker and its load.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Worker {
    id: WorkerId,
    #[schema(value_type = String)]
    address: IpAddr,
    #[schema(value_type = String)]
    http_entry: SocketAddr,
    #[schema(value_type = String)]
    tcp_host: IpAddr,
    capacity: u32,
    /// Live instances it runs.
    instances: usize,
    /// Instances it may still take (its slots; resources may run out first).
    free: usize,
    /// What it gives instances in all (absent from older agents).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    allocatable: Option<Resources>,
    /// What its live instances' limits add up to.
    committed: Resources,
    /// Per-instance networks (for instances with services) in use, as the
    /// worker last reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    networks_used: Option<u32>,
    /// Per-instance networks it has free, as the worker last reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    networks_free: Option<u32>,
    version: String,
    /// Unix seconds.
    started_at: u64,
}

impl Worker {
    /// `w`, running `instances` that take `committed`.
    pub(crate) fn new(w: &WorkerRecord, instances: usize, committed: Resources) -> Self {
        Self {
            id: w.id.clone(),
            address: w.address,
            http_entry: w.http_entry,
            tcp_host: w.tcp_host,
            capacity: w.capacity,
            instances,
            free: (w.capacity as usize).saturating_sub(instances),
            allocatable: w.allocatable,
            committed,
            networks_used: w.networks.map(|n| n.used),
            networks_free: w.networks.map(|n| n.free),
            version: w.version.clone(),
            started_at: w.started_at,
        }
    }
}

/// The registered workers.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct WorkerList {
    pub(crate) workers: Vec<Worker>,
}
