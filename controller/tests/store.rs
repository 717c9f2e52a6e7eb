//! The store layer against a real 3-member etcd: put-if-revision, the spawn
//! Txn's claims under concurrency, fencing, and lease expiry.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use tidegate_controller::{ChallengeError, Challenges, SpawnError, SpawnPlan, lifecycle, spawn};
use tidegate_lab::etcd::EtcdCluster;
use tidegate_lab::keys;
use tidegate_schema::{
    ChallengeName, ChallengeSpec, Keyspace, Kind, TeamId, WorkerId, decode_json,
};

fn spec(json: &str) -> ChallengeSpec {
    decode_json(json.as_bytes()).unwrap()
}

fn web_spec() -> ChallengeSpec {
    spec(
        r#"{"image": "tidegate/demo-http:2", "ports": [{"name": "web", "port": 8080, "protocol": "http"}]}"#,
    )
}

async fn count(client: &mut Client, prefix: &str) -> usize {
    client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap()
        .count() as usize
}

/// Becomes leader of the keyspace's election; returns (leader key, token, lease).
async fn campaign(client: &mut Client, ks: &Keyspace, ttl: i64) -> (String, i64, i64) {
    let lease = client.lease_grant(ttl, None).await.unwrap().id();
    let resp = client
        .campaign(ks.election_name(), "test-leader", lease)
        .await
        .unwrap();
    let leader = resp.leader().unwrap();
    (leader.key_str().unwrap().to_string(), leader.rev(), lease)
}

fn plan(
    ks: &Keyspace,
    challenge: tidegate_schema::ChallengeRecord,
    key: &str,
    token: i64,
    team: &str,
) -> SpawnPlan {
    SpawnPlan {
        keys: ks.clone(),
        leader_key: key.to_string(),
        token,
        challenge,
        team: TeamId::parse(team).unwrap(),
        worker: WorkerId::parse("worker-a").unwrap(),
        domain: "ctf.localhost".into(),
        tcp_ports: 20000..=29999,
        ttl_secs: 600,
        now: 1_700_000_000,
        challenge_revision: 0,
        secret_env: Default::default(),
        guards: Vec::new(),
    }
}

/// A running etcd, a client, and challenge `name` stored from `spec`.
struct Fixture {
    _etcd: EtcdCluster,
    client: Client,
    ks: Keyspace,
    challenge: tidegate_schema::ChallengeRecord,
}

async fn fixture(members: usize, name: &str, spec: ChallengeSpec) -> Fixture {
    let etcd = EtcdCluster::start(members).unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let ks = Keyspace::default();
    let store = Challenges::new(client.clone(), ks.clone());
    let name = ChallengeName::parse(name).unwrap();
    store.put(&name, spec, None).await.unwrap();
    let challenge = store.get(&name).await.unwrap().value;
    Fixture {
        _etcd: etcd,
        client,
        ks,
        challenge,
    }
}

#[tokio::test]
async fn if_match_lets_exactly_one_of_two_writers_win() {
    let etcd = EtcdCluster::start(3).unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let store = Challenges::new(client.clone(), Keyspace::default());
    let name = ChallengeName::parse("web").unwrap();
    let (rev, created) = store.put(&name, web_spec(), Some(0)).await.unwrap();
    assert!(created);

    let mut a = web_spec();
    a.per_team_max = 2;
    let mut b = web_spec();
    b.per_team_max = 3;
    let (ra, rb) = tokio::join!(
        store.put(&name, a, Some(rev)),
        store.put(&name, b, Some(rev))
    );
    let (ok, err) = match (ra, rb) {
        (Ok(ok), Err(err)) | (Err(err), Ok(ok)) => (ok, err),
        other => panic!("wanted exactly one winner, got {other:?}"),
    };
    let ChallengeError::RevisionMismatch {
        expected, current, ..
    } = err
    else {
        panic!("{err}")
    };
    assert_eq!((expected, current), (rev, ok.0));
    let stored = store.get(&name).await.unwrap();
    assert_eq!(stored.revision, ok.0);
    assert!([2, 3].contains(&stored.value.spec.per_team_max));

    // Create-only on an existing challenge, and a stale delete, change nothing.
    assert!(matches!(
        store.put(&name, web_spec(), Some(0)).await,
        Err(ChallengeError::RevisionMismatch { .. })
    ));
    assert!(matches!(
        store.delete(&name, Some(rev)).await,
        Err(ChallengeError::RevisionMismatch { .. })
    ));
    assert_eq!(store.get(&name).await.unwrap(), stored);
    // Plain PUTs (no If-Match) racing each other all land, last writer wins.
    let plain: Vec<_> = (0..10)
        .map(|i| {
            let (store, name) = (store.clone(), name.clone());
            let mut s = web_spec();
            s.per_team_max = 10 + i;
            tokio::spawn(async move { store.put(&name, s, None).await })
        })
        .collect();
    let mut last = 0;
    for t in plain {
        last = last.max(t.await.unwrap().unwrap().0);
    }
    let stored = store.get(&name).await.unwrap();
    assert_eq!(stored.revision, last);
    store.delete(&name, Some(stored.revision)).await.unwrap();
    assert!(matches!(
        store.get(&name).await,
        Err(ChallengeError::NotFound(_))
    ));
}

