//! The controller's configuration: the TOML file (`ControllerConfig`,
//! shared with the tools that write it), then environment, then flags.
//!
//! `validate()` runs before anything starts; a bad value exits 64 with the
//! field named (`tcp_ports: 30000-20000 is empty`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use tidegate_schema::config::{ConfigError, ConfigFile, ControllerConfig};

/// Command line; every flag also reads `TIDEGATE_<NAME>` from the environment
/// and overrides the same field of the `--config` file.
#[derive(Debug, Parser)]
#[command(
    name = "tidegate-controller",
    version,
    about = "tidegate control plane: REST API and elected scheduler"
)]
pub struct Cli {
    /// TOML config file (fields as in deploy/controller.toml).
    #[arg(long, env = "TIDEGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// This replica's id, shown in `GET /v1/status` (default: the hostname).
    #[arg(long, env = "TIDEGATE_ID")]
    pub id: Option<String>,
    /// Address the REST API listens on.
    #[arg(long, env = "TIDEGATE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// URL other replicas and clients use to reach this one (default: http://{listen}).
    #[arg(long, env = "TIDEGATE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// etcd client URLs, comma-separated.
    #[arg(long, env = "TIDEGATE_ETCD", value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// Wildcard domain of instance hostnames.
    #[arg(long, env = "TIDEGATE_DOMAIN")]
    pub domain: Option<String>,
    /// Admin (organizer) bearer token.
    #[arg(long, env = "TIDEGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Platform (CTF platform) bearer token.
    #[arg(long, env = "TIDEGATE_PLATFORM_TOKEN", hide_env_values = true)]
    pub platform_token: Option<String>,
    /// Secret the per-instance flags are derived from (at least 16 bytes).
    #[arg(long, env = "TIDEGATE_FLAG_SECRET", hide_env_values = true)]
    pub flag_secret: Option<String>,
    /// Port players use for HTTP instances (in the `url` of answers).
    #[arg(long, env = "TIDEGATE_PUBLIC_HTTP_PORT")]
    pub public_http_port: Option<u16>,
    /// Directory of policy plugin blobs (shared with the agents).
    #[arg(long, env = "TIDEGATE_ARTIFACT_DIR")]
    pub artifact_dir: Option<PathBuf>,
}

/// The file (or the defaults), then the flags and environment variables
/// that were given, validated.
pub fn load(cli: Cli) -> Result<ControllerConfig, ConfigError> {
    let mut cfg = match &cli.config {
        Some(path) => ControllerConfig::from_file(path)?,
        None => ControllerConfig::default(),
    };
    macro_rules! overlay {
        ($($f:ident),*) => { $( if let Some(v) = cli.$f { cfg.$f = v; } )* };
    }
    overlay!(
        id,
        listen,
        etcd,
        domain,
        admin_token,
        platform_token,
        flag_secret,
        public_http_port,
        artifact_dir
    );
    if cli.advertise_url.is_some() {
        cfg.advertise_url = cli.advertise_url;
    }
    cfg.validate()?;
    Ok(cfg)
}
