//! The CTFd plugin (`integrations/ctfd/`) against a real CTFd 3.8.7 and a
//! real tidegate, driven in headless Chromium: players start, renew and
//! stop instances from the challenge modal, flags are checked per
//! instance and flag sharing is recorded, another team's instance id is
//! refused, tidegate's refusals reach the modal in its words, a start on a
//! full cluster waits in the queue (position shown, place held by the
//! modal) until it is admitted, and the admin pages list and stop
//! instances and show who waits.
//!
//! This file starts tidegate (etcd, a controller, two agents) and CTFd
//! (`integrations/ctfd/tools/ctfd_lab.py`: the shared archive unpacked, a
//! venv from PyPI, the plugin installed, setup done); the browser scenario
//! itself is `integrations/ctfd/tests/e2e.py` (Playwright driving
//! `/usr/bin/chromium`), which fails on the first step that does not hold.
//! Screenshots of each step are kept under the test's artifacts.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Plane, plane};
use serde_json::Value;
use tidegate_lab::daemons::{PLATFORM, echo_spec, web_spec};
use tidegate_lab::plugins::component;
use tidegate_lab::ports::free_port;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// CTFd started by `ctfd_lab.py`; stopped (process group killed, its
/// directory with the venv and the SQLite file removed) on drop.
struct Ctfd {
    dir: PathBuf,
    state: Value,
    _tmp: tempfile::TempDir,
}

impl Ctfd {
    fn start(env: &[(&str, String)]) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("tidegate-ctfd-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("ctfd");
        let port = free_port().unwrap();
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(repo().join("integrations/ctfd/tools/ctfd_lab.py"))
            .args(["start", "--with-playwright", "--dir"])
            .arg(&dir)
            .args(["--port", &port.to_string()]);
        for (k, v) in env {
            cmd.args(["--env", &format!("{k}={v}")]);
        }
        let mut ctfd = Self {
            dir: dir.clone(),
            state: Value::Null,
            _tmp: tmp,
        };
        let out = cmd.output().expect("running ctfd_lab.py");
        assert!(
            out.status.success(),
            "ctfd_lab.py start failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let state = std::fs::read_to_string(dir.join("state.json")).unwrap();
        ctfd.state = serde_json::from_str(&state).unwrap();
        ctfd
    }
}

impl Drop for Ctfd {
    fn drop(&mut self) {
        let out = Command::new("/usr/bin/python3")
            .arg(repo().join("integrations/ctfd/tools/ctfd_lab.py"))
            .args(["stop", "--dir"])
            .arg(&self.dir)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            other => eprintln!("ctfd_lab.py stop: {other:?}"),
        }
    }
}

/// Challenges: `web` (HTTP), `echo` (TCP), `locked` (HTTP under the
/// allowlist policy, which admits none of CTFd's teams).
async fn challenges(p: &Plane) {
    let c = &p.controller;
    // echo holds a queue place 10 s without a poll (the modal polls, so
    // the place must outlive that); echo-noqueue refuses instead of queueing.
    let mut echo = echo_spec();
    echo["queue"] = serde_json::json!({"hold_secs": 10});
    let mut echo_noqueue = echo_spec();
    echo_noqueue["queue"] = serde_json::json!(false);
    for (name, spec) in [
        ("web", web_spec()),
        ("echo", echo),
        ("locked", web_spec()),
        ("echo-noqueue", echo_noqueue),
    ] {
        let (s, body) = c.put_challenge(name, spec).await;
        assert!(s.is_success(), "{name}: {body}");
    }
    let (s, body) = c.put_policy("locked", component("allowlist")).await;
    assert!(s.is_success(), "locked: {body}");
}