#[tokio::test]
async fn fifty_concurrent_spawns_for_one_team_with_per_team_max_1_yield_exactly_one() {
    let Fixture {
        _etcd,
        mut client,
        ks,
        challenge,
    } = fixture(3, "web", web_spec()).await;
    let (key, token, _) = campaign(&mut client, &ks, 30).await;

    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (client, plan) = (
                client.clone(),
                plan(&ks, challenge.clone(), &key, token, "team-1"),
            );
            tokio::spawn(async move { spawn(&client, &plan, |id| format!("flag{{{id}}}")).await })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(SpawnError::TeamLimit { max: 1, .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(
        count(&mut client, &ks.prefix(tidegate_schema::Kind::Instances)).await,
        1
    );
    assert_eq!(
        count(&mut client, &ks.prefix(tidegate_schema::Kind::TeamSlots)).await,
        1
    );
}

#[tokio::test]
async fn two_hundred_concurrent_spawns_never_share_a_hostname_or_port() {
    let multi = spec(
        r#"{"image": "x", "per_team_max": 2, "ports": [
            {"name": "web", "port": 80, "protocol": "http"},
            {"name": "api", "port": 81, "protocol": "http"},
            {"name": "nc", "port": 1337, "protocol": "tcp"}]}"#,
    );
    let Fixture {
        _etcd,
        mut client,
        ks,
        challenge,
    } = fixture(3, "multi", multi).await;
    let (key, token, _) = campaign(&mut client, &ks, 30).await;

    // A small port range makes collisions likely, so the claims are exercised.
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let mut p = plan(
                &ks,
                challenge.clone(),
                &key,
                token,
                &format!("team-{}", i / 2),
            );
            p.tcp_ports = 20000..=20499;
            let client = client.clone();
            tokio::spawn(async move { spawn(&client, &p, |_| "flag{x}".into()).await })
        })
        .collect();
    let mut hostnames = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for t in tasks {
        let s = t.await.unwrap().unwrap();
        for r in &s.record.http {
            assert!(
                hostnames.insert(r.hostname.clone()),
                "hostname {} handed out twice",
                r.hostname
            );
        }
        for r in &s.record.tcp {
            assert!(ports.insert(r.port), "port {} handed out twice", r.port);
        }
    }
    assert_eq!((hostnames.len(), ports.len()), (400, 200));
    assert_eq!(
        count(
            &mut client,
            &ks.prefix(tidegate_schema::Kind::HostnameClaims)
        )
        .await,
        400
    );
    assert_eq!(
        count(&mut client, &ks.prefix(tidegate_schema::Kind::PortClaims)).await,
        200
    );
}

