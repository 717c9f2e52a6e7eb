//! List-then-watch over one etcd prefix, with relist on compaction.
//!
//! Modelled on kube-rs' `watcher`: a full list at revision R is delivered
//! as `Init`, `InitApply`… and `InitDone { revision: R }`; then changes
//! from R+1 as `Apply` and `Delete`. When the watch falls behind
//! compaction, etcd cancels it with `compact_revision` set and the watcher
//! lists again, so the consumer swaps its whole view at the next `InitDone`.
//! A dropped stream resumes from the next unseen revision without a relist.
//! The watcher never polls and never gives up: etcd errors are logged and
//! retried with backoff; consumers see only events.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions, WatchStream};

use tidegate_schema::{FieldError, Key, KeyError, Keyspace, Record};

/// One key and its value, as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key is bound to (0 for none).
    pub lease: i64,
}

impl Kv {
    /// Copies an etcd key-value pair (keys that are not UTF-8 are shown lossily,
    /// and will not parse as tidegate keys).
    pub fn from_etcd(kv: &KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }

    /// Parses the key in `keyspace`.
    pub fn parse_key(&self, keyspace: &Keyspace) -> Result<Key, KeyError> {
        keyspace.parse(&self.key)
    }

    /// Decodes and validates the value as a `T`.
    pub fn decode<T: Record>(&self) -> Result<T, FieldError> {
        T::decode(&self.value)
    }
}

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A full (re)list begins: build a new view from the `InitApply`s that follow.
    Init,
    /// A key present at the list's revision.
    InitApply(Kv),
    /// The list is complete: replace the old view with the new one. The view
    /// now equals the prefix at `revision`.
    InitDone { revision: i64 },
    /// A key was created or changed.
    Apply(Kv),
    /// A key was deleted (or its lease expired) at `revision`.
    Delete { key: String, revision: i64 },
}

enum State {
    /// Next step: a full list.
    List,
    /// Next step: open a watch from this revision.
    Watch { from: i64 },
    /// Receiving; `next` is the first revision not yet delivered.
    Receiving { stream: Box<WatchStream>, next: i64 },
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
// Short: after an outage heals, a watcher resumes within a second (a
// retry is one small request per watcher).
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A watcher over every key under one prefix.
pub struct Watcher {
    client: Client,
    prefix: String,
    state: State,
    queue: VecDeque<Event>,
    /// The revision everything delivered so far is consistent with.
    revision: i64,
    lists: u64,
    backoff: Duration,
    /// A wait before the next step (after a cancelled watch).
    pause: Option<Duration>,
    /// The etcd cluster the view came from (0 before the first list): a
    /// cluster restored from a snapshot is a new one, and its history is
    /// not the one this watcher followed.
    cluster_id: u64,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("prefix", &self.prefix)
            .field("revision", &self.revision)
            .field("lists", &self.lists)
            .finish_non_exhaustive()
    }
}

/// Keys per page of a list.
const LIST_PAGE: i64 = 1000;

/// The end of the key range holding every key that starts with `prefix`
/// (etcd's prefix range end: the last byte below 0xff incremented).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or no prefix): to the end of the keyspace.
    vec![0]
}

/// Whether the history a watch resumed on is not the one the view followed:
/// another cluster (restored from a snapshot), or, on the watch's creation
/// reply, a revision below what was already delivered (restored with the
/// same cluster token). Either way only a relist is correct.
fn rewound(
    known_cluster: u64,
    resume_from: i64,
    created: bool,
    cluster: u64,
    revision: i64,
) -> Option<String> {
    if known_cluster != 0 && cluster != 0 && cluster != known_cluster {
        return Some(format!(
            "etcd is another cluster now ({known_cluster:x} → {cluster:x}: restored from a snapshot?)"
        ));
    }
    if created && revision < resume_from - 1 {
        return Some(format!(
            "etcd's revision went back from {} to {revision} (restored from a snapshot?)",
            resume_from - 1
        ));
    }
    None
}

impl Watcher {
    /// A watcher that starts with a full list of `prefix`.
    pub fn new(client: Client, prefix: impl Into<String>) -> Self {
        Self {
            client,
            prefix: prefix.into(),
            state: State::List,
            queue: VecDeque::new(),
            revision: 0,
            lists: 0,
            backoff: BACKOFF_MIN,
            pause: None,
            cluster_id: 0,
        }
    }

    /// A watcher for a consumer that already holds the view at `revision`:
    /// it watches from `revision + 1`, and lists only if that history was
    /// compacted away.
    pub fn resume(client: Client, prefix: impl Into<String>, revision: i64) -> Self {
        let mut w = Self::new(client, prefix);
        w.state = State::Watch { from: revision + 1 };
        w.revision = revision;
        w
    }

    /// The revision the delivered events are consistent with.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// How many full lists this watcher has made (1 plus one per relist).
    pub fn lists(&self) -> u64 {
        self.lists
    }

