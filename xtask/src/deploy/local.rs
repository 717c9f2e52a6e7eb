//! `cargo xtask deploy local`: a whole cluster on this machine.
//!
//! Foreground by default: Ctrl-C (or SIGTERM) removes everything it made.
//! `--detach` returns once the cluster is healthy, leaving the processes
//! running and `.tidegate/local.json` written; `--down` removes a detached
//! cluster. What it made is recorded in `.tidegate/local.state.json`, so
//! `--down` ends exactly those processes, by pid, and nothing else.
//!
//! It starts what exists: one etcd member, the controller and two agents
//! (on 127.0.0.2 and 127.0.0.3); the agents' proxies land with #5 and #6.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tidegate_local::daemons::write_config;
use tidegate_local::etcd::{healthy, plan_members};
use tidegate_local::ports::free_port;
use tidegate_local::process::pid_alive;
use tidegate_schema::config::{AgentConfig, ControllerConfig};

use crate::workspace_root;

#[derive(Debug, clap::Args)]
pub(crate) struct LocalArgs {
    /// Return once the cluster is healthy and leave it running.
    #[arg(long, conflicts_with = "down")]
    pub(crate) detach: bool,
    /// Stop a detached cluster and remove everything it made.
    #[arg(long)]
    pub(crate) down: bool,
    /// Also start CTFd 3.8.7 (from ../shared/ctfd, or
    /// $TIDEGATE_CTFD_ARCHIVE) with the tidegate plugin, setup done and the
    /// demo challenges imported; it prints the URL and the admin login.
    #[arg(long, conflicts_with = "down")]
    pub(crate) ctfd: bool,
}

/// `.tidegate/local.json`: the contract other tools (CLI, tests, scripts) read.
#[derive(Debug, Serialize, Deserialize)]
struct LocalJson {
    /// The controller's API.
    api: Option<String>,
    admin_token: String,
    platform_token: String,
    /// One `addr:port` per agent.
    http_entries: Vec<String>,
    /// One address per agent.
    tcp_hosts: Vec<String>,
    domain: String,
    etcd: Vec<String>,
}

/// What `--down` needs to undo a cluster.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    cluster_id: String,
    run_dir: PathBuf,
    processes: Vec<Proc>,
    /// CTFd's directory (`--ctfd`), stopped and removed by
    /// `integrations/ctfd/tools/ctfd_lab.py stop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ctfd_dir: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Proc {
    name: String,
    pid: u32,
    /// Start time in clock ticks (field 22 of /proc/pid/stat), so a pid the
    /// kernel reused for another program is never signalled.
    started: u64,
}

/// `cargo xtask deploy local [--detach | --down]`.
pub(crate) fn run(local: &LocalArgs) -> Result<()> {
    // TIDEGATE_STATE_DIR lets tests run a cluster beside a developer's own.
    let dir = std::env::var_os("TIDEGATE_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tidegate"));
    if local.down {
        down(&dir)
    } else {
        up(&dir, local.detach, local.ctfd)
    }
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join("local.state.json")
}