/// A renewal moves the keys to a new lease and revokes the old one; a
/// delete that read the old lease must still delete (the chaos suite saw
/// it answer 503 "requested lease not found" and leave the instance).
#[tokio::test]
async fn a_delete_racing_a_renewal_still_deletes() {
    let Fixture {
        _etcd,
        mut client,
        ks,
        challenge,
    } = fixture(1, "web", web_spec()).await;
    let (key, token, _) = campaign(&mut client, &ks, 30).await;
    let mut renewed_first = 0;
    for i in 0..20u64 {
        let p = plan(&ks, challenge.clone(), &key, token, &format!("team-{i}"));
        let s = spawn(&client, &p, |_| "flag{x}".into()).await.unwrap();
        let id = s.record.id.clone();
        let current = lifecycle::get(&client, &ks, &id).await.unwrap();
        let now = s.record.created_at;
        let (renewed, deleted) = tokio::join!(
            lifecycle::renew(
                &client,
                &ks,
                (&key, token),
                &current,
                s.record.expires_at + 60,
                now
            ),
            async {
                // Staggered so that the delete's read and revoke land before,
                // inside and after the renewal's Txn over the 20 rounds.
                tokio::time::sleep(Duration::from_micros(250 * i)).await;
                lifecycle::delete(&client, &ks, &id, None).await
            },
        );
        deleted.unwrap_or_else(|e| panic!("delete of {id} racing a renewal: {e}"));
        renewed_first += usize::from(renewed.is_ok());
        let left = count(&mut client, &keys::instance(id.as_str())).await;
        assert_eq!(left, 0, "{id} survived its delete");
    }
    println!("renewal committed before the delete in {renewed_first} of 20 races");
}

/// A 1-member etcd with one instance of `web` for team-1, spawned by a
/// leader that holds `key` with fencing token `token`.
struct One {
    _etcd: EtcdCluster,
    client: Client,
    ks: Keyspace,
    key: String,
    token: i64,
    s: tidegate_controller::Spawned,
}

async fn one_instance(flag: &'static str) -> One {
    let Fixture {
        _etcd,
        mut client,
        ks,
        challenge,
    } = fixture(1, "web", web_spec()).await;
    let (key, token, _) = campaign(&mut client, &ks, 30).await;
    let p = plan(&ks, challenge, &key, token, "team-1");
    let s = spawn(&client, &p, move |_| flag.into()).await.unwrap();
    One {
        _etcd,
        client,
        ks,
        key,
        token,
        s,
    }
}

