//! One scheduler per shard: each controller registers itself, and every
//! controller takes the shards [`tidegate_schema::shards::assign`] gives it
//! and hands over those it gives to another.
//!
//! - A controller holds one lease (TTL `ttl_secs`, kept alive every third
//!   of it) for its registration (`controllers/{id}`) and every shard it
//!   leads (`election/shards/{n}`, created only where absent). A shard's
//!   fencing token is its key's create revision: every write for a
//!   challenge of that shard compares it, as writes compared the single
//!   election key before.
//! - Every `poll` it reads both prefixes at one revision, computes the
//!   assignment from the live controllers and current leaders, takes what
//!   is its own and free, and hands over what is another's: it stops
//!   writing first, then deletes the key (only its own, by create
//!   revision), and the other takes it at its next poll.
//! - A shard whose assignee does not take it within
//!   [`Shards::ORPHAN_POLLS`] polls is taken by anyone, so a controller
//!   stuck in some way cannot keep a shard leaderless.
//! - A leader that stops (crash, SIGSTOP, partition) loses its lease after
//!   the TTL; its shards then have no leader and go to the others by the
//!   same rule. Its own late writes fail the compare.
//! - A restarted controller with the same id deletes the shard keys its
//!   previous life left (they would otherwise wait for their TTL).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use tidegate_schema::{Key, Keyspace, Kind, WorkerId};
use tokio::sync::watch;

use crate::scheduler::LeaderInfo;

/// A controller's registration and the value of the shard keys it leads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub url: String,
    /// The shard count it runs with: controllers that disagree would fence
    /// each other's writes in the wrong places, so they say so.
    #[serde(default)]
    pub shards: u16,
}

/// What the last poll saw.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// The etcd revision of the poll.
    pub revision: i64,
    /// Shard → its leader and token.
    pub leaders: BTreeMap<u16, (Member, i64)>,
    /// The live controllers.
    pub live: Vec<Member>,
}

/// This controller's side of the shard elections.
#[derive(Debug)]
pub struct Shards {
    me: Member,
    ttl_secs: i64,
    poll: Duration,
    leads: Vec<ArcSwapOption<LeaderInfo>>,
    seen: ArcSwap<Seen>,
    /// Shard → polls in a row it has had no leader.
    orphaned: Mutex<BTreeMap<u16, u32>>,
    /// The current lease (0 between leases).
    lease: std::sync::atomic::AtomicI64,
    /// Counts every shard this controller takes.
    taken: prometheus_client::metrics::counter::Counter,
    /// Whether the last poll found the controllers disagreeing (logged once).
    disagreed: std::sync::atomic::AtomicBool,
}

impl Shards {
    /// Polls an unled shard waits for its assignee before anyone takes it.
    pub const ORPHAN_POLLS: u32 = 6;

    pub fn new(me: Member, ttl_secs: i64, poll: Duration) -> Self {
        let count = me.shards.max(1);
        Self {
            leads: (0..count).map(|_| ArcSwapOption::empty()).collect(),
            me,
            ttl_secs,
            poll,
            seen: ArcSwap::from_pointee(Seen::default()),
            orphaned: Mutex::new(BTreeMap::new()),
            lease: std::sync::atomic::AtomicI64::new(0),
            taken: Default::default(),
            disagreed: Default::default(),
        }
    }

    /// Counts every shard taken on `counter` too (leader changes).
    pub fn count_taken_on(mut self, counter: prometheus_client::metrics::counter::Counter) -> Self {
        self.taken = counter;
        self
    }

    /// How often to look at the elections for a lease of `ttl_secs`: a
    /// shard handed over is led again within this long.
    pub fn poll_for(ttl_secs: i64) -> Duration {
        Duration::from_millis((ttl_secs.max(1) as u64 * 1000 / 4).min(500))
    }

