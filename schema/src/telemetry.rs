//! What both daemons measure about etcd, rendered as Prometheus text: the
//! round trip of a linearizable read (a probe every two seconds) and the
//! watch lag (from a daemon's own write committing to its watch delivering
//! that revision).

use std::collections::VecDeque;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};

/// Bucket bounds (seconds) for etcd round trips and watch lag.
pub const ETCD_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// A Prometheus histogram with fixed bounds, updated with atomics only.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Cumulative counts per bound.
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bound, n) in self.bounds.iter().zip(&self.buckets) {
            if secs <= *bound {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// `# HELP`, `# TYPE` and the series of `name`; `labels` (e.g.
    /// `hook="renew"`) go on every series, and the header is written only
    /// when `header` is set (for several label sets of one name).
    pub fn render(&self, out: &mut String, name: &str, help: &str, labels: &str, header: bool) {
        if header {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        }
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, n) in self.bounds.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}\n{name}_sum{} {:.6}\n{name}_count{} {count}",
            braces(labels),
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            braces(labels),
        );
    }
}

/// A counter line with its header.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

/// A counter family with its header: one line per value of `label`.
pub fn counters(out: &mut String, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {n}");
    }
}

/// A gauge line with its header.
pub fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// How often [`probe_etcd`] measures the round trip.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// etcd as one daemon sees it.
#[derive(Debug)]
pub struct EtcdHealth {
    pub rtt: Histogram,
    /// Probes that failed or took longer than two seconds.
    pub failures: AtomicU64,
    /// The cluster's revision at the last successful probe.
    pub revision: AtomicI64,
    /// Milliseconds of the last probe's round trip (-1 when it failed).
    pub last_rtt_ms: AtomicI64,
    /// Watch lag: our own writes, committed, until our watch delivered them.
    pub watch_lag: Histogram,
    pending: Mutex<VecDeque<(i64, Instant)>>,
}

impl Default for EtcdHealth {
    fn default() -> Self {
        Self {
            rtt: Histogram::new(&ETCD_BUCKETS),
            failures: AtomicU64::new(0),
            revision: AtomicI64::new(0),
            last_rtt_ms: AtomicI64::new(-1),
            watch_lag: Histogram::new(&ETCD_BUCKETS),
            pending: Mutex::new(VecDeque::new()),
        }
    }
}

/// At most this many writes wait for their watch event (older ones are
/// dropped: a watch that far behind shows in the revision gauge anyway).
const MAX_PENDING: usize = 1024;

impl EtcdHealth {
    /// A write of ours committed at `revision`: the watch should deliver it.
    pub fn wrote(&self, revision: i64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() == MAX_PENDING {
            p.pop_front();
        }
        p.push_back((revision, Instant::now()));
    }

    /// Our watch delivered everything up to `revision`.
    pub fn delivered(&self, revision: i64) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(r, at)) = p.front() {
            if r > revision {
                break;
            }
            self.watch_lag.observe(at.elapsed());
            p.pop_front();
        }
    }

    /// `{prefix}_etcd_*` series; `view_revision` is what the daemon's watch
    /// has delivered.
    pub fn render(&self, out: &mut String, prefix: &str, view_revision: i64) {
        self.rtt.render(
            out,
            &format!("{prefix}_etcd_rtt_seconds"),
            "Round trip of a linearizable etcd read, probed every 2 s.",
            "",
            true,
        );
        counter(
            out,
            &format!("{prefix}_etcd_probe_failures_total"),
            "etcd probes that failed or took over 2 s.",
            self.failures.load(Ordering::Relaxed),
        );
        self.watch_lag.render(
            out,
            &format!("{prefix}_etcd_watch_lag_seconds"),
            "From one of this daemon's etcd writes committing to its watch delivering it.",
            "",
            true,
        );
        let head = self.revision.load(Ordering::Relaxed);
        gauge(
            out,
            &format!("{prefix}_etcd_revision"),
            "etcd's revision at the last probe.",
            head,
        );
        gauge(
            out,
            &format!("{prefix}_etcd_watch_behind_revisions"),
            "Revisions between etcd (last probe) and what this daemon's watch delivered; keys outside its watch count too, so read trends, not values.",
            (head - view_revision).max(0),
        );
    }
}

/// Measures a linearizable count-only read of `key` every [`PROBE_EVERY`].
/// Runs until aborted.
pub async fn probe_etcd(client: Client, key: String, health: std::sync::Arc<EtcdHealth>) {
    loop {
        let mut c = client.clone();
        let started = Instant::now();
        let answer = tokio::time::timeout(
            PROBE_EVERY,
            c.get(key.as_str(), Some(GetOptions::new().with_count_only())),
        )
        .await;
        match answer {
            Ok(Ok(resp)) => {
                let took = started.elapsed();
                health.rtt.observe(took);
                health
                    .last_rtt_ms
                    .store(took.as_millis() as i64, Ordering::Relaxed);
                if let Some(h) = resp.header() {
                    health.revision.store(h.revision(), Ordering::Relaxed);
                }
            }
            _ => {
                health.failures.fetch_add(1, Ordering::Relaxed);
                health.last_rtt_ms.store(-1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(PROBE_EVERY.saturating_sub(started.elapsed())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        static B: [f64; 2] = [0.01, 0.1];
        let h = Histogram::new(&B);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(1));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help", "op=\"a\"", true);
        assert!(
            out.contains("x_seconds_bucket{op=\"a\",le=\"0.01\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{op=\"a\",le=\"0.1\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_seconds_bucket{op=\"a\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_count{op=\"a\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum{op=\"a\"} 1.055000\n"), "{out}");
    }

    #[test]
    fn watch_lag_is_observed_once_the_watch_reaches_the_write() {
        let h = EtcdHealth::default();
        h.wrote(10);
        h.wrote(12);
        h.delivered(9);
        assert_eq!(h.watch_lag.count(), 0);
        h.delivered(11);
        assert_eq!(h.watch_lag.count(), 1);
        h.delivered(20);
        assert_eq!(h.watch_lag.count(), 2);
        h.delivered(30);
        assert_eq!(h.watch_lag.count(), 2);
    }
}