/// The owning agent writes the endpoint (its container's status) when that
/// changes: once the container runs, again on every restart. Renewals
/// racing those writes all commit, and the endpoint moves to each new lease
/// with the agent's newest value. (Before, a renewal compared the
/// endpoint's revision between its read and its Txn and answered 409.)
#[tokio::test]
async fn renewals_racing_the_agents_endpoint_writes_commit_and_keep_the_newest_status() {
    let One {
        _etcd,
        mut client,
        ks,
        key,
        token,
        s,
    } = one_instance("flag{x}").await;
    let id = s.record.id.clone();
    let status_key = ks.key(&tidegate_schema::Key::Status {
        worker: s.record.worker.clone(),
        instance: id.clone(),
    });
    let instance_key = ks.key(&tidegate_schema::Key::Instance(id.clone()));
    let mut expires_at = s.record.expires_at;
    let mut renew = async |client: &Client| {
        let current = lifecycle::get(client, &ks, &id).await.unwrap();
        expires_at += 60;
        lifecycle::renew(
            client,
            &ks,
            (&key, token),
            &current,
            expires_at,
            s.record.created_at,
        )
        .await
    };

    // No endpoint yet (the container is starting): none is made up.
    renew(&client).await.unwrap();
    assert_eq!(count(&mut client, &status_key).await, 0);

    // The agent's writer, as in reconcile.rs: only on the lease the
    // instance is on; when that moved, it reads the new one and writes again.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (mut client, stop) = (client.clone(), stop.clone());
        let (status_key, instance_key) = (status_key.clone(), instance_key.clone());
        tokio::spawn(async move {
            let mut written = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got = client.get(instance_key.as_str(), None).await.unwrap();
                let lease = got.kvs()[0].lease();
                let txn = etcd_client::Txn::new()
                    .when([etcd_client::Compare::lease(
                        instance_key.as_str(),
                        etcd_client::CompareOp::Equal,
                        lease,
                    )])
                    .and_then([etcd_client::TxnOp::put(
                        status_key.as_str(),
                        format!("status {}", written + 1),
                        Some(etcd_client::PutOptions::new().with_lease(lease)),
                    )]);
                if client.txn(txn).await.unwrap().succeeded() {
                    written += 1;
                }
            }
            written
        })
    };
    let mut conflicts = Vec::new();
    for round in 0..40 {
        if let Err(e) = renew(&client).await {
            conflicts.push(format!("renewal {round}: {e}"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written >= 40, "the writer wrote only {written} times");
    assert!(conflicts.is_empty(), "{conflicts:?}");

    let instance = client.get(instance_key.as_str(), None).await.unwrap();
    let endpoint = client.get(status_key.as_str(), None).await.unwrap();
    assert_eq!(
        endpoint.kvs()[0].lease(),
        instance.kvs()[0].lease(),
        "the endpoint is on the instance's lease"
    );
    assert_eq!(
        endpoint.kvs()[0].value_str().unwrap(),
        format!("status {written}"),
        "the endpoint holds the agent's last write"
    );
}

#[tokio::test]
async fn a_fenced_scheduler_writes_nothing() {
    let Fixture {
        _etcd,
        mut client,
        ks,
        challenge,
    } = fixture(3, "web", web_spec()).await;

    let (old_key, old_token, old_lease) = campaign(&mut client, &ks, 30).await;
    // The old leader's lease ends (as when it is paused past its TTL) and another wins.
    client.lease_revoke(old_lease).await.unwrap();
    let (new_key, new_token, _) = campaign(&mut client, &ks, 30).await;
    assert!(new_token > old_token);

    let stale = plan(&ks, challenge.clone(), &old_key, old_token, "team-1");
    let err = spawn(&client, &stale, |_| "flag{x}".into())
        .await
        .unwrap_err();
    assert!(
        matches!(err, SpawnError::Fenced { token, .. } if token == old_token),
        "{err}"
    );
    assert_eq!(count(&mut client, &keys::prefix(Kind::Instances)).await, 0);
    assert_eq!(count(&mut client, &keys::claims()).await, 0);

    let fresh = plan(&ks, challenge, &new_key, new_token, "team-1");
    let s = spawn(&client, &fresh, |_| "flag{x}".into()).await.unwrap();
    assert_eq!(s.record.token, new_token);
}

#[tokio::test]
async fn an_expiring_lease_removes_every_key_of_the_instance() {
    let both = spec(
        r#"{"image": "x", "ports": [{"name": "web", "port": 80, "protocol": "http"},
            {"name": "nc", "port": 1337, "protocol": "tcp"}]}"#,
    );
    let Fixture {
        _etcd,
        mut client,
        ks,
        challenge,
    } = fixture(1, "both", both).await;
    let (key, token, _) = campaign(&mut client, &ks, 30).await;
    let mut p = plan(&ks, challenge, &key, token, "team-1");
    p.ttl_secs = 2;
    spawn(&client, &p, |_| "flag{x}".into()).await.unwrap();
    assert_eq!(count(&mut client, &keys::prefix(Kind::Instances)).await, 1);
    assert_eq!(count(&mut client, &keys::claims()).await, 3);
    let mut gone = false;
    for _ in 0..100 {
        if count(&mut client, &keys::prefix(Kind::Instances)).await == 0
            && count(&mut client, &keys::claims()).await == 0
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "instance keys outlived their 2 s lease by 10 s");
}

