//! `GET /metrics` of the controller (Prometheus text, no token: bind the
//! API where only the platform, the organizers and Prometheus reach it) and
//! the recent refusals the organizer dashboard lists.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tidegate_schema::InstanceStatus;
use tidegate_schema::telemetry::{EtcdHealth, counter, gauge};

use crate::App;

/// How many refusals the dashboard keeps (per replica).
const RECENT: usize = 100;

/// A spawn or renewal this replica refused, with why.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    /// Unix seconds.
    pub at: u64,
    /// `spawn` or `renew`.
    pub op: &'static str,
    pub team: String,
    pub challenge: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// A short label: `policy_deny`, `team_limit`, `no_capacity`, ...
    pub reason: &'static str,
    pub status: u16,
    /// What the caller was told.
    pub message: String,
}

/// What the controller measures beyond [`crate::Counters`].
#[derive(Debug, Default)]
pub struct Telemetry {
    pub etcd: Arc<EtcdHealth>,
    refusals: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    recent: Mutex<VecDeque<Refusal>>,
}

impl Telemetry {
    /// Counts a refusal by operation and reason and keeps it for the dashboard.
    pub fn refused(&self, r: Refusal) {
        tracing::info!(op = r.op, team = %r.team, challenge = %r.challenge, reason = r.reason,
            status = r.status, message = %r.message, "refused");
        *self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((r.op, r.reason))
            .or_default() += 1;
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_back();
        }
        recent.push_front(r);
    }

    /// The latest refusals, newest first.
    pub fn recent(&self) -> Vec<Refusal> {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn render_refusals(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP tidegate_controller_refusals_total Spawns and renewals refused, by operation and reason.\n# TYPE tidegate_controller_refusals_total counter"
        );
        for ((op, reason), n) in self
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "tidegate_controller_refusals_total{{op=\"{op}\",reason=\"{reason}\"}} {n}"
            );
        }
    }
}

/// The whole exposition of one replica.
pub fn render(app: &App) -> String {
    let mut out = String::new();
    let c = &app.counters;
    let leading = app.leader.load().is_some();
    gauge(
        &mut out,
        "tidegate_controller_leader",
        "1 while this replica is the elected scheduler.",
        u8::from(leading),
    );
    for (name, help, v) in [
        (
            "tidegate_controller_leader_changes_total",
            "Times this replica became the scheduler.",
            &c.leader_changes,
        ),
        (
            "tidegate_controller_spawns_total",
            "Instances this replica spawned.",
            &c.spawns,
        ),
        (
            "tidegate_controller_renewals_total",
            "Renewals this replica committed.",
            &c.renewals,
        ),
        (
            "tidegate_controller_deletions_total",
            "Deletions this replica committed.",
            &c.deletions,
        ),
        (
            "tidegate_controller_fenced_writes_total",
            "Writes etcd refused because this replica's fencing token was stale.",
            &c.fenced_writes,
        ),
        (
            "tidegate_controller_worker_gone_deletions_total",
            "Instances deleted because their worker was gone past worker_grace_secs.",
            &c.worker_gone_deletions,
        ),
        (
            "tidegate_controller_idle_expirations_total",
            "Instances expired by an on-idle policy.",
            &c.idle_expirations,
        ),
    ] {
        counter(&mut out, name, help, v.load(Ordering::Relaxed));
    }
    app.telemetry.render_refusals(&mut out);
    app.policies.calls.render(&mut out, "tidegate_controller");
    {
        let view = app.view.lock();
        gauge(
            &mut out,
            "tidegate_controller_workers",
            "Workers registered (this replica's view).",
            view.workers.len(),
        );
        gauge(
            &mut out,
            "tidegate_controller_capacity",
            "Instance slots of all registered workers.",
            view.workers
                .values()
                .map(|w| u64::from(w.capacity))
                .sum::<u64>(),
        );
        let mut states: BTreeMap<&str, usize> = ["pending", "starting", "running", "failed"]
            .map(|s| (s, 0))
            .into();
        for id in view.instances.keys() {
            let s = match view.status.get(id) {
                None => "pending",
                Some(InstanceStatus::Starting) => "starting",
                Some(InstanceStatus::Running) => "running",
                Some(InstanceStatus::Failed { .. }) => "failed",
            };
            *states.entry(s).or_default() += 1;
        }
        let _ = writeln!(
            out,
            "# HELP tidegate_controller_instances Live instances by status (this replica's view).\n# TYPE tidegate_controller_instances gauge"
        );
        for (s, n) in states {
            let _ = writeln!(out, "tidegate_controller_instances{{status=\"{s}\"}} {n}");
        }
        gauge(
            &mut out,
            "tidegate_controller_view_revision",
            "The etcd revision this replica's view reflects.",
            view.revision,
        );
        app.telemetry
            .etcd
            .render(&mut out, "tidegate_controller", view.revision);
    }
    gauge(
        &mut out,
        "tidegate_controller_plugins_compiled",
        "Policy plugins compiled and cached by this replica.",
        app.policies.host.cached(),
    );
    out
}
