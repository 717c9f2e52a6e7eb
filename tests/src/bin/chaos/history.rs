//! What a chaos run records: every API call with its answer, every
//! data-plane probe, every change etcd made (from the run's own watch),
//! every fault with its window, and each phase's end state. The checker
//! works only from this record.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};
use serde_json::Value;
use tidegate_schema::{Keyspace, Kind};

/// Seconds since the run started.
pub(crate) type Secs = f64;

/// An API operation of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Op {
    Spawn,
    Renew,
    Delete,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::Spawn => "spawn",
            Op::Renew => "renew",
            Op::Delete => "delete",
        }
    }
}

/// One API call and its final answer.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub(crate) at: Secs,
    pub(crate) took: Secs,
    pub(crate) op: Op,
    /// The controller that made the answer (index): the one asked, or the
    /// scheduler a standby forwarded it to.
    pub(crate) controller: usize,
    pub(crate) instance: Option<String>,
    /// HTTP status; 599 when no answer came (refused, reset, timed out).
    pub(crate) status: u16,
    pub(crate) body: Value,
}

impl Call {
    /// Whether the outcome is unknown or a server-side failure (the request
    /// may or may not have taken effect).
    pub(crate) fn failed(&self) -> bool {
        self.status >= 500
    }
}

/// What a probe through an agent's public entry point got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The instance itself answered (HTTP 200 with the demo page, or the
    /// TCP echo came back).
    Served,
    /// HTTP 404 from the agent: no route for that hostname.
    NotRouted,
    /// Another HTTP answer: the agent had a route but the instance did not
    /// serve (502, 503, 504...).
    Routed(u16),
    /// No answer (refused, reset, timed out, wrong echo).
    Failed(String),
}

/// One data-plane request.
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub(crate) at: Secs,
    pub(crate) took: Secs,
    pub(crate) agent: usize,
    pub(crate) instance: String,
    pub(crate) tcp: bool,
    pub(crate) outcome: Outcome,
}

/// One change etcd committed, as the run's own watch saw it.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) at: Secs,
    pub(crate) revision: i64,
    pub(crate) key: String,
    pub(crate) create_revision: i64,
    /// The value put, or `None` for a delete.
    pub(crate) value: Option<Vec<u8>>,
}

/// What a fault hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Controller(usize),
    Etcd(Vec<usize>),
    /// The agent process or all of its host's traffic.
    Agent(usize),
    /// Only the agent's connections to etcd.
    AgentEtcdLink(usize),
    /// An etcd member that is up but silent: paused, or its replies
    /// dropped (3: the controllers' lossy link losing answers).
    EtcdStalled(usize),
    /// An etcd member cut off from the others (the minority side of a
    /// partition). The daemons' clients require a leader, so the member
    /// refuses them and cancels their watches a few election timeouts in;
    /// until then an agent whose watch was there learns late.
    EtcdMinority(usize),
    /// A controller whose wall clock is this many seconds off (libfaketime):
    /// the expiries it grants are that much later than its leases end them.
    /// Explains no failure by itself.
    ControllerClock(usize, i64),
    /// An agent whose wall clock is this many seconds off. Explains no
    /// failure by itself (its restarts are faults of their own).
    AgentClock(usize, i64),
}

/// One injected fault and the window it lasted.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    pub(crate) phase: usize,
    pub(crate) what: String,
    pub(crate) target: Target,
    pub(crate) from: Secs,
    pub(crate) to: Secs,
}

/// The end of a phase: whether Docker, etcd and the agents' route tables
/// agreed once the load paused, and etcd's state then.
#[derive(Debug, Clone)]
pub(crate) struct Settle {
    pub(crate) phase: usize,
    pub(crate) at: Secs,
    /// Empty when everything agreed; else what did not, at the last look.
    pub(crate) disagreements: Vec<String>,
    pub(crate) revision: i64,
    pub(crate) live_instances: usize,
}

/// One phase's span.
#[derive(Debug, Clone)]
pub(crate) struct Phase {
    pub(crate) name: String,
    pub(crate) from: Secs,
    pub(crate) to: Secs,
}

