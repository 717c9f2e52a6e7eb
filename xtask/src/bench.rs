//! `cargo xtask bench`: benchmarks against peers measured in the same run,
//! each rewriting its section of docs/benchmarks.md.
//!
//! - `http`: wrk through an agent, nginx and HAProxy, each in front of the
//!   same nginx origin (`bench/http.rs`);
//! - `tcp`: iperf3 and connections/s through agents owning real instances,
//!   each data path and one forwarded hop, against direct and HAProxy
//!   (`bench/tcp.rs`);
//! - `plugins`: a policy call's cost and spawn decisions/s (`bench/plugins.rs`);
//! - `routes`: route propagation, spawn → routable, a 10,000-instance
//!   resync (`bench/routes.rs`);
//! - `rush`: many spawns at once, one container at a time against the
//!   agents' concurrent reconcile (`bench/rush.rs`);
//! - `spawns`: the control plane's spawn throughput, one controller
//!   against three sharing 16 shards (`bench/spawns.rs`).
//!
//! `--short` runs each one round of about a second with the debug build and
//! writes nothing: `cargo xtask ci` runs it, so a change that breaks a
//! benchmark breaks CI. It checks only that every figure came out.

mod http;
mod plugins;
mod routes;
mod rush;
mod spawns;
mod tcp;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tidegate_local::process::Supervised;

pub(crate) use crate::cluster::{
    ADMIN_TOKEN, Containers, ControlPlane, agent, agent_config, api, work_dir,
};
use crate::{sh, workspace_root};

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Which benchmark to run (`http`, `tcp`, `plugins`, `routes`, `rush`, `spawns`); all when omitted.
    which: Option<String>,
    /// One short round of each with the debug build, figures printed, not
    /// written (what CI runs).
    #[arg(long)]
    short: bool,
}

/// A benchmark: it runs in a mode and says what it measured.
type Bench = fn(Mode) -> Result<Figures>;

/// Every benchmark, by name.
const ALL: [(&str, Bench); 6] = [
    ("http", http::run),
    ("tcp", tcp::run),
    ("plugins", plugins::run),
    ("routes", routes::run),
    ("rush", rush::run),
    ("spawns", spawns::run),
];

impl BenchArgs {
    /// Every benchmark, short.
    pub(crate) fn short() -> Self {
        Self {
            which: None,
            short: true,
        }
    }
}

pub(crate) fn run(args: BenchArgs) -> Result<()> {
    let mode = Mode { short: args.short };
    let chosen: Vec<_> = match args.which.as_deref() {
        None => ALL.to_vec(),
        Some(name) => {
            let Some(b) = ALL.iter().find(|(n, _)| *n == name) else {
                bail!(
                    "no benchmark named {name:?}: `http`, `tcp`, `plugins`, `routes`, `rush` and `spawns` exist"
                );
            };
            vec![*b]
        }
    };
    for (name, bench) in chosen {
        let figures = bench(mode).with_context(|| format!("bench {name}"))?;
        figures.check(name)?;
        if let Some((title, section)) = figures.report {
            if mode.short {
                println!(
                    "bench {name} (short): {} figures, from debug builds and one round: they show the \
                     path works, not its speed",
                    figures.values.len()
                );
            } else {
                write_report(&title, &section)?;
                println!("\n{section}");
            }
        }
    }
    Ok(())
}

/// Full (release build, several rounds, the report written) or short.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mode {
    short: bool,
}

impl Mode {
    /// Rounds alternating between targets.
    fn rounds(self) -> usize {
        if self.short { 1 } else { 3 }
    }

    /// `full` seconds, or one in the short form.
    fn secs(self, full: u64) -> u64 {
        if self.short { 1 } else { full }
    }

    /// `full` items, or `short` in the short form.
    fn count(self, full: usize, short: usize) -> usize {
        if self.short { short } else { full }
    }

    /// Builds `bins` of `packages` (release), or every binary of the
    /// workspace in the debug build the tests use (with the same features,
    /// so after the tests nothing is rebuilt); returns their directory.
    fn build(self, packages: &[&str], bins: &[&str]) -> Result<PathBuf> {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(workspace_root()).args(["build", "--quiet"]);
        if self.short {
            cmd.args(["--workspace", "--bins"]);
        } else {
            cmd.arg("--release");
            for p in packages {
                cmd.args(["-p", p]);
            }
            for b in bins {
                cmd.args(["--bin", b]);
            }
        }
        sh::run(&mut cmd)?;
        Ok(crate::target_dir().join(if self.short { "debug" } else { "release" }))
    }
}

