//! tidegate's own daemons as test processes: controllers and agents with
//! generated configs, and an HTTP client for the controller's API.
//!
//! The binaries are the workspace's build outputs next to the test
//! executable's folder (`target/debug/`); `cargo xtask ci` builds them.

#![allow(clippy::unwrap_used)] // test support: a panic is the failure report

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
pub use tidegate_local::daemons::write_config;
use tidegate_schema::config::{AgentConfig, ControllerConfig, RateLimits};

use crate::etcd::EtcdCluster;
use crate::netns::NetnsHost;
use crate::ports::free_port;
use crate::process::Supervised;

/// The path of a workspace binary: in `$TIDEGATE_BIN_DIR` when set (e.g. a
/// deliberately broken build), else next to the running test's `deps/` folder.
pub fn binary(name: &str) -> String {
    if let Some(dir) = std::env::var_os("TIDEGATE_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        assert!(path.exists(), "{} does not exist", path.display());
        return path.display().to_string();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .map(|d| {
            if d.ends_with("deps") {
                d.parent().unwrap_or(d)
            } else {
                d
            }
        })
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let path: PathBuf = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --bins` (cargo xtask ci does)",
        path.display()
    );
    path.display().to_string()
}

pub const ADMIN: &str = "admin-token-0123456789";
pub const PLATFORM: &str = "platform-token-0123456789";
pub const ELECTION_TTL: u64 = 2;

/// The command prefix that runs a program on `host` (nothing for this one).
fn wrapper_for(host: Option<&NetnsHost>) -> Vec<String> {
    host.map(|h| ["ip", "netns", "exec", h.name()].map(String::from).to_vec())
        .unwrap_or_default()
}

/// `wrapper` followed by `env K=V...` when `env` is not empty (`env`
/// execs the program, so its pid stays the program's).
fn with_env(wrapper: &[String], env: &[(String, String)]) -> Vec<String> {
    let mut w = wrapper.to_vec();
    if !env.is_empty() {
        w.push("env".into());
        w.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    }
    w
}

/// Where Debian's libfaketime keeps its preload library.
const LIBFAKETIME: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
];

/// The environment that runs a daemon with its wall clock shifted by
/// `offset_secs` (libfaketime, installed by `cargo xtask setup`). Only the
/// wall clock moves: the monotonic clock (timers, leases' keep-alive
/// periods) stays true, as on a host whose NTP went wrong.
pub fn faketime(offset_secs: i64) -> Result<Vec<(String, String)>, String> {
    let lib = LIBFAKETIME
        .iter()
        .find(|p| Path::new(p).exists())
        .ok_or("libfaketime is not installed (cargo xtask setup installs it)")?;
    Ok(vec![
        ("LD_PRELOAD".into(), lib.to_string()),
        ("FAKETIME".into(), format!("{offset_secs:+}")),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ("FAKETIME_DONT_RESET".into(), "1".into()),
    ])
}

/// Starts `program args...` under `wrapper` (a command that execs the rest
/// of its arguments, so the pid stays the program's).
fn spawn_wrapped(
    name: &str,
    wrapper: &[String],
    program: String,
    args: Vec<String>,
    log: &Path,
) -> Supervised {
    let (program, args) = match wrapper.split_first() {
        None => (program, args),
        Some((first, rest)) => {
            let mut all = rest.to_vec();
            all.push(program);
            all.extend(args);
            (first.clone(), all)
        }
    };
    Supervised::spawn(name, &program, &args, log).unwrap_or_else(|e| panic!("starting {name}: {e}"))
}

/// A controller process; killed on drop.
#[derive(Debug)]
pub struct Controller {
    pub proc: Supervised,
    pub url: String,
    pub id: String,
    config: PathBuf,
    wrapper: Vec<String>,
}

impl Controller {
    /// Starts replica `id` with a 2 s election TTL and waits until it answers.
    pub async fn start(etcd: &EtcdCluster, id: &str, dir: &Path) -> Controller {
        Controller::start_on(etcd, id, dir, None, |_| {}).await
    }

    /// As [`Controller::start`], on test host `host` (listening on its port
    /// 8000) when given, its config changed by `configure` after the test
    /// settings are filled in.
    pub async fn start_on(
        etcd: &EtcdCluster,
        id: &str,
        dir: &Path,
        host: Option<&NetnsHost>,
        configure: impl FnOnce(&mut ControllerConfig),
    ) -> Controller {
        let listen = match host {
            Some(h) => SocketAddr::from((h.addr(), 8000)),
            None => SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap())),
        };
        let url = format!("http://{listen}");
        let mut cfg = ControllerConfig {
            id: id.to_string(),
            listen,
            etcd: etcd.endpoints(),
            admin_token: ADMIN.into(),
            platform_token: PLATFORM.into(),
            flag_secret: "test-flag-secret-0123456789".into(),
            election_ttl_secs: ELECTION_TTL as i64,
            etcd_timeout_ms: 1500,
            tcp_ports: "20000-29999".into(),
            sweep_interval_secs: 1,
            worker_grace_secs: 2,
            idle_check_secs: 1,
            artifact_dir: dir.join("artifacts"),
            scrape_token_file: Some(tidegate_local::daemons::scrape_token_file(dir).unwrap()),
            // Tests and chaos drive many requests per team with the platform
            // token; the tests of the buckets turn them on.
            rate_limits: RateLimits::off(),
            ..ControllerConfig::default()
        };
        configure(&mut cfg);
        let config = dir.join(format!("{id}.toml"));
        write_config(&cfg, &config).unwrap();
        let c = Controller {
            proc: Controller::launch(id, &config, &wrapper_for(host), dir),
            url,
            id: id.to_string(),
            config,
            wrapper: wrapper_for(host),
        };
        c.wait_answering().await;
        c
    }

    fn launch(id: &str, config: &Path, wrapper: &[String], dir: &Path) -> Supervised {
        spawn_wrapped(
            id,
            wrapper,
            binary("tidegate-controller"),
            vec!["--config".into(), config.display().to_string()],
            &dir.join(format!("{id}.log")),
        )
    }

    /// Starts the controller again from the same config (after a kill).
    pub async fn restart(&mut self, dir: &Path) {
        self.restart_under(dir, &[]).await;
    }

    /// As [`Controller::restart`], with `env` added to its environment for
    /// this run only (e.g. [`faketime`]); a later restart drops it.
    pub async fn restart_under(&mut self, dir: &Path, env: &[(String, String)]) {
        self.proc.kill().unwrap();
        let wrapper = with_env(&self.wrapper, env);
        self.proc = Controller::launch(&self.id, &self.config, &wrapper, dir);
        self.wait_answering().await;
    }

    async fn wait_answering(&self) {
        let id = &self.id;
        let c = self;
        for _ in 0..100 {
            if c.call(Method::GET, "/v1/openapi.json", None, None).await.0 == StatusCode::OK {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "controller {id} did not answer within 10 s:\n{}",
            c.proc.log_tail(30)
        );
    }

    /// Sends a request with the platform token unless `token` says otherwise.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let mut req = client.request(method, format!("{}{path}", self.url));
        if let Some(t) = token.or(Some(PLATFORM)).filter(|t| !t.is_empty()) {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        answer(req.send().await).await
    }

    /// Sends a request with the platform token and extra headers.
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let mut req = client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(PLATFORM);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        answer(req.send().await).await
    }

    pub async fn status(&self) -> Value {
        self.call(Method::GET, "/v1/status", None, None).await.1
    }

    /// One metric's value from its `/metrics` (the first sample whose
    /// name and labels start with `series`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let r = reqwest::get(format!("{}/metrics", self.url)).await.ok()?;
        sample(&r.text().await.ok()?, series)
    }

    pub async fn is_leader(&self) -> bool {
        self.status().await["role"] == "leader"
    }

    pub async fn spawn(&self, challenge: &str, team: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            "/v1/instances",
            Some(json!({"challenge": challenge, "team": team})),
            None,
        )
        .await
    }

    /// `PUT /v1/challenges/{name}/policy` with the component bytes (admin).
    pub async fn put_policy(&self, name: &str, component: Vec<u8>) -> (StatusCode, Value) {
        let resp = reqwest::Client::new()
            .put(format!("{}/v1/challenges/{name}/policy", self.url))
            .bearer_auth(ADMIN)
            .header("content-type", "application/wasm")
            .body(component)
            .timeout(Duration::from_secs(20))
            .send()
            .await;
        answer(resp).await
    }

    pub async fn put_challenge(&self, name: &str, spec: Value) -> (StatusCode, Value) {
        self.put_challenge_with(name, spec, "").await
    }

    /// As [`Controller::put_challenge`], with a query (e.g. a rollout's
    /// `rollout=gated&canary=1`).
    pub async fn put_challenge_with(
        &self,
        name: &str,
        spec: Value,
        query: &str,
    ) -> (StatusCode, Value) {
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        self.call(
            Method::PUT,
            &format!("/v1/challenges/{name}{q}"),
            Some(spec),
            Some(ADMIN),
        )
        .await
    }
}

/// An API answer as (status, JSON body or the text as a string); a request
/// that got no answer is status 599 with the error.
async fn answer(resp: reqwest::Result<reqwest::Response>) -> (StatusCode, Value) {
    match resp {
        Ok(r) => {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            (
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            )
        }
        Err(e) => (
            StatusCode::from_u16(599).unwrap(),
            Value::String(e.to_string()),
        ),
    }
}

/// A demo HTTP challenge spec.
pub fn web_spec() -> Value {
    json!({"image": "tidegate/demo-http:2", "ports": [{"name": "web", "port": 8080, "protocol": "http"}]})
}

/// A demo TCP challenge spec (a line echo).
pub fn echo_spec() -> Value {
    json!({"image": crate::images::DEMO_TCP, "ports": [{"name": "echo", "port": crate::images::DEMO_TCP_PORT, "protocol": "tcp"}]})
}

/// Polls `check` every 100 ms for up to `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..secs * 10 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// An agent process; killed on drop (its containers stay, as after a crash).
#[derive(Debug)]
pub struct Agent {
    pub proc: Supervised,
    pub worker: String,
    pub metrics_url: String,
    metrics: SocketAddr,
    pub config: PathBuf,
    /// A command the agent runs under (e.g. `setpriv` dropping capabilities).
    pub wrapper: Vec<String>,
}

impl Agent {
    /// Starts worker `worker`, its config changed by `configure` after the
    /// test settings are filled in (images are never pulled), and waits for
    /// its metrics endpoint.
    pub async fn start(
        etcd: &EtcdCluster,
        worker: &str,
        dir: &Path,
        configure: impl FnOnce(&mut AgentConfig),
    ) -> Agent {
        Agent::start_wrapped(etcd, worker, dir, configure, &[]).await
    }

    /// As [`Agent::start`], run under `wrapper` (a command that execs the
    /// rest of its arguments, e.g. `setpriv --bounding-set -bpf --`).
    pub async fn start_wrapped(
        etcd: &EtcdCluster,
        worker: &str,
        dir: &Path,
        configure: impl FnOnce(&mut AgentConfig),
        wrapper: &[&str],
    ) -> Agent {
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
        let http_entry = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port().unwrap()));
        let wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        let mut cfg = Agent::test_config(etcd, worker, dir, metrics, http_entry);
        configure(&mut cfg);
        Agent::write_and_start(cfg, dir, wrapper).await
    }

    /// As [`Agent::start`], on test host `host`: HTTP entry on its port 8080,
    /// metrics on 9100, TCP on its address, advertised to the other agents.
    pub async fn start_on(
        etcd: &EtcdCluster,
        worker: &str,
        dir: &Path,
        configure: impl FnOnce(&mut AgentConfig),
        host: &NetnsHost,
    ) -> Agent {
        let ip = IpAddr::V4(host.addr());
        let (metrics, http_entry) = (SocketAddr::new(ip, 9100), SocketAddr::new(ip, 8080));
        let mut cfg = Agent::test_config(etcd, worker, dir, metrics, http_entry);
        cfg.advertise_address = ip;
        cfg.tcp_host = ip;
        // It shares this machine's Docker engine from a network namespace
        // of its own, where the engine's bridges are not: their firewall
        // is this machine's to keep, not this agent's.
        cfg.allow_host_access = true;
        configure(&mut cfg);
        Agent::write_and_start(cfg, dir, wrapper_for(Some(host))).await
    }

    /// The test settings: no image pulls, a fast reconcile and membership,
    /// this process's cluster label.
    fn test_config(
        etcd: &EtcdCluster,
        worker: &str,
        dir: &Path,
        metrics: SocketAddr,
        http_entry: SocketAddr,
    ) -> AgentConfig {
        AgentConfig {
            worker_id: worker.to_string(),
            etcd: etcd.endpoints(),
            pull_images: false,
            metrics_listen: metrics,
            http_entry,
            reconcile_interval_ms: 200,
            membership_ttl_secs: 3,
            cluster_label: Some(lab_cluster()),
            artifact_dir: dir.join("artifacts"),
            hop_key_file: Some(tidegate_local::daemons::hop_key_file(dir).unwrap()),
            scrape_token_file: Some(tidegate_local::daemons::scrape_token_file(dir).unwrap()),
            // Tests open thousands of connections from loopback's one
            // address; the tests of the caps set them back.
            tcp_max_connections_per_source: 8192,
            http_max_connections_per_source: 8192,
            ..AgentConfig::default()
        }
    }

    async fn write_and_start(cfg: AgentConfig, dir: &Path, wrapper: Vec<String>) -> Agent {
        let config = dir.join(format!("{}.toml", cfg.worker_id));
        write_config(&cfg, &config).unwrap();
        Agent::start_with(&cfg.worker_id, config, cfg.metrics_listen, dir, wrapper).await
    }
    /// Starts the agent again from the same config (after a kill), in place.
    pub async fn restart_here(&mut self, dir: &Path) {
        let _ = self.proc.kill();
        let again = Agent::start_with(
            &self.worker,
            self.config.clone(),
            self.metrics,
            dir,
            self.wrapper.clone(),
        )
        .await;
        *self = again;
    }

    /// Starts the agent again from the same config (after a kill).
    pub async fn restart(self, dir: &Path) -> Agent {
        self.restart_under(dir, &[]).await
    }

    /// As [`Agent::restart`], with `env` added to its environment for this
    /// run only (e.g. [`faketime`]); a later restart drops it.
    pub async fn restart_under(self, dir: &Path, env: &[(String, String)]) -> Agent {
        let (worker, config, wrapper) = (
            self.worker.clone(),
            self.config.clone(),
            self.wrapper.clone(),
        );
        let metrics = self.metrics;
        drop(self);
        let mut agent =
            Agent::start_with(&worker, config, metrics, dir, with_env(&wrapper, env)).await;
        agent.wrapper = wrapper;
        agent
    }

    async fn start_with(
        worker: &str,
        config: PathBuf,
        metrics: SocketAddr,
        dir: &Path,
        wrapper: Vec<String>,
    ) -> Agent {
        sweep_dead_lab_containers();
        let log = dir.join(format!("{worker}.log"));
        let proc = spawn_wrapped(
            worker,
            &wrapper,
            binary("tidegate-agent"),
            vec!["--config".into(), config.display().to_string()],
            &log,
        );
        let agent = Agent {
            proc,
            worker: worker.to_string(),
            metrics_url: format!("http://{metrics}/metrics"),
            metrics,
            config,
            wrapper,
        };
        for _ in 0..100 {
            if agent.metrics().await.is_some() {
                return agent;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "agent {worker} did not answer within 10 s:\n{}",
            agent.proc.log_tail(30)
        );
    }

    /// The Prometheus text, if the agent answers.
    pub async fn metrics(&self) -> Option<String> {
        let mut req = reqwest::Client::new().get(&self.metrics_url);
        if let Some(token) = self.scrape_token() {
            req = req.bearer_auth(token);
        }
        let r = req.send().await.ok()?;
        r.status().is_success().then_some(())?;
        r.text().await.ok()
    }

    /// The scrape token of the agent's config, if it has one: the
    /// per-instance series are served only with it.
    pub fn scrape_token(&self) -> Option<String> {
        use tidegate_schema::config::ConfigFile;
        let cfg = tidegate_schema::config::AgentConfig::from_file(&self.config).ok()?;
        let token = std::fs::read_to_string(cfg.scrape_token_file?).ok()?;
        Some(token.trim_end().to_string())
    }

    /// One metric's value (the first sample whose name and labels start with `series`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        sample(&self.metrics().await?, series)
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.proc.log()).unwrap_or_default()
    }
}

