//! `cargo xtask deploy`: a cluster on this machine (`local`) or on the
//! hosts of an inventory over SSH (`--inventory FILE`).

mod inventory;
mod local;

use std::path::PathBuf;

use anyhow::{Result, bail};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct DeployArgs {
    #[command(subcommand)]
    target: Option<Target>,
    /// Deploy to the hosts of this inventory over SSH (see deploy/README.md
    /// and deploy/inventory.example.toml).
    #[arg(long, value_name = "FILE")]
    inventory: Option<PathBuf>,
    #[command(flatten)]
    remote: inventory::InventoryArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Target {
    /// A local cluster: 1 etcd member, the controller, two agents with
    /// distinct addresses.
    Local(local::LocalArgs),
}

pub(crate) fn run(args: DeployArgs) -> Result<()> {
    match (&args.target, &args.inventory) {
        (Some(Target::Local(local)), _) => local::run(local),
        (None, Some(inventory)) => inventory::run(inventory, &args.remote),
        (None, None) => bail!(
            "say where: `cargo xtask deploy local` (this machine) or `cargo xtask deploy --inventory FILE` (hosts over SSH)"
        ),
    }
}

/// The demo challenges every cluster starts with (local, and from an
/// inventory with `demo = true`).
pub(crate) const DEMO_CHALLENGES: [(&str, &str); 3] = [
    (
        "demo-http",
        r#"{"image": "tidegate/demo-http:2", "ports": [{"name": "web", "port": 8080, "protocol": "http"}]}"#,
    ),
    (
        "demo-tcp",
        r#"{"image": "tidegate/demo-tcp:1", "ports": [{"name": "echo", "port": 1337, "protocol": "tcp"}]}"#,
    ),
    // An app, its db and an admin bot on a network of their own per instance.
    ("demo-web-bot", tidegate_local::images::DEMO_WEB_BOT_SPEC),
];