    /// The next event. Cancel-safe between events: dropping the future
    /// loses nothing that was already received.
    pub async fn next(&mut self) -> Event {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return event;
            }
            if let Some(pause) = self.pause.take() {
                tokio::time::sleep(pause).await;
            }
            if let Err(e) = self.step().await {
                tracing::warn!(prefix = %self.prefix, error = %e, retry_in = ?self.backoff, "etcd watch failed");
                tokio::time::sleep(self.backoff).await;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    async fn step(&mut self) -> Result<(), etcd_client::Error> {
        match &mut self.state {
            State::List => self.list().await,
            State::Watch { from } => {
                let from = *from;
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(from)
                    .with_progress_notify();
                let stream = self
                    .client
                    .watch(self.prefix.as_str(), Some(options))
                    .await?;
                self.state = State::Receiving {
                    stream: Box::new(stream),
                    next: from,
                };
                Ok(())
            }
            State::Receiving { stream, next } => {
                let resume_from = *next;
                match stream.message().await {
                    Ok(Some(resp)) => {
                        self.receive(resp, resume_from);
                        Ok(())
                    }
                    Ok(None) => {
                        tracing::debug!(prefix = %self.prefix, "watch stream ended; resuming");
                        self.state = State::Watch { from: resume_from };
                        Ok(())
                    }
                    Err(e) => {
                        self.state = State::Watch { from: resume_from };
                        Err(e)
                    }
                }
            }
        }
    }

    /// The full list, in pages, all at the first page's revision (one
    /// consistent snapshot): a single range over 10,000 instances would pass
    /// the gRPC message limit (4 MiB) and fail forever.
    async fn list(&mut self) -> Result<(), etcd_client::Error> {
        let end = prefix_end(self.prefix.as_bytes());
        let mut from = self.prefix.as_bytes().to_vec();
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LIST_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let resp = self.client.get(from.clone(), Some(options)).await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
                self.cluster_id = resp.header().map_or(0, |h| h.cluster_id());
            }
            kvs.extend(resp.kvs().iter().map(Kv::from_etcd));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        self.queue.push_back(Event::Init);
        self.queue.extend(kvs.into_iter().map(Event::InitApply));
        self.queue.push_back(Event::InitDone { revision });
        self.revision = revision;
        self.lists += 1;
        self.backoff = BACKOFF_MIN;
        self.state = State::Watch { from: revision + 1 };
        Ok(())
    }

    /// One message of the watch stream, which was to start at `resume_from`:
    /// its events are queued, or a compaction, a restored cluster or a
    /// cancel sends the watcher back to listing or re-watching.
    fn receive(&mut self, resp: etcd_client::WatchResponse, resume_from: i64) {
        if resp.compact_revision() > 0 {
            tracing::warn!(
                prefix = %self.prefix,
                wanted = resume_from,
                compacted_to = resp.compact_revision(),
                "watch fell behind compaction; relisting"
            );
            self.state = State::List;
            return;
        }
        if let Some(why) = resp.header().and_then(|h| {
            rewound(
                self.cluster_id,
                resume_from,
                resp.created(),
                h.cluster_id(),
                h.revision(),
            )
        }) {
            tracing::warn!(prefix = %self.prefix, wanted = resume_from, "{why}; relisting");
            self.state = State::List;
            return;
        }
        if resp.canceled() {
            // A cancel that repeats (permission denied, an expired auth
            // token) must not become a busy loop: wait, longer each time.
            tracing::warn!(prefix = %self.prefix, reason = resp.cancel_reason(), retry_in = ?self.backoff, "watch cancelled; resuming");
            self.pause = Some(self.backoff);
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            self.state = State::Watch { from: resume_from };
            return;
        }
        self.backoff = BACKOFF_MIN;
        let mut delivered = resume_from;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            delivered = delivered.max(kv.mod_revision() + 1);
            self.queue.push_back(match event.event_type() {
                EventType::Put => Event::Apply(Kv::from_etcd(kv)),
                EventType::Delete => Event::Delete {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    revision: kv.mod_revision(),
                },
            });
        }
        // A progress notification (no events, not the creation reply) says
        // every event up to its header revision was sent.
        if let Some(h) = resp
            .header()
            .filter(|_| resp.events().is_empty() && !resp.created())
        {
            delivered = delivered.max(h.revision() + 1);
        }
        if let State::Receiving { next, .. } = &mut self.state {
            *next = delivered;
        }
        self.revision = self.revision.max(delivered - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::rewound;

    #[test]
    fn a_restored_cluster_or_a_revision_going_back_means_relist() {
        // Same cluster, watch created at or past what was delivered: fine.
        assert_eq!(rewound(7, 101, true, 7, 100), None);
        assert_eq!(rewound(7, 101, true, 7, 250), None);
        // Not the creation reply: its header may lag, only the id counts.
        assert_eq!(rewound(7, 101, false, 7, 50), None);
        // Before the first list nothing is known about the cluster.
        assert_eq!(rewound(0, 1, true, 9, 1), None);
        let other = rewound(7, 101, false, 9, 500).unwrap();
        assert!(other.contains("another cluster"), "{other}");
        let back = rewound(7, 101, true, 7, 60).unwrap();
        assert!(back.contains("went back from 100 to 60"), "{back}");
    }
}
