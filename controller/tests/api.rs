//! The REST API of a real controller process against a real etcd: the
//! contract, bad inputs (4xx, nothing written), and the instance lifecycle.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use etcd_client::Client;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::etcd::EtcdCluster;

#[tokio::test]
async fn challenges_auth_and_bad_inputs_write_nothing() {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(&etcd, "c1", dir.path()).await;
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();

    // Tokens and scopes.
    let (s, body) = c.call(Method::GET, "/v1/challenges", None, Some("")).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(body["error"].as_str().unwrap().contains("Bearer"));
    assert_eq!(
        c.call(Method::GET, "/v1/challenges", None, Some("wrong-token"))
            .await
            .0,
        StatusCode::UNAUTHORIZED
    );
    let (s, _) = c
        .call(
            Method::PUT,
            "/v1/challenges/web",
            Some(web_spec()),
            Some(PLATFORM),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Create, replace, read.
    let (s, body) = c.put_challenge("web", web_spec()).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    let rev = body["revision"].as_i64().unwrap();
    assert_eq!(body["name"], "web");
    let (s, body) = c.put_challenge("web", web_spec()).await;
    assert_eq!(s, StatusCode::OK);
    let rev2 = body["revision"].as_i64().unwrap();
    assert!(rev2 > rev);
    let (s, body) = c.call(Method::GET, "/v1/challenges/web", None, None).await;
    assert_eq!((s, body["revision"].as_i64()), (StatusCode::OK, Some(rev2)));

    // Two writers with the same If-Match: exactly one wins.
    let put_if = |n: u32| {
        let url = format!("{}/v1/challenges/web", c.url);
        let mut spec = web_spec();
        spec["per_team_max"] = json!(n);
        async move {
            reqwest::Client::new()
                .put(url)
                .bearer_auth(ADMIN)
                .header("If-Match", format!("\"{rev2}\""))
                .body(spec.to_string())
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let (a, b) = tokio::join!(put_if(2), put_if(3));
    let mut got = [a.as_u16(), b.as_u16()];
    got.sort();
    assert_eq!(got, [200, 412]);

    // Every bad input: its 4xx, naming the field, and etcd unchanged.
    let before = revision(&client).await;
    // A challenge with services (an app, its db, an admin bot), broken
    // one way each.
    let services = |edit: &dyn Fn(&mut Value)| {
        let mut v = json!({
            "services": {
                "app": {"image": "x:1", "depends_on": ["db"]},
                "db": {"image": "y:1"},
                "bot": {"image": "z:1", "depends_on": ["app"]},
            },
            "ports": [{"name": "web", "port": 80, "protocol": "http", "service": "app"}],
        });
        edit(&mut v);
        v
    };
    let nine: serde_json::Map<String, Value> = (0..9)
        .map(|i| (format!("s{i}"), json!({"image": "x:1"})))
        .collect();
    let duplicate_name = r#"{"services": {"app": {"image": "a:1"}, "app": {"image": "b:1"}},
        "ports": [{"name": "web", "port": 80, "protocol": "http"}]}"#;
    let bad: Vec<(Method, &str, Value, StatusCode, Option<&str>)> = vec![
        (
            Method::PUT,
            "/v1/challenges/web",
            services(&|v| v["ports"][0]["service"] = json!("cache")),
            StatusCode::BAD_REQUEST,
            Some("ports[0].service"),
        ),
        (
            Method::PUT,
            "/v1/challenges/web",
            services(&|v| v["services"] = Value::Object(nine.clone())),
            StatusCode::BAD_REQUEST,
            Some("services"),
        ),
        (
            Method::PUT,
            "/v1/challenges/web",
            services(&|v| v["services"]["db"]["depends_on"] = json!(["bot"])),
            StatusCode::BAD_REQUEST,
            Some("services.app.depends_on"),
        ),
        (
            Method::PUT,
            "/v1/challenges/web",
            services(&|v| v["services"]["Not_A_Label"] = json!({"image": "x:1"})),
            StatusCode::BAD_REQUEST,
            Some("services.Not_A_Label"),
        ),
        (
            Method::PUT,
            "/v1/challenges/web",
            json!({"image": "x", "ports": [], "colour": 1}),
            StatusCode::BAD_REQUEST,
            Some("colour"),
        ),
        (
            Method::PUT,
            "/v1/challenges/web",
            json!({"image": "x", "ports": [{"name": "a", "port": 1, "protocol": "udp"}]}),
            StatusCode::BAD_REQUEST,
            Some("ports[0].protocol"),
        ),
        (
            Method::PUT,
            "/v1/challenges/web",
            json!({"image": "x", "ports": [{"name": "a", "port": 1, "protocol": "tcp"}, {"name": "a", "port": 2, "protocol": "tcp"}]}),
            StatusCode::BAD_REQUEST,
            Some("ports[1].name"),
        ),
        (
            Method::PUT,
            "/v1/challenges/web",
            json!({"image": "x", "ports": [{"name": "a", "port": 1, "protocol": "tcp"}, {"name": "b", "port": 1, "protocol": "tcp"}]}),
            StatusCode::BAD_REQUEST,
            Some("ports[1].port"),
        ),
        (
            Method::PUT,
            "/v1/challenges/Bad_Name",
            web_spec(),
            StatusCode::BAD_REQUEST,
            Some("name"),
        ),
        (
            Method::PUT,
            "/v1/challenges/web",
            json!("not an object"),
            StatusCode::BAD_REQUEST,
            Some("."),
        ),
        (
            Method::POST,
            "/v1/instances",
            json!({"challenge": "web"}),
            StatusCode::BAD_REQUEST,
            Some("."),
        ),
        (
            Method::POST,
            "/v1/instances",
            json!({"challenge": "web", "team": "a/b"}),
            StatusCode::BAD_REQUEST,
            Some("team"),
        ),
        (
            Method::POST,
            "/v1/instances",
            json!({"challenge": "web", "team": "t", "x": 1}),
            StatusCode::BAD_REQUEST,
            Some("x"),
        ),
        (
            Method::POST,
            "/v1/instances",
            json!({"challenge": "nope", "team": "t"}),
            StatusCode::NOT_FOUND,
            Some("challenge"),
        ),
        (
            Method::GET,
            "/v1/instances/NOT-AN-ID",
            Value::Null,
            StatusCode::BAD_REQUEST,
            Some("id"),
        ),
        (
            Method::GET,
            "/v1/instances/0000000001",
            Value::Null,
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::POST,
            "/v1/instances/0000000001/flag",
            json!({"flag": "x"}),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::DELETE,
            "/v1/challenges/nope",
            Value::Null,
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            Method::PATCH,
            "/v1/challenges/web",
            Value::Null,
            StatusCode::METHOD_NOT_ALLOWED,
            None,
        ),
    ];
    for (method, path, body, want, field) in bad {
        let body = (!body.is_null()).then_some(body);
        let (s, answer) = c.call(method.clone(), path, body, Some(ADMIN)).await;
        assert_eq!(s, want, "{method} {path}: {answer}");
        assert!(
            answer["error"].is_string(),
            "{method} {path}: error body not JSON: {answer}"
        );
        if let Some(f) = field {
            assert_eq!(answer["field"], f, "{method} {path}: {answer}");
        }
    }
    // Over 1 MiB: 413 with a JSON body.
    let big = reqwest::Client::new()
        .put(format!("{}/v1/challenges/web", c.url))
        .bearer_auth(ADMIN)
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = big.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("1048576"));
    // A service named twice (raw JSON: a map keeps the last silently).
    let r = reqwest::Client::new()
        .put(format!("{}/v1/challenges/web", c.url))
        .bearer_auth(ADMIN)
        .body(duplicate_name)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["field"], "services", "{body}");
    assert!(
        body.get("reason").is_none(),
        "a 400 names a field, not a reason: {body}"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("\"app\" listed twice"),
        "{body}"
    );
    // A malformed If-Match.
    let r = reqwest::Client::new()
        .put(format!("{}/v1/challenges/web", c.url))
        .bearer_auth(ADMIN)
        .header("If-Match", "yesterday")
        .body(web_spec().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        revision(&client).await,
        before,
        "a refused request wrote to etcd"
    );

    // No worker registered: 503 with the reason.
    let (s, body) = c.spawn("web", "t1").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["error"].as_str().unwrap().contains("no worker"),
        "{body}"
    );
    assert_eq!(body["reason"], "no_worker", "{body}");

    let (s, doc) = c
        .call(Method::GET, "/v1/openapi.json", None, Some(""))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["paths"]["/v1/instances"]["post"].is_object());
}

