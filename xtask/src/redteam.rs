//! `cargo xtask redteam`: every attack of docs/security.md, run the way a
//! player would, against a local cluster with production settings
//! (`redteam/range.rs`). Attacks come from inside an instance (a shell and
//! the `player` tool), from the network, and with a stolen worker
//! credential. One row per attack, then `attacks: N tried, M succeeded`;
//! any success fails the command.
//!
//! Each defence has a positive control: `--planted <defence>` switches it
//! off (a documented opt-out where one exists, else `TIDEGATE_PLANTED`,
//! which only debug builds read) and runs that defence's attacks, which
//! must then get through; one that does not is a broken attack. `--controls`
//! runs every defence's control in turn.

mod api;
mod edge;
mod etcd;
mod flags;
mod hop;
mod host;
mod instance;
mod policy;
mod range;
mod services;
mod solver;

use std::time::Instant;

use anyhow::{Result, bail};

use range::Range;

#[derive(Debug, clap::Args)]
pub(crate) struct RedteamArgs {
    /// Switch off one defence and run only its attacks: each must succeed.
    #[arg(long, value_name = "DEFENCE")]
    planted: Option<String>,
    /// Run every defence's positive control in turn (a cluster each).
    #[arg(long, conflicts_with = "planted")]
    controls: bool,
}

impl RedteamArgs {
    /// Every attack, every defence on.
    pub(crate) fn all() -> Self {
        Self {
            planted: None,
            controls: false,
        }
    }

    /// Every defence's positive control.
    pub(crate) fn controls() -> Self {
        Self {
            planted: None,
            controls: true,
        }
    }
}

/// Where an attack comes from.
#[derive(Debug, Clone, Copy)]
enum From {
    /// Code in an instance (root in the container, its caps and limits).
    Instance,
    /// A player on the network, or a process on an agent's host.
    Network,
    /// A worker's etcd credential and hop key, stolen.
    Worker,
    /// A challenge author who may upload the challenge's policy plugin.
    Organizer,
}

impl From {
    fn name(self) -> &'static str {
        match self {
            From::Instance => "instance",
            From::Network => "network",
            From::Worker => "stolen worker",
            From::Organizer => "organizer",
        }
    }
}

/// What an attack achieved.
#[derive(Debug)]
enum Verdict {
    /// The defence held; what the attacker saw.
    Blocked(String),
    /// The attack got through; what it got.
    Succeeded(String),
}

/// What an attack runs against the range.
type Run = Box<dyn Fn(&Range) -> Result<Verdict>>;

/// One attack: what it does, from where, which defence stops it.
struct Attack {
    name: String,
    from: From,
    defence: &'static str,
    run: Run,
}

impl Attack {
    fn new(
        name: impl Into<String>,
        from: From,
        defence: &'static str,
        run: impl Fn(&Range) -> Result<Verdict> + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            from,
            defence,
            run: Box::new(run),
        }
    }
}

/// The defences, each with what switches it off for its positive control.
const DEFENCES: &[(&str, &str)] = &[
    (
        "firewall",
        "instances cannot open connections to the host or egress_deny (agent allow_host_access)",
    ),
    (
        "hop-proof",
        "agents trust a hop only with a valid HMAC proof, not by source address (TIDEGATE_PLANTED)",
    ),
    (
        "scrape-token",
        "agents serve per-instance series and /activity only to the scrape token (TIDEGATE_PLANTED)",
    ),
    (
        "neighbour-pinning",
        "instances' addresses pinned on their bridges (TIDEGATE_PLANTED)",
    ),
    (
        "userns",
        "the engine's userns-remap: root in an instance is an unprivileged uid of the host (TIDEGATE_PLANTED: that container is made with --userns=host)",
    ),
    (
        "log-limit",
        "two rotated json-file parts of log_mib (TIDEGATE_PLANTED)",
    ),
    ("tmpfs-size", "sized tmpfs mounts (TIDEGATE_PLANTED)"),
    (
        "flag-file",
        "an instance's flag file is the worker's, mounted read-only and mode 0444 (TIDEGATE_PLANTED: read-write, 0666)",
    ),
    (
        "read-only-rootfs",
        "read-only root filesystem (spec read_only_rootfs = false, agent allow_unbounded_rootfs)",
    ),
    (
        "port-range",
        "agents route only tcp_ports (TIDEGATE_PLANTED)",
    ),
    (
        "spec-derived",
        "agents make containers from the challenge's spec and refuse records that differ (TIDEGATE_PLANTED)",
    ),
    (
        "unique-worker",
        "worker registration is create-if-absent (TIDEGATE_PLANTED)",
    ),
    (
        "team-scope",
        "instance operations with ?team= refuse another team's id as missing; the flag check takes only the submitter's own instance flags (TIDEGATE_PLANTED)",
    ),
    (
        "rate-limit",
        "token buckets per team for the platform's spawns, renewals, deletes and flag checks (TIDEGATE_PLANTED)",
    ),
    (
        "tcp-caps",
        "agents cap open TCP connections per player address and per instance (TIDEGATE_PLANTED)",
    ),
    (
        "plugin-caps",
        "a policy component holds at most 4 memories, 16 core instances and 16 tables of the pool every challenge's plugin shares (TIDEGATE_PLANTED)",
    ),
    (
        "tcp-idle",
        "agents close a TCP connection quiet for its challenge's tcp_idle_timeout_secs (TIDEGATE_PLANTED)",
    ),
    (
        "http-limits",
        "the agents' HTTP entry and the controller's API: a deadline on every request head, caps on connections in all and per source address (TIDEGATE_PLANTED)",
    ),
    (
        "pinned-policy",
        "a pinned HTTP connection is admitted by the edge policy at its first request, at the edge and (forwarded with a pinned proof) nowhere else (TIDEGATE_PLANTED: the pinned path asks no policy)",
    ),
    (
        "pinned-proof",
        "an owner pins a forwarded connection only on an edge's pinned proof, never on an L7 edge's, which carries many players' requests over one connection (TIDEGATE_PLANTED: an L7 proof pins too)",
    ),
    (
        "instance-networks",
        "each instance with services has a network of its own (TIDEGATE_PLANTED: one network for all of them)",
    ),
    (
        "solver-limits",
        "a solver run is stopped at its timeout_secs and its container removed (TIDEGATE_PLANTED: an hour)",
    ),
    (
        "etcd-roles",
        "each worker's etcd user reads its own secrets and writes only its own keys (the range grants worker b readwrite on the root)",
    ),
    (
        "stalled-reader",
        "an agent's HTTP connection whose player takes no byte of what is written to it (an answer, a WebSocket tunnel's bytes) for upstream_read_timeout_ms is closed (TIDEGATE_PLANTED)",
    ),
];

