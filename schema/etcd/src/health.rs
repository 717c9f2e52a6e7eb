//! What both daemons measure about etcd: the round trip of a linearizable
//! read (a probe every two seconds) and the watch lag (from a daemon's own
//! write committing to its watch delivering that revision). Registered in
//! the daemon's Prometheus registry as `{prefix}_etcd_*`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Bucket bounds (seconds) for etcd round trips and watch lag.
pub const ETCD_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// How often [`probe_etcd`] measures the round trip.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);

/// At most this many writes wait for their watch event (older ones are
/// dropped: a watch that far behind shows in the revision gauge anyway).
const MAX_PENDING: usize = 1024;

/// etcd as one daemon sees it.
#[derive(Debug)]
pub struct EtcdHealth {
    rtt: Histogram,
    /// Probes that failed or took longer than two seconds.
    failures: Counter,
    /// The cluster's revision at the last successful probe.
    revision: Gauge,
    /// Revisions between the last probe and what the daemon's watch delivered.
    behind: Gauge,
    /// What the daemon's watch has delivered.
    delivered: AtomicI64,
    /// Watch lag: our own writes, committed, until our watch delivered them.
    watch_lag: Histogram,
    /// Our writes' round trips: each is a proposal a quorum committed.
    write: Histogram,
    pending: Mutex<VecDeque<(i64, Instant)>>,
}

impl Default for EtcdHealth {
    fn default() -> Self {
        Self {
            rtt: Histogram::new(ETCD_BUCKETS),
            failures: Counter::default(),
            revision: Gauge::default(),
            behind: Gauge::default(),
            delivered: AtomicI64::new(0),
            watch_lag: Histogram::new(ETCD_BUCKETS),
            write: Histogram::new(ETCD_BUCKETS),
            pending: Mutex::new(VecDeque::new()),
        }
    }
}

impl EtcdHealth {
    /// Registers the `etcd_*` series in `registry` (the daemon's prefix
    /// registry, so they read `{prefix}_etcd_rtt_seconds` and so on).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "etcd_rtt_seconds",
            "Round trip of a linearizable etcd read, probed every 2 s",
            self.rtt.clone(),
        );
        registry.register(
            "etcd_probe_failures",
            "etcd probes that failed or took over 2 s",
            self.failures.clone(),
        );
        registry.register(
            "etcd_watch_lag_seconds",
            "From one of this daemon's etcd writes committing to its watch delivering it",
            self.watch_lag.clone(),
        );
        registry.register(
            "etcd_write_seconds",
            "Round trip of this daemon's etcd writes, answered or failed (controllers: spawns with their lease grant, queue places, pool members; agents: status), each proposals a quorum must commit: a slow disk or a lost quorum shows here",
            self.write.clone(),
        );
        registry.register(
            "etcd_revision",
            "etcd's revision at the last probe",
            self.revision.clone(),
        );
        registry.register(
            "etcd_watch_behind_revisions",
            "Revisions between etcd (last probe) and what this daemon's watch delivered; keys outside its watch count too, so read trends, not values",
            self.behind.clone(),
        );
    }

    /// A write of ours sent at `sent` was answered, or failed, or timed
    /// out: its round trip is observed either way (a write that fails
    /// after seconds is what an outage looks like).
    pub fn write_took(&self, sent: Instant) {
        self.write.observe(sent.elapsed().as_secs_f64());
    }

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
        // Stored, not maximised: after a restore the watch relists at a
        // lower revision, and so does what it delivered.
        self.delivered.store(revision, Ordering::Relaxed);
        self.update_behind();
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(r, at)) = p.front() {
            if r > revision {
                break;
            }
            self.watch_lag.observe(at.elapsed().as_secs_f64());
            p.pop_front();
        }
    }

    fn probed(&self, took: Duration, revision: Option<i64>) {
        self.rtt.observe(took.as_secs_f64());
        if let Some(r) = revision {
            self.revision.set(r);
        }
        self.update_behind();
    }

    fn probe_failed(&self) {
        self.failures.inc();
    }

    fn update_behind(&self) {
        let head = self.revision.get();
        self.behind
            .set((head - self.delivered.load(Ordering::Relaxed)).max(0));
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
            Ok(Ok(resp)) => health.probed(started.elapsed(), resp.header().map(|h| h.revision())),
            _ => health.probe_failed(),
        }
        tokio::time::sleep(PROBE_EVERY.saturating_sub(started.elapsed())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(h: &EtcdHealth) -> String {
        let mut registry = Registry::with_prefix("x");
        h.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn watch_lag_is_observed_once_the_watch_reaches_the_write() {
        let h = EtcdHealth::default();
        h.wrote(10);
        h.wrote(12);
        assert!(text(&h).contains("x_etcd_write_seconds_count 0\n"));
        h.write_took(Instant::now());
        assert!(text(&h).contains("x_etcd_write_seconds_count 1\n"));
        h.delivered(9);
        assert!(text(&h).contains("x_etcd_watch_lag_seconds_count 0\n"));
        h.delivered(11);
        assert!(text(&h).contains("x_etcd_watch_lag_seconds_count 1\n"));
        h.delivered(20);
        h.delivered(30);
        assert!(text(&h).contains("x_etcd_watch_lag_seconds_count 2\n"));
    }

    #[test]
    fn behind_is_the_probed_head_minus_what_the_watch_delivered() {
        let h = EtcdHealth::default();
        h.delivered(90);
        h.probed(Duration::from_millis(3), Some(100));
        assert!(text(&h).contains("x_etcd_watch_behind_revisions 10\n"));
        h.delivered(100);
        assert!(text(&h).contains("x_etcd_watch_behind_revisions 0\n"));
        h.probe_failed();
        assert!(text(&h).contains("x_etcd_probe_failures_total 1\n"));
    }
}
