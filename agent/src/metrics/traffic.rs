//! Each instance's traffic: counters updated on the request and connection
//! paths with atomics only (one add per counter), the last time it saw
//! traffic (for `on-idle` policies, served at `GET /activity`), and the
//! collector that writes them as Prometheus series when `/metrics` is read.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use tidegate_schema::time::unix_ms;
use tidegate_schema::{ActivityReport, InstanceActivity};

use crate::routes::{RouteTable, SharedRoutes, Target};

/// Upper bounds of the request latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// One instance's traffic through this agent.
#[derive(Debug, Default)]
pub struct InstanceTraffic {
    pub requests: AtomicU64,
    /// Responses by class: 1xx..5xx at index 0..4.
    pub status: [AtomicU64; 5],
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Requests per latency bucket (not cumulative); the last is above every bound.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_micros: AtomicU64,
    /// Unix time in milliseconds of the last request or connection.
    pub last_activity_ms: AtomicU64,
    /// TCP connections accepted and spliced to the instance.
    pub tcp_connections: AtomicU64,
    /// TCP connections open now.
    pub tcp_active: AtomicU64,
    /// TCP connections holding a place under `tcp_max_connections_per_instance`
    /// (from accept, before the connect to the instance).
    pub tcp_admitted: AtomicU64,
    /// Bytes from players to the instance over TCP.
    pub tcp_bytes_in: AtomicU64,
    /// Bytes from the instance to players over TCP.
    pub tcp_bytes_out: AtomicU64,
}

impl InstanceTraffic {
    /// Records one finished request.
    pub fn request(&self, status: u16, bytes_in: u64, bytes_out: u64, took: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if (100..600).contains(&status) {
            self.status[usize::from(status / 100 - 1)].fetch_add(1, Relaxed);
        }
        self.bytes_in.fetch_add(bytes_in, Relaxed);
        self.bytes_out.fetch_add(bytes_out, Relaxed);
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS.partition_point(|bound| *bound < secs);
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
        self.touch();
    }

    /// Marks the instance active now.
    pub fn touch(&self) {
        self.last_activity_ms.store(unix_ms(), Relaxed);
    }

