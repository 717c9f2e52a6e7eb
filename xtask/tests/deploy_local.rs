//! `cargo xtask deploy local`: detached and foreground clusters come up
//! healthy and leave nothing behind (processes, run dir, local.json); the
//! detached one with `--ctfd`, whose CTFd has the demo challenges playable
//! and goes with `--down`.

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

/// The pids of the cluster's processes: etcd, the controller, two agents.
fn cluster_pids(state_dir: &Path) -> Vec<u32> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("local.state.json")).unwrap())
            .unwrap();
    let procs = state["processes"].as_array().unwrap();
    let names: Vec<&str> = procs.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["etcd", "controller", "worker-a", "worker-b"]);
    procs
        .iter()
        .map(|p| u32::try_from(p["pid"].as_u64().unwrap()).unwrap())
        .collect()
}

/// Checks local.json's contract: its etcd answers etcdctl, its API answers
/// curl with the admin token and its controller leads.
fn check_local_json(state_dir: &Path) {
    let local: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("local.json")).unwrap()).unwrap();
    for field in ["api", "admin_token", "platform_token", "domain"] {
        assert!(
            local[field].as_str().is_some_and(|s| !s.is_empty()),
            "{field} in {local}"
        );
    }
    assert_ne!(local["admin_token"], local["platform_token"]);
    for (field, n) in [("http_entries", 2), ("tcp_hosts", 2), ("etcd", 1)] {
        assert_eq!(
            local[field].as_array().map(Vec::len),
            Some(n),
            "{field} in {local}"
        );
    }
    assert_ne!(
        local["tcp_hosts"][0], local["tcp_hosts"][1],
        "agents share an address"
    );
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

    let api = local["api"].as_str().unwrap();
    let auth = format!(
        "Authorization: Bearer {}",
        local["admin_token"].as_str().unwrap()
    );
    let mut role = String::new();
    for _ in 0..100 {
        let out = Command::new("curl")
            .args(["-sS", "-H", &auth, &format!("{api}/v1/status")])
            .output()
            .unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        role = status["role"].as_str().unwrap_or_default().to_string();
        if role == "leader" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        role, "leader",
        "the local controller never became the scheduler"
    );
    let out = Command::new("curl")
        .args(["-sS", "-H", &auth, &format!("{api}/v1/challenges")])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list["challenges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["demo-http", "demo-tcp", "demo-web-bot"]);

    // A demo instance starts on one of the agents.
    let platform = format!(
        "Authorization: Bearer {}",
        local["platform_token"].as_str().unwrap()
    );
    let out = Command::new("curl")
        .args([
            "-sS",
            "-H",
            &platform,
            "-d",
            r#"{"challenge": "demo-http", "team": "t1"}"#,
            &format!("{api}/v1/instances"),
        ])
        .output()
        .unwrap();
    let inst: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = inst["id"]
        .as_str()
        .unwrap_or_else(|| panic!("spawn failed: {inst}"));
    let mut status = String::new();
    for _ in 0..100 {
        let out = Command::new("curl")
            .args(["-sS", "-H", &platform, &format!("{api}/v1/instances/{id}")])
            .output()
            .unwrap();
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status = got["status"].as_str().unwrap_or_default().to_string();
        if status == "running" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(status, "running");
}

/// The cluster's id, from its state file.
fn cluster_id(state_dir: &Path) -> String {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_dir.join("local.state.json")).unwrap())
            .unwrap();
    state["cluster_id"].as_str().unwrap().to_string()
}

/// Containers labelled with the cluster's id.
fn cluster_containers(state_dir: &Path) -> Vec<String> {
    cluster_containers_of(&cluster_id(state_dir))
}

