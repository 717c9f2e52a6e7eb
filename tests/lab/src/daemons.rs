//! tidegate's own daemons as test processes: controllers and agents with
//! generated configs, and an HTTP client for the controller's API.
//!
//! The binaries are the workspace's build outputs next to the test
//! executable's folder (`target/debug/`); `cargo xtask ci` builds them.

#![allow(clippy::unwrap_used)] // test support: a panic is the failure report

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::etcd::EtcdCluster;
use crate::ports::free_port;
use crate::process::Supervised;

/// The path of a workspace binary, next to the running test's `deps/` folder.
pub fn binary(name: &str) -> String {
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

/// A controller process; killed on drop.
#[derive(Debug)]
pub struct Controller {
    pub proc: Supervised,
    pub url: String,
    pub id: String,
}

impl Controller {
    /// Starts replica `id` with a 2 s election TTL and waits until it answers.
    pub async fn start(etcd: &EtcdCluster, id: &str, dir: &Path) -> Controller {
        let port = free_port().unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let endpoints = etcd
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"id = "{id}"
listen = "127.0.0.1:{port}"
etcd = [{endpoints}]
admin_token = "{ADMIN}"
platform_token = "{PLATFORM}"
flag_secret = "test-flag-secret-0123456789"
election_ttl_secs = {ELECTION_TTL}
etcd_timeout_ms = 1500
tcp_ports = "30000-39999"
sweep_interval_secs = 1
worker_grace_secs = 2
idle_check_secs = 1
artifact_dir = "{artifacts}"
"#,
                artifacts = dir.join("artifacts").display()
            ),
        )
        .unwrap();
        let proc = Supervised::spawn(
            id,
            &binary("tidegate-controller"),
            &["--config".into(), config.display().to_string()],
            &dir.join(format!("{id}.log")),
        )
        .unwrap();
        let c = Controller {
            proc,
            url,
            id: id.to_string(),
        };
        for _ in 0..100 {
            if c.call(Method::GET, "/v1/openapi.json", None, None).await.0 == StatusCode::OK {
                return c;
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

    pub async fn status(&self) -> Value {
        self.call(Method::GET, "/v1/status", None, None).await.1
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
        self.call(
            Method::PUT,
            &format!("/v1/challenges/{name}"),
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
    json!({"image": "tidegate/demo-http:1", "ports": [{"name": "web", "port": 8080, "protocol": "http"}]})
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
    pub config: PathBuf,
    /// A command the agent runs under (e.g. `setpriv` dropping capabilities).
    pub wrapper: Vec<String>,
}

impl Agent {
    /// Starts worker `worker` with `extra` TOML lines appended to its config
    /// (images are never pulled), and waits for its metrics endpoint.
    pub async fn start(etcd: &EtcdCluster, worker: &str, dir: &Path, extra: &str) -> Agent {
        Agent::start_wrapped(etcd, worker, dir, extra, &[]).await
    }

    /// As [`Agent::start`], run under `wrapper` (a command that execs the
    /// rest of its arguments, e.g. `setpriv --bounding-set -bpf --`).
    pub async fn start_wrapped(
        etcd: &EtcdCluster,
        worker: &str,
        dir: &Path,
        extra: &str,
        wrapper: &[&str],
    ) -> Agent {
        let port = free_port().unwrap();
        let endpoints = etcd
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join(format!("{worker}.toml"));
        let text = format!(
            "worker_id = \"{worker}\"\netcd = [{endpoints}]\npull_images = false\nmetrics_listen = \"127.0.0.1:{port}\"\nreconcile_interval_ms = 200\nmembership_ttl_secs = 3\ncluster_label = \"lab-{}\"\nartifact_dir = \"{}\"\n{extra}\n",
            std::process::id(),
            dir.join("artifacts").display()
        );
        // Each agent its own HTTP entry unless the test chose one.
        let text = if extra.contains("http_entry") {
            text
        } else {
            format!(
                "{text}http_entry = \"127.0.0.1:{}\"\n",
                free_port().unwrap()
            )
        };
        std::fs::write(&config, text).unwrap();
        let wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        Agent::start_with(worker, config, port, dir, wrapper).await
    }

    /// Starts the agent again from the same config (after a kill).
    pub async fn restart(self, dir: &Path) -> Agent {
        let (worker, config, wrapper) = (
            self.worker.clone(),
            self.config.clone(),
            self.wrapper.clone(),
        );
        let port: u16 = self
            .metrics_url
            .rsplit(':')
            .next()
            .and_then(|p| p.trim_end_matches("/metrics").parse().ok())
            .unwrap_or(0);
        drop(self);
        Agent::start_with(&worker, config, port, dir, wrapper).await
    }

    async fn start_with(
        worker: &str,
        config: PathBuf,
        port: u16,
        dir: &Path,
        wrapper: Vec<String>,
    ) -> Agent {
        sweep_dead_lab_containers();
        let log = dir.join(format!("{worker}.log"));
        let agent_args = ["--config".into(), config.display().to_string()];
        let (program, args) = match wrapper.split_first() {
            None => (binary("tidegate-agent"), agent_args.to_vec()),
            Some((first, rest)) => {
                let mut args = rest.to_vec();
                args.push(binary("tidegate-agent"));
                args.extend(agent_args);
                (first.clone(), args)
            }
        };
        let proc = Supervised::spawn(worker, &program, &args, &log)
            .unwrap_or_else(|e| panic!("starting agent {worker}: {e}"));
        let agent = Agent {
            proc,
            worker: worker.to_string(),
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
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
        let r = reqwest::get(&self.metrics_url).await.ok()?;
        r.status().is_success().then_some(())?;
        r.text().await.ok()
    }

    /// One metric's value (the first sample whose name and labels start with `series`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics().await?;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.proc.log()).unwrap_or_default()
    }
}

/// Removes containers that agents of a test process made (label
/// `tidegate.cluster=lab-<pid>`) when that process is gone: a test killed
/// before its guards ran leaves nothing behind for long.
pub fn sweep_dead_lab_containers() {
    let Ok(rows) = crate::docker::docker(&[
        "ps",
        "-a",
        "--filter",
        "label=tidegate.cluster",
        "--format",
        "{{.ID}} {{.Label \"tidegate.cluster\"}}",
    ]) else {
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
            let _ = crate::docker::docker(&["rm", "-f", "-v", id]);
        }
    }
}