fn up(dir: &Path, detach: bool, ctfd: bool) -> Result<()> {
    // A fresh machine needs its packages, Docker engine and images first;
    // on a machine that has them this is a quick check.
    crate::setup::run().context("cargo xtask setup")?;
    if let Ok(text) = std::fs::read_to_string(state_path(dir)) {
        let state: State =
            serde_json::from_str(&text).context("reading .tidegate/local.state.json")?;
        if state.processes.iter().any(same_process) {
            bail!(
                "a local cluster ({}) is already running: `cargo xtask deploy local --down` stops it",
                state.cluster_id
            );
        }
        println!(
            "cleaning up a local cluster that is no longer running ({})",
            state.cluster_id
        );
        teardown(dir, &state, &mut Vec::new())?;
    }
    let cluster_id = format!("local-{:08x}", rand::random::<u32>());
    let run_dir = dir.join(&cluster_id);
    std::fs::create_dir_all(&run_dir)?;
    let mut state = State {
        cluster_id: cluster_id.clone(),
        run_dir: run_dir.clone(),
        processes: Vec::new(),
        ctfd_dir: None,
    };
    // Record the state before starting anything, so a failure half-way is undone.
    // The processes we start are our children while we run: we reap them.
    let mut children = Vec::new();
    let mut result = start(dir, &mut state, &mut children);
    if result.is_ok() && ctfd {
        result = start_ctfd(dir, &mut state);
    }
    if let Err(e) = result {
        eprintln!("start failed, removing what was made: {e:#}");
        teardown(dir, &state, &mut children)?;
        return Err(e);
    }
    println!(
        "try: tidegate instance spawn demo-http team-1 (open the url it prints) or demo-tcp (ncat 127.0.0.1 <port>), or demo-web-bot (an app, its db and an admin bot); any agent serves any instance"
    );
    println!("wrote {}", dir.join("local.json").display());
    let cli = std::env::current_exe()?.with_file_name("tidegate");
    println!(
        "CLI: {} status   (reads the address and admin token from local.json)",
        cli.display()
    );
    if detach {
        println!("detached: `cargo xtask deploy local --down` stops it");
        return Ok(());
    }
    println!("running in the foreground; Ctrl-C stops it and removes everything it made");
    let why = wait_for_stop(&state)?;
    println!("\n{why}: stopping");
    teardown(dir, &state, &mut children)
}

fn start(dir: &Path, state: &mut State, children: &mut Vec<Child>) -> Result<()> {
    let save = |state: &State| -> Result<()> {
        std::fs::write(state_path(dir), serde_json::to_vec_pretty(state)?)?;
        Ok(())
    };
    save(state)?;
    let bins = build_daemons()?;

    let etcd_dir = state.run_dir.join("etcd");
    let members = plan_members(1, &etcd_dir)?;
    let member = &members[0];
    let token = format!("tidegate-{}", state.cluster_id);
    let log = state.run_dir.join("etcd.log");
    let pid = launch(
        state,
        children,
        "etcd",
        "etcd",
        &member.args(&members, &token),
        &log,
    )?;
    save(state)?;
    wait_for(pid, &log, || healthy(member.client_addr()))?;
    println!(
        "etcd        {}  (pid {pid}, log {})",
        member.client_url(),
        log.display()
    );

    let http_port = common_free_port()?;
    let admin_token = random_token();
    let platform_token = random_token();
    let api_port = free_port()?;
    let api = format!("http://127.0.0.1:{api_port}");
    let config = ControllerConfig {
        id: "controller-1".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], api_port)),
        etcd: vec![member.client_url()],
        domain: DOMAIN.into(),
        admin_token: admin_token.clone(),
        platform_token: platform_token.clone(),
        flag_secret: random_token(),
        public_http_port: http_port,
        artifact_dir: state.run_dir.join("artifacts"),
        scrape_token_file: Some(tidegate_local::daemons::scrape_token_file(&state.run_dir)?),
        ..ControllerConfig::default()
    };
    let path = state.run_dir.join("controller.toml");
    write_config(&config, &path)?;
    let args = ["--config".to_string(), path.display().to_string()];
    let log = state.run_dir.join("controller.log");
    let pid = launch(
        state,
        children,
        "controller",
        &bins.controller.display().to_string(),
        &args,
        &log,
    )?;
    save(state)?;
    wait_for(pid, &log, || http_ok(api_port, "/v1/openapi.json"))?;
    println!("controller  {api}  (pid {pid}, log {})", log.display());
    register_demo_challenges(api_port, &admin_token)?;
    let (http_entries, tcp_hosts) = start_agents(
        state,
        children,
        &bins.agent,
        &member.client_url(),
        http_port,
    )?;
    save(state)?;

    let local = LocalJson {
        api: Some(api),
        admin_token,
        platform_token,
        http_entries,
        tcp_hosts,
        domain: DOMAIN.into(),
        etcd: vec![member.client_url()],
    };
    // It holds the admin and platform tokens.
    tidegate_local::daemons::write_private(
        &dir.join("local.json"),
        &serde_json::to_vec_pretty(&local)?,
    )?;
    Ok(())
}