/// Everything a run recorded.
#[derive(Debug, Default)]
pub(crate) struct History {
    /// Unix time at `Secs` 0.
    pub(crate) start_unix: f64,
    pub(crate) calls: Vec<Call>,
    pub(crate) probes: Vec<Probe>,
    pub(crate) events: Vec<Event>,
    pub(crate) faults: Vec<Fault>,
    pub(crate) settles: Vec<Settle>,
    pub(crate) phases: Vec<Phase>,
    /// Controller index → its id (the election key's value).
    pub(crate) controller_ids: Vec<String>,
    /// Agent index → worker id.
    pub(crate) workers: Vec<String>,
    /// Problems of the run itself (e.g. its watch fell behind compaction).
    pub(crate) harness_errors: Vec<String>,
    /// The TCP packets the daemons' hosts sent to the etcd members' client
    /// port (requests, stream messages, connection attempts), summed over
    /// members and sampled every second: the load they put on etcd.
    pub(crate) etcd_requests: Vec<(Secs, f64)>,
    /// Faults during which that load is compared with the baseline phase's
    /// (slow disk, quorum loss): retrying clients must not multiply it.
    pub(crate) rate_checked: Vec<usize>,
}

/// The run's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    start: Instant,
    pub(crate) start_unix: f64,
}

impl Clock {
    pub(crate) fn new() -> Self {
        let unix = tidegate_schema::time::unix_ms() as f64 / 1000.0;
        Self {
            start: Instant::now(),
            start_unix: unix,
        }
    }

    pub(crate) fn now(&self) -> Secs {
        self.start.elapsed().as_secs_f64()
    }
}

/// What the recorder knows about one instance, for the load and the probes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Known {
    pub(crate) challenge: String,
    /// Empty while it waits in its challenge's pool.
    pub(crate) team: String,
    pub(crate) worker: String,
    pub(crate) hostname: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) expires_at: u64,
    /// When its endpoint first said `running`.
    pub(crate) running_since: Option<Secs>,
    /// When its record was deleted.
    pub(crate) ended: Option<Secs>,
}

/// Applies one instance or status event to `known`.
pub(crate) fn learn(known: &mut BTreeMap<String, Known>, event: &Event) {
    let Some((kind, id)) = split_key(&event.key) else {
        return;
    };
    match (kind, &event.value) {
        ("instances", Some(v)) => {
            let Ok(rec) = serde_json::from_slice::<Value>(v) else {
                return;
            };
            let k = known.entry(id.to_string()).or_default();
            let team = rec["team"].as_str().unwrap_or_default().to_string();
            if k.team.is_empty() && !team.is_empty() {
                // A pooled instance claimed: routed again once its agent
                // has written the team's flag and reports it running.
                k.running_since = None;
            }
            k.challenge = rec["challenge"].as_str().unwrap_or_default().to_string();
            k.team = team;
            k.worker = rec["worker"].as_str().unwrap_or_default().to_string();
            k.hostname = rec["http"][0]["hostname"].as_str().map(String::from);
            k.port = rec["tcp"][0]["port"]
                .as_u64()
                .and_then(|p| p.try_into().ok());
            k.expires_at = rec["expires_at"].as_u64().unwrap_or_default();
            k.ended = None;
        }
        ("instances", None) => {
            if let Some(k) = known.get_mut(id) {
                k.ended = Some(event.at);
            }
        }
        ("status", Some(v)) => {
            if let Some(k) = known.get_mut(id)
                && status_running(v)
                && k.running_since.is_none()
            {
                k.running_since = Some(event.at);
            }
        }
        _ => {}
    }
}

/// Whether a status record says its container runs.
pub(crate) fn status_running(value: &[u8]) -> bool {
    // `"status": {"state": "running"}` (schema::InstanceStatus)
    serde_json::from_slice::<Value>(value)
        .is_ok_and(|e| e["status"]["state"].as_str() == Some("running"))
}

/// An instance's key or its status key (`status/{worker}/{id}`) →
/// (`instances` or `status`, id). Ids are taken as they are (the checker's
/// tests use short ones).
pub(crate) fn split_key(key: &str) -> Option<(&'static str, &str)> {
    let ks = Keyspace::default();
    if let Some(id) = key.strip_prefix(&ks.prefix(Kind::Instances)) {
        return Some(("instances", id));
    }
    let rest = key.strip_prefix(&ks.prefix(Kind::Statuses))?;
    rest.split_once('/').map(|(_, id)| ("status", id))
}

