//! `cargo xtask`: everything the project needs beyond `cargo build`.
//!
//! Each subcommand is a module; `--help` on any of them says what it does.

mod bench;
#[path = "../../ebpf/build_ebpf.rs"]
mod build_ebpf;
mod chaos;
mod ci;
mod cluster;
mod deploy;
mod redteam;
mod setup;
mod sh;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "tidegate project automation", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install and start everything the project needs on a fresh Debian
    /// machine (packages, Rust toolchains and targets, bpf-linker, a Docker
    /// engine on 198.18.0.0/15, bpffs, the demo images). Idempotent: a second
    /// run changes nothing and says so.
    Setup,
    /// Build the eBPF programs (ebpf/programs: nightly, -Z build-std=core,
    /// bpfel-unknown-none, bpf-linker) into <target dir>/ebpf and print the
    /// object's path. The agent's build script runs the same build.
    BuildEbpf,
    /// Build the policy plugins (plugins/: the examples and the test
    /// fixtures, with the SDK) for wasm32-unknown-unknown, wrap each into a
    /// component with no WASI imports, and print the path of each component
    /// written (<target dir>/plugins/components/<name>.wasm). Build-time
    /// settings of the examples come from the environment (see each
    /// example's docs, e.g. `IDLE_REAPER_SECS=600`).
    BuildPlugins,
    /// Start a cluster: `deploy local` on this machine, or `deploy
    /// --inventory FILE` on real hosts over SSH (`--dry-run` prints every
    /// step; a second run with nothing changed is a no-op; `--down [--purge]`).
    Deploy(deploy::DeployArgs),
    /// The fault-injection suite: 3 etcd members, 2 controllers and 3
    /// agents on their own network namespaces under a steady load; kills,
    /// pauses, quorum loss, a partition and a compaction, one per phase;
    /// then the invariant check. Prints a table per phase and
    /// `violations: N`; fails on any violation or unexpected failure.
    Chaos(chaos::ChaosArgs),
    /// What CI runs: setup, `cargo fmt --check`, `cargo clippy --all-targets
    /// -- -D warnings`, the whole test suite against real components, then
    /// `cargo xtask chaos --short`.
    Ci(ci::CiArgs),
    /// Run benchmarks and regenerate their sections of docs/benchmarks.md:
    /// `http` (vs nginx and HAProxy), `tcp` (vs direct loopback and HAProxy,
    /// each data path), `plugins` (policy call cost, spawn decisions/s),
    /// `routes` (route propagation and spawn → routable with a 3-member
    /// etcd, 10,000-instance resync and agent RSS).
    /// `--short`: one round of about a second each with the debug build,
    /// nothing written (what `cargo xtask ci` runs).
    Bench(bench::BenchArgs),
    /// Attack a local cluster with production settings the way players
    /// would (from inside instances, from the network, with a stolen worker
    /// credential): one row per attack, `attacks: N tried, M succeeded`,
    /// and a failure if any succeeded. `--planted <defence>` switches one
    /// defence off and checks its attacks then succeed; `--controls` does
    /// that for every defence (docs/security.md).
    Redteam(redteam::RedteamArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run().map(|_| ()),
        Command::BuildEbpf => build_ebpf(),
        Command::BuildPlugins => build_plugins(),
        Command::Deploy(args) => deploy::run(args),
        Command::Chaos(args) => chaos::run(args),
        Command::Ci(args) => ci::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Redteam(args) => redteam::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn build_ebpf() -> Result<()> {
    let root = workspace_root();
    let target = target_dir();
    let object =
        build_ebpf::build(&root.join("ebpf"), &target.join("ebpf")).map_err(anyhow::Error::msg)?;
    println!("{}", object.display());
    Ok(())
}

fn build_plugins() -> Result<()> {
    let root = workspace_root();
    let target = target_dir();
    let built = tidegate_local::plugins::build(&root.join("plugins"), &target.join("plugins"), &[])
        .map_err(anyhow::Error::msg)?;
    for b in built {
        println!("{}", b.component.display());
    }
    Ok(())
}

/// The cargo target dir: `CARGO_TARGET_DIR`, else `<workspace>/target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The workspace root (the folder holding the top-level Cargo.toml).
fn workspace_root() -> PathBuf {
    // `cargo xtask` (cargo run) sets it at run time: prefer that to the
    // build-time value, which is another checkout's when two checkouts
    // share one target dir (CI's clone and a working copy do).
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}
