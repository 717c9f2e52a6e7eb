//! Prometheus text metrics of the agent. Activity data stays here (and in
//! logs), never in etcd.

use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tidegate_schema::InstanceStatus;

/// Upper bounds of the reconcile latency histogram, in seconds.
const BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0];

#[derive(Debug, Default)]
pub struct Metrics {
    states: Mutex<[u64; 3]>,
    latency: Mutex<([u64; BUCKETS.len()], u64, f64)>,
    malformed: AtomicU64,
    fenced: AtomicU64,
    orphans: AtomicU64,
    watch_revision: AtomicI64,
    registrations: AtomicU64,
    /// etcd round trips and watch lag.
    pub etcd: std::sync::Arc<tidegate_schema::telemetry::EtcdHealth>,
}

impl Metrics {
    pub fn set_states<'a>(&self, states: impl Iterator<Item = &'a InstanceStatus>) {
        let mut counts = [0u64; 3];
        for s in states {
            counts[match s {
                InstanceStatus::Starting => 0,
                InstanceStatus::Running => 1,
                InstanceStatus::Failed { .. } => 2,
            }] += 1;
        }
        *self.states.lock().unwrap_or_else(|e| e.into_inner()) = counts;
    }

    /// Time from first seeing a record to its container running.
    pub fn reconciled(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.0[i] += 1;
            }
        }
        h.1 += 1;
        h.2 += secs;
    }

    pub fn malformed(&self) {
        self.malformed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fenced(&self) {
        self.fenced.fetch_add(1, Ordering::Relaxed);
    }

    pub fn orphan_removed(&self) {
        self.orphans.fetch_add(1, Ordering::Relaxed);
    }

    pub fn registered(&self) {
        self.registrations.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_watch_revision(&self, r: i64) {
        self.watch_revision.store(r, Ordering::Relaxed);
    }

    /// The Prometheus text exposition; `routes_revision` is what the route
    /// table's watch has delivered.
    pub fn render(&self, routes_revision: i64) -> String {
        let mut out = String::new();
        self.etcd
            .render(&mut out, "tidegate_agent", routes_revision);
        let states = *self.states.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "# HELP tidegate_agent_containers Instances of this worker by state."
        );
        let _ = writeln!(out, "# TYPE tidegate_agent_containers gauge");
        for (name, n) in ["starting", "running", "failed"].iter().zip(states) {
            let _ = writeln!(out, "tidegate_agent_containers{{state=\"{name}\"}} {n}");
        }
        let (buckets, count, sum) = *self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "# HELP tidegate_agent_reconcile_seconds Time from seeing an instance record to its container running."
        );
        let _ = writeln!(out, "# TYPE tidegate_agent_reconcile_seconds histogram");
        for (bound, n) in BUCKETS.iter().zip(buckets) {
            let _ = writeln!(
                out,
                "tidegate_agent_reconcile_seconds_bucket{{le=\"{bound}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "tidegate_agent_reconcile_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(out, "tidegate_agent_reconcile_seconds_sum {sum}");
        let _ = writeln!(out, "tidegate_agent_reconcile_seconds_count {count}");
        for (name, help, v) in [
            (
                "tidegate_agent_malformed_records_total",
                "Instance keys or records skipped as malformed.",
                self.malformed.load(Ordering::Relaxed),
            ),
            (
                "tidegate_agent_fenced_records_total",
                "Records refused for carrying a stale fencing token.",
                self.fenced.load(Ordering::Relaxed),
            ),
            (
                "tidegate_agent_orphans_removed_total",
                "Containers removed because no record wanted them.",
                self.orphans.load(Ordering::Relaxed),
            ),
            (
                "tidegate_agent_registrations_total",
                "Times this worker (re)registered its membership.",
                self.registrations.load(Ordering::Relaxed),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP tidegate_agent_watch_revision The etcd revision the agent's view reflects.\n# TYPE tidegate_agent_watch_revision gauge\ntidegate_agent_watch_revision {}",
            self.watch_revision.load(Ordering::Relaxed)
        );
        out
    }
}

/// Appends the route table's size and every instance's HTTP series.
pub fn render_routes(out: &mut String, table: &crate::routes::RouteTable) {
    let _ = writeln!(
        out,
        "# HELP tidegate_agent_routes HTTP hostnames in this agent's route table.\n# TYPE tidegate_agent_routes gauge\ntidegate_agent_routes {}",
        table.by_host.len()
    );
    let _ = writeln!(
        out,
        "# HELP tidegate_agent_routes_revision The etcd revision of the route table.\n# TYPE tidegate_agent_routes_revision gauge\ntidegate_agent_routes_revision {}",
        table.revision
    );
    let _ = writeln!(
        out,
        "# HELP tidegate_agent_tcp_routes TCP ports in this agent's route table.\n# TYPE tidegate_agent_tcp_routes gauge\ntidegate_agent_tcp_routes {}",
        table.by_port.len()
    );
    let mut seen = std::collections::BTreeSet::new();
    for route in table.by_host.values().chain(table.by_port.values()) {
        if seen.insert(route.instance.as_str()) {
            route.stats.render(out, route.instance.as_str());
        }
    }
}
