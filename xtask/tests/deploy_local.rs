//! `cargo xtask deploy local`: detached and foreground clusters come up
//! healthy and leave nothing behind (process, run dir, local.json).

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with(['Z', 'X']))
        })
        .is_some_and(|zombie| !zombie)
}

fn etcd_pid(state_dir: &Path) -> u32 {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("local.state.json")).unwrap())
            .unwrap();
    let p = &state["processes"][0];
    assert_eq!(p["name"], "etcd");
    u32::try_from(p["pid"].as_u64().unwrap()).unwrap()
}

/// Checks local.json's contract and that its etcd answers a real client.
fn check_local_json(state_dir: &Path) {
    let local: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("local.json")).unwrap()).unwrap();
    for field in ["admin_token", "platform_token", "domain"] {
        assert!(
            local[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field} in {local}"
        );
    }
    assert_ne!(local["admin_token"], local["platform_token"]);
    for field in ["http_entries", "tcp_hosts", "etcd"] {
        assert!(local[field].is_array(), "{field} in {local}");
    }
    let etcd = local["etcd"][0].as_str().unwrap();
    let out = Command::new("etcdctl")
        .args(["--endpoints", etcd, "put", "/tidegate-deploy-test", "ok"])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_gone(state_dir: &Path, pid: u32) {
    assert!(!pid_alive(pid), "etcd {pid} still running");
    assert!(
        !state_dir.exists(),
        "{} left behind: {:?}",
        state_dir.display(),
        std::fs::read_dir(state_dir).map(|d| d.map(|e| e.unwrap().path()).collect::<Vec<_>>())
    );
}

#[test]
fn detach_then_down_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let run = |args: &[&str]| {
        let out = Command::new(XTASK)
            .args(args)
            .env("TIDEGATE_STATE_DIR", &dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = run(&["deploy", "local", "--detach"]);
    assert!(ok, "{text}");
    check_local_json(&dir);
    let pid = etcd_pid(&dir);
    assert!(pid_alive(pid));

    // A second cluster on the same state dir is refused, the first untouched.
    let (ok, text) = run(&["deploy", "local", "--detach"]);
    assert!(!ok && text.contains("already running"), "{text}");
    assert!(pid_alive(pid));

    let (ok, text) = run(&["deploy", "local", "--down"]);
    assert!(ok, "{text}");
    assert_gone(&dir, pid);
    let (ok, text) = run(&["deploy", "local", "--down"]);
    assert!(ok && text.contains("nothing to stop"), "{text}");
}

#[test]
fn foreground_cluster_is_removed_on_ctrl_c() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let mut child = Command::new(XTASK)
        .args(["deploy", "local"])
        .env("TIDEGATE_STATE_DIR", &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !dir.join("local.json").exists() {
        assert!(Instant::now() < deadline, "no local.json within 60 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "deploy local exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    check_local_json(&dir);
    let pid = etcd_pid(&dir);
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "deploy local exited with {status}");
    assert_gone(&dir, pid);
}
