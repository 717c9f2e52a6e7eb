//! The agent's configuration: the TOML file (`AgentConfig`, shared with
//! the tools that write it), then environment, then flags. `validate()`
//! runs before anything starts; a bad value exits 64 naming the field.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use tidegate_schema::config::{AgentConfig, ConfigError, ConfigFile, DataPath, Steering};

/// Command line; every flag also reads `TIDEGATE_<NAME>` and overrides the file.
#[derive(Debug, Parser)]
#[command(
    name = "tidegate-agent",
    version,
    about = "tidegate data plane: runs this worker's instances"
)]
pub struct Cli {
    /// TOML config file (fields as in deploy/agent.toml).
    #[arg(long, env = "TIDEGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This worker's id (a DNS label).
    #[arg(long, env = "TIDEGATE_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Address other agents use to reach this one.
    #[arg(long, env = "TIDEGATE_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<IpAddr>,
    /// The HTTP entry point players' requests arrive on.
    #[arg(long, env = "TIDEGATE_HTTP_ENTRY")]
    pub http_entry: Option<SocketAddr>,
    /// The address whose ports the TCP data plane serves.
    #[arg(long, env = "TIDEGATE_TCP_HOST")]
    pub tcp_host: Option<IpAddr>,
    /// How many instances this worker runs at most.
    #[arg(long, env = "TIDEGATE_CAPACITY")]
    pub capacity: Option<u32>,
    /// etcd client URLs, comma-separated.
    #[arg(long, env = "TIDEGATE_ETCD", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// Where the Prometheus metrics are served.
    #[arg(long, env = "TIDEGATE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// How TCP connections reach the agent: auto (eBPF, else listeners), ebpf, listeners.
    #[arg(long, env = "TIDEGATE_TCP_STEERING")]
    pub tcp_steering: Option<Steering>,
    /// How TCP bytes move: splice (default), sockhash (in-kernel, opt-in), copy.
    #[arg(long, env = "TIDEGATE_TCP_DATA_PATH")]
    pub tcp_data_path: Option<DataPath>,
    /// Directory of policy plugin blobs (the controllers' artifact store).
    #[arg(long, env = "TIDEGATE_ARTIFACT_DIR")]
    pub artifact_dir: Option<PathBuf>,
    /// File with the cluster's hop key (the same on every agent).
    #[arg(long, env = "TIDEGATE_HOP_KEY_FILE")]
    pub hop_key_file: Option<PathBuf>,
}

/// The file (or the defaults), then the flags and environment variables
/// that were given, validated.
pub fn load(cli: Cli) -> Result<AgentConfig, ConfigError> {
    let mut cfg = match &cli.config {
        Some(path) => AgentConfig::from_file(path)?,
        None => AgentConfig::default(),
    };
    macro_rules! overlay {
        ($($f:ident),*) => { $( if let Some(v) = cli.$f { cfg.$f = v; } )* };
    }
    overlay!(
        worker_id,
        advertise_address,
        http_entry,
        tcp_host,
        capacity,
        etcd,
        metrics_listen,
        tcp_steering,
        tcp_data_path,
        artifact_dir
    );
    if let Some(path) = cli.hop_key_file {
        cfg.hop_key_file = Some(path);
    }
    cfg.validate()?;
    Ok(cfg)
}
