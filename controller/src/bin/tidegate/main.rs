//! `tidegate`: the organizers' and scripts' command line for the REST API.
//!
//! The API address and token come from `--api`/`--token`, then
//! `TIDEGATE_API`/`TIDEGATE_TOKEN`, then `.tidegate/local.json` (found in
//! this folder or a parent), using its admin token.

mod client;
mod human;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use client::{Body, read_challenge, send};

#[derive(Debug, Parser)]
#[command(
    name = "tidegate",
    version,
    about = "Manage tidegate challenges and instances"
)]
struct Cli {
    /// Controller API base URL (e.g. http://127.0.0.1:7080).
    #[arg(long, env = "TIDEGATE_API", global = true)]
    api: Option<String>,
    /// Bearer token (admin or platform scope).
    #[arg(long, env = "TIDEGATE_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Challenges (organizers).
    #[command(subcommand)]
    Challenge(ChallengeCmd),
    /// Instances.
    #[command(subcommand)]
    Instance(InstanceCmd),
    /// Spawns waiting for room.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Workers.
    #[command(subcommand)]
    Worker(WorkerCmd),
    /// Challenges' policy plugins (WebAssembly components; organizers).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// This replica's role, the leader, etcd members and revision.
    Status,
}

#[derive(Debug, Subcommand)]
enum ChallengeCmd {
    /// Create or replace a challenge from a TOML or JSON file. Its name is the
    /// file's `name` field, else the file name without extension.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Only replace the challenge if it is still at this revision.
        #[arg(long)]
        if_match: Option<i64>,
    },
    /// List challenges.
    Ls,
    /// Show one challenge.
    Get { name: String },
    /// Delete a challenge.
    Rm { name: String },
    /// Roll a challenge's current spec out to its live instances (canaries,
    /// a gate opened by the solver check, batches), or act on its rollout:
    /// `status`, `continue` (open the gate), `pause`, `resume`, `abort`.
    Rollout {
        name: String,
        /// status, continue, pause, resume or abort (none: start one).
        action: Option<String>,
        /// Canaries (starting one; default 2).
        #[arg(long)]
        canary: Option<u32>,
        /// Instances per batch after the gate (starting one; default 10).
        #[arg(long)]
        batch: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum InstanceCmd {
    /// Start an instance of a challenge for a team.
    Spawn { challenge: String, team: String },
    /// List live instances.
    Ls {
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        challenge: Option<String>,
    },
    /// Show one instance.
    Get {
        id: String,
        /// Only if it is this team's (otherwise: no such instance).
        #[arg(long)]
        team: Option<String>,
    },
    /// Extend an instance's lifetime.
    Renew {
        id: String,
        /// Only if it is this team's (otherwise: no such instance).
        #[arg(long)]
        team: Option<String>,
    },
    /// Delete an instance.
    Rm {
        id: String,
        /// Only if it is this team's (otherwise: no such instance).
        #[arg(long)]
        team: Option<String>,
    },
    /// Check a submitted flag against an instance's.
    Flag {
        id: String,
        flag: String,
        /// Only if it is this team's (otherwise: no such instance).
        #[arg(long)]
        team: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum QueueCmd {
    /// List waiting spawns, first to be admitted first.
    Ls {
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        challenge: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Upload a component (e.g. from `cargo xtask build-plugins`) as the
    /// challenge's policy. It is checked, dry-run and stored by digest first;
    /// a bad one is refused and changes nothing.
    Upload {
        challenge: String,
        file: PathBuf,
        /// Only if the challenge is still at this revision.
        #[arg(long)]
        if_match: Option<i64>,
    },
    /// Show the challenge's policy: digest, hooks, fallback.
    Get { challenge: String },
    /// Remove the challenge's policy (its spawns and connections are then
    /// decided by the spec alone).
    Rm { challenge: String },
}

#[derive(Debug, Subcommand)]
enum WorkerCmd {
    /// List live workers.
    Ls,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tidegate: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidegate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One API call a command makes, and what to print when the answer has no
/// body of its own (deletions).
struct Call {
    method: Method,
    path: String,
    body: Option<Body>,
    if_match: Option<i64>,
    done: Option<Value>,
}

impl Call {
    fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            body: None,
            if_match: None,
            done: None,
        }
    }

    fn json(mut self, body: Value) -> Self {
        self.body = Some(Body::json(&body));
        self
    }

    fn if_match(mut self, revision: Option<i64>) -> Self {
        self.if_match = revision;
        self
    }

    /// Prints `done` instead of the (empty) answer.
    fn done(mut self, done: Value) -> Self {
        self.done = Some(done);
        self
    }
}

/// The call `command` makes.
fn call_of(command: &Command) -> Result<Call> {
    Ok(match command {
        Command::Status => Call::new(Method::GET, "/v1/status"),
        Command::Worker(WorkerCmd::Ls) => Call::new(Method::GET, "/v1/workers"),
        Command::Challenge(c) => match c {
            ChallengeCmd::Apply { file, if_match } => {
                let (name, spec) = read_challenge(file)?;
                Call::new(Method::PUT, format!("/v1/challenges/{name}"))
                    .json(spec)
                    .if_match(*if_match)
            }
            ChallengeCmd::Ls => Call::new(Method::GET, "/v1/challenges"),
            ChallengeCmd::Get { name } => Call::new(Method::GET, format!("/v1/challenges/{name}")),
            ChallengeCmd::Rm { name } => {
                Call::new(Method::DELETE, format!("/v1/challenges/{name}"))
                    .done(json!({ "deleted": name }))
            }
            ChallengeCmd::Rollout {
                name,
                action,
                canary,
                batch,
            } => match action.as_deref() {
                None => Call::new(Method::POST, format!("/v1/challenges/{name}/rollout"))
                    .json(json!({ "strategy": "gated", "canary": canary, "batch": batch })),
                Some(_) if canary.is_some() || batch.is_some() => {
                    anyhow::bail!("--canary and --batch go with starting a rollout (no action)")
                }
                Some("status") => Call::new(Method::GET, format!("/v1/challenges/{name}/rollout")),
                Some(a) => Call::new(Method::POST, format!("/v1/challenges/{name}/rollout/{a}")),
            },
        },
        Command::Policy(p) => match p {
            PolicyCmd::Upload {
                challenge,
                file,
                if_match,
            } => {
                let bytes =
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                let mut call = Call::new(Method::PUT, format!("/v1/challenges/{challenge}/policy"))
                    .if_match(*if_match);
                call.body = Some(Body::wasm(bytes));
                call
            }
            PolicyCmd::Get { challenge } => {
                Call::new(Method::GET, format!("/v1/challenges/{challenge}/policy"))
            }
            PolicyCmd::Rm { challenge } => {
                Call::new(Method::DELETE, format!("/v1/challenges/{challenge}/policy"))
                    .done(json!({ "removed": challenge }))
            }
        },
        Command::Instance(i) => instance_call(i),
        Command::Queue(QueueCmd::Ls { team, challenge }) => Call::new(
            Method::GET,
            format!("/v1/queue{}", list_query(team, challenge)),
        ),
    })
}

fn instance_call(cmd: &InstanceCmd) -> Call {
    match cmd {
        InstanceCmd::Spawn { challenge, team } => Call::new(Method::POST, "/v1/instances")
            .json(json!({ "challenge": challenge, "team": team })),
        InstanceCmd::Ls { team, challenge } => Call::new(
            Method::GET,
            format!("/v1/instances{}", list_query(team, challenge)),
        ),
        InstanceCmd::Get { id, team } => Call::new(
            Method::GET,
            format!("/v1/instances/{id}{}", team_query(team)),
        ),
        InstanceCmd::Renew { id, team } => Call::new(
            Method::POST,
            format!("/v1/instances/{id}/renew{}", team_query(team)),
        ),
        InstanceCmd::Rm { id, team } => Call::new(
            Method::DELETE,
            format!("/v1/instances/{id}{}", team_query(team)),
        )
        .done(json!({ "deleted": id })),
        InstanceCmd::Flag { id, flag, team } => Call::new(
            Method::POST,
            format!("/v1/instances/{id}/flag{}", team_query(team)),
        )
        .json(json!({ "flag": flag })),
    }
}

/// `?team=...` (percent-encoded) when a team is given.
fn team_query(team: &Option<String>) -> String {
    list_query(team, &None)
}

/// `?team=...&challenge=...` (percent-encoded) of the filters given; empty
/// without any.
fn list_query(team: &Option<String>, challenge: &Option<String>) -> String {
    let pairs: Vec<String> = [("team", team), ("challenge", challenge)]
        .into_iter()
        .filter_map(|(name, value)| Some(format!("{name}={}", encode(value.as_deref()?))))
        .collect();
    if pairs.is_empty() {
        String::new()
    } else {
        format!("?{}", pairs.join("&"))
    }
}

/// `s` percent-encoded for a query string.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn run(cli: Cli) -> Result<()> {
    let call = call_of(&cli.command)?;
    let answer = send(&cli, call.method, &call.path, call.body, call.if_match).await?;
    let out = call.done.unwrap_or(answer);
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", human::human(&cli.command, &out));
    }
    Ok(())
}
