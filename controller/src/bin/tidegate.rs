//! `tidegate`: the organizers' and scripts' command line for the REST API.
//!
//! The API address and token come from `--api`/`--token`, then
//! `TIDEGATE_API`/`TIDEGATE_TOKEN`, then `.tidegate/local.json` (found in
//! this folder or a parent), using its admin token.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

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
    Get { id: String },
    /// Extend an instance's lifetime.
    Renew { id: String },
    /// Delete an instance.
    Rm { id: String },
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

/// Where the API is and which token to send.
fn target(cli: &Cli) -> Result<(String, String)> {
    let local = find_local_json(&std::env::current_dir()?);
    let local: Option<Value> = local
        .as_deref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    let api = cli
        .api
        .clone()
        .or_else(|| local.as_ref()?["api"].as_str().map(String::from))
        .context(
            "no API address: pass --api, set TIDEGATE_API, or run `cargo xtask deploy local`",
        )?;
    let token = cli
        .token
        .clone()
        .or_else(|| local.as_ref()?["admin_token"].as_str().map(String::from))
        .context("no token: pass --token or set TIDEGATE_TOKEN")?;
    Ok((api.trim_end_matches('/').to_string(), token))
}

fn find_local_json(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|d| d.join(".tidegate/local.json"))
        .find(|p| p.exists())
}

async fn call(
    cli: &Cli,
    method: Method,
    path: &str,
    body: Option<Value>,
    if_match: Option<i64>,
) -> Result<Value> {
    let body = body.map(|b| (b.to_string().into_bytes(), "application/json"));
    send(cli, method, path, body, if_match).await
}

/// Sends a request with a body of the given content type.
async fn send(
    cli: &Cli,
    method: Method,
    path: &str,
    body: Option<(Vec<u8>, &str)>,
    if_match: Option<i64>,
) -> Result<Value> {
    let (api, token) = target(cli)?;
    let mut req = reqwest::Client::new()
        .request(method.clone(), format!("{api}{path}"))
        .bearer_auth(token);
    if let Some((bytes, content_type)) = body {
        req = req.header("Content-Type", content_type).body(bytes);
    }
    if let Some(r) = if_match {
        req = req.header("If-Match", format!("\"{r}\""));
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("{method} {api}{path}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if !status.is_success() {
        let msg = value["error"].as_str().unwrap_or(text.as_str());
        match value["field"].as_str() {
            Some(f) => bail!("{status}: {msg} (field {f})"),
            None => bail!("{status}: {msg}"),
        }
    }
    Ok(value)
}

/// Reads a challenge file; returns its name and the spec to send.
fn read_challenge(path: &Path) -> Result<(String, Value)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut spec: Value = if path.extension().is_some_and(|e| e == "toml") {
        let t: toml::Value = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        serde_json::to_value(t)?
    } else {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?
    };
    let from_file = spec.as_object_mut().and_then(|o| o.remove("name"));
    let name = match from_file {
        Some(Value::String(n)) => n,
        Some(other) => bail!("{}: `name` must be a string, not {other}", path.display()),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .context("the file has no name")?,
    };
    Ok((name, spec))
}

async fn run(cli: Cli) -> Result<()> {
    let out = match &cli.command {
        Command::Status => call(&cli, Method::GET, "/v1/status", None, None).await?,
        Command::Worker(WorkerCmd::Ls) => {
            call(&cli, Method::GET, "/v1/workers", None, None).await?
        }
        Command::Challenge(c) => match c {
            ChallengeCmd::Apply { file, if_match } => {
                let (name, spec) = read_challenge(file)?;
                call(
                    &cli,
                    Method::PUT,
                    &format!("/v1/challenges/{name}"),
                    Some(spec),
                    *if_match,
                )
                .await?
            }
            ChallengeCmd::Ls => call(&cli, Method::GET, "/v1/challenges", None, None).await?,
            ChallengeCmd::Get { name } => {
                call(
                    &cli,
                    Method::GET,
                    &format!("/v1/challenges/{name}"),
                    None,
                    None,
                )
                .await?
            }
            ChallengeCmd::Rm { name } => {
                call(
                    &cli,
                    Method::DELETE,
                    &format!("/v1/challenges/{name}"),
                    None,
                    None,
                )
                .await?;
                json!({ "deleted": name })
            }
        },
        Command::Policy(p) => match p {
            PolicyCmd::Upload {
                challenge,
                file,
                if_match,
            } => {
                let bytes =
                    std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
                send(
                    &cli,
                    Method::PUT,
                    &format!("/v1/challenges/{challenge}/policy"),
                    Some((bytes, "application/wasm")),
                    *if_match,
                )
                .await?
            }
            PolicyCmd::Get { challenge } => {
                call(
                    &cli,
                    Method::GET,
                    &format!("/v1/challenges/{challenge}/policy"),
                    None,
                    None,
                )
                .await?
            }
            PolicyCmd::Rm { challenge } => {
                call(
                    &cli,
                    Method::DELETE,
                    &format!("/v1/challenges/{challenge}/policy"),
                    None,
                    None,
                )
                .await?;
                json!({ "removed": challenge })
            }
        },
        Command::Instance(i) => match i {
            InstanceCmd::Spawn { challenge, team } => {
                let body = json!({ "challenge": challenge, "team": team });
                call(&cli, Method::POST, "/v1/instances", Some(body), None).await?
            }
            InstanceCmd::Ls { team, challenge } => {
                let mut q = Vec::new();
                if let Some(t) = team {
                    q.push(format!("team={t}"));
                }
                if let Some(c) = challenge {
                    q.push(format!("challenge={c}"));
                }
                let path = format!("/v1/instances?{}", q.join("&"));
                call(&cli, Method::GET, &path, None, None).await?
            }
            InstanceCmd::Get { id } => {
                call(
                    &cli,
                    Method::GET,
                    &format!("/v1/instances/{id}"),
                    None,
                    None,
                )
                .await?
            }
            InstanceCmd::Renew { id } => {
                call(
                    &cli,
                    Method::POST,
                    &format!("/v1/instances/{id}/renew"),
                    None,
                    None,
                )
                .await?
            }
            InstanceCmd::Rm { id } => {
                call(
                    &cli,
                    Method::DELETE,
                    &format!("/v1/instances/{id}"),
                    None,
                    None,
                )
                .await?;
                json!({ "deleted": id })
            }
        },
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", human(&cli.command, &out));
    }
    Ok(())
}