fn attacks() -> Vec<Attack> {
    let mut all = host::attacks();
    all.extend(hop::attacks());
    all.extend(instance::attacks());
    all.extend(etcd::attacks());
    all.extend(api::attacks());
    all.extend(edge::attacks());
    all.extend(policy::attacks());
    all.extend(services::attacks());
    all.extend(api::replica_attacks());
    all.extend(solver::attacks());
    all
}

pub(crate) fn run(args: RedteamArgs) -> Result<()> {
    if args.controls {
        let mut broken = Vec::new();
        for (defence, _) in DEFENCES {
            println!("\n== positive control: --planted {defence}");
            if let Err(e) = control(defence) {
                println!("{e:#}");
                broken.push(*defence);
            }
        }
        if !broken.is_empty() {
            bail!("broken attacks (their defence off, they still failed): {broken:?}");
        }
        println!("\nevery defence's attacks got through with it off");
        return Ok(());
    }
    match args.planted.as_deref() {
        Some(defence) => control(defence),
        None => {
            let range = Range::start(None)?;
            let (tried, succeeded, rows) = report(&range, &attacks())?;
            let swept = flags::sweep(&range, &rows);
            if succeeded > 0 {
                bail!("{succeeded} of {tried} attacks succeeded");
            }
            swept
        }
    }
}

/// The positive control of `defence`: with it off, its attacks succeed.
fn control(defence: &str) -> Result<()> {
    if !DEFENCES.iter().any(|(d, _)| *d == defence) {
        let names: Vec<_> = DEFENCES.iter().map(|(d, _)| *d).collect();
        bail!("no defence named {defence:?}: one of {}", names.join(", "));
    }
    let chosen: Vec<Attack> = attacks()
        .into_iter()
        .filter(|a| a.defence == defence)
        .collect();
    let range = Range::start(Some(defence))?;
    let (tried, succeeded, _) = report(&range, &chosen)?;
    if succeeded < tried {
        bail!(
            "with {defence} off only {succeeded} of its {tried} attacks succeeded: the others are broken"
        );
    }
    println!("positive control of {defence}: all {tried} attacks got through with it off");
    Ok(())
}

/// Runs `attacks` against `range`, printing a row each and the total;
/// `(tried, succeeded, the rows)`.
fn report(range: &Range, attacks: &[Attack]) -> Result<(usize, usize, String)> {
    let mut rows = format!("\n{:<66} {:<14} {:<18} result", "attack", "from", "defence");
    println!("{rows}");
    let mut succeeded = 0;
    for a in attacks {
        let t = Instant::now();
        let verdict =
            (a.run)(range).map_err(|e| e.context(format!("attack {:?} is broken", a.name)))?;
        let result = match verdict {
            Verdict::Blocked(seen) => format!("blocked: {seen}"),
            Verdict::Succeeded(got) => {
                succeeded += 1;
                format!("SUCCEEDED: {got}")
            }
        };
        let row = format!(
            "{:<66} {:<14} {:<18} {result} ({:.1} s)",
            a.name,
            a.from.name(),
            a.defence,
            t.elapsed().as_secs_f64()
        );
        println!("{row}");
        rows += &format!("\n{row}");
    }
    println!("attacks: {} tried, {succeeded} succeeded", attacks.len());
    Ok((attacks.len(), succeeded, rows))
}