/// The CTFd helper script of the plugin.
fn ctfd_lab() -> PathBuf {
    workspace_root().join("integrations/ctfd/tools/ctfd_lab.py")
}

/// Starts CTFd with the plugin pointed at this cluster (`--ctfd`), the
/// demo challenges imported, and prints where and how to log in.
fn start_ctfd(dir: &Path, state: &mut State) -> Result<()> {
    let local: LocalJson = serde_json::from_slice(&std::fs::read(dir.join("local.json"))?)?;
    let ctfd_dir = state.run_dir.join("ctfd");
    state.ctfd_dir = Some(ctfd_dir.clone());
    std::fs::write(state_path(dir), serde_json::to_vec_pretty(state)?)?;
    let port = free_port()?;
    println!(
        "CTFd: unpacking, installing its requirements into a venv and starting it (about 30 s)"
    );
    let mut cmd = Command::new("python3");
    cmd.arg(ctfd_lab())
        .arg("start")
        .arg("--dir")
        .arg(&ctfd_dir)
        .args(["--port", &port.to_string()]);
    for (k, v) in [
        ("TIDEGATE_API_URL", local.api.clone().unwrap_or_default()),
        ("TIDEGATE_PLATFORM_TOKEN", local.platform_token.clone()),
        // The agents' TCP redirector serves every loopback address.
        ("TIDEGATE_TCP_HOST", "127.0.0.1".to_string()),
    ] {
        cmd.args(["--env", &format!("{k}={v}")]);
    }
    for (name, _) in super::DEMO_CHALLENGES {
        cmd.args(["--tidegate-challenge", name]);
    }
    let out = cmd.stdout(Stdio::piped()).output()?;
    if !out.status.success() {
        bail!(
            "starting CTFd failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ctfd: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ctfd_dir.join("state.json"))?)
            .context("reading CTFd's state.json")?;
    println!(
        "CTFd        {}  (admin {} / {}, log {})",
        ctfd["url"].as_str().unwrap_or("?"),
        ctfd["admin_name"].as_str().unwrap_or("?"),
        ctfd["admin_password"].as_str().unwrap_or("?"),
        ctfd["log"].as_str().unwrap_or("?"),
    );
    println!("            register a player and a team there, open a demo challenge, Start");
    Ok(())
}

/// Stops CTFd and removes its directory (venv, SQLite file), if `--ctfd` started one.
fn stop_ctfd(state: &State) {
    let Some(ctfd_dir) = &state.ctfd_dir else {
        return;
    };
    if !ctfd_dir.exists() {
        return;
    }
    let stopped = Command::new("python3")
        .arg(ctfd_lab())
        .arg("stop")
        .arg("--dir")
        .arg(ctfd_dir)
        .status();
    match stopped {
        Ok(s) if s.success() => println!("stopped CTFd, removed {}", ctfd_dir.display()),
        other => eprintln!("stopping CTFd ({}): {other:?}", ctfd_dir.display()),
    }
}

/// The wildcard domain of a local cluster (`*.ctf.localhost` resolves to loopback).
const DOMAIN: &str = "ctf.localhost";

/// Builds the daemons; returns the controller binary's path.
fn build_daemons() -> Result<Daemons> {
    // TIDEGATE_PREBUILT: tests use the binaries the test build already made
    // (a second build with other features would replace them under running tests).
    if std::env::var_os("TIDEGATE_PREBUILT").is_none() {
        crate::sh::run(crate::sh::build_daemons(&workspace_root()).arg("--quiet"))?;
    }
    // The daemons land next to this xtask binary (same target dir and profile).
    let exe = std::env::current_exe()?;
    let find = |name: &str| -> Result<PathBuf> {
        let bin = exe.with_file_name(name);
        if !bin.exists() {
            bail!("{name} is not built at {}", bin.display());
        }
        Ok(bin)
    };
    Ok(Daemons {
        controller: find("tidegate-controller")?,
        agent: find("tidegate-agent")?,
    })
}

/// Paths of the built daemons.
struct Daemons {
    controller: PathBuf,
    agent: PathBuf,
}

/// The two local agents: worker id and the loopback address each serves on.
/// worker-a takes 127.0.0.1, where `*.ctf.localhost` resolves, so a browser
/// reaches instances directly; both use the same HTTP port.
const AGENTS: [(&str, [u8; 4]); 2] = [("worker-a", [127, 0, 0, 1]), ("worker-b", [127, 0, 0, 2])];

/// A port free on every agent address.
fn common_free_port() -> Result<u16> {
    for _ in 0..50 {
        let port = free_port()?;
        let free = AGENTS.iter().all(|(_, ip)| {
            std::net::TcpListener::bind((std::net::Ipv4Addr::from(*ip), port)).is_ok()
        });
        if free {
            return Ok(port);
        }
    }
    bail!("found no port free on all agent addresses")
}

/// Starts the agents; returns their HTTP entries and TCP hosts.
fn start_agents(
    state: &mut State,
    children: &mut Vec<Child>,
    bin: &Path,
    etcd: &str,
    http_port: u16,
) -> Result<(Vec<String>, Vec<String>)> {
    let mut http_entries = Vec::new();
    let mut tcp_hosts = Vec::new();
    for (worker, ip) in AGENTS {
        let addr = std::net::Ipv4Addr::from(ip);
        let metrics_port = free_port()?;
        let agent = AgentConfig {
            worker_id: worker.into(),
            advertise_address: addr.into(),
            http_entry: SocketAddr::from((addr, http_port)),
            tcp_host: addr.into(),
            capacity: 16,
            etcd: vec![etcd.to_string()],
            pull_images: false,
            cluster_label: Some(state.cluster_id.clone()),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
            artifact_dir: state.run_dir.join("artifacts"),
            hop_key_file: Some(tidegate_local::daemons::hop_key_file(&state.run_dir)?),
            scrape_token_file: Some(tidegate_local::daemons::scrape_token_file(&state.run_dir)?),
            ..AgentConfig::default()
        };
        let config = state.run_dir.join(format!("{worker}.toml"));
        write_config(&agent, &config)?;
        let log = state.run_dir.join(format!("{worker}.log"));
        let args = ["--config".to_string(), config.display().to_string()];
        let pid = launch(
            state,
            children,
            worker,
            &bin.display().to_string(),
            &args,
            &log,
        )?;
        wait_for(pid, &log, || http_ok(metrics_port, "/metrics"))?;
        println!(
            "agent       {worker} on {addr}  (http {addr}:{http_port}, metrics 127.0.0.1:{metrics_port}, pid {pid}, log {})",
            log.display()
        );
        http_entries.push(format!("{addr}:{http_port}"));
        tcp_hosts.push(addr.to_string());
    }
    Ok((http_entries, tcp_hosts))
}

/// Starts a process of the cluster and records it in `state`.
fn launch(
    state: &mut State,
    children: &mut Vec<Child>,
    name: &str,
    program: &str,
    args: &[String],
    log: &Path,
) -> Result<u32> {
    let child = spawn_detached(program, args, log)?;
    let pid = child.id();
    children.push(child);
    state.processes.push(Proc {
        name: name.into(),
        pid,
        started: start_time(pid).unwrap_or(0),
    });
    Ok(pid)
}

/// Waits up to 30 s for `ready`; fails early if the process exits.
fn wait_for(pid: u32, log: &Path, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        if Instant::now() > deadline || !pid_alive(pid) {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "pid {pid} did not become ready; {}:\n{}",
                log.display(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Whether `GET path` on 127.0.0.1:`port` answers 200.
fn http_ok(port: u16, path: &str) -> bool {
    http(port, "GET", path, None, "").is_some_and(|(status, _)| status == 200)
}

/// One HTTP/1.0 request to 127.0.0.1:`port`.
fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    crate::sh::http(&format!("127.0.0.1:{port}"), method, path, token, body)
}

fn register_demo_challenges(api_port: u16, admin_token: &str) -> Result<()> {
    for (name, spec) in super::DEMO_CHALLENGES {
        let path = format!("/v1/challenges/{name}");
        match http(api_port, "PUT", &path, Some(admin_token), spec) {
            Some((200 | 201, _)) => println!("challenge   {name}"),
            Some((status, body)) => bail!("registering {name}: {status} {body}"),
            None => bail!("registering {name}: the controller did not answer"),
        }
    }
    Ok(())
}

fn random_token() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Starts `program` in its own process group (so Ctrl-C reaches only us and
/// we stop it in order), output appended to `log`.
fn spawn_detached(program: &str, args: &[String], log: &Path) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(program);
    // The daemons take their settings from the files written here, not from
    // whatever `TIDEGATE_*` the caller's shell holds (logging aside).
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("TIDEGATE_") && !name.starts_with("TIDEGATE_LOG") {
            cmd.env_remove(name);
        }
    }
    let child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("could not start {program} (run `cargo xtask setup`)"))?;
    Ok(child)
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state); the start time is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `p` still names the process we started.
fn same_process(p: &Proc) -> bool {
    pid_alive(p.pid) && start_time(p.pid) == Some(p.started)
}

/// Blocks until Ctrl-C, SIGTERM, or a process of the cluster dies.
fn wait_for_stop(state: &State) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Ok("Ctrl-C".to_string()),
                _ = term.recv() => return Ok("SIGTERM".to_string()),
                _ = tick.tick() => {
                    if let Some(dead) = state.processes.iter().find(|p| !same_process(p)) {
                        return Ok(format!("{} (pid {}) exited; see {}", dead.name, dead.pid, state.run_dir.display()));
                    }
                }
            }
        }
    })
}