/// What a benchmark measured: named figures, and its report section.
pub(crate) struct Figures {
    values: Vec<(String, f64)>,
    report: Option<(String, String)>,
}

impl Figures {
    /// Every figure is a positive, finite number.
    fn check(&self, bench: &str) -> Result<()> {
        if self.values.is_empty() {
            bail!("bench {bench} measured nothing");
        }
        for (name, v) in &self.values {
            if !(v.is_finite() && *v > 0.0) {
                bail!("bench {bench}: {name} came out as {v}");
            }
            println!("bench {bench}: {name} = {v:.3}");
        }
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// The resident set of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// HAProxy in the foreground with config file `cfg`, logging beside it
/// (`haproxy.cfg` → `haproxy.log`).
fn haproxy(cfg: &Path) -> Result<Supervised> {
    Ok(Supervised::spawn(
        "haproxy",
        "haproxy",
        &["-db".into(), "-f".into(), cfg.display().to_string()],
        &cfg.with_extension("log"),
    )?)
}

/// Replaces the section `## {title}…` of docs/benchmarks.md (or appends it),
/// keeping the header with the machine description current.
fn write_report(title: &str, section: &str) -> Result<()> {
    let path = workspace_root().join("docs/benchmarks.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    std::fs::write(&path, merged(&old, title, section, &machine()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// docs/benchmarks.md (`old`) with the section `## {title}…` replaced by
/// `section` (or added), the sections in order. Sections come from
/// different runs, possibly on different machines: the new one names its
/// `machine` under its title, the others keep theirs.
fn merged(old: &str, title: &str, section: &str, machine: &str) -> String {
    let mut sections: Vec<String> = old
        .split("\n## ")
        .skip(1)
        .map(|s| format!("## {}", s.trim_end()))
        .filter(|s| !s.starts_with(&format!("## {title}")))
        .collect();
    let (heading, body) = section.trim_end().split_once('\n').unwrap_or((section, ""));
    sections.push(format!("{heading}\n\n{}\n{body}", machine.trim_end()));
    sections.sort();
    let header = "# Benchmarks\n\nRegenerated by `cargo xtask bench` (one section per benchmark; `cargo xtask bench <name>` reruns one). \
         Peers are measured in the same run on the same machine; each section names the machine and the day it ran on, \
         and sections from different runs compare only through their ratios.\n";
    format!("{header}\n{}\n", sections.join("\n\n"))
}

/// The line naming the machine and the day a section was measured on.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = sh::output(Command::new("uname").arg("-r")).unwrap_or_default();
    let day = sh::output(Command::new("date").arg("-u").arg("+%Y-%m-%d")).unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "Machine: {cores} cores ({cpu}), kernel {}, Debian 12, {}; everything on loopback.",
        kernel.trim(),
        day.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::merged;

    /// A rerun replaces its own section only, under a line naming the
    /// machine it ran on; another section keeps the machine it was
    /// measured on, and the sections stay in order.
    #[test]
    fn a_rerun_replaces_its_section_and_names_its_machine_only() {
        let old = merged(
            "",
            "B bench",
            "## B bench\n\nold b figures\n",
            "Machine: M1.",
        );
        let old = merged(
            &old,
            "A bench",
            "## A bench\n\nold a figures",
            "Machine: M1.",
        );
        let new = merged(
            &old,
            "B bench",
            "## B bench\n\nnew b figures\n",
            "Machine: M2.",
        );
        assert!(new.starts_with("# Benchmarks\n"), "{new}");
        let a = new.find("## A bench\n\nMachine: M1.\n\nold a figures");
        let b = new.find("## B bench\n\nMachine: M2.\n\nnew b figures");
        assert!(a.is_some() && b.is_some() && a < b, "{new}");
        assert!(!new.contains("old b figures"), "{new}");
        assert_eq!(new.matches("Machine:").count(), 2, "{new}");
    }
}
