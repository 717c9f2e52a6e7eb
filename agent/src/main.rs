//! `tidegate-agent`: runs this worker's instances.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tidegate_agent::metrics::Metrics;
use tidegate_agent::reconcile::Reconciler;
use tidegate_agent::runtime::Runtime;
use tidegate_agent::tcp::TcpOptions;
use tidegate_agent::{Cli, Config, membership};
use tidegate_schema::{Keyspace, V1, WorkerRecord};

// The proxy allocates per request (header maps, buffers); with glibc's
// malloc, allocation and free were a fifth of the agent's CPU time under
// `cargo xtask bench http` (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a configuration error (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cfg = match Config::load(Cli::parse()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("tidegate-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging();
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
            ExitCode::FAILURE
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

async fn run(cfg: Config) -> anyhow::Result<()> {
    let worker = cfg.worker()?;
    let ks = Keyspace::new(&cfg.key_root)?;
    let client =
        tidegate_schema::connect::connect(&cfg.etcd, cfg.etcd_tls.as_ref(), cfg.etcd_auth.as_ref())
            .await?;
    let pruner = tokio::spawn(tidegate_schema::endpoints::prune_dead_endpoints(
        client.clone(),
        cfg.etcd.clone(),
    ));
    let runtime = Runtime::connect(&cfg)
        .await
        .with_context(|| format!("connecting to Docker at {}", cfg.docker_socket))?;
    runtime
        .ensure_networks()
        .await
        .context("creating the instance networks")?;
    let metrics = Arc::new(Metrics::default());
    let etcd_probe = tokio::spawn(tidegate_schema::telemetry::probe_etcd(
        client.clone(),
        ks.key(&tidegate_schema::Key::Worker(worker.clone())),
        metrics.etcd.clone(),
    ));
    let forward_from = forward_from(cfg.advertise_address);
    // eBPF loads (or the fallback is chosen) before anything is served.
    let tcp = Arc::new(tidegate_agent::tcp::TcpPlane::prepare(TcpOptions {
        host: cfg.tcp_host,
        forward_from,
        steering: cfg.tcp_steering,
        data_path: cfg.tcp_data_path,
        pipe_bytes: cfg.tcp_pipe_bytes,
        tls: match (cfg.tls_tcp_entry, &cfg.tls_cert, &cfg.tls_key) {
            (Some(entry), Some(cert), Some(key)) => Some((entry, cert.clone(), key.clone())),
            _ => None,
        },
    })?);
    let routes_for_metrics: tidegate_agent::routes::SharedRoutes = Arc::default();
    let plugin_host = tidegate_plugin_host::Host::new(tidegate_plugin_host::Limits {
        deadline: Duration::from_millis(cfg.plugin_deadline_ms),
        memory_bytes: cfg.plugin_memory_mib * 1024 * 1024,
        ..tidegate_plugin_host::Limits::default()
    })
    .context("starting the policy plugin engine")?;
    let store = tidegate_plugin_host::DirStore::new(&cfg.artifact_dir)
        .map_err(|e| anyhow::anyhow!("artifact_dir: {e}"))?;
    let policy = Arc::new(tidegate_agent::policy::PluginPolicy::new(
        plugin_host,
        Arc::new(store),
    ));

    let listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("metrics_listen {}", cfg.metrics_listen))?;
    let m = metrics.clone();
    let table = routes_for_metrics.clone();
    let tcp_metrics = tcp.clone();
    let policy_metrics = policy.clone();
    let activity_table = routes_for_metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let (m, table, tcp, policy) = (
                    m.clone(),
                    table.clone(),
                    tcp_metrics.clone(),
                    policy_metrics.clone(),
                );
                async move {
                    let table = table.load();
                    let mut body = m.render(table.revision);
                    tcp.render_metrics(&mut body);
                    policy.render_metrics(&mut body);
                    tidegate_agent::metrics::render_routes(&mut body, &table);
                    ([("content-type", "text/plain; version=0.0.4")], body)
                }
            }),
        )
        .route(
            "/activity",
            axum::routing::get(move || {
                let table = activity_table.clone();
                async move { axum::Json(tidegate_agent::stats::activity(&table.load())) }
            }),
        );
    let metrics_server = tokio::spawn(async move { axum::serve(listener, app).await });

    let record = WorkerRecord {
        v: V1,
        id: worker.clone(),
        address: cfg.advertise_address,
        http_entry: cfg.http_entry,
        tcp_host: cfg.tcp_host,
        capacity: cfg.capacity,
        metrics: cfg.activity_address(),
        version: env!("CARGO_PKG_VERSION").into(),
        started_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let (lease_tx, lease_rx) = tokio::sync::watch::channel(0i64);
    let membership = tokio::spawn(membership::run(
        client.clone(),
        ks.clone(),
        record,
        cfg.membership_ttl_secs,
        metrics.clone(),
        lease_tx,
    ));
    tracing::info!(worker = %worker, etcd = ?cfg.etcd, "tidegate-agent starting");
    if cfg.activity_address().is_none() {
        tracing::warn!(metrics_listen = %cfg.metrics_listen, advertise_address = %cfg.advertise_address,
            "metrics_listen is loopback: the leader cannot read this worker's /activity, so on-idle policies keep its instances; listen on an address the controllers reach (e.g. 0.0.0.0:9464)");
    }

    let routes = routes_for_metrics.clone();
    let (builds, builds_rx) = tokio::sync::watch::channel(0u64);
    let (wanted_tx, wanted_rx) = tokio::sync::watch::channel(Arc::default());
    let routes_task = tokio::spawn(tidegate_agent::routes::run(
        client.clone(),
        ks.clone(),
        worker.clone(),
        routes.clone(),
        builds,
        wanted_tx,
        metrics.etcd.clone(),
    ));
    let policy_task = tokio::spawn(policy.clone().run(wanted_rx));
    let policy: Arc<dyn tidegate_agent::policy::EdgePolicy> = policy;
    let proxy = start_proxy(
        &cfg,
        routes.clone(),
        worker.to_string(),
        forward_from,
        policy.clone(),
    )?;
    let tcp_task = tokio::spawn(tcp.run(routes, builds_rx, policy));

    let reconciler = Reconciler::new(
        client.clone(),
        ks,
        worker,
        runtime,
        metrics,
        cfg.max_restarts,
    );
    reconciler
        .run(Duration::from_millis(cfg.reconcile_interval_ms), shutdown())
        .await;

    // Clean shutdown: leave the cluster at once; containers keep running
    // and are adopted when the agent comes back.
    membership.abort();
    pruner.abort();
    etcd_probe.abort();
    metrics_server.abort();
    routes_task.abort();
    policy_task.abort();
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

/// The Pingora server, on its own threads; stopped on shutdown.
struct Proxy {
    stop: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Pingora's shutdown signal: our own channel instead of Unix signals.
struct StopSignal(tokio::sync::watch::Receiver<bool>);

#[async_trait::async_trait]
impl pingora::server::ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
        pingora::server::ShutdownSignal::FastShutdown
    }
}

