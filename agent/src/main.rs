//! `tidegate-agent`: runs this worker's instances.

use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tidegate_agent::config::{Cli, load};
use tidegate_agent::hop::Hops;
use tidegate_agent::hostnet::Firewall;
use tidegate_agent::http::guard::{ConnLimits, Connections};
use tidegate_agent::membership::ClaimError;
use tidegate_agent::metrics::Metrics;
use tidegate_agent::policy::{EdgePolicy, PluginPolicy};
use tidegate_agent::reconcile::{HostChecks, Reconciler};
use tidegate_agent::routes::SharedRoutes;
use tidegate_agent::runtime::Runtime;
use tidegate_agent::tcp::{TcpOptions, TcpPlane};
use tidegate_agent::{membership, metrics};
use tidegate_schema::config::AgentConfig;
use tidegate_schema::{Key, Keyspace, V1, WorkerId, WorkerRecord};

mod proxy;

// The proxy allocates per request (header maps, buffers); with glibc's
// malloc, allocation and free were a fifth of the agent's CPU time under
// `cargo xtask bench http` (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration error (sysexits EX_USAGE), and for a
/// `worker_id` a live agent holds.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cfg = match load(Cli::parse()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("tidegate-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging();
    if let Ok(planted) = std::env::var("TIDEGATE_PLANTED")
        && cfg!(debug_assertions)
    {
        tracing::warn!(%planted, "defences switched off for the red team's positive controls (debug build, TIDEGATE_PLANTED)");
    }
    raise_open_files();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidegate-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            match e.downcast_ref::<ClaimError>() {
                Some(ClaimError::Held { .. }) => ExitCode::from(EXIT_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Lifts the soft open-file limit to the hard one: every held player
/// connection costs up to four descriptors (two sockets, and a pipe per
/// direction on the splice path), and the default soft limit (1,024 or
/// 20,000) would cap a worker far below its connection caps.
fn raise_open_files() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let was = limit.current;
        limit.current = limit.maximum;
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => tracing::debug!(?was, now = ?limit.maximum, "open-file limit raised"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("TIDEGATE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let worker = cfg.worker()?;
    let ks = Keyspace::new(&cfg.key_root)?;
    let client =
        tidegate_etcd::connect(&cfg.etcd, cfg.etcd_tls.as_ref(), cfg.etcd_auth.as_ref()).await?;
    // Before anything touches Docker or the network: a second agent with a
    // live worker's id stops here.
    let record = worker_record(&cfg, &worker);
    let first_lease = membership::claim(
        &mut client.clone(),
        &ks.key(&Key::Worker(worker.clone())),
        &record,
        cfg.membership_ttl_secs,
        None,
    )
    .await?;
    let mut runtime = Runtime::connect(&cfg)
        .await
        .with_context(|| format!("connecting to Docker at {}", cfg.docker_socket))?;
    runtime
        .ensure_networks()
        .await
        .context("creating the instance networks")?;
    let metrics = Arc::new(Metrics::default());
    let firewall = host_firewall(&cfg, &runtime, &metrics).await;
    let refusal = host_root(&cfg, &runtime).await;
    let forward_from = forward_from(cfg.advertise_address);
    let hops = Arc::new(hop_key(&cfg, &worker)?);
    // eBPF loads (or the fallback is chosen) before anything is served.
    let tcp = Arc::new(TcpPlane::prepare(tcp_options(&cfg, forward_from))?);
    let wanted = tidegate_agent::policy::PolicyFeed::default();
    let policy = Arc::new(plugin_policy(&cfg, wanted.clone())?);
    let routes: SharedRoutes = Arc::default();
    let http = Arc::new(Connections::new(ConnLimits {
        header_timeout: Duration::from_millis(cfg.http_header_timeout_ms),
        write_stall: Duration::from_millis(cfg.upstream_read_timeout_ms),
        max_header_bytes: cfg.max_header_bytes,
        max_connections: cfg.http_max_connections,
        max_connections_per_source: cfg.http_max_connections_per_source,
    }));
    let scrape = metrics::Scrape {
        public: metrics::registry(&metrics, &routes, &tcp, &policy, &hops, &http, false),
        full: metrics::registry(&metrics, &routes, &tcp, &policy, &hops, &http, true),
        routes: routes.clone(),
        token: scrape_token(&cfg)?,
    };
    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("metrics_listen {}", cfg.metrics_listen))?;
    let (lease_tx, lease_rx) = tokio::sync::watch::channel(0i64);
    let (builds, builds_rx) = tokio::sync::watch::channel(0u64);
    let (networks_tx, networks_rx) = tokio::sync::watch::channel(None);
    let tasks = [
        tokio::spawn(tidegate_etcd::prune_dead_members(
            client.clone(),
            cfg.etcd.clone(),
        )),
        tokio::spawn(tidegate_etcd::probe_etcd(
            client.clone(),
            ks.key(&Key::Worker(worker.clone())),
            metrics.etcd.clone(),
        )),
        tokio::spawn(metrics::serve(metrics_listener, scrape)),
        tokio::spawn(membership::run(
            client.clone(),
            ks.clone(),
            record,
            cfg.membership_ttl_secs,
            metrics.clone(),
            lease_tx,
            first_lease,
            networks_rx,
        )),
        tokio::spawn(tidegate_agent::routes::run(
            client.clone(),
            ks.clone(),
            worker.clone(),
            cfg.tcp_port_range()?,
            routes.clone(),
            builds,
            wanted,
            metrics.etcd.clone(),
        )),
        tokio::spawn(policy.clone().run()),
    ];
    tracing::info!(worker = %worker, etcd = ?cfg.etcd, "tidegate-agent starting");
    if cfg.activity_address().is_none() {
        tracing::warn!(metrics_listen = %cfg.metrics_listen, advertise_address = %cfg.advertise_address,
            "metrics_listen is loopback: the leader cannot read this worker's /activity, so on-idle policies keep its instances; listen on an address the controllers reach (e.g. 0.0.0.0:9464)");
    }
    let policy: Arc<dyn EdgePolicy> = policy;
    let proxy = proxy::start(
        &cfg,
        routes.clone(),
        forward_from,
        policy.clone(),
        hops.clone(),
        http,
        builds_rx.clone(),
    )?;
    let tcp_task = tokio::spawn(tcp.run(routes, builds_rx, policy, hops));
    let reconciler = Reconciler::new(
        client.clone(),
        ks,
        worker,
        runtime,
        metrics,
        cfg.max_restarts,
        HostChecks { firewall, refusal },
    )
    .reporting_networks_to(networks_tx)
    .with_concurrency(cfg.reconcile_concurrency);
    reconciler
        .run(Duration::from_millis(cfg.reconcile_interval_ms), shutdown())
        .await;

    // Clean shutdown: leave the cluster at once; containers keep running
    // and are adopted when the agent comes back.
    for t in tasks {
        t.abort();
    }
    tcp_task.abort();
    proxy.stop();
    let lease = *lease_rx.borrow();
    if lease != 0 {
        let _ = client.clone().lease_revoke(lease).await;
        tracing::info!("deregistered");
    }
    Ok(())
}

async fn shutdown() {
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

/// The host firewall of the instance networks (`hostnet`), or none with
/// `allow_host_access`. Rules other agents on this host keep are left as
/// they are (only the red team's positive control takes them out).
async fn host_firewall(
    cfg: &AgentConfig,
    runtime: &Runtime,
    metrics: &Metrics,
) -> Option<Firewall> {
    let bridges = runtime.bridges();
    let mut fw = Firewall {
        bridges: bridges.values().cloned().collect(),
        egress_bridges: bridges
            .get(&cfg.egress_network)
            .cloned()
            .into_iter()
            .collect(),
        egress_deny: cfg.egress_deny.clone(),
    };
    fw.bridges.sort();
    let [internal, egress] = tidegate_agent::runtime::INSTANCE_BRIDGE_PREFIXES;
    fw.bridges
        .extend([format!("{internal}+"), format!("{egress}+")]);
    fw.egress_bridges.push(format!("{egress}+"));
    if cfg.allow_host_access {
        tracing::warn!(bridges = ?fw.bridges, "allow_host_access: this agent keeps no firewall; unless another agent on this host does, instances can open connections to this host's addresses (its daemons, etcd) and egress instances to egress_deny");
        if tidegate_schema::config::planted("firewall") {
            fw.remove().await;
        }
        metrics.set_host_firewall(true);
        return None;
    }
    Some(fw)
}

/// Why no instance may start here when the Docker engine runs container
/// root as host root (no `userns-remap`) and the config does not say
/// `allow_host_root`; `None` when instances may start.
async fn host_root(cfg: &AgentConfig, runtime: &Runtime) -> Option<String> {
    match runtime.remaps_root().await {
        Ok(true) => None,
        Ok(false) if cfg.allow_host_root => {
            tracing::warn!(
                "allow_host_root: the Docker engine does not remap container root (userns-remap), so root in an instance is root on this host once it escapes"
            );
            None
        }
        Ok(false) => {
            let why = "this worker's Docker engine does not remap container root (userns-remap): root in an instance would be root on the host. Configure userns-remap (cargo xtask setup and deploy do) or set allow_host_root = true";
            tracing::error!("{why}; starting no instance");
            Some(why.to_string())
        }
        Err(e) => {
            let why = format!("cannot ask the Docker engine whether it remaps container root: {e}");
            tracing::error!("{why}; starting no instance");
            Some(why)
        }
    }
}

/// This worker's membership record.
fn worker_record(cfg: &AgentConfig, worker: &WorkerId) -> WorkerRecord {
    WorkerRecord {
        v: V1,
        id: worker.clone(),
        address: cfg.advertise_address,
        http_entry: cfg.http_entry,
        tcp_host: cfg.tcp_host,
        capacity: cfg.capacity,
        allocatable: Some(tidegate_agent::resources::allocatable(
            cfg,
            tidegate_agent::resources::Host::read(),
        )),
        metrics: cfg.activity_address(),
        networks: None,
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: tidegate_schema::time::unix_secs(),
    }
}

/// The TCP data plane's settings.
fn tcp_options(cfg: &AgentConfig, forward_from: Option<IpAddr>) -> TcpOptions {
    TcpOptions {
        host: cfg.tcp_host,
        forward_from,
        steering: cfg.tcp_steering,
        data_path: cfg.tcp_data_path,
        pipe_bytes: cfg.tcp_pipe_bytes,
        max_per_source: cfg.tcp_max_connections_per_source,
        max_per_instance: cfg.tcp_max_connections_per_instance,
        tls: match (cfg.tls_tcp_entry, &cfg.tls_cert, &cfg.tls_key) {
            (Some(entry), Some(cert), Some(key)) => Some((entry, cert.clone(), key.clone())),
            _ => None,
        },
    }
}

/// The cluster's hop key (`hop_key_file`), or one of this agent's own.
fn hop_key(cfg: &AgentConfig, worker: &WorkerId) -> anyhow::Result<Hops> {
    match &cfg.hop_key_file {
        Some(path) => Hops::from_file(path, worker.as_str()).map_err(anyhow::Error::msg),
        None => {
            tracing::warn!(
                "no hop_key_file: requests and connections other agents forward here are served as players' (the edge policy is asked again, with the forwarding agent's address as the source); set the same key file on every agent"
            );
            Hops::random(worker.as_str()).map_err(anyhow::Error::msg)
        }
    }
}

/// The scrape token (`scrape_token_file`), if set.
fn scrape_token(cfg: &AgentConfig) -> anyhow::Result<Option<Vec<u8>>> {
    match &cfg.scrape_token_file {
        Some(path) => tidegate_schema::config::read_secret_file("scrape_token_file", path, 16)
            .map(Some)
            .map_err(anyhow::Error::msg),
        None => {
            tracing::warn!(
                "no scrape_token_file: /metrics serves no per-instance series and /activity answers 401, so on-idle policies keep this worker's instances"
            );
            Ok(None)
        }
    }
}

/// The edge policies: the plugin engine and the artifact store.
fn plugin_policy(
    cfg: &AgentConfig,
    wanted: tidegate_agent::policy::PolicyFeed,
) -> anyhow::Result<PluginPolicy> {
    let host = tidegate_plugin_host::Host::new(tidegate_plugin_host::Limits {
        deadline: Duration::from_millis(cfg.plugin_deadline_ms),
        memory_bytes: cfg.plugin_memory_mib * 1024 * 1024,
        // Edge calls run on the decision pool's threads, bounded by its CPU
        // share: on a busy host a well-behaved call waits there, and the
        // pool's queue (not this bound) keeps players from waiting long.
        stall_after: Some(Duration::from_secs(1)),
        // A call that runs to its deadline lets the proxy and the
        // instances in every millisecond.
        yield_each_tick: true,
        ..tidegate_plugin_host::Limits::default()
    })
    .context("starting the policy plugin engine")?;
    let store = tidegate_plugin_host::DirStore::new(&cfg.artifact_dir)
        .map_err(|e| anyhow::anyhow!("artifact_dir: {e}"))?;
    let limits = tidegate_agent::policy::EdgeLimits {
        threads: cfg.edge_policy_threads,
        queue: cfg.edge_policy_queue,
        cpu_share: cfg.edge_policy_cpu_share,
        cache_ttl: Duration::from_millis(cfg.edge_decision_cache_ms),
    };
    PluginPolicy::new(host, Arc::new(store), limits, wanted)
        .context("starting the edge policy threads")
}

/// `advertise_address` if it is an address of this host: connections and
/// requests forwarded to other agents are sent from it, so the owner can
/// tell them from players' (see `tcp::hop`).
fn forward_from(advertise: IpAddr) -> Option<IpAddr> {
    match std::net::TcpListener::bind((advertise, 0)) {
        Ok(_) => Some(advertise),
        Err(e) => {
            tracing::warn!(
                %advertise, error = %e,
                "advertise_address is not an address of this host (NAT?): connections forwarded to other agents leave from the kernel's choice, so the owning agent takes them for players' (it asks the edge policy again and cannot stop a forwarding loop)"
            );
            None
        }
    }
}
