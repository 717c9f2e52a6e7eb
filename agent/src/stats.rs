//! Per-instance traffic counters, updated on the request path with atomics
//! only, and the last time each instance saw traffic (for idle policies).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the request latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Debug, Default)]
pub struct InstanceStats {
    pub requests: AtomicU64,
    /// Responses by class: 1xx..5xx at index 0..4.
    pub status: [AtomicU64; 5],
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    /// Unix time in milliseconds of the last request or connection.
    pub last_activity_ms: AtomicU64,
    /// TCP connections accepted and spliced to the instance.
    pub tcp_connections: AtomicU64,
    /// TCP connections open now.
    pub tcp_active: AtomicU64,
    /// Bytes from players to the instance over TCP.
    pub tcp_bytes_in: AtomicU64,
    /// Bytes from the instance to players over TCP.
    pub tcp_bytes_out: AtomicU64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl InstanceStats {
    /// Records one finished request.
    pub fn request(&self, status: u16, bytes_in: u64, bytes_out: u64, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if (100..600).contains(&status) {
            self.status[usize::from(status / 100 - 1)].fetch_add(1, Ordering::Relaxed);
        }
        self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.touch();
    }

    /// Marks the instance active now.
    pub fn touch(&self) {
        self.last_activity_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Appends this instance's series to a Prometheus text body.
    pub fn render(&self, out: &mut String, instance: &str) {
        let l = format!("instance=\"{instance}\"");
        let _ = writeln!(
            out,
            "tidegate_http_requests_total{{{l}}} {}",
            self.requests.load(Ordering::Relaxed)
        );
        for (i, n) in self.status.iter().enumerate() {
            let _ = writeln!(
                out,
                "tidegate_http_responses_total{{{l},class=\"{}xx\"}} {}",
                i + 1,
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "tidegate_http_request_bytes_total{{{l}}} {}",
            self.bytes_in.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "tidegate_http_response_bytes_total{{{l}}} {}",
            self.bytes_out.load(Ordering::Relaxed)
        );
        for (bound, n) in LATENCY_BUCKETS.iter().zip(&self.latency) {
            let _ = writeln!(
                out,
                "tidegate_http_request_seconds_bucket{{{l},le=\"{bound}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "tidegate_http_request_seconds_bucket{{{l},le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "tidegate_http_request_seconds_sum{{{l}}} {}",
            self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "tidegate_http_request_seconds_count{{{l}}} {count}");
        for (name, n) in [
            ("tidegate_tcp_connections_total", &self.tcp_connections),
            ("tidegate_tcp_active_connections", &self.tcp_active),
            ("tidegate_tcp_received_bytes_total", &self.tcp_bytes_in),
            ("tidegate_tcp_sent_bytes_total", &self.tcp_bytes_out),
        ] {
            let _ = writeln!(out, "{name}{{{l}}} {}", n.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "tidegate_instance_last_activity_seconds{{{l}}} {}",
            self.last_activity_ms.load(Ordering::Relaxed) as f64 / 1e3
        );
    }
}

/// What `/activity` says of each instance running here: the leader's
/// `on-idle` check reads it (the owner sees all of an instance's traffic,
/// also what other agents forwarded).
pub fn activity(table: &crate::routes::RouteTable) -> serde_json::Value {
    let mut instances = serde_json::Map::new();
    for route in table.by_host.values().chain(table.by_port.values()) {
        if !matches!(route.target, crate::routes::Target::Local(_)) {
            continue;
        }
        instances.insert(
            route.instance.to_string(),
            serde_json::json!({
                "last_activity_ms": route.stats.last_activity_ms.load(Ordering::Relaxed),
                "open_connections": route.stats.tcp_active.load(Ordering::Relaxed),
            }),
        );
    }
    serde_json::json!({ "now_ms": now_ms(), "revision": table.revision, "instances": instances })
}
