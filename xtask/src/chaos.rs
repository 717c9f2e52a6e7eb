//! `cargo xtask chaos`: the fault-injection suite (tests/src/bin/chaos).
//!
//! Builds the binaries (debug), makes sure the machine is set up, and runs
//! `chaos` as root: 3 etcd members, 2 controllers and 3 agents on their own
//! network namespaces, one fault per phase under load, then the invariant
//! check. `--planted <bug>` first builds a deliberately broken controller
//! and agent (a copy of the source with one known change, in its own
//! target dir) and succeeds only if the suite reports violations.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{setup, sh, target_dir, workspace_root};

#[derive(Debug, clap::Args)]
pub(crate) struct ChaosArgs {
    /// Shorter phases (3–4 minutes in all): what `cargo xtask ci` runs.
    #[arg(long)]
    short: bool,
    /// Run against a build with a planted bug and expect violations:
    /// `fence` (the spawn Txn no longer compares the leader's election key),
    /// `renew-revoke` (an unanswered renewal revokes its new lease, as before
    /// renewals were settled), `relist` (a watcher that fell behind
    /// compaction resumes without listing again) or `storm` (a member out
    /// of the balance is probed again at once: a reconnect storm on etcd),
    /// `sweep-clock` (the expiry sweep trusts the leader's clock to the
    /// second), `slow-switch` (an agent puts off a rewritten instance's
    /// containers), `shard-fence` (a controller fences every write with one
    /// shard's token) or `rollout-routes` (a rollout rebuilds the routes).
    #[arg(long, value_name = "BUG")]
    planted: Option<String>,
    /// Where the report, the history and every daemon's log go
    /// (default: <target dir>/chaos).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A planted bug: in `file`, `old` (which must occur exactly once) becomes `new`.
struct Plant {
    name: &'static str,
    file: &'static str,
    old: &'static str,
    new: &'static str,
}

const PLANTS: &[Plant] = &[
    Plant {
        name: "fence",
        file: "controller/src/spawn.rs",
        old: "        plan.leader_key.as_str(),\n        CompareOp::Equal,\n        plan.token,",
        // Always true: any creation revision differs from -1.
        new: "        plan.leader_key.as_str(),\n        CompareOp::NotEqual,\n        -1,",
    },
    Plant {
        // Before renewals were settled: an unanswered renewal Txn revokes
        // its new lease, though it may have committed.
        name: "renew-revoke",
        file: "controller/src/lifecycle.rs",
        old: "            return match settle(&client, ks, current, lease).await {",
        new: "            let _ = client.lease_revoke(lease).await;\n            return match Settled::NotRenewed {",
    },
    Plant {
        name: "relist",
        file: "schema/src/watch.rs",
        old: "                    self.state = State::List;",
        new: "                    self.state = State::Watch { from: resp.compact_revision() };",
    },
    Plant {
        // While an etcd member is out of the balance, every daemon checks
        // it again at once instead of every 500 ms: a reconnect storm on
        // the members that are down (and the ones coming back).
        name: "storm",
        file: "schema/etcd/src/members.rs",
        old: "        tokio::time::sleep(PROBE_EVERY).await;",
        new: "        if removed.iter().all(|r| !*r) {\n            tokio::time::sleep(PROBE_EVERY).await;\n        }",
    },
    Plant {
        // The sweep before the clock-skew phase found it: it trusts the
        // leader's wall clock to the second, so a leader whose clock runs
        // ahead revokes what the other replica granted, before its time.
        name: "sweep-clock",
        file: "controller/src/scheduler.rs",
        old: ".filter(|i| i.record.expires_at.saturating_add(SWEEP_GRACE_SECS) < now)",
        new: ".filter(|i| i.record.expires_at < now)",
    },
    Plant {
        // An agent that puts off making a rewritten instance's containers
        // (as if its retry backoff carried over): players cannot reach it
        // for longer than the switch window.
        name: "slow-switch",
        file: "agent/src/reconcile.rs",
        old: "            self.retry_at = None;",
        new: "            self.retry_at = Some(Instant::now() + Duration::from_secs(30));",
    },
    Plant {
        // A controller that fences every write with the token of the first
        // shard it leads, whatever the challenge's shard: it schedules
        // other controllers' shards, etcd accepts (its own key is intact),
        // and two schedulers write one shard at once.
        name: "shard-fence",
        file: "controller/src/app.rs",
        old: "        self.shards.lead(self.shards.of(challenge.as_str()))",
        new: "        let _ = challenge;\n        self.shards.led().first().and_then(|s| self.shards.lead(*s))",
    },
    Plant {
        // A rollout that rebuilds the instance's routes from the new spec
        // instead of keeping them: players lose their hostname.
        name: "rollout-routes",
        file: "controller/src/rollout.rs",
        old: "    let mut r = record.clone();",
        new: "    let mut r = record.clone();\n    r.http.clear();",
    },
];

pub(crate) fn run(args: ChaosArgs) -> Result<()> {
    let root = workspace_root();
    let target = target_dir();
    setup::run()?;
    println!("== building the binaries");
    sh::run(
        Command::new("cargo")
            .current_dir(&root)
            .args(["build", "--bins"]),
    )?;
    let out = args.out.unwrap_or_else(|| target.join("chaos"));
    let mut chaos = Command::new(target.join("debug/chaos"));
    chaos.arg("--out").arg(&out);
    if args.short {
        chaos.arg("--short");
    }
    let Some(name) = args.planted else {
        println!("== chaos");
        return sh::run(&mut chaos);
    };
    let plant = PLANTS.iter().find(|p| p.name == name).with_context(|| {
        let known: Vec<&str> = PLANTS.iter().map(|p| p.name).collect();
        format!("no planted bug {name:?}; known: {}", known.join(", "))
    })?;
    let bins = build_planted(&root, &target.join("chaos-planted"), plant)?;
    println!("== chaos against the build with the planted bug {name:?}");
    println!("  (TIDEGATE_BIN_DIR={})", bins.display());
    let status = chaos
        .env("TIDEGATE_BIN_DIR", &bins)
        .status()
        .context("running chaos")?;
    match status.code() {
        Some(1) => {
            println!("planted bug {name:?} caught: the suite reported it (see above)");
            Ok(())
        }
        Some(0) => bail!("planted bug {name:?} NOT caught: the suite passed"),
        _ => bail!("the chaos run against the planted bug {name:?} could not complete ({status})"),
    }
}

/// Copies the source (tracked and new files) to `dir/src`, plants the bug,
/// builds the controller and agent there into `dir/target`, and returns the
/// folder holding the two binaries.
fn build_planted(root: &Path, dir: &Path, plant: &Plant) -> Result<PathBuf> {
    let src = dir.join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    let files = sh::output(Command::new("git").current_dir(root).args([
        "ls-files",
        "--cached",
        "--others",
        "--exclude-standard",
    ]))
    .context("listing the source files (git ls-files)")?;
    for file in files.lines() {
        let from = root.join(file);
        if !from.is_file() {
            continue; // deleted in the work tree
        }
        let to = src.join(file);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(&from, &to).with_context(|| format!("copying {file}"))?;
    }
    let path = src.join(plant.file);
    let text = std::fs::read_to_string(&path)?;
    if text.matches(plant.old).count() != 1 {
        bail!(
            "{}: the code the planted bug {:?} changes is not there exactly once any more; update PLANTS in xtask/src/chaos.rs",
            plant.file,
            plant.name
        );
    }
    std::fs::write(&path, text.replacen(plant.old, plant.new, 1))?;
    println!("== planted {:?} in {}", plant.name, plant.file);
    let planted_target = dir.join("target");
    sh::run(sh::build_daemons(&src).env("CARGO_TARGET_DIR", &planted_target))?;
    Ok(planted_target.join("debug"))
}
