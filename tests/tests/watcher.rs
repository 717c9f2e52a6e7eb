//! The shared watcher against a real etcd: list at R, watch from R+1,
//! resume after a lost member without loss or duplication, relist after
//! compaction, and hand malformed values to the consumer to report.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, CompactionOptions, GetOptions};
use tidegate_etcd::{Event, Watcher};
use tidegate_lab::etcd::EtcdCluster;
use tidegate_schema::{InstanceRecord, Key, Keyspace, Kind};

const STEP: Duration = Duration::from_secs(15);

async fn next(w: &mut Watcher) -> Event {
    tokio::time::timeout(STEP, w.next())
        .await
        .unwrap_or_else(|_| panic!("no watch event within {STEP:?} ({w:?})"))
}

/// Applies events to a view the way a consumer must (a relist replaces it).
#[derive(Default, Debug)]
struct View {
    live: BTreeMap<String, Vec<u8>>,
    building: Option<BTreeMap<String, Vec<u8>>>,
    inits: usize,
}

impl View {
    fn apply(&mut self, event: Event) {
        match event {
            Event::Init => {
                self.building = Some(BTreeMap::new());
                self.inits += 1;
            }
            Event::InitApply(kv) => {
                self.building
                    .as_mut()
                    .expect("InitApply outside Init")
                    .insert(kv.key, kv.value);
            }
            Event::InitDone { .. } => {
                self.live = self.building.take().expect("InitDone outside Init")
            }
            Event::Apply(kv) => {
                self.live.insert(kv.key, kv.value);
            }
            Event::Delete { key, .. } => {
                self.live.remove(&key);
            }
        }
    }
}

async fn etcd_view(client: &mut Client, prefix: &str) -> (BTreeMap<String, Vec<u8>>, i64) {
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let rev = resp.header().unwrap().revision();
    let map = resp
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), kv.value().to_vec()))
        .collect();
    (map, rev)
}

/// Feeds events into `view` until the watcher has caught up with `revision`.
async fn catch_up(w: &mut Watcher, view: &mut View, revision: i64) {
    while w.revision() < revision || view.building.is_some() {
        let e = next(w).await;
        view.apply(e);
    }
}

