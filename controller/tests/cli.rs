//! The `tidegate` CLI against a real controller and etcd.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use etcd_client::Client;
use serde_json::Value;
use tidegate_lab::etcd::EtcdCluster;

/// Runs `tidegate args...` in `cwd` with no TIDEGATE_* env; returns (ok, stdout, stderr).
fn tidegate(cwd: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .current_dir(cwd)
        .env_remove("TIDEGATE_API")
        .env_remove("TIDEGATE_TOKEN")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn organizer_workflow_through_the_cli() {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(&etcd, "c1", dir.path()).await;
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 8).await;
    assert!(eventually(10, || c.is_leader()).await);

    // Address and token from .tidegate/local.json in a parent folder.
    let project = dir.path().join("project");
    std::fs::create_dir_all(project.join(".tidegate")).unwrap();
    std::fs::create_dir_all(project.join("challenges")).unwrap();
    std::fs::write(
        project.join(".tidegate/local.json"),
        serde_json::json!({"api": c.url, "admin_token": ADMIN, "platform_token": PLATFORM})
            .to_string(),
    )
    .unwrap();
    let cwd = project.join("challenges");
    std::fs::write(
        cwd.join("web.toml"),
        "image = \"tidegate/demo-http:2\"\nper_team_max = 2\n\n[ttl]\ndefault_secs = 600\nmax_secs = 600\n\n[[ports]]\nname = \"web\"\nport = 8080\nprotocol = \"http\"\n",
    )
    .unwrap();
    let (ok, out, err) = tidegate(&cwd, &["challenge", "apply", "-f", "web.toml"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("challenge web created at revision"),
        "{out}"
    );
    let (ok, out, _) = tidegate(&cwd, &["challenge", "ls"]);
    assert!(
        ok && out.lines().nth(1).unwrap().starts_with("web "),
        "{out}"
    );
    assert!(out.contains("http/web:8080"), "{out}");

    // A bad spec: non-zero exit, the field named, nothing changed.
    std::fs::write(
        cwd.join("bad.json"),
        r#"{"name": "web", "image": "x", "ports": [{"name": "a", "port": 1, "protocol": "udp"}]}"#,
    )
    .unwrap();
    let (ok, _, err) = tidegate(&cwd, &["challenge", "apply", "-f", "bad.json"]);
    assert!(!ok);
    assert!(
        err.contains("400") && err.contains("field ports[0].protocol"),
        "{err}"
    );
    let (_, out, _) = tidegate(&cwd, &["challenge", "get", "web", "--json"]);
    let got: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["spec"]["image"], "tidegate/demo-http:2");

    // Instances: spawn (JSON for scripts), list (table), renew refused (the
    // challenge's TTL is already its maximum lifetime: 409 whatever the
    // clock; "too early" depended on spawn and renew falling in one second), rm.
    let (ok, out, err) = tidegate(&cwd, &["instance", "spawn", "web", "team-1", "--json"]);
    assert!(ok, "{err}");
    let inst: Value = serde_json::from_str(&out).unwrap();
    let id = inst["id"].as_str().unwrap();
    let (ok, out, _) = tidegate(&cwd, &["instance", "ls", "--team", "team-1"]);
    assert!(
        ok && out.contains(id) && out.contains(&format!("http://{id}.ctf.localhost/")),
        "{out}"
    );
    let (ok, out, _) = tidegate(&cwd, &["worker", "ls"]);
    assert!(
        ok && out.contains("worker-a") && out.contains("1/8"),
        "{out}"
    );
    let (ok, out, _) = tidegate(&cwd, &["status"]);
    assert!(ok && out.contains("replica c1 is leader"), "{out}");
    let (ok, _, err) = tidegate(&cwd, &["instance", "renew", id]);
    assert!(
        !ok && err.contains("409") && err.contains("maximum lifetime"),
        "{err}"
    );
    let (ok, _, err) = tidegate(&cwd, &["instance", "rm", id]);
    assert!(ok, "{err}");
    let (ok, _, err) = tidegate(&cwd, &["instance", "get", id]);
    assert!(!ok && err.contains("404"), "{err}");

    // Explicit flags win over local.json; a wrong token is reported.
    let (ok, _, err) = tidegate(
        dir.path(),
        &["--api", &c.url, "--token", "not-a-token", "challenge", "ls"],
    );
    assert!(!ok && err.contains("401"), "{err}");
    let (ok, _, err) = tidegate(dir.path(), &["challenge", "ls"]);
    assert!(!ok && err.contains("no API address"), "{err}");
}

