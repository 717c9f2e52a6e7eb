//! What the agent measures, for its `GET /metrics` (Prometheus text):
//! the reconciler and membership (`tidegate_agent_*`, here), etcd's health,
//! every instance's traffic (`traffic`), the TCP data plane
//! (`tidegate_tcp_*`, in `tcp`) and the edge policies (`tidegate_policy_*`,
//! in `policy`). Activity data stays here (and in logs), never in etcd.

pub mod traffic;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tidegate_etcd::EtcdHealth;
use tidegate_schema::InstanceStatus;

use crate::routes::SharedRoutes;

/// Upper bounds of the reconcile latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Container states, as the `state` label of `tidegate_agent_containers`.
const STATES: [&str; 3] = ["starting", "running", "failed"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// A solver check's outcome, as the `result` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The reconciler's and membership's measures, and etcd's health.
#[derive(Debug)]
pub struct Metrics {
    containers: Family<StateLabel, Gauge>,
    reconcile: Histogram,
    malformed: Counter,
    fenced: Counter,
    unlike_spec: Counter,
    orphans: Counter,
    registrations: Counter,
    solver_checks: Family<ResultLabel, Counter>,
    solver_replacements: Counter,
    watch_revision: Gauge,
    host_firewall: Gauge,
    /// etcd round trips and watch lag.
    pub etcd: Arc<EtcdHealth>,
}

impl Default for Metrics {
    fn default() -> Self {
        let containers = Family::<StateLabel, Gauge>::default();
        for state in STATES {
            containers.get_or_create(&StateLabel { state }).set(0);
        }
        Self {
            containers,
            reconcile: Histogram::new(BUCKETS),
            malformed: Counter::default(),
            fenced: Counter::default(),
            unlike_spec: Counter::default(),
            orphans: Counter::default(),
            registrations: Counter::default(),
            solver_checks: Family::default(),
            solver_replacements: Counter::default(),
            watch_revision: Gauge::default(),
            host_firewall: Gauge::default(),
            etcd: Arc::default(),
        }
    }
}

impl Metrics {
    /// Registers `tidegate_agent_*` in `registry` (the `tidegate_agent` prefix).
    pub fn register(&self, registry: &mut Registry) {
        self.etcd.register(registry);
        registry.register(
            "containers",
            "Instances of this worker by state",
            self.containers.clone(),
        );
        registry.register(
            "reconcile_seconds",
            "Time from seeing an instance record to its container running",
            self.reconcile.clone(),
        );
        for (name, help, c) in [
            (
                "malformed_records",
                "Instance keys or records skipped as malformed",
                &self.malformed,
            ),
            (
                "fenced_records",
                "Records refused for carrying a stale fencing token",
                &self.fenced,
            ),
            (
                "unlike_spec_records",
                "Records refused because their container is not what their challenge's spec makes (no container started)",
                &self.unlike_spec,
            ),
            (
                "orphans_removed",
                "Containers removed because no record wanted them",
                &self.orphans,
            ),
            (
                "registrations",
                "Times this worker (re)registered its membership",
                &self.registrations,
            ),
            (
                "solver_replacements",
                "Times this worker made an instance's containers again after a failed solver check (replace_unhealthy)",
                &self.solver_replacements,
            ),
        ] {
            registry.register(name, help, c.clone());
        }
        for result in ["healthy", "unhealthy"] {
            let _ = self.solver_checks.get_or_create(&ResultLabel { result });
        }
        registry.register(
            "solver_checks",
            "Solver checks this worker ran, by outcome (the flag found or not)",
            self.solver_checks.clone(),
        );
        registry.register(
            "watch_revision",
            "The etcd revision the agent's view reflects",
            self.watch_revision.clone(),
        );
        registry.register(
            "host_firewall",
            "1 while the rules keeping instances off this host are in place (or allow_host_access), else 0: no instance starts",
            self.host_firewall.clone(),
        );
    }

    pub fn set_states<'a>(&self, states: impl Iterator<Item = &'a InstanceStatus>) {
        let mut counts = [0i64; STATES.len()];
        for s in states {
            if let Some(i) = STATES.iter().position(|n| *n == s.name()) {
                counts[i] += 1;
            }
        }
        for (state, n) in STATES.into_iter().zip(counts) {
            self.containers.get_or_create(&StateLabel { state }).set(n);
        }
    }

    /// Time from first seeing a record to its container running.
    pub fn reconciled(&self, took: Duration) {
        self.reconcile.observe(took.as_secs_f64());
    }

    pub fn malformed(&self) {
        self.malformed.inc();
    }

    pub fn fenced(&self) {
        self.fenced.inc();
    }

    pub fn unlike_spec(&self) {
        self.unlike_spec.inc();
    }

    /// A solver check ended.
    pub fn solver_checked(&self, healthy: bool) {
        let result = if healthy { "healthy" } else { "unhealthy" };
        self.solver_checks
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// An unhealthy instance's containers are being made again.
    pub fn solver_replaced(&self) {
        self.solver_replacements.inc();
    }

    pub fn orphan_removed(&self) {
        self.orphans.inc();
    }

    pub fn registered(&self) {
        self.registrations.inc();
    }

    pub fn set_watch_revision(&self, r: i64) {
        self.watch_revision.set(r);
    }

    pub fn set_host_firewall(&self, in_place: bool) {
        self.host_firewall.set(i64::from(in_place));
    }
}

/// The route table's size and revision (`tidegate_agent_routes*`), read
/// from the current snapshot when `/metrics` is read.
#[derive(Debug)]
pub struct RouteTableCollector(pub SharedRoutes);

impl Collector for RouteTableCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let table = self.0.load();
        for (name, help, value) in [
            (
                "tidegate_agent_routes",
                "HTTP hostnames in this agent's route table",
                table.by_host.len() as i64,
            ),
            (
                "tidegate_agent_routes_revision",
                "The etcd revision of the route table",
                table.revision,
            ),
            (
                "tidegate_agent_tcp_routes",
                "TCP ports in this agent's route table",
                table.by_port.len() as i64,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(m)?;
        }
        Ok(())
    }
}

