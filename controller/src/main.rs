//! `tidegate-controller`: the REST API and (when elected) the scheduler.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tidegate_controller::config::{Cli, load};
use tidegate_controller::{App, api, etcd_members, policy, scheduler, serve, view};
use tidegate_schema::config::ControllerConfig;

/// Exit status for a configuration error (sysexits EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cfg = match load(Cli::parse()) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("tidegate-controller: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Files the config names are read when used; an unreadable one stops
    // the start here, named.
    if let Some(path) = &cfg.scrape_token_file
        && let Err(e) = tidegate_schema::config::read_secret_file("scrape_token_file", path, 16)
    {
        eprintln!("tidegate-controller: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidegate-controller: cannot start the runtime: {e}");
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

async fn run(cfg: ControllerConfig) -> anyhow::Result<()> {
    let client =
        tidegate_etcd::connect(&cfg.etcd, cfg.etcd_tls.as_ref(), cfg.etcd_auth.as_ref()).await?;
    let listener = tokio::net::TcpListener::bind(cfg.listen).await?;
    let app = Arc::new(App::new(cfg, client)?);
    tracing::info!(id = %app.cfg.id, listen = %app.cfg.listen, etcd = ?app.cfg.etcd, "tidegate-controller starting");
    let tasks = [
        tokio::spawn(view::run(
            app.client.clone(),
            app.ks.clone(),
            app.view.clone(),
            app.metrics.etcd.clone(),
        )),
        tokio::spawn(tidegate_etcd::probe_etcd(
            app.client.clone(),
            app.ks.election_name(),
            app.metrics.etcd.clone(),
        )),
        tokio::spawn(etcd_members::run(
            etcd_members::endpoints(&app.cfg.etcd, app.cfg.etcd_metrics.as_deref()),
            app.metrics.etcd_members.clone(),
        )),
        tokio::spawn(app.shards.clone().run(app.client.clone(), app.ks.clone())),
        tokio::spawn(scheduler::run_sweeps(app.clone())),
        tokio::spawn(tidegate_controller::rollout::run(app.clone())),
        tokio::spawn(api::run_admissions(app.clone())),
        tokio::spawn(api::run_pools(app.clone())),
        tokio::spawn(policy::run_idle_checks(app.clone())),
        tokio::spawn(tidegate_etcd::prune_dead_members(
            app.client.clone(),
            app.cfg.etcd.clone(),
        )),
    ];
    let result = serve::serve(listener, api::router(app.clone()), app.clone(), shutdown()).await;
    for t in tasks {
        t.abort();
    }
    // Hand the shards over at once instead of after the lease TTL.
    // (Also when leading none: the registration goes with the lease, so
    // the others stop counting this replica in the share-out.)
    let led = app.leads_any();
    app.shards.resign(&app.client).await;
    if led {
        tracing::info!("resigned as scheduler");
    }
    result?;
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