#[tokio::test]
async fn lists_at_a_revision_then_watches_from_the_next() {
    let etcd = EtcdCluster::start(1).unwrap();
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    let prefix = Keyspace::default().prefix(Kind::Instances);
    for i in 0..3 {
        c.put(format!("{prefix}k{i}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    c.put(
        format!("{}instancesX", Keyspace::default().root_prefix()),
        "outside the prefix",
        None,
    )
    .await
    .unwrap();

    let mut w = Watcher::new(c.clone(), prefix.clone());
    assert_eq!(next(&mut w).await, Event::Init);
    let mut keys = Vec::new();
    let revision = loop {
        match next(&mut w).await {
            Event::InitApply(kv) => keys.push(kv.key),
            Event::InitDone { revision } => break revision,
            other => panic!("unexpected {other:?} during the list"),
        }
    };
    assert_eq!(keys, [0, 1, 2].map(|i| format!("{prefix}k{i}")));
    let (_, now) = etcd_view(&mut c, &prefix).await;
    assert_eq!(revision, now);

    let put = c.put(format!("{prefix}k3"), "v3", None).await.unwrap();
    let del = c.delete(format!("{prefix}k0"), None).await.unwrap();
    c.put(
        format!("{}other/x", Keyspace::default().root_prefix()),
        "not watched",
        None,
    )
    .await
    .unwrap();
    match next(&mut w).await {
        Event::Apply(kv) => {
            assert_eq!(kv.key, format!("{prefix}k3"));
            assert_eq!(kv.mod_revision, put.header().unwrap().revision());
        }
        other => panic!("wanted Apply of k3, got {other:?}"),
    }
    assert_eq!(
        next(&mut w).await,
        Event::Delete {
            key: format!("{prefix}k0"),
            revision: del.header().unwrap().revision()
        }
    );
    assert_eq!(w.lists(), 1);
}

#[tokio::test]
async fn relists_after_compaction_and_ends_with_exactly_etcds_view() {
    let etcd = EtcdCluster::start(1).unwrap();
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    let prefix = &Keyspace::default().prefix(Kind::Statuses);
    for i in 0..5 {
        c.put(format!("{prefix}k{i}"), "old", None).await.unwrap();
    }
    let mut w = Watcher::new(c.clone(), prefix);
    let mut view = View::default();
    let (_, rev) = etcd_view(&mut c, prefix).await;
    catch_up(&mut w, &mut view, rev).await;
    let seen = w.revision();
    drop(w); // the watch is cut

    // Changes the consumer never sees as events, then their history is compacted.
    c.put(format!("{prefix}k1"), "new", None).await.unwrap();
    c.delete(format!("{prefix}k2"), None).await.unwrap();
    c.put(format!("{prefix}k9"), "added", None).await.unwrap();
    let (want, now) = etcd_view(&mut c, prefix).await;
    c.compact(now, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();

    let mut w = Watcher::resume(c.clone(), prefix, seen);
    catch_up(&mut w, &mut view, now).await;
    assert_eq!(w.lists(), 1, "the resumed watcher had to relist once");
    assert_eq!(view.inits, 2);
    assert_eq!(
        view.live, want,
        "the view after the relist differs from etcd"
    );
    assert!(
        !view.live.contains_key(&format!("{prefix}k2")),
        "stale key k2 survived"
    );
}

#[tokio::test]
async fn resumes_without_relisting_when_history_is_intact() {
    let etcd = EtcdCluster::start(1).unwrap();
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    let prefix = &Keyspace::default().prefix(Kind::Workers);
    let mut w = Watcher::new(c.clone(), prefix);
    let mut view = View::default();
    catch_up(&mut w, &mut view, 1).await;
    let seen = w.revision();
    drop(w);
    c.put(format!("{prefix}a"), "1", None).await.unwrap();
    let (want, now) = etcd_view(&mut c, prefix).await;
    let mut w = Watcher::resume(c.clone(), prefix, seen);
    catch_up(&mut w, &mut view, now).await;
    assert_eq!(w.lists(), 0, "no relist is needed when history is intact");
    assert_eq!(view.live, want);
}

#[tokio::test]
async fn loses_and_repeats_nothing_while_etcd_members_die() {
    let mut etcd = EtcdCluster::start(3).unwrap();
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    let prefix = &Keyspace::default().prefix(Kind::Instances);
    let mut w = Watcher::new(c.clone(), prefix);
    assert_eq!(next(&mut w).await, Event::Init);
    assert!(matches!(next(&mut w).await, Event::InitDone { .. }));

    let mut written = Vec::new();
    for (round, victim) in [0usize, 1, 2].into_iter().enumerate() {
        etcd.kill_member(victim).unwrap();
        for i in 0..10 {
            let key = format!("{prefix}r{round}-{i}");
            // Retry while the survivors elect a leader; a retried put is the same key and value.
            let mut ok = false;
            for _ in 0..100 {
                if c.put(key.as_str(), "x", None).await.is_ok() {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(ok, "put {key} failed for 10 s with member {victim} down");
            written.push(key);
        }
        etcd.restart_member(victim).unwrap();
        etcd.wait_healthy(victim).unwrap();
    }
    // Every write reaches the watcher once (a retried put could add a
    // second revision of a key, which is still only that key).
    let mut seen = Vec::new();
    while seen.len() < written.len() {
        match next(&mut w).await {
            Event::Apply(kv) => {
                if seen.last() != Some(&kv.key) {
                    seen.push(kv.key);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, written);
    assert_eq!(w.lists(), 1);
}

#[tokio::test]
async fn malformed_values_reach_the_consumer_as_errors_naming_the_key() {
    let etcd = EtcdCluster::start(1).unwrap();
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    let ks = Keyspace::default();
    let prefix = ks.prefix(Kind::Instances);
    let mut w = Watcher::new(c.clone(), prefix.clone());
    let mut view = View::default();
    catch_up(&mut w, &mut view, 1).await;

    c.put(format!("{prefix}a3f4b92c8d"), "{garbage", None)
        .await
        .unwrap();
    c.put(format!("{prefix}NOT-AN-ID"), "{}", None)
        .await
        .unwrap();
    let Event::Apply(garbage) = next(&mut w).await else {
        panic!()
    };
    assert!(matches!(garbage.parse_key(&ks), Ok(Key::Instance(_))));
    let err = garbage.decode::<InstanceRecord>().unwrap_err();
    assert!(!err.message.is_empty());
    let Event::Apply(bad_key) = next(&mut w).await else {
        panic!()
    };
    let err = bad_key.parse_key(&ks).unwrap_err();
    assert!(err.to_string().contains("NOT-AN-ID"), "{err}");
    // The watcher goes on.
    c.put(format!("{prefix}0000000001"), "{}", None)
        .await
        .unwrap();
    assert!(matches!(next(&mut w).await, Event::Apply(_)));
}

#[tokio::test]
async fn lists_more_than_one_grpc_message_in_consistent_pages() {
    let etcd = EtcdCluster::start(1).unwrap();
    let mut client = Client::connect(etcd.endpoints(), None).await.unwrap();
    // 3,000 keys of 2 KiB: 6 MB, more than a 4 MiB gRPC message, as 10,000
    // instance records are. A key just past the prefix must not be listed.
    let value = "x".repeat(2048);
    for chunk in (0..3000).collect::<Vec<u32>>().chunks(100) {
        let ops: Vec<_> = chunk
            .iter()
            .map(|i| etcd_client::TxnOp::put(format!("/big/k{i:05}"), value.as_str(), None))
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .unwrap();
    }
    client.put("/big0", "outside", None).await.unwrap();
    let mut w = Watcher::new(client.clone(), "/big/");
    let mut view = View::default();
    // (One unpaged range of it fails: the reason for the pages.)
    assert!(
        client
            .get("/big/", Some(GetOptions::new().with_prefix()))
            .await
            .is_err()
    );
    let revision = |r: etcd_client::GetResponse| r.header().unwrap().revision();
    let now = revision(client.get("/big0", None).await.unwrap());
    catch_up(&mut w, &mut view, now).await;
    assert_eq!(view.live.len(), 3000);
    assert!(view.live.values().all(|v| v == value.as_bytes()));
    assert_eq!(w.lists(), 1);
    let late = client.put("/big/k99999", "late", None).await.unwrap();
    catch_up(&mut w, &mut view, late.header().unwrap().revision()).await;
    assert_eq!(view.live.len(), 3001);
    assert_eq!(view.live["/big/k99999"], b"late");
    assert!(!view.live.contains_key("/big0"));
}
