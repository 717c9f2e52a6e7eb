//! `cargo xtask ci`: what CI runs, in order, stopping at the first failure
//! (the test suite runs to its end before stopping, as does the chaos run):
//! setup, fmt, clippy, the test suite, every benchmark in its short form,
//! the fault-injection suite, the red team (every attack, then every
//! defence's positive control).

use std::process::Command;

use anyhow::Result;

use crate::{setup, sh, workspace_root};

#[derive(Debug, clap::Args)]
pub(crate) struct CiArgs {
    /// Skip `cargo xtask setup` (for a machine that is known to be set up).
    #[arg(long)]
    skip_setup: bool,
}

pub(crate) fn run(args: CiArgs) -> Result<()> {
    let root = workspace_root();
    if !args.skip_setup {
        println!("== setup");
        setup::run()?;
    }
    println!("== cargo fmt --check");
    sh::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["fmt", "--all", "--check"]),
    )?;
    println!("== cargo clippy --all-targets -- -D warnings");
    sh::run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The policy plugins' guest workspace (wasm32): the same rules.
    let plugins = root.join("plugins");
    let target = crate::target_dir();
    println!("== plugins/: cargo fmt --check, cargo clippy (wasm32-unknown-unknown)");
    sh::run(
        Command::new("cargo")
            .current_dir(&plugins)
            .args(["fmt", "--all", "--check"]),
    )?;
    sh::run(
        Command::new("cargo")
            .current_dir(&plugins)
            .args(["clippy", "--locked", "--target", "wasm32-unknown-unknown"])
            .arg("--target-dir")
            .arg(target.join("plugins-clippy"))
            .args(["--", "-D", "warnings"]),
    )?;
    println!("== tests (cargo nextest, real etcd, Docker and netns)");
    sh::run(Command::new("cargo").current_dir(&root).args([
        "nextest",
        "run",
        "--workspace",
        "--no-fail-fast",
    ]))?;
    // Every benchmark, one short round with the debug build the tests
    // used: a change that breaks one fails here. Speed is not asserted.
    println!("== bench --short: every benchmark once, figures not asserted");
    crate::bench::run(crate::bench::BenchArgs::short())?;
    // The fault-injection suite, short phases (the binaries are built: the
    // tests above needed them).
    println!("== chaos (short): faults under load, invariant check");
    sh::run(
        Command::new(target.join("debug/chaos"))
            .arg("--short")
            .arg("--out")
            .arg(target.join("chaos-ci")),
    )?;
    println!("== redteam: every attack (none may succeed), then every positive control");
    crate::redteam::run(crate::redteam::RedteamArgs::all())?;
    crate::redteam::run(crate::redteam::RedteamArgs::controls())?;
    Ok(())
}
