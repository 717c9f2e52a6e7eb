//! Edge decisions off the request path: a pool of threads of their own
//! (never the runtime's workers that carry the reconciler and the
//! membership keep-alive, nor Pingora's), with a bounded queue, and a
//! short-lived cache of decisions per (instance, source, host).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidegate_plugin_host::thread_cpu;

type Job = Box<dyn FnOnce() + Send>;

/// The pool threads' nice value: below the proxy and the runtime, so a
/// flood of calls that spend their whole CPU budget takes only the CPU
/// that serving other instances leaves. A call's budget is CPU time, so
/// waiting does not cut it short; its wall-clock bound is the agent's
/// `stall_after` (1 s), not the API's.
const POOL_NICE: i32 = 19;

/// `threads` threads taking jobs from a queue of `queue` places, using at
/// most `cpu_share` of one core's time.
#[derive(Debug)]
pub struct DecisionPool {
    tx: SyncSender<Job>,
    budget: Arc<CpuBudget>,
}

impl DecisionPool {
    pub fn new(threads: usize, queue: usize, cpu_share: f64) -> std::io::Result<Self> {
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
        Ok(Self {
            tx,
            budget: Arc::new(CpuBudget::new(cpu_share, Instant::now())),
        })
    }

    /// Runs `f` on the pool and waits for it; `None` at once when every
    /// thread is busy and the queue is full, or the pool has used its CPU
    /// share (the caller applies the fallback), or if the pool is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        if !self.budget.left(Instant::now()) {
            return None;
        }
        let (done, answer) = tokio::sync::oneshot::channel();
        let budget = self.budget.clone();
        let job: Job = Box::new(move || {
            let started = thread_cpu();
            let answer = f();
            budget.spend(thread_cpu().saturating_sub(started), Instant::now());
            let _ = done.send(answer);
        });
        match self.tx.try_send(job) {
            Ok(()) => answer.await.ok(),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => None,
        }
    }
}

/// The pool's CPU time, as a share of one core: refilled continuously, at
/// most [`CpuBudget::BURST`] ahead. Nice 19 keeps the pool's threads from
/// taking CPU from the agent's own, but not from other cgroups (the
/// instances' containers, etcd): a flood of requests to a runaway policy
/// would otherwise keep the pool's threads spinning and take the agent's
/// whole CPU share from them.
#[derive(Debug)]
struct CpuBudget {
    share: f64,
    /// Seconds of CPU left (negative: spent ahead), and when it was last
    /// refilled.
    state: Mutex<(f64, Instant)>,
}

impl CpuBudget {
    /// How much CPU time the pool may use at once after a quiet spell.
    const BURST: Duration = Duration::from_millis(100);

    fn new(share: f64, now: Instant) -> Self {
        Self {
            share,
            state: Mutex::new((Self::BURST.as_secs_f64() * share, now)),
        }
    }

    fn refill(&self, now: Instant) -> std::sync::MutexGuard<'_, (f64, Instant)> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.share).min(Self::BURST.as_secs_f64() * self.share);
        s.1 = now;
        s
    }

    /// Whether a call may start now.
    fn left(&self, now: Instant) -> bool {
        self.refill(now).0 > 0.0
    }

    fn spend(&self, cpu: Duration, now: Instant) {
        self.refill(now).0 -= cpu.as_secs_f64();
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
        let pool = Arc::new(DecisionPool::new(1, 1, 1.0).unwrap());
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
    fn the_cpu_budget_refills_at_its_share_and_stops_calls_when_spent() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let b = CpuBudget::new(0.5, t0);
        // A burst of 50 ms (100 ms at half a core), then nothing left.
        assert!(b.left(t0));
        b.spend(ms(50), t0);
        assert!(!b.left(t0));
        // Spent 40 ms ahead: 80 ms of wall time pay it back.
        b.spend(ms(40), t0);
        assert!(!b.left(t0 + ms(79)));
        assert!(b.left(t0 + ms(81)));
        // A quiet minute refills no more than the burst.
        b.spend(ms(50), t0 + ms(81));
        assert!(b.left(t0 + ms(60_000)));
        b.spend(ms(51), t0 + ms(60_000));
        assert!(!b.left(t0 + ms(60_000)));
    }

    #[tokio::test]
    async fn a_pool_past_its_cpu_share_answers_none_until_it_refills() {
        let pool = DecisionPool::new(1, 4, 0.5).unwrap();
        let spin = |d: Duration| {
            move || {
                let start = thread_cpu();
                while thread_cpu().saturating_sub(start) < d {}
                1
            }
        };
        // 60 ms of CPU: more than the 50 ms burst of half a core.
        assert_eq!(pool.run(spin(Duration::from_millis(60))).await, Some(1));
        assert_eq!(pool.run(|| 2).await, None, "the spent budget let a call in");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(pool.run(|| 3).await, Some(3));
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