/// Runs the browser scenario with the venv's Python; its last stdout line
/// is a JSON summary.
fn scenario(ctfd: &Ctfd, env: &[(&str, String)]) -> Value {
    let python = ctfd.dir.join("venv/bin/python");
    let mut child = Command::new(python)
        .arg(repo().join("integrations/ctfd/tests/e2e.py"))
        .env("CTFD_STATE", ctfd.dir.join("state.json"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running e2e.py");
    // Every step has a timeout of its own; this only stops a wedged browser.
    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("e2e.py ran past 900 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    eprintln!("{out}");
    assert!(status.success(), "the browser scenario failed ({status})");
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("summary {last:?}: {e}"))
}

/// Polls `check` every 200 ms for up to `secs` seconds.
fn within(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    check()
}

/// Whether Docker runs (or keeps) a container of instance `id`.
fn container_exists(id: &str) -> bool {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=tidegate.instance={id}"),
        ])
        .output()
        .unwrap();
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_and_organizers_use_tidegate_from_ctfd_in_a_real_browser() {
    // Three slots per agent: the scenario fills the rest to meet "no capacity".
    let p = plane(|c| c.capacity = 3).await;
    challenges(&p).await;
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts/ctfd");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();

    // The token reaches CTFd's server from its environment; the API's
    // address is set on the plugin's config page by the scenario (so that
    // it can point it at a closed port and back).
    let ctfd = tokio::task::block_in_place(|| {
        Ctfd::start(&[
            ("TIDEGATE_PLATFORM_TOKEN", PLATFORM.to_string()),
            ("TIDEGATE_TCP_HOST", p.a_host.clone()),
        ])
    });
    let env = [
        ("TIDEGATE_API_URL", p.controller.url.clone()),
        ("TIDEGATE_PLATFORM_TOKEN", PLATFORM.to_string()),
        ("AGENT_HTTP", format!("{},{}", p.a_http, p.b_http)),
        ("AGENT_TCP_HOSTS", format!("{},{}", p.a_host, p.b_host)),
        // Three slots each on the two agents.
        ("CLUSTER_CAPACITY", "6".to_string()),
        ("SCREENSHOTS", shots.display().to_string()),
    ];
    let summary = tokio::task::block_in_place(|| scenario(&ctfd, &env));

    // What the scenario says it saw, checked from tidegate's side: both
    // stopped instances are gone, and their containers with them.
    // A full cluster: the start waited in the queue (held by the modal's
    // polls past its 10 s hold) and became the instance it was promised;
    // a challenge with queueing off showed tidegate's refusal.
    assert!(summary["admitted_from_queue"].is_string(), "{summary}");
    assert_eq!(summary["no_queue_refused"], true, "{summary}");
    for (who, key) in [
        ("the player (the modal's Stop)", "stopped_by_player"),
        ("the admin (the Instances page)", "stopped_by_admin"),
    ] {
        let stopped = summary[key].as_str().unwrap();
        let path = format!("/v1/instances/{stopped}");
        let (s, _) = p
            .controller
            .call(reqwest::Method::GET, &path, None, None)
            .await;
        assert_eq!(s, 404, "instance {stopped} stopped by {who} lives on");
        let gone = within(30, || !container_exists(stopped));
        assert!(
            gone,
            "the container of {stopped} (stopped by {who}) is still there"
        );
    }
    for name in [
        "challenge-form",
        "modal-start",
        "modal-running",
        "modal-renewed",
        "modal-tcp",
        "modal-error",
        "modal-unreachable",
        "modal-stopped",
        "modal-queued",
        "modal-admitted",
        "admin-instances",
        "admin-waiting",
        "admin-sharing",
    ] {
        let png = std::fs::read(shots.join(format!("{name}.png")))
            .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        assert!(png.starts_with(b"\x89PNG"), "{name}.png is not a PNG");
    }
    eprintln!("screenshots: {}", shots.display());
    // Stopping CTFd leaves nothing: no process, no venv, no SQLite file.
    let dir = ctfd.dir.clone();
    drop(ctfd);
    assert!(
        !dir.exists(),
        "{} is left after CTFd stopped",
        dir.display()
    );
}
