//! `tidegate-agent`: runs this worker's instances.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tidegate_agent::metrics::Metrics;
use tidegate_agent::reconcile::Reconciler;
use tidegate_agent::runtime::Runtime;
use tidegate_agent::{Cli, Config, membership};
use tidegate_schema::{Keyspace, V1, WorkerRecord};

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
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
    let client = etcd_client::Client::connect(&cfg.etcd, Some(options)).await?;
    let runtime = Runtime::connect(&cfg)
        .await
        .with_context(|| format!("connecting to Docker at {}", cfg.docker_socket))?;
    runtime
        .ensure_networks()
        .await
        .context("creating the instance networks")?;
    let metrics = Arc::new(Metrics::default());

    let listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("metrics_listen {}", cfg.metrics_listen))?;
    let m = metrics.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = m.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
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
    metrics_server.abort();
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
