//! Shared by the data-plane tests: etcd, a controller and two agents with
//! distinct addresses, and a plain HTTP client.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // each test file uses a part of this

use std::time::Duration;

use etcd_client::Client;
use reqwest::{Method, StatusCode};
use tidegate_lab::daemons::{Agent, Controller, eventually};
use tidegate_lab::etcd::{EtcdCluster, EtcdUsers};
use tidegate_lab::images::ensure_demo_images;
use tidegate_lab::ports::free_port;
use tidegate_schema::config::AgentConfig;

/// etcd, a controller and two agents on loopback addresses of their own
/// (`a_host`, `b_host`: 127.N.M.2 and .3, from the test process's pid), so
/// tests running side by side never share a TCP port or a steering program.
pub struct Plane {
    pub a_host: String,
    pub b_host: String,
    pub a: Agent,
    pub b: Agent,
    pub a_http: String,
    pub b_http: String,
    pub controller: Controller,
    /// etcd's admin view (`root` when auth is on).
    pub client: Client,
    /// With [`plane_secured`]: etcd's users (each worker's own).
    pub users: Option<EtcdUsers>,
    pub _etcd: EtcdCluster,
    pub _dir: tempfile::TempDir,
}

pub fn worker(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

impl Drop for Plane {
    fn drop(&mut self) {
        // Agents first, so none creates a container after the sweep below.
        let _ = self.a.proc.kill();
        let _ = self.b.proc.kill();
        for w in [&self.a.worker, &self.b.worker] {
            let _ = tidegate_lab::docker::remove_labelled(&format!("tidegate.worker={w}"));
        }
        tidegate_lab::docker::remove_flag_files(&tidegate_lab::daemons::lab_cluster());
    }
}

/// The loopback addresses of this test process's two agents.
pub fn hosts() -> (String, String) {
    let pid = std::process::id();
    let net = format!("127.{}.{}", 100 + pid % 150, (pid / 150) % 250 + 1);
    (format!("{net}.2"), format!("{net}.3"))
}

/// A self-signed certificate for `*.ctf.localhost` in `dir`: (cert, key).
pub fn wildcard_cert(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let st = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=*.ctf.localhost"])
        .args(["-addext", "subjectAltName=DNS:*.ctf.localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "openssl req failed");
    (cert, key)
}

/// Both agents' configs are changed by `configure` (after their addresses
/// are set: `tcp_host` is the agent's own).
pub async fn plane(configure: impl Fn(&mut AgentConfig)) -> Plane {
    plane_wrapped(configure, &[]).await
}

/// As [`plane`], both agents run under `wrapper` (see `Agent::start_wrapped`).
pub async fn plane_wrapped(configure: impl Fn(&mut AgentConfig), wrapper: &[&str]) -> Plane {
    plane_with(configure, wrapper, false).await
}

/// As [`plane`], with etcd's auth on and the production roles: the
/// controller as its user, each agent as its worker's own user.
pub async fn plane_secured(configure: impl Fn(&mut AgentConfig)) -> Plane {
    plane_with(configure, &[], true).await
}

async fn plane_with(
    configure: impl Fn(&mut AgentConfig),
    wrapper: &[&str],
    secured: bool,
) -> Plane {
    ensure_demo_images().unwrap();
    let etcd = EtcdCluster::start(1).unwrap();
    let users = secured.then(|| etcd.enable_auth(&[&worker("a"), &worker("b")]).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start_on(&etcd, "c1", dir.path(), None, |c| {
        c.etcd_auth = users.as_ref().map(EtcdUsers::controller);
    })
    .await;
    let options = users
        .as_ref()
        .map(|u| etcd_client::ConnectOptions::new().with_user("root", u.password("root").unwrap()));
    let client = Client::connect(etcd.endpoints(), options).await.unwrap();
    let (a_host, b_host) = hosts();
    let a_http = format!("{a_host}:{}", free_port().unwrap());
    let b_http = format!("{b_host}:{}", free_port().unwrap());
    let cfg = |addr: &str, http: &str| {
        let (addr, http) = (addr.parse().unwrap(), http.parse().unwrap());
        let (configure, users) = (&configure, &users);
        move |c: &mut AgentConfig| {
            c.advertise_address = addr;
            c.http_entry = http;
            c.tcp_host = addr;
            c.etcd_auth = users.as_ref().map(|u| u.worker(&c.worker_id));
            configure(c);
        }
    };
    let a = Agent::start_wrapped(
        &etcd,
        &worker("a"),
        dir.path(),
        cfg(&a_host, &a_http),
        wrapper,
    )
    .await;
    let b = Agent::start_wrapped(
        &etcd,
        &worker("b"),
        dir.path(),
        cfg(&b_host, &b_http),
        wrapper,
    )
    .await;
    assert!(eventually(10, || controller.is_leader()).await);
    assert!(
        eventually(10, || async {
            controller
                .call(Method::GET, "/v1/workers", None, None)
                .await
                .1["workers"]
                .as_array()
                .is_some_and(|w| w.len() == 2)
        })
        .await
    );
    Plane {
        a_host,
        b_host,
        a,
        b,
        a_http,
        b_http,
        controller,
        client,
        users,
        _etcd: etcd,
        _dir: dir,
    }
}

/// A GET through an agent's entry with a Host header: (status, headers, body).
pub async fn get(
    entry: &str,
    host: &str,
    accept: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = reqwest::Client::new()
        .get(format!("http://{entry}/"))
        .header("host", host)
        .timeout(Duration::from_secs(20));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    match req.send().await {
        Ok(r) => {
            let (s, h) = (r.status().as_u16(), r.headers().clone());
            (s, h, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, Default::default(), e.to_string()),
    }
}

impl Plane {
    /// Spawns `challenge` for `team` and waits until its hostname answers 200 through agent a.
    pub async fn running(&self, challenge: &str, team: &str) -> (String, String, String) {
        let (s, inst) = self.controller.spawn(challenge, team).await;
        assert_eq!(s, StatusCode::CREATED, "{inst}");
        let id = inst["id"].as_str().unwrap().to_string();
        let host = inst["http"][0]["hostname"].as_str().unwrap().to_string();
        let ok = eventually(30, || async {
            self.controller
                .call(Method::GET, &format!("/v1/instances/{id}"), None, None)
                .await
                .1["status"]
                == "running"
        })
        .await;
        if !ok {
            let (_, now) = self
                .controller
                .call(Method::GET, &format!("/v1/instances/{id}"), None, None)
                .await;
            panic!(
                "instance {id} never ran: {now}\nagent a:\n{}\nagent b:\n{}",
                self.a.proc.log_tail(10),
                self.b.proc.log_tail(10)
            );
        }
        (id, host, inst["worker"].as_str().unwrap().to_string())
    }
}