fn down(dir: &Path) -> Result<()> {
    let text = match std::fs::read_to_string(state_path(dir)) {
        Ok(text) => text,
        Err(_) => {
            println!(
                "no local cluster is recorded in {}: nothing to stop",
                dir.display()
            );
            return Ok(());
        }
    };
    let state: State = serde_json::from_str(&text).context("reading .tidegate/local.state.json")?;
    teardown(dir, &state, &mut Vec::new())
}

/// Ends the cluster's processes (SIGTERM, then SIGKILL after 10 s), removes
/// its containers, run dir, local.json and state file.
fn teardown(dir: &Path, state: &State, children: &mut [Child]) -> Result<()> {
    stop_ctfd(state);
    for p in state.processes.iter().rev() {
        if !same_process(p) {
            continue;
        }
        let _ = Command::new("kill").arg(p.pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while same_process(p) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if same_process(p) {
            let _ = Command::new("kill")
                .args(["-KILL", &p.pid.to_string()])
                .status();
        }
        println!("stopped {} (pid {})", p.name, p.pid);
    }
    // Reap them: ourselves when they are our children (foreground), else
    // init does it a moment later. Either way no zombie is left listed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while state
        .processes
        .iter()
        .any(|p| start_time(p.pid) == Some(p.started))
        && Instant::now() < deadline
    {
        for c in children.iter_mut() {
            let _ = c.try_wait();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if tidegate_local::docker::engine_up() {
        let label = format!("tidegate.cluster={}", state.cluster_id);
        for what in tidegate_local::docker::remove_labelled(&label)? {
            println!("removed {what}");
        }
    }
    if state.run_dir.starts_with(dir) && state.run_dir.exists() {
        std::fs::remove_dir_all(&state.run_dir)?;
        println!("removed {}", state.run_dir.display());
    }
    for file in [dir.join("local.json"), state_path(dir)] {
        if file.exists() {
            std::fs::remove_file(&file)?;
        }
    }
    // Leave no empty .tidegate/ behind either.
    let _ = std::fs::remove_dir(dir);
    println!("local cluster {} removed", state.cluster_id);
    Ok(())
}