    /// The lease this controller holds its shards on now (0: none).
    pub fn lease(&self) -> i64 {
        self.lease.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops leading every shard and gives them up at once (shutdown): the
    /// others take them at their next poll instead of after the TTL.
    pub async fn resign(&self, client: &Client) {
        self.drop_all();
        let lease = self.lease();
        if lease != 0 {
            let _ = client.clone().lease_revoke(lease).await;
        }
    }

    /// The number of shards.
    pub fn count(&self) -> u16 {
        self.leads.len() as u16
    }

    /// The shard of challenge `name`.
    pub fn of(&self, name: &str) -> u16 {
        tidegate_schema::shards::shard_of(name, self.count())
    }

    /// This controller's lead of `shard`, while it has it.
    pub fn lead(&self, shard: u16) -> Option<Arc<LeaderInfo>> {
        self.leads.get(usize::from(shard))?.load_full()
    }

    /// The shards this controller leads now.
    pub fn led(&self) -> Vec<u16> {
        (0..self.count())
            .filter(|s| self.lead(*s).is_some())
            .collect()
    }

    /// What the last poll saw.
    pub fn seen(&self) -> Arc<Seen> {
        self.seen.load_full()
    }

    /// Stops leading everything at once (shutdown, a lost lease).
    fn drop_all(&self) {
        for l in &self.leads {
            l.store(None);
        }
    }

    /// Runs forever: keeps a lease, registers, and takes and hands over
    /// shards every `poll`.
    pub async fn run(self: Arc<Self>, client: Client, ks: Keyspace) {
        loop {
            match self.clone().term(&client, &ks).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "shard elections: etcd failed; again in 1 s"),
            }
            self.drop_all();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// One lease's life: until it is lost.
    async fn term(
        self: Arc<Self>,
        client: &Client,
        ks: &Keyspace,
    ) -> Result<(), etcd_client::Error> {
        let mut c = client.clone();
        let lease = c.lease_grant(self.ttl_secs, None).await?.id();
        self.lease
            .store(lease, std::sync::atomic::Ordering::Relaxed);
        let (tx, mut lost) = watch::channel(false);
        let keeper = tokio::spawn(crate::election::keep_alive(
            c.clone(),
            lease,
            self.ttl_secs,
            tx,
        ));
        let _keeper = AbortOnDrop(keeper);
        let me = WorkerId::parse(&self.me.id)
            .map_err(|e| etcd_client::Error::InvalidArgs(format!("controller id: {e}")))?;
        let value = serde_json::to_vec(&self.me).unwrap_or_default();
        c.put(
            ks.key(&Key::Controller(me)),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await?;
        tracing::info!(
            lease,
            shards = self.count(),
            "registered for the shard elections"
        );
        loop {
            if *lost.borrow() {
                tracing::warn!("the shard lease was lost: leading no shard; registering again");
                return Ok(());
            }
            // A failed poll changes nothing: the shards stay led (and
            // fenced) until the lease itself is lost, as a single election
            // would. Retried at the next poll.
            if let Err(e) = self.step(&mut c, ks, lease, &value).await {
                tracing::debug!(error = %e, "shard elections: a poll failed; next poll");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                // The keep-alive ended: lost (said at the top), or gone.
                changed = lost.changed() => if changed.is_err() && !*lost.borrow() {
                    tracing::warn!("the shard lease's keep-alive stopped: leading no shard; registering again");
                    return Ok(());
                },
            }
        }
    }

    /// One poll: look, then take and hand over.
    async fn step(
        &self,
        c: &mut Client,
        ks: &Keyspace,
        lease: i64,
        value: &[u8],
    ) -> Result<(), etcd_client::Error> {
        let prefix = || Some(GetOptions::new().with_prefix());
        let (leaders_prefix, members_prefix, single) = (
            ks.prefix(Kind::ShardLeaders),
            ks.prefix(Kind::Controllers),
            ks.prefix(Kind::Election),
        );
        let resp = c
            .txn(Txn::new().and_then([
                TxnOp::get(leaders_prefix.as_str(), prefix()),
                TxnOp::get(members_prefix.as_str(), prefix()),
                TxnOp::get(single.as_str(), prefix().map(|o| o.with_count_only())),
            ]))
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let ops = resp.op_responses();
        let kvs = |n: usize| match ops.get(n) {
            Some(etcd_client::TxnOpResponse::Get(g)) => g.kvs().to_vec(),
            _ => Vec::new(),
        };
        let mut seen = Seen {
            revision,
            ..Seen::default()
        };
        // Shard → (leader, token, lease).
        let mut held: BTreeMap<u16, (Member, i64, i64)> = BTreeMap::new();
        for kv in kvs(0) {
            let key = String::from_utf8_lossy(kv.key());
            let (Ok(Key::ShardLeader(shard)), Ok(m)) =
                (ks.parse(&key), serde_json::from_slice::<Member>(kv.value()))
            else {
                tracing::warn!(key = %key, "ignoring a malformed shard leader key");
                continue;
            };
            held.insert(shard, (m, kv.create_revision(), kv.lease()));
        }
        // Fail closed: while any live controller runs with another shard
        // count, holds a shard we do not have, or is a controller from
        // before shards (on the single election key), its leads and ours
        // would overlap with nothing to fence them apart. Lead nothing
        // until it is gone (a rolling upgrade or change of `shards`).
        let mut disagree: Option<String> = None;
        for kv in kvs(1) {
            match serde_json::from_slice::<Member>(kv.value()) {
                Ok(m) if m.shards == self.count() => seen.live.push(m),
                Ok(m) => {
                    disagree = Some(format!(
                        "controller {} runs with shards = {}",
                        m.id, m.shards
                    ));
                }
                Err(_) => {
                    tracing::warn!(key = %String::from_utf8_lossy(kv.key()), "ignoring a malformed controller registration")
                }
            }
        }
        if let Some(shard) = held.keys().find(|s| **s >= self.count()) {
            disagree = Some(format!("shard {shard} has a leader"));
        }
        let old_single = match ops.get(2) {
            Some(etcd_client::TxnOpResponse::Get(g)) => g.count(),
            _ => 0,
        };
        if old_single > 0 {
            disagree = Some("a controller from before shards holds the single election key".into());
        }
        if let Some(why) = disagree {
            if !self
                .disagreed
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(ours = self.count(), %why, "leading no shard: the controllers disagree on the shards");
            }
            self.drop_all();
            for (shard, (m, token, held_lease)) in &held {
                if *held_lease == lease && m.id == self.me.id {
                    delete_if(c, &ks.key(&Key::ShardLeader(*shard)), *token).await?;
                }
            }
            seen.leaders = held
                .iter()
                .map(|(s, (m, t, _))| (*s, (m.clone(), *t)))
                .collect();
            self.seen.store(Arc::new(seen));
            return Ok(());
        }
        self.disagreed
            .store(false, std::sync::atomic::Ordering::Relaxed);
        // Leads that etcd no longer shows as ours (deleted by hand, or
        // expired with a lease we thought alive) end now.
        for shard in 0..self.count() {
            if let Some(l) = self.lead(shard) {
                let still = held.get(&shard).is_some_and(|(_, token, held_lease)| {
                    *token == l.token && *held_lease == lease
                });
                if !still {
                    tracing::warn!(
                        shard,
                        token = l.token,
                        "lost shard: its key is gone or another's"
                    );
                    self.leads[usize::from(shard)].store(None);
                }
            }
        }
        let live: Vec<String> = seen.live.iter().map(|m| m.id.clone()).collect();
        let current: BTreeMap<u16, String> = held
            .iter()
            .filter(|(_, (m, ..))| live.contains(&m.id))
            .map(|(s, (m, ..))| (*s, m.id.clone()))
            .collect();
        let want = tidegate_schema::shards::assign(self.count(), &live, &current);
        let mut released = Vec::new();
        for shard in 0..self.count() {
            let key = ks.key(&Key::ShardLeader(shard));
            let mine = want.get(&shard).is_some_and(|id| *id == self.me.id);
            match held.get(&shard) {
                // A previous life of this controller: not ours to wait for.
                Some((m, token, held_lease)) if m.id == self.me.id && *held_lease != lease => {
                    delete_if(c, &key, *token).await?;
                    tracing::info!(
                        shard,
                        token,
                        "deleted the shard key of this controller's previous run"
                    );
                }
                Some((_, token, held_lease)) if *held_lease == lease && !mine => {
                    // Stop writing first, then let go.
                    self.leads[usize::from(shard)].store(None);
                    let to = want.get(&shard).map_or("nobody", String::as_str);
                    delete_if(c, &key, *token).await?;
                    released.push(shard);
                    tracing::info!(shard, token, to, "handed a shard over");
                }
                // Ours on our lease but not led here: a take whose answer
                // was lost after it committed. Lead it.
                Some((_, token, held_lease))
                    if *held_lease == lease && self.lead(shard).is_none() =>
                {
                    self.adopt(shard, key, *token, lease);
                }
                Some(_) => {
                    self.orphaned_for(shard, false);
                }
                None => {
                    let waited = self.orphaned_for(shard, true);
                    if mine || waited > Self::ORPHAN_POLLS {
                        self.take(c, &key, shard, lease, value).await?;
                    }
                }
            }
        }
        for shard in 0..self.count() {
            if let Some(l) = self.lead(shard) {
                seen.leaders.insert(shard, (self.me.clone(), l.token));
            } else if let Some((m, token, _)) =
                held.get(&shard).filter(|_| !released.contains(&shard))
            {
                seen.leaders.insert(shard, (m.clone(), *token));
            }
        }
        self.seen.store(Arc::new(seen));
        Ok(())
    }

    /// Counts the polls `shard` has gone unled (reset when it is led).
    fn orphaned_for(&self, shard: u16, unled: bool) -> u32 {
        let mut o = self.orphaned.lock().unwrap_or_else(|e| e.into_inner());
        if unled {
            let n = o.entry(shard).or_default();
            *n += 1;
            *n
        } else {
            o.remove(&shard);
            0
        }
    }

    /// Creates the shard's key if nobody holds it; leads it on success.
    async fn take(
        &self,
        c: &mut Client,
        key: &str,
        shard: u16,
        lease: i64,
        value: &[u8],
    ) -> Result<(), etcd_client::Error> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let resp = c.txn(txn).await?;
        if !resp.succeeded() {
            return Ok(());
        }
        let token = resp.header().map_or(0, |h| h.revision());
        self.adopt(shard, key.to_string(), token, lease);
        Ok(())
    }

    /// Leads `shard` from its key (created at `token`, on `lease`) on.
    fn adopt(&self, shard: u16, key: String, token: i64, lease: i64) {
        self.orphaned_for(shard, false);
        self.leads[usize::from(shard)].store(Some(Arc::new(LeaderInfo { key, token, lease })));
        self.taken.inc();
        tracing::info!(shard, token, "leading a shard");
    }
}

/// Deletes a shard key if it is still the one created at `token`.
async fn delete_if(c: &mut Client, key: &str, token: i64) -> Result<(), etcd_client::Error> {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, token)])
        .and_then([TxnOp::delete(key, None)]);
    c.txn(txn).await.map(|_| ())
}

/// Aborts a task when dropped (the keep-alive of a lease we stop using).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