/// Every metric of the agent in one registry; with `per_instance`, also
/// the series labelled by instance (served only to the scrape token).
pub fn registry(
    metrics: &Metrics,
    routes: &SharedRoutes,
    tcp: &crate::tcp::TcpPlane,
    policy: &crate::policy::PluginPolicy,
    hops: &crate::hop::Hops,
    http: &crate::http::guard::Connections,
    per_instance: bool,
) -> Registry {
    let mut registry = Registry::default();
    hops.register(&mut registry);
    metrics.register(registry.sub_registry_with_prefix("tidegate_agent"));
    http.register(registry.sub_registry_with_prefix("tidegate_agent"));
    registry.register_collector(Box::new(RouteTableCollector(routes.clone())));
    tcp.register(registry.sub_registry_with_prefix("tidegate_tcp"));
    policy.register(registry.sub_registry_with_prefix("tidegate_policy"));
    if per_instance {
        registry.register_collector(Box::new(traffic::TrafficCollector(routes.clone())));
    }
    registry
}

/// The Prometheus text of `registry`, in a buffer sized like the last one
/// (`last_len`): with 10,000 instances the text is ~17 MB, and growing a
/// buffer to that by doubling holds twice as much at the end.
pub fn render(registry: &Registry, last_len: &AtomicUsize) -> String {
    let mut out = String::with_capacity(last_len.load(Ordering::Relaxed) + 4096);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    last_len.store(out.len(), Ordering::Relaxed);
    out
}

/// What `/metrics` and `/activity` serve: the agent's own series to
/// anyone, per-instance series and activity only to the scrape token.
pub struct Scrape {
    pub public: Registry,
    pub full: Registry,
    pub routes: SharedRoutes,
    /// The scrape token (`scrape_token_file`); none: per-instance data is
    /// served to no one.
    pub token: Option<Vec<u8>>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrape")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl Scrape {
    /// Whether `headers` carry `Authorization: Bearer <the token>`.
    fn authorized(&self, headers: &axum::http::HeaderMap) -> bool {
        use subtle::ConstantTimeEq;
        if tidegate_schema::config::planted("scrape-token") {
            return true;
        }
        let Some(token) = &self.token else {
            return false;
        };
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .is_some_and(|given| bool::from(given.ct_eq(token)))
    }
}

/// Serves `GET /metrics` (the Prometheus text) and `GET /activity` (each
/// local instance's last traffic, for the leader's `on-idle` check) on
/// `listener`, until aborted.
pub async fn serve(listener: tokio::net::TcpListener, scrape: Scrape) {
    let scrape = Arc::new(scrape);
    // Each registry's text is sized like its own last one.
    let last_len = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let metrics = {
        let scrape = scrape.clone();
        move |headers: axum::http::HeaderMap| {
            let (scrape, last_len) = (scrape.clone(), last_len.clone());
            async move {
                let (registry, last_len) = if scrape.authorized(&headers) {
                    (&scrape.full, &last_len[1])
                } else {
                    (&scrape.public, &last_len[0])
                };
                (
                    [(
                        "content-type",
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    )],
                    render(registry, last_len),
                )
            }
        }
    };
    let activity = move |headers: axum::http::HeaderMap| {
        let scrape = scrape.clone();
        async move {
            if !scrape.authorized(&headers) {
                let why = "/activity names this worker's instances: it needs Authorization: Bearer <the agent's scrape_token_file>";
                return Err((axum::http::StatusCode::UNAUTHORIZED, why));
            }
            Ok(axum::Json(traffic::activity(&scrape.routes.load())))
        }
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/activity", axum::routing::get(activity));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics listener stopped");
    }
}
