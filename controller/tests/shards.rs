//! Shard elections against a real etcd: three controllers share sixteen
//! shards 6/5/5, a crashed one's shards move to the others within its
//! lease TTL and nobody else's move, its late writes are fenced while the
//! other shards' leaders write on, and it takes its share back on return.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use tidegate_controller::shards::{Member, Shards};
use tidegate_controller::{Challenges, SpawnError, SpawnPlan, spawn};
use tidegate_lab::etcd::EtcdCluster;
use tidegate_schema::shards::shard_of;
use tidegate_schema::{ChallengeName, Keyspace, TeamId, WorkerId, decode_json};

const TTL: i64 = 2;
const SHARDS: u16 = 16;

fn start(client: &Client, id: &str) -> (Arc<Shards>, tokio::task::JoinHandle<()>) {
    let me = Member {
        id: id.into(),
        url: format!("http://{id}.invalid"),
        shards: SHARDS,
    };
    let s = Arc::new(Shards::new(me, TTL, Duration::from_millis(200)));
    let task = tokio::spawn(s.clone().run(client.clone(), Keyspace::default()));
    (s, task)
}

/// Shard → who leads it, from the controllers' own view; `None` while a
/// shard has no leader or two.
fn leaders(cs: &[(&str, &Arc<Shards>)]) -> Option<BTreeMap<u16, String>> {
    let mut out = BTreeMap::new();
    for shard in 0..SHARDS {
        let by: Vec<&str> = cs
            .iter()
            .filter(|(_, s)| s.lead(shard).is_some())
            .map(|(id, _)| *id)
            .collect();
        let [one] = by[..] else { return None };
        out.insert(shard, one.to_string());
    }
    Some(out)
}

fn counts(l: &BTreeMap<u16, String>) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for id in l.values() {
        *c.entry(id.clone()).or_default() += 1;
    }
    c
}

