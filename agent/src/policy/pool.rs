//! Edge decisions off the request path: a pool of threads of their own
//! (never the runtime's workers that carry the reconciler and the
//! membership keep-alive, nor Pingora's), with a bounded queue, and a
//! short-lived cache of decisions per (instance, source, host).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidegate_plugin_host::thread_cpu;

type Job = Box<dyn FnOnce() + Send>;

// The pool's threads run at the agent's own priority, bounded by their CPU
// share (`CpuBudget`), not by a lower priority. Measured on 2 cores under
// a 1,500 req/s flood of a policy that spends its whole deadline on every
// call, a `curl` to another instance (straight to its container) had p99
// 88–157 ms and stalls up to 1.3 s with the threads at nice 19, 42–157 ms
// under `SCHED_IDLE`, and 17 ms at nice 0 (share 0.2 core): a thread of
// low priority that is always runnable (its calls wait for a CPU, and its
// budget is CPU time) keeps the CPUs from ever being idle, and the
// instances' processes, in cgroups of their own, waited behind it
// (`perf sched`: a container's process runnable for 164 ms while a pool
// thread ran). At the same priority a call ends soon, the budget stops the
// next ones, and a pool thread never holds up a lock the proxy waits on;
// each call also gives up the CPU every 1 ms epoch tick of its wasm code
// to a thread waiting for it (the plugin host's `yield_each_tick`).

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
                .spawn(move || work(&rx))?;
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
/// most [`CpuBudget::BURST`] ahead: a flood of requests to a policy that
/// spends its whole deadline on every call takes this much CPU from the
/// proxy and the instances, on average (it is checked when a call is
/// queued, so the calls already admitted, at most queue + threads, still
/// run).
///
/// Lock-free (a theoretical arrival time, as in GCRA), because the proxy
/// asks it on every call and a pool thread spends from it: a pool thread
/// preempted while holding a lock would stall the proxy behind it.
#[derive(Debug)]
struct CpuBudget {
    share: f64,
    base: Instant,
    /// Nanoseconds after `base` from which a call may start: every CPU
    /// second spent moves it `1 / share` seconds on, and it never lags
    /// more than `BURST` behind now.
    ready_at: AtomicI64,
}

impl CpuBudget {
    /// How much wall time of refill the pool may use at once after a quiet
    /// spell (so `BURST × share` of CPU).
    const BURST: Duration = Duration::from_millis(100);

    fn new(share: f64, now: Instant) -> Self {
        Self {
            share,
            base: now,
            ready_at: AtomicI64::new(-Self::nanos(Self::BURST)),
        }
    }

    fn nanos(d: Duration) -> i64 {
        i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
    }

    fn since_base(&self, now: Instant) -> i64 {
        Self::nanos(now.saturating_duration_since(self.base))
    }

    /// Whether a call may start now.
    fn left(&self, now: Instant) -> bool {
        self.since_base(now) > self.ready_at.load(Ordering::Acquire)
    }

    fn spend(&self, cpu: Duration, now: Instant) {
        let now = self.since_base(now);
        debug_assert!(self.share > 0.0, "a share of {}", self.share);
        // Saturates (a share of 0 would refuse every call, as it should).
        let cost = (cpu.as_secs_f64() / self.share * 1e9) as i64;
        let _ = self
            .ready_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |at| {
                Some(at.max(now - Self::nanos(Self::BURST)).saturating_add(cost))
            });
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

/// What a cached decision is keyed by: the connection, and the policy
/// that decided it (its digest and fallback), so a challenge's new policy
/// is never answered with the old one's decisions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DecisionKey {
    pub instance: String,
    pub source: Option<IpAddr>,
    pub host: String,
    pub protocol: &'static str,
    pub policy: tidegate_plugin_host::Digest,
    pub fallback: tidegate_schema::PolicyFallback,
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
            policy: tidegate_plugin_host::Digest::of(b"a policy"),
            fallback: tidegate_schema::PolicyFallback::Deny,
        }
    }

    /// A decision answers for the policy that made it only: another
    /// digest, or the same one with another fallback, is a miss.
    #[test]
    fn a_cached_decision_holds_for_its_policy_only() {
        let cache = DecisionCache::new(Duration::from_secs(60));
        let now = Instant::now();
        cache.put(key(1), "allow", now);
        assert_eq!(cache.get(&key(1), now), Some("allow"));
        let swapped = DecisionKey {
            policy: tidegate_plugin_host::Digest::of(b"the next policy"),
            ..key(1)
        };
        assert_eq!(cache.get(&swapped, now), None);
        let refallen = DecisionKey {
            fallback: tidegate_schema::PolicyFallback::Allow,
            ..key(1)
        };
        assert_eq!(cache.get(&refallen, now), None);
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