/// A plain table, columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut s = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        s += &line(r);
    }
    s
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn instance_rows(items: &[Value]) -> String {
    let rows = items
        .iter()
        .map(|i| {
            let http: Vec<String> = i["http"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| text(&h["url"]))
                .collect();
            let tcp: Vec<String> = i["tcp"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| text(&t["port"]))
                .collect();
            vec![
                text(&i["id"]),
                text(&i["challenge"]),
                text(&i["team"]),
                text(&i["worker"]),
                text(&i["status"]),
                text(&i["expires_at"]),
                [http, tcp.iter().map(|p| format!("tcp:{p}")).collect()]
                    .concat()
                    .join(" "),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "CHALLENGE",
            "TEAM",
            "WORKER",
            "STATUS",
            "EXPIRES_AT",
            "ENDPOINTS",
        ],
        rows,
    )
}

fn human(cmd: &Command, v: &Value) -> String {
    match cmd {
        Command::Challenge(ChallengeCmd::Ls) => {
            let rows = v["challenges"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let ports: Vec<String> = c["spec"]["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            format!(
                                "{}/{}:{}",
                                text(&p["protocol"]),
                                text(&p["name"]),
                                text(&p["port"])
                            )
                        })
                        .collect();
                    vec![
                        text(&c["name"]),
                        text(&c["revision"]),
                        text(&c["spec"]["image"]),
                        ports.join(" "),
                    ]
                })
                .collect();
            let mut s = table(&["NAME", "REVISION", "IMAGE", "PORTS"], rows);
            for e in v["errors"].as_array().into_iter().flatten() {
                s += &format!("unreadable: {} ({})\n", text(&e["key"]), text(&e["error"]));
            }
            s
        }
        Command::Challenge(ChallengeCmd::Apply { .. }) => {
            let verb = if v["created"] == true {
                "created"
            } else {
                "updated"
            };
            format!(
                "challenge {} {verb} at revision {}\n",
                text(&v["name"]),
                text(&v["revision"])
            )
        }
        Command::Instance(InstanceCmd::Ls { .. }) => {
            instance_rows(v["instances"].as_array().map(Vec::as_slice).unwrap_or(&[]))
        }
        Command::Instance(
            InstanceCmd::Spawn { .. } | InstanceCmd::Get { .. } | InstanceCmd::Renew { .. },
        ) => instance_rows(std::slice::from_ref(v)),
        Command::Worker(WorkerCmd::Ls) => {
            let rows = v["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| {
                    vec![
                        text(&w["id"]),
                        text(&w["http_entry"]),
                        text(&w["tcp_host"]),
                        format!("{}/{}", text(&w["instances"]), text(&w["capacity"])),
                        text(&w["version"]),
                    ]
                })
                .collect();
            table(
                &["ID", "HTTP_ENTRY", "TCP_HOST", "USED/CAPACITY", "VERSION"],
                rows,
            )
        }
        Command::Policy(PolicyCmd::Upload { .. } | PolicyCmd::Get { .. }) => format!(
            "challenge {}: policy {}\nhooks: {}\nsize: {} bytes, fallback: {}, revision {}\n",
            text(&v["challenge"]),
            text(&v["digest"]),
            v["hooks"]
                .as_array()
                .map(|h| h.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            text(&v["size"]),
            text(&v["fallback"]),
            text(&v["revision"]),
        ),
        Command::Policy(PolicyCmd::Rm { challenge }) => {
            format!("challenge {challenge}: policy removed\n")
        }
        Command::Status => format!(
            "replica {} is {} (token {})\nleader: {} at {}\netcd revision {}, {} member(s)\n",
            text(&v["id"]),
            text(&v["role"]),
            text(&v["token"]),
            text(&v["leader"]["id"]),
            text(&v["leader"]["url"]),
            text(&v["etcd"]["revision"]),
            v["etcd"]["members"].as_array().map_or(0, Vec::len),
        ),
        _ => serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
    }
}