async fn until<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if let Some(v) = f() {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Every shard led by exactly one of `cs`, each holding 5 or 6.
fn spread(cs: &[(&str, &Arc<Shards>)]) -> Option<BTreeMap<u16, String>> {
    let l = leaders(cs)?;
    let c = counts(&l);
    (c.len() == cs.len() && c.values().all(|n| (5..=6).contains(n))).then_some(l)
}

#[tokio::test]
async fn sixteen_shards_spread_over_three_controllers_move_on_a_crash_and_come_back() {
    let etcd = EtcdCluster::start(1).unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let (a, _ta) = start(&client, "ctl-a");
    let (b, _tb) = start(&client, "ctl-b");
    let (c, tc) = start(&client, "ctl-c");
    let three = |c: &Arc<Shards>| {
        let c = c.clone();
        let (a, b) = (a.clone(), b.clone());
        move || spread(&[("ctl-a", &a), ("ctl-b", &b), ("ctl-c", &c)])
    };
    let before = until(15, three(&c))
        .await
        .expect("16 shards were not spread 5-6 over three controllers within 15 s");
    eprintln!("three controllers lead {:?}", counts(&before));
    let token = |s: &Arc<Shards>, shard| s.lead(shard).map(|l| l.token);
    let tokens: BTreeMap<u16, Option<i64>> = before
        .iter()
        .map(|(shard, id)| {
            let s = match id.as_str() {
                "ctl-a" => &a,
                "ctl-b" => &b,
                _ => &c,
            };
            (*shard, token(s, *shard))
        })
        .collect();

    // ctl-c crashes: its task stops, its lease runs out by itself. What it
    // believed it led stays in its memory, as in a paused process.
    let c_led = c.led();
    let stale = c.lead(c_led[0]).unwrap();
    tc.abort();
    let crashed = Instant::now();
    let after = until(6 * TTL as u64, || {
        let l = leaders(&[("ctl-a", &a), ("ctl-b", &b)])?;
        Some(l)
    })
    .await
    .expect("ctl-c's shards were not taken over within 6 TTLs");
    let took = crashed.elapsed();
    eprintln!(
        "ctl-c's {} shards moved in {took:?} (lease TTL {TTL} s); now {:?}",
        c_led.len(),
        counts(&after)
    );
    assert!(
        took <= Duration::from_secs(2 * TTL as u64 + 1),
        "the move took {took:?}"
    );
    for (shard, id) in &before {
        if id != "ctl-c" {
            let s = if id == "ctl-a" { &a } else { &b };
            assert_eq!(
                token(s, *shard),
                tokens[shard],
                "shard {shard} of {id} moved or changed token while ctl-c's moved"
            );
        }
    }

    // The crashed leader wakes and writes for one of its old shards: fenced.
    // The shard's new leader, and another shard's leader, write on.
    let store = Challenges::new(client.clone(), Keyspace::default());
    let named = |shard: u16| {
        let i = (0..10_000)
            .find(|i| shard_of(&format!("chall-{i}"), SHARDS) == shard)
            .unwrap();
        ChallengeName::parse(&format!("chall-{i}")).unwrap()
    };
    let spec = || {
        decode_json(
            br#"{"image": "x", "ports": [{"name": "web", "port": 80, "protocol": "http"}]}"#,
        )
        .unwrap()
    };
    let plan = |challenge, key: &str, token| SpawnPlan {
        keys: Keyspace::default(),
        leader_key: key.to_string(),
        token,
        challenge,
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
    let moved = c_led[0];
    let name = named(moved);
    store.put(&name, spec(), None).await.unwrap();
    let challenge = store.get(&name).await.unwrap().value;
    let err = spawn(
        &client,
        &plan(challenge.clone(), &stale.key, stale.token),
        |_| "f".into(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SpawnError::Fenced { .. }), "{err}");
    let now_leads = if after[&moved] == "ctl-a" { &a } else { &b };
    let new = now_leads.lead(moved).unwrap();
    assert!(new.token > stale.token);
    spawn(&client, &plan(challenge, &new.key, new.token), |_| {
        "f".into()
    })
    .await
    .unwrap();
    let other = (0..SHARDS).find(|s| before[s] == "ctl-a").unwrap();
    let name = named(other);
    store.put(&name, spec(), None).await.unwrap();
    let challenge = store.get(&name).await.unwrap().value;
    let lead = a.lead(other).unwrap();
    assert_eq!(Some(lead.token), tokens[&other]);
    spawn(&client, &plan(challenge, &lead.key, lead.token), |_| {
        "f".into()
    })
    .await
    .unwrap();

    // ctl-c comes back: it takes 5 or 6 shards from the others, which keep
    // the rest, and every shard has one leader.
    let (c2, _tc2) = start(&client, "ctl-c");
    let back = Instant::now();
    let settled = until(60, three(&c2))
        .await
        .expect("ctl-c did not take its share back within a minute");
    eprintln!(
        "ctl-c took back {} shards in {:?}",
        counts(&settled)["ctl-c"],
        back.elapsed()
    );
    let kept = settled
        .iter()
        .filter(|(s, id)| *id != "ctl-c" && after[s] == **id)
        .count();
    assert_eq!(
        kept,
        16 - counts(&settled)["ctl-c"],
        "{after:?} -> {settled:?}"
    );
    // What a controller shows as the leaders (for /v1/status) agrees.
    until(2, || {
        let seen: BTreeMap<u16, String> = b
            .seen()
            .leaders
            .iter()
            .map(|(s, (m, _))| (*s, m.id.clone()))
            .collect();
        (seen == settled).then_some(())
    })
    .await
    .expect("ctl-b's view of the leaders differs from who leads");
}

#[tokio::test]
async fn a_restarted_controller_takes_over_its_previous_keys_at_once() {
    let etcd = EtcdCluster::start(1).unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let (a, ta) = start(&client, "solo");
    until(10, || (a.led().len() == usize::from(SHARDS)).then_some(()))
        .await
        .expect("a lone controller did not lead every shard");
    ta.abort();
    // Restarted at once, under the same id: no wait for the old lease.
    let (a2, _t2) = start(&client, "solo");
    let back = Instant::now();
    until(TTL as u64, || {
        (a2.led().len() == usize::from(SHARDS)).then_some(())
    })
    .await
    .expect("the restarted controller waited for its previous lease");
    eprintln!(
        "restarted and leading all 16 shards again in {:?}",
        back.elapsed()
    );
}

#[tokio::test]
async fn controllers_that_disagree_on_the_shard_count_lead_nothing_until_one_is_gone() {
    let etcd = EtcdCluster::start(1).unwrap();
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let (a, _ta) = start(&client, "sixteen");
    until(10, || (a.led().len() == usize::from(SHARDS)).then_some(()))
        .await
        .expect("a lone controller did not lead every shard");
    // One more with 4 shards joins: both would lead shard 0..3's
    // challenges under different maps, so neither leads anything.
    let other = Member {
        id: "four".into(),
        url: "http://four.invalid".into(),
        shards: 4,
    };
    let b = Arc::new(Shards::new(other, TTL, Duration::from_millis(200)));
    let tb = tokio::spawn(b.clone().run(client.clone(), Keyspace::default()));
    until(5, || {
        (a.led().is_empty() && b.led().is_empty()).then_some(())
    })
    .await
    .expect("controllers with 16 and 4 shards went on leading side by side");
    // The odd one stops (its lease runs out): the other leads again.
    tb.abort();
    until(4 * TTL as u64, || {
        (a.led().len() == usize::from(SHARDS)).then_some(())
    })
    .await
    .expect("the controller with 16 shards did not lead again after the other left");
}