/// Several renewals of one instance at once (a player double-clicking
/// "extend", or a platform retrying): the one that commits extends it; the
/// others are decided again on the renewed record, so they are told it is
/// too early instead of "changed while renewing; try again".
#[tokio::test]
async fn concurrent_renewals_are_decided_again_not_refused_as_conflicts() {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(&etcd, "c1", dir.path()).await;
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 10).await;
    let spec = json!({"image": "x", "ports": [{"name": "web", "port": 80, "protocol": "http"}],
        "ttl": {"default_secs": 30, "max_secs": 600, "max_renewals": 50}});
    assert_eq!(c.put_challenge("web", spec).await.0, StatusCode::CREATED);
    assert!(
        eventually(5, || async {
            c.call(Method::GET, "/v1/workers", None, None).await.1["workers"][0]["id"] == "worker-a"
        })
        .await
    );
    let (s, inst) = c.spawn("web", "team-1").await;
    assert_eq!(s, StatusCode::CREATED, "{inst}");
    let path = format!("/v1/instances/{}/renew", inst["id"].as_str().unwrap());
    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let answers =
            futures::future::join_all((0..6).map(|_| c.call(Method::POST, &path, None, None)))
                .await;
        let ok = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
        assert!(ok >= 1, "round {round}: no renewal committed: {answers:?}");
        for (s, body) in &answers {
            let error = body["error"].as_str().unwrap_or_default();
            assert!(
                *s == StatusCode::OK
                    || (*s == StatusCode::CONFLICT && error.contains("would not extend")),
                "round {round}: {s} {body}"
            );
        }
    }
}