#[tokio::test]
async fn a_spawn_that_waits_shows_its_place() {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 1).await;
    let c = Controller::start(&etcd, "c1", dir.path()).await;
    assert!(eventually(10, || c.is_leader()).await);
    assert!(sees_workers(&c, 1).await);
    let project = dir.path().join("project");
    std::fs::create_dir_all(project.join(".tidegate")).unwrap();
    std::fs::write(
        project.join(".tidegate/local.json"),
        serde_json::json!({"api": c.url, "admin_token": ADMIN}).to_string(),
    )
    .unwrap();
    let cwd = project.as_path();
    std::fs::write(
        cwd.join("web.json"),
        r#"{"image": "x", "ports": [{"name": "web", "port": 80, "protocol": "http"}]}"#,
    )
    .unwrap();
    let (ok, _, err) = tidegate(cwd, &["challenge", "apply", "-f", "web.json"]);
    assert!(ok, "{err}");
    let (ok, out, _) = tidegate(cwd, &["queue", "ls"]);
    assert_eq!(
        (ok, out.as_str()),
        (true, "POSITION  ID  TEAM  CHALLENGE  REASON  WAITED\n")
    );

    // The one slot taken, the next team's spawn waits: 202, said plainly.
    let (ok, _, err) = tidegate(cwd, &["instance", "spawn", "web", "team-1"]);
    assert!(ok, "{err}");
    let (ok, out, err) = tidegate(cwd, &["instance", "spawn", "web", "team-2"]);
    assert!(ok, "{err}");
    let promised = out
        .strip_prefix("queued: ")
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_string();
    let id = promised.as_str();
    assert!(
        out.starts_with(&format!("queued: {id}, position 1 of 1 (no_capacity)\n")),
        "{out}"
    );
    // Asking about it (which holds the place) says the same; JSON for scripts.
    let (ok, out, err) = tidegate(cwd, &["instance", "get", id]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!("queued: {id}, position 1 of 1 (no_capacity)\n")),
        "{out}"
    );
    let (ok, out, err) = tidegate(cwd, &["instance", "get", id, "--json"]);
    assert!(ok, "{err}");
    let place: Value = serde_json::from_str(&out).unwrap();
    assert!(
        place["status"] == "queued" && place["id"] == id && place["team"] == "team-2",
        "{out}"
    );
    let (ok, out, _) = tidegate(cwd, &["queue", "ls", "--challenge", "web"]);
    let row = out.lines().nth(1).unwrap_or_default();
    assert!(
        ok && row.starts_with(&format!("1         {id}  team-2  web        no_capacity  ")),
        "{out}"
    );
    let (ok, out, _) = tidegate(cwd, &["queue", "ls", "--team", "team-1"]);
    assert!(ok && out.lines().count() == 1, "{out}");
    let (ok, out, _) = tidegate(cwd, &["queue", "ls", "--json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert!(ok && list["queued"][0]["id"] == id, "{out}");

    // Leaving the queue.
    let (ok, _, err) = tidegate(cwd, &["instance", "rm", id]);
    assert!(ok, "{err}");
    let (ok, out, _) = tidegate(cwd, &["queue", "ls"]);
    assert!(ok && out.lines().count() == 1, "{out}");
}

/// The CLI pointed at a standby: the standby forwards the spawn to the
/// scheduler with the caller's own token (the CLI once followed a 307
/// there and lost its token: 401). Renew and delete work the same way.
#[tokio::test]
async fn the_cli_spawns_through_a_standby() {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 8).await;
    let c1 = Controller::start(&etcd, "c1", dir.path()).await;
    assert!(eventually(10, || c1.is_leader()).await);
    let c2 = Controller::start(&etcd, "c2", dir.path()).await;
    assert_eq!(c2.status().await["role"], "standby");
    assert!(sees_workers(&c1, 1).await && sees_workers(&c2, 1).await);
    assert_eq!(
        c1.put_challenge("web", web_spec()).await.0,
        reqwest::StatusCode::CREATED
    );
    let api = |args: &[&str]| {
        let mut all = vec!["--api", c2.url.as_str(), "--token", PLATFORM];
        all.extend_from_slice(args);
        tidegate(dir.path(), &all)
    };
    let (ok, out, err) = api(&["instance", "spawn", "web", "team-1", "--json"]);
    assert!(ok, "spawn through the standby failed: {err}");
    let inst: Value = serde_json::from_str(&out).unwrap();
    let id = inst["id"].as_str().unwrap().to_string();
    // Written by the scheduler, with its token.
    let key = tidegate_schema::Keyspace::default().key_of(tidegate_schema::Kind::Instances, &id);
    let mut kv = client.clone();
    let got = kv.get(key, None).await.unwrap();
    let record: Value = serde_json::from_slice(got.kvs()[0].value()).unwrap();
    assert_eq!(record["team"], "team-1");
    assert_eq!(
        c2.status().await["counters"]["forwarded"],
        1,
        "{}",
        c2.status().await
    );
    // A wrong token is refused by the standby itself, before any hop.
    let (ok, _, err) = tidegate(
        dir.path(),
        &[
            "--api",
            &c2.url,
            "--token",
            "not-a-token",
            "instance",
            "spawn",
            "web",
            "team-2",
        ],
    );
    assert!(!ok && err.contains("401"), "{err}");
    assert_eq!(c2.status().await["counters"]["forwarded"], 1);
    let (ok, _, err) = api(&["instance", "rm", &id]);
    assert!(ok, "delete through the standby failed: {err}");
}
