//! The TCP data plane: every instance's public port on the agent's
//! `tcp_host`, spliced to the instance (here, or on the owning agent).
//!
//! Steering — how a connection reaches the agent:
//! - eBPF (`ebpf`): an `sk_lookup` program hands connections on allocated
//!   ports to one listening socket; the route table is mirrored into a BPF
//!   map after every swap, so a port opens or closes the moment the map
//!   changes and nothing is bound per port.
//! - Listeners (`listeners`): one bound listener per port, rebound after
//!   every route-table swap. Used when eBPF cannot load (no CAP_BPF) or when
//!   configured.
//!
//! Data paths — how bytes move once a connection is paired with its backend:
//! `splice` (default: splice(2) through a pipe per direction, bytes never
//! copied to userspace), `sockhash` (in-kernel `sk_skb` redirect; opt-in,
//! see docs/architecture.md "TCP data paths" for why), `copy` (tokio copy).
//! Each forwards half-close and resets and releases everything on close.

mod copy;
pub mod ebpf;
mod error;
pub mod hop;
pub mod listeners;
mod relay;
pub mod sockhash;
pub mod splice;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

pub use error::{Result, TcpError};
pub use relay::Relay;
pub(crate) use relay::{connect_from, idle};
pub use tidegate_schema::config::{DataPath, Steering};

use crate::policy::EdgePolicy;
use crate::routes::SharedRoutes;

/// Accept queue of the TCP listeners (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// How long connecting to an instance (or its owning agent) may take.
/// Covers three lost SYNs (resent after 1, 3 and 7 s): a challenge whose
/// small accept queue overflows under a burst still gets the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the TCP data plane is given.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    pub host: IpAddr,
    /// This agent's registered address, when it is one of this host's:
    /// connections it forwards to other agents come from it, which is how
    /// they know them (see [`hop`]).
    pub forward_from: Option<IpAddr>,
    pub steering: Steering,
    pub data_path: DataPath,
    /// Pipe size per direction of the splice path, in bytes.
    pub pipe_bytes: usize,
    /// Open connections at most from one player address, and to one instance.
    pub max_per_source: u32,
    pub max_per_instance: u32,
    /// `tls_tcp_entry` with `tls_cert` and `tls_key`.
    pub tls: Option<(SocketAddr, std::path::PathBuf, std::path::PathBuf)>,
}

/// The TCP data plane, prepared: eBPF loaded (or the fallback chosen).
#[derive(Debug)]
pub struct TcpPlane {
    opts: TcpOptions,
    data_path: DataPath,
    redirector: Option<Arc<ebpf::Redirector>>,
    failures: Arc<Failures>,
    tls: std::sync::Mutex<Option<tls::Entry>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

/// Accepted connections that ended without being served, or in an error
/// (`tidegate_tcp_failed_connections_total{stage}`): one counter handle
/// per stage, so counting one is an atomic add.
#[derive(Debug)]
struct Failures {
    family: Family<StageLabel, Counter>,
    /// The port has no route any more, or its instance is not ready.
    not_ready: Counter,
    /// Connecting to the instance (or its owning agent) failed or timed out.
    connect: Counter,
    /// Moving bytes failed: a reset or an error on either side.
    transfer: Counter,
    /// Another agent forwarded it here, and this agent would forward it
    /// again: the tables disagree on the owner, or two workers are
    /// registered with one address.
    loops: Counter,
    /// The TLS handshake on `tls_tcp_entry` failed or timed out.
    tls: Counter,
    /// Closed at accept: the player's address held `max_per_source` already.
    per_source: Counter,
    /// Closed at accept: the instance had `max_per_instance` open already.
    per_instance: Counter,
    /// Closed after the challenge's `tcp_idle_timeout_secs` without a byte.
    idle: Counter,
}

impl Default for Failures {
    fn default() -> Self {
        let family = Family::<StageLabel, Counter>::default();
        let stage = |stage| family.get_or_create_owned(&StageLabel { stage });
        Self {
            not_ready: stage("not_ready"),
            connect: stage("connect"),
            transfer: stage("transfer"),
            loops: stage("loop"),
            tls: stage("tls"),
            per_source: stage("max_per_source"),
            per_instance: stage("max_per_instance"),
            idle: stage("idle_timeout"),
            family,
        }
    }
}

impl TcpPlane {
    /// Loads the eBPF programs unless steering is `listeners`. Fails only
    /// when `steering = ebpf` and they cannot load; with `auto` one log
    /// line says why eBPF is not used and the listeners take over.
    pub fn prepare(opts: TcpOptions) -> Result<Self> {
        let redirector = match opts.steering {
            Steering::Listeners => None,
            Steering::Ebpf | Steering::Auto => {
                match ebpf::Redirector::load(opts.host, opts.data_path == DataPath::Sockhash) {
                    Ok(r) => Some(Arc::new(r)),
                    Err(e) if opts.steering == Steering::Auto => {
                        tracing::warn!(
                            error = %e,
                            "eBPF TCP steering unavailable; falling back to one listener per instance port"
                        );
                        None
                    }
                    Err(e) => return Err(TcpError::new("tcp_steering = ebpf", e)),
                }
            }
        };
        let tls = match &opts.tls {
            Some((entry, cert, key)) => Some(tls::Entry::bind(*entry, cert, key)?),
            None => None,
        };
        let mut data_path = opts.data_path;
        if data_path == DataPath::Sockhash && redirector.is_none() {
            tracing::warn!("tcp_data_path sockhash needs eBPF; using splice");
            data_path = DataPath::Splice;
        }
        Ok(Self {
            opts,
            data_path,
            redirector,
            failures: Arc::default(),
            tls: std::sync::Mutex::new(tls),
        })
    }