#[tokio::test]
async fn instance_lifecycle_spawn_get_flag_renew_delete() {
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(&etcd, "c1", dir.path()).await;
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 10).await;
    let mut spec = json!({"image": "x", "ports": [
        {"name": "web", "port": 80, "protocol": "http"},
        {"name": "admin", "port": 81, "protocol": "http"},
        {"name": "nc", "port": 1337, "protocol": "tcp"}],
        "ttl": {"default_secs": 30, "max_secs": 32, "max_renewals": 5},
        "flag": {"template": "CTF{{hmac}}"}});
    assert_eq!(
        c.put_challenge("multi", spec.clone()).await.0,
        StatusCode::CREATED
    );
    assert!(
        eventually(5, || async {
            c.call(Method::GET, "/v1/workers", None, None).await.1["workers"][0]["id"] == "worker-a"
        })
        .await
    );

    let (s, inst) = c.spawn("multi", "team-1").await;
    assert_eq!(s, StatusCode::CREATED, "{inst}");
    let id = inst["id"].as_str().unwrap().to_string();
    assert_eq!(inst["worker"], "worker-a");
    assert_eq!(inst["http"][0]["hostname"], format!("{id}.ctf.localhost"));
    assert_eq!(
        inst["http"][1]["hostname"],
        format!("{id}-admin.ctf.localhost")
    );
    assert_eq!(
        inst["http"][0]["url"],
        format!("http://{id}.ctf.localhost/")
    );
    let port = inst["tcp"][0]["port"].as_u64().unwrap();
    assert!((20000..=29999).contains(&port));
    assert_eq!(
        inst["tcp"][0]["tls_hostname"],
        format!("{id}-nc.ctf.localhost")
    );
    assert_eq!(inst["status"], "pending");
    assert_eq!(count(&client, &keys::claims()).await, 4);

    let (s, got) = c
        .call(Method::GET, &format!("/v1/instances/{id}"), None, None)
        .await;
    assert_eq!((s, &got["id"]), (StatusCode::OK, &json!(id)));
    let (_, list) = c
        .call(Method::GET, "/v1/instances?team=team-1", None, None)
        .await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 1);
    let (_, list) = c
        .call(Method::GET, "/v1/instances?team=team-2", None, None)
        .await;
    assert_eq!(list["instances"].as_array().unwrap().len(), 0);

    // The flag: not in the record every worker reads, but in the secret
    // only the owner reads; the stored one is right, anything else wrong.
    let stored = client.clone().get(keys::instance(&id), None).await.unwrap();
    let rec: Value = serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    assert!(rec.get("flag").is_none(), "{rec}");
    let worker = rec["worker"].as_str().unwrap();
    let stored = client
        .clone()
        .get(keys::secret(worker, &id), None)
        .await
        .unwrap();
    let secret: Value = serde_json::from_slice(stored.kvs()[0].value()).unwrap();
    assert_eq!(secret["worker"], rec["worker"], "{secret}");
    let flag = secret["flag"].as_str().unwrap();
    assert!(flag.starts_with("CTF{") && flag.len() == 5 + 32, "{flag}");
    let flag_path = format!("/v1/instances/{id}/flag");
    let check = |f: String| c.call(Method::POST, &flag_path, Some(json!({"flag": f})), None);
    assert_eq!(check(flag.to_string()).await.1, json!({"correct": true}));
    assert_eq!(check(format!("{flag}x")).await.1, json!({"correct": false}));
    assert_eq!(check("CTF{0}".into()).await.1, json!({"correct": false}));

    // Renew extends expires_at up to created_at + max_secs, then 409.
    let created = inst["created_at"].as_u64().unwrap();
    let first_expiry = inst["expires_at"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, renewed) = c
        .call(
            Method::POST,
            &format!("/v1/instances/{id}/renew"),
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{renewed}");
    let new_expiry = renewed["expires_at"].as_u64().unwrap();
    assert!(
        new_expiry > first_expiry && new_expiry <= created + 32,
        "{first_expiry} -> {new_expiry}"
    );
    assert_eq!(renewed["renewals"], 1);
    // Every key moved to the new lease: still 4 claims, one lease for all.
    let leases: BTreeSet<i64> = client
        .clone()
        .get(
            keys::all(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap()
        .kvs()
        .iter()
        .filter(|kv| {
            !kv.key_str().unwrap().contains("/workers/")
                && !kv.key_str().unwrap().contains("/challenges/")
                && !kv.key_str().unwrap().contains("/election/")
                && !kv.key_str().unwrap().contains("/controllers/")
                // Spawn guards and the flag's owner have no lease at all.
                && !kv.key_str().unwrap().contains("/guards/")
                && !kv.key_str().unwrap().contains("/flag-owners/")
        })
        .map(|kv| kv.lease())
        .collect();
    assert_eq!(
        leases.len(),
        1,
        "keys on several leases after renew: {leases:?}"
    );
    assert_eq!(count(&client, &keys::claims()).await, 4);
    assert_eq!(count(&client, &keys::secret(worker, &id)).await, 1);
    let mut last = (StatusCode::OK, Value::Null);
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        last = c
            .call(
                Method::POST,
                &format!("/v1/instances/{id}/renew"),
                None,
                None,
            )
            .await;
        if last.0 != StatusCode::OK {
            break;
        }
        assert!(last.1["expires_at"].as_u64().unwrap() <= created + 32);
    }
    assert_eq!(last.0, StatusCode::CONFLICT, "{}", last.1);
    assert!(
        last.1["error"]
            .as_str()
            .unwrap()
            .contains("maximum lifetime"),
        "{}",
        last.1
    );

    // max_renewals is enforced too.
    spec["ttl"] = json!({"default_secs": 30, "max_secs": 600, "max_renewals": 1});
    c.put_challenge("once", spec).await;
    let (_, inst2) = c.spawn("once", "team-1").await;
    let id2 = inst2["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        c.call(
            Method::POST,
            &format!("/v1/instances/{id2}/renew"),
            None,
            None
        )
        .await
        .0,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, body) = c
        .call(
            Method::POST,
            &format!("/v1/instances/{id2}/renew"),
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        body["error"].as_str().unwrap().contains("renewed 1 times"),
        "{body}"
    );
    assert_eq!(body["reason"], "max_renewals", "{body}");

    // Delete removes the record and every claim at once.
    for id in [id.as_str(), id2] {
        let (s, _) = c
            .call(Method::DELETE, &format!("/v1/instances/{id}"), None, None)
            .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
    }
    assert_eq!(
        count(&client, &keys::prefix(tidegate_schema::Kind::Instances)).await,
        0
    );
    assert_eq!(count(&client, &keys::claims()).await, 0);
    assert_eq!(
        c.call(Method::DELETE, &format!("/v1/instances/{id}"), None, None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn concurrent_spawns_respect_per_team_max_and_never_share_names() {
    let etcd = EtcdCluster::start(3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = Controller::start(&etcd, "c1", dir.path()).await;
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    register_worker(&client, "worker-a", 1000).await;
    register_worker(&client, "worker-b", 1000).await;
    c.put_challenge("web", web_spec()).await;
    c.put_challenge(
        "multi",
        json!({"image": "x", "per_team_max": 2, "ports": [
        {"name": "web", "port": 80, "protocol": "http"},
        {"name": "nc", "port": 1337, "protocol": "tcp"}]}),
    )
    .await;
    assert!(sees_workers(&c, 2).await);

    // 50 concurrent spawns for one team, per_team_max 1: exactly one 201.
    let answers = futures_join(50, |_| c.spawn("web", "team-x")).await;
    let created = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    let conflicts = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CONFLICT)
        .count();
    assert_eq!((created, conflicts), (1, 49), "{answers:?}");

    // 200 concurrent spawns across 100 teams: no hostname or port twice.
    let c = &c;
    let answers = futures_join(200, |i| {
        let team = format!("team-{}", i / 2);
        async move { c.spawn("multi", &team).await }
    })
    .await;
    let mut hostnames = BTreeSet::new();
    let mut ports = BTreeSet::new();
    let mut per_worker = std::collections::BTreeMap::<String, usize>::new();
    for (s, body) in &answers {
        assert_eq!(*s, StatusCode::CREATED, "{body}");
        assert!(hostnames.insert(body["http"][0]["hostname"].as_str().unwrap().to_string()));
        assert!(ports.insert(body["tcp"][0]["port"].as_u64().unwrap()));
        *per_worker
            .entry(body["worker"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!((hostnames.len(), ports.len()), (200, 200));
    // Placement spreads: each worker got a share.
    assert!(per_worker.values().all(|n| *n >= 90), "{per_worker:?}");
}

/// Runs `n` requests at once and returns their answers in order.
async fn futures_join<F, Fut>(n: usize, make: F) -> Vec<(StatusCode, Value)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = (StatusCode, Value)>,
{
    futures::future::join_all((0..n).map(make)).await
}
