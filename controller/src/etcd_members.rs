//! etcd's own view of its health, read from each member's Prometheus
//! endpoint every [`SCRAPE_EVERY`] and exported again by the controller as
//! `tidegate_controller_etcd_member_*{member="host:port"}`: how long the
//! write-ahead log's fsync and the backend's commit take (a slow disk),
//! leader changes, proposals failed and pending, whether the member has a
//! leader, its database size against its quota, and whether it could be
//! read at all (`etcd_member_up`).
//!
//! These are what tell an organizer that consensus is leaving its
//! envelope before spawns start failing: the alert rules in
//! `deploy/prometheus/tidegate-alerts.yml` are written against them. The
//! members' endpoints are plain HTTP (etcd's `--listen-metrics-urls`, or
//! its client URL when that is `http://`): numbers only, no keys.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

/// How often each member's endpoint is read.
pub const SCRAPE_EVERY: Duration = Duration::from_secs(10);
/// How long one read may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// A member's exposition is about 100 KiB; more is refused, not parsed.
const MAX_BODY: usize = 4 << 20;

/// How a kept family is exported.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Histogram,
    Counter,
    Gauge,
}

/// What is kept of a member's exposition: etcd's family, the name it is
/// exported under (after the `tidegate_controller_` prefix; counters gain
/// `_total`), its help and its kind.
const KEPT: [(&str, &str, &str, Kind); 9] = [
    (
        "etcd_disk_wal_fsync_duration_seconds",
        "etcd_member_wal_fsync_seconds",
        "etcd's write-ahead log fsync, per member (etcd_disk_wal_fsync_duration_seconds): a slow disk shows here first",
        Kind::Histogram,
    ),
    (
        "etcd_disk_backend_commit_duration_seconds",
        "etcd_member_backend_commit_seconds",
        "etcd's backend commit, per member (etcd_disk_backend_commit_duration_seconds)",
        Kind::Histogram,
    ),
    (
        "etcd_server_leader_changes_seen_total",
        "etcd_member_leader_changes",
        "Raft leader changes each member has seen (etcd_server_leader_changes_seen_total)",
        Kind::Counter,
    ),
    (
        "etcd_server_proposals_failed_total",
        "etcd_member_proposals_failed",
        "Raft proposals that failed, per member (etcd_server_proposals_failed_total)",
        Kind::Counter,
    ),
    (
        "etcd_server_proposals_pending",
        "etcd_member_proposals_pending",
        "Raft proposals waiting to commit, per member (etcd_server_proposals_pending)",
        Kind::Gauge,
    ),
    (
        "etcd_server_has_leader",
        "etcd_member_has_leader",
        "1 while the member knows a leader (etcd_server_has_leader)",
        Kind::Gauge,
    ),
    (
        "etcd_server_is_leader",
        "etcd_member_is_leader",
        "1 on the member that leads (etcd_server_is_leader)",
        Kind::Gauge,
    ),
    (
        "etcd_mvcc_db_total_size_in_bytes",
        "etcd_member_db_size_bytes",
        "The member's database file size (etcd_mvcc_db_total_size_in_bytes)",
        Kind::Gauge,
    ),
    (
        "etcd_server_quota_backend_bytes",
        "etcd_member_db_quota_bytes",
        "The database size at which the member refuses writes (etcd_server_quota_backend_bytes)",
        Kind::Gauge,
    ),
];

/// A histogram as read: cumulative buckets by upper bound.
#[derive(Debug, Default, Clone, PartialEq)]
struct Histo {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl Histo {
    /// Per-bucket counts, as the encoder wants them (it sums them again).
    fn deltas(&self) -> Vec<(f64, u64)> {
        let mut before = 0;
        let mut out = Vec::with_capacity(self.buckets.len());
        for &(le, cumulative) in &self.buckets {
            out.push((le, cumulative.saturating_sub(before)));
            before = before.max(cumulative);
        }
        out
    }
}

/// What one read of a member kept.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Sample {
    histograms: BTreeMap<&'static str, Histo>,
    values: BTreeMap<&'static str, f64>,
}

