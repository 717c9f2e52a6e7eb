//! Election against a real 3-member etcd: a standby takes over within two
//! lease TTLs of the leader going silent, with a higher fencing token, and
//! the old leader's writes are fenced off.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::time::{Duration, Instant};

use etcd_client::Client;
use tidegate_controller::{Challenges, SpawnError, SpawnPlan, campaign, spawn};
use tidegate_lab::etcd::EtcdCluster;
use tidegate_schema::{ChallengeName, Keyspace, TeamId, WorkerId, decode_json};

const TTL: i64 = 2;

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_goes_silent_and_the_old_token_is_fenced() {
    let etcd = EtcdCluster::start(3).unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let ks = Keyspace::default();
    let old = campaign(&client, &ks, "controller-a", TTL).await.unwrap();

    // The standby blocks in its campaign while the leader keeps its lease.
    let (c2, ks2) = (client.clone(), ks.clone());
    let mut standby = tokio::spawn(async move { campaign(&c2, &ks2, "controller-b", TTL).await });
    tokio::time::sleep(Duration::from_secs(3 * TTL as u64)).await;
    assert!(
        !standby.is_finished(),
        "standby won while the leader was alive"
    );
    assert!(!old.is_lost());

    // The leader goes silent (crash or SIGSTOP): its keep-alives stop.
    let silent_at = Instant::now();
    old.abandon();
    let new = tokio::time::timeout(Duration::from_secs(4 * TTL as u64), &mut standby)
        .await
        .expect("no takeover within 4 TTLs")
        .unwrap()
        .unwrap();
    let took = silent_at.elapsed();
    assert!(
        took <= Duration::from_secs(2 * TTL as u64),
        "takeover took {took:?}, more than 2 TTLs"
    );
    assert!(new.token > old.token);
    let mut c = client.clone();
    let leader = c.leader(ks.election_name()).await.unwrap();
    assert_eq!(leader.kv().unwrap().value(), b"controller-b");

    // The old leader wakes up and tries to schedule: nothing lands.
    let store = Challenges::new(client.clone(), ks.clone());
    let name = ChallengeName::parse("web").unwrap();
    let spec = decode_json(
        br#"{"image": "x", "ports": [{"name": "web", "port": 80, "protocol": "http"}]}"#,
    )
    .unwrap();
    store.put(&name, spec, None).await.unwrap();
    let challenge = store.get(&name).await.unwrap().value;
    let plan = |key: &str, token| SpawnPlan {
        keys: ks.clone(),
        leader_key: key.to_string(),
        token,
        challenge: challenge.clone(),
        team: TeamId::parse("t1").unwrap(),
        worker: WorkerId::parse("w1").unwrap(),
        domain: "ctf.localhost".into(),
        tcp_ports: 20000..=20999,
        ttl_secs: 60,
        now: 0,
        challenge_revision: 0,
        secret_env: Default::default(),
        guards: Vec::new(),
    };
    let err = spawn(&client, &plan(&old.key, old.token), |_| "f".into())
        .await
        .unwrap_err();
    assert!(matches!(err, SpawnError::Fenced { .. }), "{err}");
    let ok = spawn(&client, &plan(&new.key, new.token), |_| "f".into())
        .await
        .unwrap();
    assert_eq!(ok.record.token, new.token);
}

#[tokio::test]
async fn leadership_is_reported_lost_when_its_lease_is_gone() {
    let etcd = EtcdCluster::start(1).unwrap();
    let mut client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let mut lead = campaign(&client, &Keyspace::default(), "controller-a", TTL)
        .await
        .unwrap();
    assert!(!lead.is_lost());
    client.lease_revoke(lead.lease).await.unwrap();
    tokio::time::timeout(Duration::from_secs(4 * TTL as u64), lead.lost())
        .await
        .expect("loss not reported within 4 TTLs");
    assert!(lead.is_lost());
}