fn cluster_containers_of(cluster: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=tidegate.cluster={cluster}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

fn assert_gone(state_dir: &Path, pids: &[u32]) {
    for pid in pids {
        assert!(!pid_alive(*pid), "pid {pid} still running");
    }
    assert!(
        !state_dir.exists(),
        "{} left behind: {:?}",
        state_dir.display(),
        std::fs::read_dir(state_dir).map(|d| d.map(|e| e.unwrap().path()).collect::<Vec<_>>())
    );
}

/// Runs `cargo xtask` with `args` on state dir `dir`: (success, output).
fn xtask(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(XTASK)
        .args(args)
        .env("TIDEGATE_STATE_DIR", dir)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn detach_then_down_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let run = |args: &[&str]| xtask(&dir, args);
    let (ok, text) = run(&["deploy", "local", "--detach", "--ctfd"]);
    if !ok {
        let _ = run(&["deploy", "local", "--down"]);
    }
    assert!(ok, "{text}");
    check_local_json(&dir);
    let pids = cluster_pids(&dir);
    assert!(pids.iter().all(|p| pid_alive(*p)));
    let cluster = cluster_id(&dir);
    assert_eq!(cluster_containers(&dir).len(), 1);
    let (gunicorn, ctfd_dir) = check_ctfd(&dir, &text);
    assert_eq!(cluster_containers(&dir).len(), 2, "no instance from CTFd");

    // A second cluster on the same state dir is refused, the first untouched.
    let (ok, text) = run(&["deploy", "local", "--detach"]);
    assert!(!ok && text.contains("already running"), "{text}");
    assert!(pids.iter().all(|p| pid_alive(*p)));

    let (ok, text) = run(&["deploy", "local", "--down"]);
    assert!(ok, "{text}");
    // CTFd too, with its venv and SQLite file.
    assert!(text.contains("stopped CTFd"), "{text}");
    assert!(!pid_alive(gunicorn), "CTFd (pid {gunicorn}) still running");
    assert!(!ctfd_dir.exists(), "{} left", ctfd_dir.display());
    assert_gone(&dir, &pids);
    assert_eq!(
        cluster_containers_of(&cluster),
        Vec::<String>::new(),
        "containers left behind"
    );
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
        .env("TIDEGATE_PREBUILT", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("local.json").exists() {
        assert!(Instant::now() < deadline, "no local.json within 120 s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "deploy local exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    check_local_json(&dir);
    let pids = cluster_pids(&dir);
    let cluster = cluster_id(&dir);
    assert_eq!(cluster_containers(&dir).len(), 1);
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "deploy local exited with {status}");
    assert_gone(&dir, &pids);
    assert_eq!(
        cluster_containers_of(&cluster),
        Vec::<String>::new(),
        "containers left behind"
    );
}

/// `curl -sS` with `args`; the answer as JSON (null when it is not).
fn curl_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("curl").arg("-sS").args(args).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// `--ctfd`'s CTFd: `text` (deploy's output) says where it is and how to
/// log in, the demo challenges are tidegate challenges there, and one is
/// playable: the admin joins a team and starts demo-http from the plugin,
/// and the URL it answers is served by an agent. Returns CTFd's gunicorn
/// pid and directory, for the checks after `--down`.
fn check_ctfd(dir: &Path, text: &str) -> (u32, std::path::PathBuf) {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("local.state.json")).unwrap()).unwrap();
    let ctfd_dir = std::path::PathBuf::from(state["ctfd_dir"].as_str().unwrap());
    let ctfd: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ctfd_dir.join("state.json")).unwrap()).unwrap();
    let url = ctfd["url"].as_str().unwrap();
    let password = ctfd["admin_password"].as_str().unwrap();
    // What a newcomer reads: where CTFd is and how to log in.
    assert!(
        text.contains(&format!("CTFd        {url}  (admin admin / {password}")),
        "{text}"
    );
    let gunicorn = u32::try_from(ctfd["pid"].as_u64().unwrap()).unwrap();
    assert!(pid_alive(gunicorn));

    // The demo challenges are tidegate challenges in CTFd.
    let auth = format!(
        "Authorization: Token {}",
        ctfd["admin_token"].as_str().unwrap()
    );
    let json = "Content-Type: application/json";
    let list = curl_json(&[
        "-H",
        &auth,
        "-H",
        json,
        &format!("{url}/api/v1/challenges?view=admin"),
    ]);
    let mut demos: Vec<(String, i64)> = list["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{list}"))
        .iter()
        .map(|c| {
            assert_eq!(c["type"], "tidegate", "{c}");
            (
                c["name"].as_str().unwrap().to_string(),
                c["id"].as_i64().unwrap(),
            )
        })
        .collect();
    demos.sort();
    let names: Vec<&str> = demos.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["demo-http", "demo-tcp", "demo-web-bot"]);

    // Playable: the admin joins a team and starts demo-http from the
    // plugin; the URL it answers is served by an agent.
    let team = curl_json(&[
        "-H",
        &auth,
        "-H",
        json,
        "-d",
        r#"{"name": "organizers", "password": "organizers-pw"}"#,
        &format!("{url}/api/v1/teams"),
    ]);
    let team_id = team["data"]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("{team}"));
    let joined = curl_json(&[
        "-H",
        &auth,
        "-H",
        json,
        "-d",
        r#"{"user_id": 1}"#,
        &format!("{url}/api/v1/teams/{team_id}/members"),
    ]);
    assert_eq!(joined["success"], true, "{joined}");
    let started = curl_json(&[
        "-X",
        "POST",
        "-H",
        &auth,
        "-H",
        json,
        &format!(
            "{url}/plugins/tidegate/api/challenges/{}/instance",
            demos[0].1
        ),
    ]);
    let instance_url = started["data"]["http"][0]["url"]
        .as_str()
        .unwrap_or_else(|| panic!("start from CTFd: {started}"))
        .to_string();
    let local: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("local.json")).unwrap()).unwrap();
    let entry = local["http_entries"][0].as_str().unwrap();
    let host = instance_url
        .trim_start_matches("http://")
        .split([':', '/'])
        .next()
        .unwrap();
    let mut code = String::new();
    for _ in 0..300 {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("Host: {host}"))
            .arg(format!("http://{entry}/"))
            .output()
            .unwrap();
        code = String::from_utf8_lossy(&out.stdout).into_owned();
        if code == "200" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(code, "200", "{instance_url} through {entry}");

    (gunicorn, ctfd_dir)
}