/// Watches every key under the key root from revision 1 and hands each
/// change to `sink`, resuming after errors from the next unseen revision.
/// A compaction past the next revision is a harness error (reported once).
pub(crate) async fn record_etcd(
    client: Client,
    clock: Clock,
    mut sink: impl FnMut(Event),
    mut harness_error: impl FnMut(String),
) {
    let mut next = 1;
    loop {
        let options = WatchOptions::new().with_prefix().with_start_revision(next);
        let root = Keyspace::default().root_prefix();
        let mut stream = match client.clone().watch(root, Some(options)).await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                _ => break,
            };
            if resp.compact_revision() > 0 {
                harness_error(format!(
                    "the run's own watch fell behind compaction (wanted {next}, compacted to {})",
                    resp.compact_revision()
                ));
                next = resp.compact_revision();
                break;
            }
            if resp.canceled() {
                break;
            }
            let at = clock.now();
            for e in resp.events() {
                let Some(kv) = e.kv() else { continue };
                next = next.max(kv.mod_revision() + 1);
                sink(Event {
                    at,
                    revision: kv.mod_revision(),
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    create_revision: kv.create_revision(),
                    value: match e.event_type() {
                        EventType::Put => Some(kv.value().to_vec()),
                        EventType::Delete => None,
                    },
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Counts, in each etcd member's host, the TCP packets the daemons'
/// hosts send to its client port: requests, stream messages, keep-alives
/// and connection attempts (a refused one too). Rules of the `mangle`
/// table without a target only count; [`NetnsHost::heal`] flushes the
/// `filter` table, and the counts outlive a killed member.
///
/// [`NetnsHost::heal`]: tidegate_lab::netns::NetnsHost::heal
pub(crate) fn count_etcd_packets(
    member: &tidegate_lab::netns::NetnsHost,
    daemons: &[std::net::Ipv4Addr],
) -> Result<(), String> {
    for d in daemons {
        let d = d.to_string();
        member
            .exec(&[
                "iptables",
                "-w",
                "-t",
                "mangle",
                "-A",
                "PREROUTING",
                "-p",
                "tcp",
                "-s",
                &d,
                "--dport",
                "2379",
            ])
            .map_err(|e| format!("counting packets to etcd: {e}"))?;
    }
    Ok(())
}

/// The packets the counting rules of [`count_etcd_packets`] saw, summed,
/// from `iptables -L -v -x -n` output.
pub(crate) fn counted(listing: &str) -> f64 {
    listing
        .lines()
        .filter(|l| l.contains("dpt:2379"))
        .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .sum()
}

/// Reads the counts of every member's host (network namespaces `netns`)
/// each second and calls `sample` with the time and their sum (a host
/// that cannot be read adds what it had last). Runs until aborted.
pub(crate) async fn sample_etcd_requests(
    netns: Vec<String>,
    clock: Clock,
    mut sample: impl FnMut(Secs, f64),
) {
    let mut last: BTreeMap<String, f64> = BTreeMap::new();
    loop {
        for ns in &netns {
            let out = tokio::process::Command::new("ip")
                .args(["netns", "exec", ns, "iptables", "-w", "-t", "mangle"])
                .args(["-L", "PREROUTING", "-v", "-x", "-n"])
                .output()
                .await;
            if let Ok(out) = out
                && out.status.success()
            {
                last.insert(ns.clone(), counted(&String::from_utf8_lossy(&out.stdout)));
            }
        }
        sample(clock.now(), last.values().sum());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counted_sums_the_packets_of_the_counting_rules() {
        let listing = "\
Chain PREROUTING (policy ACCEPT 9120 packets, 1170302 bytes)
    pkts      bytes target     prot opt in     out     source               destination
    1200   130000            tcp  --  *      *       198.18.128.10        0.0.0.0/0            tcp dpt:2379
      34     4000            tcp  --  *      *       198.18.128.14        0.0.0.0/0            tcp dpt:2379
";
        assert_eq!(super::counted(listing), 1234.0);
        assert_eq!(super::counted(""), 0.0);
    }
}
