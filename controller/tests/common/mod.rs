//! Real `tidegate-controller` processes against a real etcd, and a small
//! HTTP client for their API.

#![allow(dead_code, unreachable_pub)] // each test file uses a part of this

use std::path::Path;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::etcd::EtcdCluster;
use tidegate_lab::ports::free_port;
use tidegate_lab::process::Supervised;

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
"#
            ),
        )
        .unwrap();
        let proc = Supervised::spawn(
            id,
            env!("CARGO_BIN_EXE_tidegate-controller"),
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
        match req.send().await {
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
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

/// A demo HTTP challenge spec.
pub fn web_spec() -> Value {
    json!({"image": "tidegate/demo-http:1", "ports": [{"name": "web", "port": 8080, "protocol": "http"}]})
}

/// Registers a worker the way an agent does (record under a lease).
pub async fn register_worker(client: &Client, id: &str, capacity: u32) -> i64 {
    let mut c = client.clone();
    let lease = c.lease_grant(600, None).await.unwrap().id();
    let rec = json!({"v": 1, "id": id, "address": "127.0.0.2", "http_entry": "127.0.0.2:8080",
        "tcp_host": "127.0.0.2", "capacity": capacity, "version": "test", "started_at": 1});
    c.put(
        format!("/tidegate/workers/{id}"),
        rec.to_string(),
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    lease
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

/// The etcd revision now.
pub async fn revision(client: &Client) -> i64 {
    client
        .clone()
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

/// How many keys lie under `prefix`.
pub async fn count(client: &Client, prefix: &str) -> i64 {
    client
        .clone()
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count()
}