/// Reads the kept families out of Prometheus text; anything else, and any
/// line that does not parse, is skipped.
pub fn parse(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let mut parts = line.rsplitn(2, ' ');
        let (Some(value), Some(series)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (series, ""),
        };
        for &(family, _, _, kind) in &KEPT {
            match kind {
                Kind::Histogram => {
                    let Some(suffix) = name.strip_prefix(family).and_then(|r| r.strip_prefix('_'))
                    else {
                        continue;
                    };
                    let h = s.histograms.entry(family).or_default();
                    match suffix {
                        "sum" => h.sum = value,
                        "count" => h.count = value as u64,
                        "bucket" => {
                            if let Some(le) = label(labels, "le").and_then(|le| match le {
                                "+Inf" => Some(f64::INFINITY),
                                le => le.parse::<f64>().ok(),
                            }) {
                                h.buckets.push((le, value as u64));
                            }
                        }
                        _ => {}
                    }
                }
                Kind::Counter | Kind::Gauge if name == family => {
                    s.values.insert(family, value);
                }
                _ => {}
            }
        }
    }
    for h in s.histograms.values_mut() {
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    s.histograms.retain(|_, h| !h.buckets.is_empty());
    s
}

/// The value of label `key` in `a="x",b="y"` (values here have no quotes
/// or commas inside).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

/// Every member's last read (`None`: the last read failed), exported on
/// each scrape of the controller.
#[derive(Debug, Default)]
pub struct EtcdMembers {
    members: Mutex<BTreeMap<String, Option<Sample>>>,
}

impl EtcdMembers {
    fn set(&self, member: &str, sample: Option<Sample>) {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(member.to_string(), sample);
    }
}

