//! Least privilege in etcd: with auth on and the production roles, each
//! agent runs as its worker's own etcd user. A stolen worker credential
//! reads no other worker's secrets (flags, `secret_env` values) and writes
//! nothing but its own membership and statuses; everything still routes
//! and runs.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use common::{get, plane_secured};
use etcd_client::{Client, ConnectOptions, GetOptions};
use reqwest::Method;
use serde_json::{Value, json};
use tidegate_lab::daemons::{ADMIN, eventually, web_spec};
use tidegate_lab::docker::docker;
use tidegate_lab::etcd::worker_user;
use tidegate_lab::keys;

/// Whether etcd refused `result` for want of permission.
fn denied<T: std::fmt::Debug>(what: &str, result: Result<T, etcd_client::Error>) {
    match result {
        Err(e) if e.to_string().contains("permission denied") => {}
        other => panic!("{what}: expected permission denied, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stolen_worker_credential_reads_only_its_own_secrets_and_writes_only_its_own_keys() {
    // One slot each: the two instances land on different workers.
    let p = plane_secured(|c| c.capacity = 1).await;
    const SECRET: &str = "admin-pw-5e0c1f7a92";
    let mut spec = web_spec();
    spec["secret_env"] = json!({ "ADMIN_PASSWORD": SECRET });
    let (s, body) = p.controller.put_challenge("web", spec).await;
    assert!(s.is_success(), "{body}");
    assert_eq!(
        body["spec"]["secret_env"],
        json!({"ADMIN_PASSWORD": ""}),
        "{body}"
    );
    let (_, got) = p
        .controller
        .call(Method::GET, "/v1/challenges/web", None, None)
        .await;
    assert!(!got.to_string().contains(SECRET), "{got}");
    let (id1, host1, owner1) = p.running("web", "t1").await;
    let (id2, host2, owner2) = p.running("web", "t2").await;
    assert_ne!(owner1, owner2, "both instances on one worker");
    // Each agent says what it gives instances (the host less its reserve),
    // and each worker's one instance commits the default limits.
    let (_, workers) = p
        .controller
        .call(Method::GET, "/v1/workers", None, None)
        .await;
    for w in workers["workers"].as_array().unwrap() {
        assert!(w["allocatable"]["memory_mib"].as_u64().unwrap() > 0, "{w}");
        assert!(w["allocatable"]["millicpus"].as_u64().unwrap() > 0, "{w}");
        assert_eq!(
            w["committed"],
            json!({"memory_mib": 256, "millicpus": 500, "pids": 128}),
            "{w}"
        );
    }

    // Every agent routes every instance with its narrow role (its watches
    // cover only what it may read).
    for entry in [&p.a_http, &p.b_http] {
        for host in [&host1, &host2] {
            let ok = eventually(10, || async { get(entry, host, None).await.0 == 200 }).await;
            assert!(ok, "{host} not served through {entry}");
        }
    }

    // Each container got its flag from the secret only its worker reads,
    // and the flag check takes it.
    let mut root = p.client.clone();
    let mut flags = Vec::new();
    for (id, owner, entry) in [(&id1, &owner1, &p.a_http), (&id2, &owner2, &p.b_http)] {
        let secret = root.get(keys::secret(owner, id), None).await.unwrap();
        let secret: Value = serde_json::from_slice(secret.kvs()[0].value()).unwrap();
        let flag = secret["flag"].as_str().unwrap().to_string();
        let host = if id == &id1 { &host1 } else { &host2 };
        let page = reqwest::Client::new()
            .get(format!("http://{entry}/cgi-bin/flag"))
            .header("host", host.as_str())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(page.trim(), flag, "instance {id}");
        let (_, checked) = p
            .controller
            .call(
                Method::POST,
                &format!("/v1/instances/{id}/flag"),
                Some(json!({ "flag": flag })),
                None,
            )
            .await;
        assert_eq!(checked, json!({"correct": true}));
        flags.push(flag);
        // The secret env value reached the container, from the same secret.
        let filter = format!("label=tidegate.instance={id}");
        let container = docker(&["ps", "-q", "--filter", &filter]).unwrap();
        let env = docker(&[
            "inspect",
            "--format",
            "{{json .Config.Env}}",
            container.trim(),
        ])
        .unwrap();
        assert!(
            env.contains(&format!("ADMIN_PASSWORD={SECRET}")),
            "{id}: {env}"
        );
        assert_eq!(secret["env"]["ADMIN_PASSWORD"], SECRET);
    }
    flags.push(SECRET.to_string());

    // The stolen credential: worker 2's etcd user and password.
    let users = p.users.as_ref().unwrap();
    let user = worker_user(&owner2);
    let options = ConnectOptions::new().with_user(user.clone(), users.password(&user).unwrap());
    let mut stolen = Client::connect(p._etcd.endpoints(), Some(options))
        .await
        .unwrap();
    let prefix = || Some(GetOptions::new().with_prefix());

    // Its own secret: yes. Worker 1's, or everything: no.
    let own = stolen.get(keys::secret(&owner2, &id2), None).await.unwrap();
    assert_eq!(own.kvs().len(), 1);
    denied(
        "read worker 1's secret",
        stolen.get(keys::secret(&owner1, &id1), None).await,
    );
    denied(
        "list every secret",
        stolen
            .get(keys::prefix(tidegate_schema::Kind::Secrets), prefix())
            .await,
    );
    denied("list the key root", stolen.get(keys::all(), prefix()).await);
    denied(
        "read the challenges' secret env",
        stolen
            .get(
                keys::prefix(tidegate_schema::Kind::ChallengeSecrets),
                prefix(),
            )
            .await,
    );
    denied(
        "list the claims",
        stolen.get(keys::claims(), prefix()).await,
    );
    denied(
        "list whose each flag is",
        stolen
            .get(keys::prefix(tidegate_schema::Kind::FlagOwners), prefix())
            .await,
    );

    // What it may read holds no flag and no secret env value (its own
    // instance's included: the records every worker reads carry none).
    for kind in [
        tidegate_schema::Kind::Instances,
        tidegate_schema::Kind::Workers,
        tidegate_schema::Kind::Challenges,
    ] {
        let resp = stolen.get(keys::prefix(kind), prefix()).await.unwrap();
        for kv in resp.kvs() {
            let v = String::from_utf8_lossy(kv.value());
            let key = kv.key_str().unwrap();
            assert!(
                !flags.iter().any(|f| v.contains(f.as_str())),
                "{key} holds a flag or a secret env value"
            );
        }
    }

    // Writes: an instance record, a challenge, worker 1's membership and
    // status, and worker 1's instance's lease.
    let rec = root.get(keys::instance(&id1), None).await.unwrap();
    let (rec_value, lease1) = (rec.kvs()[0].value().to_vec(), rec.kvs()[0].lease());
    denied(
        "put an instance record",
        stolen
            .put(keys::instance(&id1), rec_value.clone(), None)
            .await,
    );
    denied(
        "create an instance record",
        stolen
            .put(keys::instance("00000000ff"), rec_value, None)
            .await,
    );
    denied(
        "delete an instance record",
        stolen.delete(keys::instance(&id1), None).await,
    );
    denied(
        "put a challenge",
        stolen.put(keys::challenge("web"), "{}", None).await,
    );
    denied(
        "delete a challenge",
        stolen.delete(keys::challenge("web"), None).await,
    );
    denied(
        "put worker 1's membership",
        stolen.put(keys::worker(&owner1), "{}", None).await,
    );
    denied(
        "delete worker 1's membership",
        stolen.delete(keys::worker(&owner1), None).await,
    );
    denied(
        "put worker 1's status",
        stolen.put(keys::status(&owner1, &id1), "{}", None).await,
    );
    denied(
        "revoke worker 1's instance's lease",
        stolen.lease_revoke(lease1).await,
    );
    denied(
        "delete the claims",
        stolen
            .delete(
                keys::claims(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await,
    );

    // Nothing changed: worker 1's instance still runs and is routed.
    let (_, inst) = p
        .controller
        .call(Method::GET, &format!("/v1/instances/{id1}"), None, None)
        .await;
    assert_eq!(inst["status"], "running", "{inst}");
    assert_eq!(get(&p.b_http, &host1, None).await.0, 200);

    // The platform's flag check: a team's own flag is correct; another
    // team's is not, and names its owner; a guess is nobody's.
    let check = |team: &str, flag: &str| {
        let body = json!({ "challenge": "web", "team": team, "flag": flag });
        let controller = &p.controller;
        async move {
            controller
                .call(Method::POST, "/v1/flags/check", Some(body), None)
                .await
        }
    };
    let (s, own) = check("t1", &format!("  {}\n", flags[0])).await;
    assert_eq!(s, 200, "{own}");
    assert_eq!(own["correct"], true, "{own}");
    assert_eq!(own["shared"], false, "{own}");
    assert_eq!(own["owner"]["team"], "t1", "{own}");
    assert_eq!(own["owner"]["instance"], id1.as_str(), "{own}");
    let (_, shared) = check("t2", &flags[0]).await;
    assert_eq!(
        (shared["correct"].clone(), shared["shared"].clone()),
        (json!(false), json!(true)),
        "{shared}"
    );
    assert_eq!(shared["owner"]["team"], "t1", "{shared}");
    assert_eq!(shared["owner"]["instance"], id1.as_str(), "{shared}");
    assert_eq!(shared["owner"]["worker"], owner1.as_str(), "{shared}");
    let (_, guess) = check("t2", "flag{00000000000000000000000000000000}").await;
    assert_eq!(guess, json!({"correct": false, "shared": false}));
    let (s, unknown) = p
        .controller
        .call(
            Method::POST,
            "/v1/flags/check",
            Some(json!({ "challenge": "nope", "team": "t1", "flag": "x" })),
            None,
        )
        .await;
    assert_eq!(s, 404, "{unknown}");
    assert_eq!(unknown["reason"], "unknown_challenge", "{unknown}");

    // The owner outlives the instance: a flag copied from an ended instance
    // is still its team's, and still shared for anyone else.
    let (s, _) = p
        .controller
        .call(Method::DELETE, &format!("/v1/instances/{id1}"), None, None)
        .await;
    assert_eq!(s, 204);
    let (_, after) = check("t1", &flags[0]).await;
    assert_eq!(after["correct"], true, "{after}");
    let (_, after) = check("t2", &flags[0]).await;
    assert_eq!(after["shared"], true, "{after}");

    // Deleting the challenge forgets its flags' owners.
    let (s, _) = p
        .controller
        .call(Method::DELETE, "/v1/challenges/web", None, Some(ADMIN))
        .await;
    assert!(s.is_success(), "{s}");
    let owners = root
        .get(keys::prefix(tidegate_schema::Kind::FlagOwners), prefix())
        .await
        .unwrap();
    assert_eq!(
        owners.kvs().len(),
        0,
        "flag owners left after the challenge"
    );
}