/// The value of one series (name and labels, e.g. `tidegate_agent_routes`)
/// in a Prometheus text body.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The `tidegate.cluster` label of the containers this process's agents
/// make: `lab-<pid>`.
pub fn lab_cluster() -> String {
    format!("lab-{}", std::process::id())
}

/// Removes every container this process's agents made (e.g. after killing
/// them, as a crash would leave them), then their instance networks.
pub fn remove_lab_containers() {
    let _ = tidegate_local::docker::remove_labelled(&format!("tidegate.cluster={}", lab_cluster()));
    tidegate_local::docker::remove_flag_files(&lab_cluster());
}

/// Removes containers that agents of a test process made (label
/// `tidegate.cluster=lab-<pid>`) when that process is gone: a test killed
/// before its guards ran leaves nothing behind for long.
pub fn sweep_dead_lab_containers() {
    sweep_dead(&["ps", "-a"], &["rm", "-f", "-v"]);
    sweep_dead(&["network", "ls"], &["network", "rm"]);
    // And their flag files.
    let flags = AgentConfig::default().flag_dir;
    for entry in std::fs::read_dir(flags).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dead = name
            .strip_prefix("lab-")
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !crate::process::pid_alive(pid));
        if dead {
            tidegate_local::docker::remove_flag_files(&name);
        }
    }
}

/// Removes what `list` shows with a dead test process's cluster label.
fn sweep_dead(list: &[&str], remove: &[&str]) {
    let mut args = list.to_vec();
    args.extend([
        "--filter",
        "label=tidegate.cluster",
        "--format",
        "{{.ID}} {{.Label \"tidegate.cluster\"}}",
    ]);
    let Ok(rows) = crate::docker::docker(&args) else {
        return;
    };
    for row in rows.lines() {
        let mut parts = row.split_whitespace();
        let (Some(id), Some(cluster)) = (parts.next(), parts.next()) else {
            continue;
        };
        let dead = cluster
            .strip_prefix("lab-")
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| !crate::process::pid_alive(pid));
        if dead {
            let mut args = remove.to_vec();
            args.push(id);
            let _ = crate::docker::docker(&args);
        }
    }
}