impl Collector for EtcdMembers {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let members = self
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if members.is_empty() {
            return Ok(());
        }
        {
            let mut family = encoder.encode_descriptor(
                "etcd_member_up",
                "1 while the member's /metrics could be read at the last scrape (every 10 s)",
                None,
                MetricType::Gauge,
            )?;
            for (member, sample) in &members {
                let labels = [("member", member.as_str())];
                ConstGauge::new(i64::from(sample.is_some()))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        for &(from, name, help, kind) in &KEPT {
            let read: Vec<(&String, &Sample)> = members
                .iter()
                .filter_map(|(m, s)| Some((m, s.as_ref()?)))
                .filter(|(_, s)| match kind {
                    Kind::Histogram => s.histograms.contains_key(from),
                    _ => s.values.contains_key(from),
                })
                .collect();
            if read.is_empty() {
                continue;
            }
            let metric_type = match kind {
                Kind::Histogram => MetricType::Histogram,
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
            for (member, sample) in read {
                let labels = [("member", member.as_str())];
                let mut metric = family.encode_family(&labels)?;
                match kind {
                    Kind::Histogram => {
                        let h = &sample.histograms[from];
                        metric.encode_histogram::<NoLabelSet>(h.sum, h.count, &h.deltas(), None)?;
                    }
                    Kind::Counter => {
                        metric
                            .encode_counter::<NoLabelSet, f64, f64>(&sample.values[from], None)?;
                    }
                    Kind::Gauge => metric.encode_gauge(&sample.values[from])?,
                }
            }
        }
        Ok(())
    }
}

/// The member's name in the `member` label: the URL's `host:port`.
pub fn member_name(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// The endpoints to read: `etcd_metrics` when set (each with `/metrics`
/// added), else every plain-http etcd endpoint (etcd serves `/metrics` on
/// its client URL too). `https://` members need `etcd_metrics` (etcd's
/// `--listen-metrics-urls`).
pub fn endpoints(etcd: &[String], etcd_metrics: Option<&[String]>) -> Vec<String> {
    let with_path = |u: &String| format!("{}/metrics", u.trim_end_matches('/'));
    match etcd_metrics {
        Some(urls) => urls.iter().map(with_path).collect(),
        None => etcd
            .iter()
            .filter(|u| u.starts_with("http://"))
            .map(with_path)
            .collect(),
    }
}

/// Reads every member every [`SCRAPE_EVERY`] into `members`. Runs until
/// aborted; a member that cannot be read shows as `etcd_member_up 0`.
pub async fn run(urls: Vec<String>, members: Arc<EtcdMembers>) {
    if urls.is_empty() {
        tracing::info!(
            "etcd members' own metrics are not read: their endpoints are https; set etcd_metrics to their --listen-metrics-urls"
        );
        return;
    }
    let http = match reqwest::Client::builder().timeout(SCRAPE_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "no HTTP client to read etcd's metrics");
            return;
        }
    };
    let mut failing: BTreeMap<String, bool> = BTreeMap::new();
    loop {
        // All at once: an unreachable member costs its timeout, not the
        // others' reads.
        let mut reads = tokio::task::JoinSet::new();
        for url in &urls {
            let (http, url) = (http.clone(), url.clone());
            reads.spawn(async move {
                let read = scrape(&http, &url).await;
                (url, read)
            });
        }
        while let Some(Ok((url, read))) = reads.join_next().await {
            let url = &url;
            let was_failing = failing.insert(url.clone(), read.is_err()).unwrap_or(false);
            match read {
                Ok(sample) => {
                    if was_failing {
                        tracing::info!(%url, "etcd member's metrics readable again");
                    }
                    members.set(member_name(url), Some(sample));
                }
                Err(e) => {
                    if !was_failing {
                        tracing::warn!(%url, error = %e, "cannot read an etcd member's metrics");
                    }
                    members.set(member_name(url), None);
                }
            }
        }
        tokio::time::sleep(SCRAPE_EVERY).await;
    }
}

async fn scrape(http: &reqwest::Client, url: &str) -> Result<Sample, String> {
    let mut resp = http.get(url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    if resp.content_length().is_some_and(|l| l > MAX_BODY as u64) {
        return Err(format!("more than {MAX_BODY} bytes"));
    }
    // Read chunk by chunk, so that an endpoint streaming without end is
    // cut at the limit, not held in memory.
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!("more than {MAX_BODY} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    let sample = parse(&String::from_utf8_lossy(&body));
    if sample.histograms.is_empty() && sample.values.is_empty() {
        return Err("no etcd series in the answer (is this etcd's /metrics?)".into());
    }
    Ok(sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETCD: &str = "\
# HELP etcd_disk_wal_fsync_duration_seconds The latency distributions of fsync called by WAL.
# TYPE etcd_disk_wal_fsync_duration_seconds histogram
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.001\"} 5
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"0.002\"} 9
etcd_disk_wal_fsync_duration_seconds_bucket{le=\"+Inf\"} 10
etcd_disk_wal_fsync_duration_seconds_sum 0.75
etcd_disk_wal_fsync_duration_seconds_count 10
etcd_server_has_leader 1
etcd_server_leader_changes_seen_total 2
etcd_server_proposals_pending 0
etcd_server_proposals_failed_total_not_this 7
go_goroutines 93
garbage line
";

    #[test]
    fn parse_keeps_the_named_families_only() {
        let s = parse(ETCD);
        let h = &s.histograms["etcd_disk_wal_fsync_duration_seconds"];
        assert_eq!(h.count, 10);
        assert_eq!(h.sum, 0.75);
        assert_eq!(h.buckets, vec![(0.001, 5), (0.002, 9), (f64::INFINITY, 10)]);
        assert_eq!(h.deltas(), vec![(0.001, 5), (0.002, 4), (f64::INFINITY, 1)]);
        assert_eq!(s.values["etcd_server_has_leader"], 1.0);
        assert_eq!(s.values["etcd_server_leader_changes_seen_total"], 2.0);
        assert!(!s.values.contains_key("etcd_server_proposals_failed_total"));
        assert_eq!(s.values.len(), 3);
        assert_eq!(s.histograms.len(), 1);
    }

    #[test]
    fn the_export_is_valid_text_with_one_series_per_member() {
        let m = EtcdMembers::default();
        m.set("127.0.0.1:2379", Some(parse(ETCD)));
        m.set("127.0.0.1:2479", None);
        let mut r = prometheus_client::registry::Registry::with_prefix("tidegate_controller");
        r.register_collector(Box::new(Arc::new(m)));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &r).unwrap_or_default();
        for line in [
            "tidegate_controller_etcd_member_up{member=\"127.0.0.1:2379\"} 1",
            "tidegate_controller_etcd_member_up{member=\"127.0.0.1:2479\"} 0",
            "tidegate_controller_etcd_member_wal_fsync_seconds_count{member=\"127.0.0.1:2379\"} 10",
            "tidegate_controller_etcd_member_wal_fsync_seconds_bucket{member=\"127.0.0.1:2379\",le=\"0.002\"} 9",
            "tidegate_controller_etcd_member_leader_changes_total{member=\"127.0.0.1:2379\"} 2.0",
            "# TYPE tidegate_controller_etcd_member_wal_fsync_seconds histogram",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(!text.contains("member=\"127.0.0.1:2479\"} 1"), "{text}");
    }

    #[test]
    fn endpoints_come_from_the_config_or_the_plain_http_members() {
        let etcd = [
            "http://127.0.0.1:2379/".to_string(),
            "https://e:2379".into(),
        ];
        assert_eq!(endpoints(&etcd, None), ["http://127.0.0.1:2379/metrics"]);
        let given = ["http://10.0.1.10:2381".to_string()];
        assert_eq!(
            endpoints(&etcd, Some(&given)),
            ["http://10.0.1.10:2381/metrics"]
        );
        assert!(endpoints(&etcd, Some(&[])).is_empty());
        assert_eq!(
            member_name("http://10.0.1.10:2381/metrics"),
            "10.0.1.10:2381"
        );
    }
}
