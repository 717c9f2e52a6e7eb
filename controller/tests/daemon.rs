//! The daemon's edges: bad configuration exits 64 naming the field, and the
//! leader's sweep deletes the instances of a worker that vanished.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::process::Command;

use common::*;
use etcd_client::Client;
use reqwest::{Method, StatusCode};
use tidegate_lab::etcd::EtcdCluster;

fn controller(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidegate-controller"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("TIDEGATE_")) {
        cmd.env_remove(k);
    }
    let out = cmd.args(args).envs(env.iter().copied()).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Arguments, environment, and the field the error must name.
type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);

#[test]
fn bad_configuration_exits_64_and_names_the_field() {
    let good = [
        ("TIDEGATE_ADMIN_TOKEN", "admin-token-0123456789"),
        ("TIDEGATE_PLATFORM_TOKEN", "platform-token-0123456789"),
        ("TIDEGATE_FLAG_SECRET", "flag-secret-0123456789"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let cases: Vec<Case> = vec![
        (vec![], vec![], "admin_token"),
        (vec![], good[..2].to_vec(), "flag_secret"),
        (
            vec!["--domain".into(), "Not A Domain".into()],
            good.to_vec(),
            "domain",
        ),
        (
            vec!["--etcd".into(), "127.0.0.1:2379".into()],
            good.to_vec(),
            "etcd",
        ),
        (
            vec![
                "--config".into(),
                write("ports.toml", "tcp_ports = \"30000-20000\""),
            ],
            good.to_vec(),
            "tcp_ports",
        ),
        (
            vec![
                "--config".into(),
                write("ephemeral.toml", "tcp_ports = \"30000-39999\""),
            ],
            good.to_vec(),
            "tcp_ports: \"30000-39999\" overlaps the ephemeral",
        ),
        (
            vec![
                "--config".into(),
                write("daemons.toml", "tcp_ports = \"7000-9999\""),
            ],
            good.to_vec(),
            "holds port 7080, the controller API",
        ),
        (
            vec![
                "--config".into(),
                write("typo.toml", "electoin_ttl_secs = 3"),
            ],
            good.to_vec(),
            "electoin_ttl_secs",
        ),
        (
            vec![
                "--config".into(),
                write("ttl.toml", "election_ttl_secs = 0"),
            ],
            good.to_vec(),
            "election_ttl_secs",
        ),
        (
            vec!["--config".into(), "/nonexistent.toml".into()],
            good.to_vec(),
            "/nonexistent.toml",
        ),
    ];
    for (args, env, field) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = controller(&args, &env);
        assert_eq!(code, Some(64), "{args:?}: {err}");
        assert!(
            err.contains(field),
            "{args:?}: {err:?} does not name {field}"
        );
    }
}

#[tokio::test]
async fn instances_of_a_vanished_worker_are_deleted_after_the_grace_period() {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(&etcd, "c1", dir.path()).await;
    let mut client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let lease_a = register_worker(&client, "worker-a", 10).await;
    assert!(eventually(10, || c.is_leader()).await);
    c.put_challenge("web", web_spec()).await;
    assert!(
        eventually(5, || async {
            c.call(Method::GET, "/v1/workers", None, None).await.1["workers"][0]["id"] == "worker-a"
        })
        .await
    );
    let (s, inst) = c.spawn("web", "t1").await;
    assert_eq!(s, StatusCode::CREATED);
    let id = inst["id"].as_str().unwrap().to_string();

    // A second worker stays; the first one's membership lease vanishes.
    register_worker(&client, "worker-b", 10).await;
    client.lease_revoke(lease_a).await.unwrap();
    let gone = eventually(15, || async {
        c.call(Method::GET, &format!("/v1/instances/{id}"), None, None)
            .await
            .0
            == StatusCode::NOT_FOUND
    })
    .await;
    assert!(gone, "the instance of the vanished worker was not deleted");
    assert_eq!(c.status().await["counters"]["worker_gone_deletions"], 1);
    assert_eq!(count(&client, &keys::claims()).await, 0);
    // The team's slot is free again: it can spawn on the remaining worker.
    let (s, inst) = c.spawn("web", "t1").await;
    assert_eq!(
        (s, inst["worker"].as_str()),
        (StatusCode::CREATED, Some("worker-b"))
    );
}