/// `advertise_address` if it is an address of this host: connections and
/// requests forwarded to other agents are sent from it, so the owner can
/// tell them from players' (see `tcp::hop`).
fn forward_from(advertise: std::net::IpAddr) -> Option<std::net::IpAddr> {
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

fn start_proxy(
    cfg: &Config,
    routes: tidegate_agent::routes::SharedRoutes,
    me: String,
    forward_from: Option<std::net::IpAddr>,
    policy: Arc<dyn tidegate_agent::policy::EdgePolicy>,
) -> anyhow::Result<Proxy> {
    use pingora::server::configuration::ServerConf;
    use tidegate_agent::http::{EdgeProxy, HttpLimits};
    let conf = ServerConf {
        threads: cfg.http_threads,
        ..ServerConf::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let proxy = EdgeProxy {
        routes,
        me,
        forward_from,
        limits: HttpLimits {
            max_body_bytes: cfg.max_body_bytes,
            max_header_bytes: cfg.max_header_bytes,
            connect_timeout: Duration::from_millis(cfg.upstream_connect_timeout_ms),
            read_timeout: Duration::from_millis(cfg.upstream_read_timeout_ms),
        },
        policy,
    };
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, proxy);
    // Bind now so a taken port fails the start with a clear error.
    std::net::TcpListener::bind(cfg.http_entry)
        .with_context(|| format!("http_entry {}", cfg.http_entry))?;
    service.add_tcp(&cfg.http_entry.to_string());
    if let (Some(addr), Some(cert), Some(key)) = (cfg.https_entry, &cfg.tls_cert, &cfg.tls_key) {
        let mut tls = pingora::listeners::tls::TlsSettings::intermediate(
            &cert.display().to_string(),
            &key.display().to_string(),
        )
        .map_err(|e| anyhow::anyhow!("TLS certificate {}: {e}", cert.display()))?;
        tls.enable_h2();
        service.add_tls_with_settings(&addr.to_string(), None, tls);
    }
    server.add_service(service);
    let (tx, rx) = tokio::sync::watch::channel(false);
    std::thread::Builder::new()
        .name("pingora".into())
        .spawn(move || {
            server.run(pingora::server::RunArgs {
                shutdown_signal: Box::new(StopSignal(rx)),
            })
        })?;
    tracing::info!(http = %cfg.http_entry, https = ?cfg.https_entry, "HTTP proxy listening");
    Ok(Proxy { stop: tx })
}