    /// Serves TCP until `builds` closes.
    pub async fn run(
        self: Arc<Self>,
        routes: SharedRoutes,
        builds: tokio::sync::watch::Receiver<u64>,
        policy: Arc<dyn EdgePolicy>,
        hops: Arc<crate::hop::Hops>,
    ) -> Result<()> {
        let host = self.opts.host;
        let relay = Arc::new(Relay {
            routes: routes.clone(),
            policy,
            data_path: self.data_path,
            pipe_bytes: self.opts.pipe_bytes,
            redirector: self.redirector.clone(),
            failures: self.failures.clone(),
            forward_from: self.opts.forward_from,
            hops,
            limits: relay::Limits {
                per_source: self.opts.max_per_source,
                per_instance: self.opts.max_per_instance,
            },
            sources: Arc::default(),
        });
        let entry = self.tls.lock().ok().and_then(|mut t| t.take());
        let tls_task = entry.map(|entry| {
            let relay = relay.clone();
            tokio::spawn(async move {
                if let Err(e) = tls::serve(entry, relay).await {
                    tracing::error!(error = %e, "tls_tcp_entry stopped");
                }
            })
        });
        let served = match &self.redirector {
            Some(r) => {
                tracing::info!(%host, data_path = %self.data_path, "TCP ports steered by eBPF sk_lookup");
                ebpf::serve(r.clone(), host, relay, routes, builds).await
            }
            None => {
                tracing::info!(%host, data_path = %self.data_path, "TCP ports served by one listener each");
                listeners::run(host, relay, routes, builds).await;
                Ok(())
            }
        };
        if let Some(t) = tls_task {
            t.abort();
        }
        served
    }

    /// Registers `tidegate_tcp_*` (in the `tidegate_tcp` prefix registry).
    pub fn register(&self, registry: &mut Registry) {
        let steering = Gauge::<i64>::default();
        steering.set(i64::from(self.redirector.is_some()));
        registry.register(
            "ebpf_steering",
            "1 if eBPF sk_lookup steers the TCP ports, 0 with one listener per port",
            steering,
        );
        registry.register(
            "data_path",
            "The TCP data path in use",
            Info::new(vec![("path".to_string(), self.data_path.to_string())]),
        );
        registry.register(
            "failed_connections",
            "Accepted connections not served (no route or instance not ready; connecting to the instance failed; forwarded by another agent and to be forwarded again: loop) or ended in an error (transfer)",
            self.failures.family.clone(),
        );
        if let Some(r) = &self.redirector {
            registry.register_collector(Box::new(KernelMaps {
                redirector: r.clone(),
                sockhash: self.data_path == DataPath::Sockhash,
            }));
        }
    }
}

/// The eBPF maps' contents, read from the kernel when `/metrics` is read.
#[derive(Debug)]
struct KernelMaps {
    redirector: Arc<ebpf::Redirector>,
    sockhash: bool,
}

impl Collector for KernelMaps {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), std::fmt::Error> {
        let r = &self.redirector;
        let steered = i64::try_from(r.steered_ports().len()).unwrap_or(i64::MAX);
        let m = encoder.encode_descriptor(
            "steered_ports",
            "Ports in the BPF port map, read from the kernel",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(steered).encode(m)?;
        if !self.sockhash {
            return Ok(());
        }
        let (spliced, refused) = r.spliced_pairs();
        let mut m = encoder.encode_descriptor(
            "sockhash_pairs",
            "Connections spliced in the kernel, and those it refused (served by splice(2))",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in [("spliced", spliced), ("refused", refused)] {
            ConstCounter::new(n).encode(m.encode_family(&[("result", result)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "sockhash_entries",
            "Entries of the in-kernel splice maps, read from the kernel",
            None,
            MetricType::Gauge,
        )?;
        let ids = r.spliced_map_ids();
        for (map, n) in ["PAIRS", "TARGETS", "PEERS"]
            .into_iter()
            .zip(r.spliced_entries())
        {
            let id = ids
                .iter()
                .find(|(name, _)| *name == map)
                .map_or(0, |(_, id)| *id)
                .to_string();
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            ConstGauge::new(n).encode(m.encode_family(&[("map", map), ("id", id.as_str())])?)?;
        }
        Ok(())
    }
}