/// A record written before flags moved to `secrets/` carries its flag
/// inline, where every worker reads it: renewing it moves the flag to the
/// worker's secret (on the new lease) and writes the record without it; the
/// flag check still finds it.
#[tokio::test]
async fn renewing_a_record_with_an_inline_flag_moves_the_flag_to_its_secret() {
    let One {
        _etcd,
        mut client,
        ks,
        key,
        token,
        s,
    } = one_instance("flag{old}").await;
    let id = s.record.id.clone();
    let secret_key = ks.key(&tidegate_schema::Key::Secret {
        worker: s.record.worker.clone(),
        instance: id.clone(),
    });
    let instance_key = ks.key(&tidegate_schema::Key::Instance(id.clone()));
    // Make it look like an old record: the flag inline, no secret.
    let mut old = s.record.clone();
    old.flag = Some("flag{old}".into());
    client
        .put(
            instance_key.as_str(),
            tidegate_schema::Record::encode(&old),
            Some(etcd_client::PutOptions::new().with_lease(s.lease)),
        )
        .await
        .unwrap();
    client.delete(secret_key.as_str(), None).await.unwrap();
    let current = lifecycle::get(&client, &ks, &id).await.unwrap();
    assert_eq!(current.record.flag.as_deref(), Some("flag{old}"));

    let renewed = lifecycle::renew(
        &client,
        &ks,
        (&key, token),
        &current,
        s.record.expires_at + 60,
        s.record.created_at,
    )
    .await
    .unwrap();
    assert_eq!(renewed.record.flag, None);
    let now = lifecycle::get(&client, &ks, &id).await.unwrap();
    assert_eq!(now.record.flag, None, "the record still holds the flag");
    let secret = client.get(secret_key.as_str(), None).await.unwrap();
    let kv = &secret.kvs()[0];
    assert_eq!(kv.lease(), now.lease, "the secret is not on the new lease");
    let secret: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
    assert_eq!(secret["flag"], "flag{old}");
    assert_eq!(
        lifecycle::flag(&client, &ks, &now.record).await.unwrap(),
        Some("flag{old}".to_string())
    );
}

#[tokio::test]
async fn a_renewal_whose_answer_was_lost_is_settled_without_losing_the_instance() {
    let Fixture {
        _etcd,
        mut client,
        ks,
        challenge,
    } = fixture(1, "web", web_spec()).await;
    let (key, token, _) = campaign(&mut client, &ks, 30).await;

    // It committed, and its answer never came: settling finds the record on
    // the new lease, says so, and leaves that lease alone.
    let s = spawn(
        &client,
        &plan(&ks, challenge.clone(), &key, token, "t1"),
        |_| "flag{x}".into(),
    )
    .await
    .unwrap();
    let before = lifecycle::get(&client, &ks, &s.record.id).await.unwrap();
    let expiry = s.record.expires_at + 60;
    lifecycle::renew(
        &client,
        &ks,
        (&key, token),
        &before,
        expiry,
        s.record.created_at,
    )
    .await
    .unwrap();
    let after = lifecycle::get(&client, &ks, &s.record.id).await.unwrap();
    match lifecycle::settle(&client, &ks, &before, after.lease).await {
        lifecycle::Settled::Renewed(r) => assert_eq!(r.expires_at, expiry),
        other => panic!("a committed renewal settled as {other:?}"),
    }
    let now = lifecycle::get(&client, &ks, &s.record.id).await.unwrap();
    assert_eq!(now.lease, after.lease, "the renewed lease was given up");
    let ttl = client.lease_time_to_live(after.lease, None).await.unwrap();
    assert!(ttl.ttl() > 0, "the lease holding the record was revoked");

    // It never reached etcd: settling revokes the unused lease, and the
    // renewal Txn, should it arrive late, can no longer commit.
    let s = spawn(&client, &plan(&ks, challenge, &key, token, "t2"), |_| {
        "flag{x}".into()
    })
    .await
    .unwrap();
    let before = lifecycle::get(&client, &ks, &s.record.id).await.unwrap();
    let unused = client.lease_grant(600, None).await.unwrap().id();
    assert!(matches!(
        lifecycle::settle(&client, &ks, &before, unused).await,
        lifecycle::Settled::NotRenewed
    ));
    let ttl = client.lease_time_to_live(unused, None).await.unwrap();
    assert!(ttl.ttl() <= 0, "the unused lease is still there");
    let late = lifecycle::renew(
        &client,
        &ks,
        (&key, token),
        &before,
        s.record.expires_at + 60,
        s.record.created_at,
    )
    .await;
    assert!(
        matches!(late, Err(lifecycle::LifecycleError::Conflict(_))),
        "{late:?}"
    );
    let now = lifecycle::get(&client, &ks, &s.record.id).await.unwrap();
    assert_eq!(
        (now.lease, now.record.expires_at),
        (before.lease, before.record.expires_at),
        "the instance changed"
    );
}