    /// The latency histogram as (upper bound, count in that bucket), and
    /// the sum and count of all requests.
    fn latency(&self) -> (Vec<(f64, u64)>, f64, u64) {
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.latency)
            .map(|(bound, n)| (bound, n.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.latency_sum_micros.load(Relaxed) as f64 / 1e6;
        (buckets, sum, count)
    }
}

/// What `/activity` says of each instance running here: the leader's
/// `on-idle` check reads it (the owner sees all of an instance's traffic,
/// also what other agents forwarded).
pub fn activity(table: &RouteTable) -> ActivityReport {
    let instances = table
        .by_host
        .values()
        .chain(table.by_port.values())
        .filter(|route| matches!(route.target, Target::Local(_)))
        .map(|route| {
            let t = &route.traffic;
            let open = u32::try_from(t.tcp_active.load(Relaxed)).unwrap_or(u32::MAX);
            (
                route.instance.clone(),
                InstanceActivity {
                    last_activity_ms: t.last_activity_ms.load(Relaxed),
                    open_connections: open,
                },
            )
        })
        .collect();
    ActivityReport {
        now_ms: unix_ms(),
        revision: table.revision,
        instances,
    }
}

/// Writes every instance's series (`tidegate_http_*`, `tidegate_tcp_*`
/// with an `instance` label, `tidegate_instance_last_activity_seconds`)
/// from the route table's current snapshot.
#[derive(Debug)]
pub struct TrafficCollector(pub SharedRoutes);

/// The per-instance counters: name (without `_total`), help, and the value.
type CounterOf = fn(&InstanceTraffic) -> &AtomicU64;
const COUNTERS: [(&str, &str, CounterOf); 6] = [
    (
        "tidegate_http_requests",
        "HTTP requests served, by instance",
        |t| &t.requests,
    ),
    (
        "tidegate_http_request_bytes",
        "Bytes of HTTP request bodies, by instance (pinned connections: every byte from the player, heads too)",
        |t| &t.bytes_in,
    ),
    (
        "tidegate_http_response_bytes",
        "Bytes of HTTP response bodies, by instance (pinned connections: every byte to the player, heads too)",
        |t| &t.bytes_out,
    ),
    (
        "tidegate_tcp_connections",
        "TCP connections accepted and spliced to the instance, by instance",
        |t| &t.tcp_connections,
    ),
    (
        "tidegate_tcp_received_bytes",
        "Bytes from players to the instance over TCP, by instance",
        |t| &t.tcp_bytes_in,
    ),
    (
        "tidegate_tcp_sent_bytes",
        "Bytes from the instance to players over TCP, by instance",
        |t| &t.tcp_bytes_out,
    ),
];

/// Every instance's traffic, by id.
type All<'a> = [(&'a str, &'a InstanceTraffic)];

impl Collector for TrafficCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let table = self.0.load();
        let mut seen = BTreeSet::new();
        let all: Vec<(&str, &InstanceTraffic)> = table
            .by_host
            .values()
            .chain(table.by_port.values())
            .filter(|r| seen.insert(r.instance.as_str()))
            .map(|r| (r.instance.as_str(), &*r.traffic))
            .collect();
        if all.is_empty() {
            return Ok(());
        }
        for (name, help, field) in COUNTERS {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (id, t) in &all {
                m.encode_family(&[("instance", *id)])?
                    .encode_counter::<NoLabelSet, _, u64>(&field(t).load(Relaxed), None)?;
            }
        }
        responses(&mut encoder, &all)?;
        latency(&mut encoder, &all)?;
        gauges(
            &mut encoder,
            "tidegate_tcp_active_connections",
            "TCP connections open now, by instance",
            &all,
            |t| t.tcp_active.load(Relaxed) as f64,
        )?;
        gauges(
            &mut encoder,
            "tidegate_instance_last_activity_seconds",
            "Unix time of the instance's last request or connection (0: none yet), by instance",
            &all,
            |t| t.last_activity_ms.load(Relaxed) as f64 / 1e3,
        )
    }
}

/// `tidegate_http_responses_total{instance, class}`.
fn responses(encoder: &mut DescriptorEncoder, all: &All<'_>) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(
        "tidegate_http_responses",
        "HTTP responses by status class, by instance",
        None,
        MetricType::Counter,
    )?;
    for (id, t) in all {
        for (i, n) in t.status.iter().enumerate() {
            let class = format!("{}xx", i + 1);
            m.encode_family(&[("instance", *id), ("class", class.as_str())])?
                .encode_counter::<NoLabelSet, _, u64>(&n.load(Relaxed), None)?;
        }
    }
    Ok(())
}

/// `tidegate_http_request_seconds{instance}`.
fn latency(encoder: &mut DescriptorEncoder, all: &All<'_>) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(
        "tidegate_http_request_seconds",
        "Time from a request's arrival to its response's end, by instance",
        None,
        MetricType::Histogram,
    )?;
    for (id, t) in all {
        let (buckets, sum, count) = t.latency();
        m.encode_family(&[("instance", *id)])?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

/// A gauge family with one series per instance.
fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    all: &All<'_>,
    value: impl Fn(&InstanceTraffic) -> f64,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (id, t) in all {
        m.encode_family(&[("instance", *id)])?
            .encode_gauge(&value(t))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_count_each_request_once() {
        let t = InstanceTraffic::default();
        t.request(200, 1, 2, Duration::from_micros(500));
        t.request(404, 1, 2, Duration::from_millis(30));
        t.request(503, 1, 2, Duration::from_secs(9));
        let (buckets, sum, count) = t.latency();
        assert_eq!(count, 3);
        assert!((sum - 9.0305).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (0.001, 1));
        assert_eq!(buckets[5], (0.05, 1));
        assert_eq!(buckets[10], (f64::INFINITY, 1));
        assert_eq!(t.status[0].load(Relaxed), 0);
        assert_eq!(t.status[1].load(Relaxed), 1);
        assert_eq!(t.status[3].load(Relaxed), 1);
        assert_eq!(t.status[4].load(Relaxed), 1);
    }
}
