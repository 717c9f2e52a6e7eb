//! Edge decisions off the request path: a pool of threads of their own
//! (never the runtime's workers that carry the reconciler and the
//! membership keep-alive, nor Pingora's), with a bounded queue, and a
//! short-lived cache of decisions per (instance, source, host).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Job = Box<dyn FnOnce() + Send>;

/// The pool threads' nice value: below the proxy and the runtime, so a
/// flood of calls that spend their whole CPU budget takes only the CPU
/// that serving other instances leaves. A call's budget is CPU time, so
/// waiting does not cut it short; its wall-clock bound is the agent's
/// `stall_after` (1 s), not the API's.
const POOL_NICE: i32 = 19;

/// `threads` threads taking jobs from a queue of `queue` places.
#[derive(Debug)]
pub struct DecisionPool {
    tx: SyncSender<Job>,
}

impl DecisionPool {
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("edge-policy-{i}"))
                .spawn(move || {
                    let _ = rustix::process::setpriority_process(
                        Some(rustix::thread::gettid()),
                        POOL_NICE,
                    );
                    work(&rx)
                })?;
        }
        Ok(Self { tx })
    }

    /// Runs `f` on the pool and waits for it; `None` at once when every
    /// thread is busy and the queue is full (the caller applies the
    /// fallback), or if the pool is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        match self.tx.try_send(job) {
            Ok(()) => answer.await.ok(),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => None,
        }
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        job();
    }
}

/// What a cached decision is keyed by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    pub instance: String,
    pub source: Option<IpAddr>,
    pub host: String,
    pub protocol: &'static str,
}

/// Entries kept at most; past it, expired ones are swept, and if none
/// had expired the cache starts over.
const MAX_ENTRIES: usize = 65_536;

/// Decisions for `ttl` (zero: nothing is kept).
#[derive(Debug)]
pub struct DecisionCache<V> {
    ttl: Duration,
    entries: Mutex<HashMap<DecisionKey, (V, Instant)>>,
}

impl<V: Clone> DecisionCache<V> {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::default(),
        }
    }

    pub fn get(&self, key: &DecisionKey, now: Instant) -> Option<V> {
        if self.ttl.is_zero() {
            return None;
        }
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(key)
            .filter(|(_, until)| now < *until)
            .map(|(v, _)| v.clone())
    }

    pub fn put(&self, key: DecisionKey, value: V, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (_, until)| now < *until);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(key, (value, now + self.ttl));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> DecisionKey {
        DecisionKey {
            instance: "0000000001".into(),
            source: Some(IpAddr::from(i.to_be_bytes())),
            host: "0000000001.ctf.localhost".into(),
            protocol: "http",
        }
    }

    #[tokio::test]
    async fn a_full_pool_answers_none_at_once_and_runs_jobs_again_when_free() {
        let pool = Arc::new(DecisionPool::new(1, 1).unwrap());
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        // One job holds the thread, one waits in the queue.
        let holding = {
            let (pool, wait) = (pool.clone(), wait.clone());
            tokio::spawn(async move {
                pool.run(move || {
                    let _ = wait.lock().unwrap().recv();
                    1
                })
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.run(|| 2).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        assert_eq!(pool.run(|| 3).await, None, "a third job found room");
        assert!(started.elapsed() < Duration::from_millis(50));
        release.send(()).unwrap();
        assert_eq!(holding.await.unwrap(), Some(1));
        assert_eq!(queued.await.unwrap(), Some(2));
        assert_eq!(pool.run(|| 4).await, Some(4));
    }

    #[test]
    fn cached_decisions_expire_and_the_cache_stays_bounded() {
        let cache = DecisionCache::new(Duration::from_secs(1));
        let t0 = Instant::now();
        cache.put(key(1), "allow", t0);
        assert_eq!(cache.get(&key(1), t0), Some("allow"));
        assert_eq!(cache.get(&key(2), t0), None);
        assert_eq!(cache.get(&key(1), t0 + Duration::from_secs(1)), None);
        for i in 0..MAX_ENTRIES as u32 + 10 {
            cache.put(key(i), "allow", t0);
        }
        assert!(cache.len() <= MAX_ENTRIES);
        let off = DecisionCache::new(Duration::ZERO);
        off.put(key(1), "allow", t0);
        assert!(off.is_empty());
    }
}
