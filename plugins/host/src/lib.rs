//! Runs organizers' policy plugins: WebAssembly components of the world
//! `tidegate:policy/policy` (plugins/wit/policy.wit), for the controller
//! (`admit-spawn`, `renew`, `on-idle`) and the agents (`admit-connection`).
//!
//! - One [`Host`] per process: a wasmtime engine with the pooling allocator
//!   and epoch interruption, and a linker with only the two imports the
//!   world allows (`log`, `clock`) — no WASI, so a plugin that wants files,
//!   sockets or environment fails to load with a message saying so.
//! - [`Host::load`] validates, compiles and pre-instantiates a component
//!   once, caching it by sha256 digest: a digest already loaded is never
//!   compiled again.
//! - Every hook call gets a fresh store (nothing leaks between calls), an
//!   epoch deadline (default 5 ms) and a memory cap (default 32 MiB). A
//!   trap, a timeout or a memory blow-up is a [`CallError`] naming the
//!   plugin, the hook and the cause; callers apply the challenge's fallback.

mod store;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store,
    Trap, UpdateDeadline,
};

pub use store::{ArtifactStore, DirStore, StoreError};
/// Unix time in milliseconds (what plugins are told `now` is).
pub use tidegate_schema::time::unix_ms;

mod bindings {
    wasmtime::component::bindgen!({
        world: "policy",
        path: "../wit",
        additional_derives: [PartialEq, Eq],
    });
}

pub use bindings::tidegate::policy::log::Level;
pub use bindings::tidegate::policy::types::{
    Activity, Connection, Hooks, IdleDecision, InstanceInfo, Protocol, RenewDecision,
    SpawnDecision, SpawnRequest, Verdict,
};

/// The largest component accepted.
pub const MAX_COMPONENT_BYTES: usize = 10 * 1024 * 1024;

/// Linear memories one component may contain (all of them together are
/// held to the memory cap of a call).
pub const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
/// Core module instances one component may create.
pub const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 16;
/// Tables one component may contain.
pub const MAX_TABLES_PER_COMPONENT: u32 = 16;
/// Compiled plugins kept at most; past it the least recently used goes
/// (and is compiled again from the artifact store if it is used again).
pub const MAX_CACHED_PLUGINS: usize = 64;

/// Compiled plugins by digest, with when each was last used.
struct Cache<T = Arc<Plugin>> {
    plugins: HashMap<Digest, (T, u64)>,
    clock: u64,
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Self {
            plugins: HashMap::new(),
            clock: 0,
        }
    }
}

impl<T: Clone> Cache<T> {
    fn get(&mut self, digest: &Digest) -> Option<T> {
        self.clock += 1;
        let clock = self.clock;
        self.plugins.get_mut(digest).map(|(p, used)| {
            *used = clock;
            p.clone()
        })
    }

    fn insert(&mut self, digest: Digest, plugin: T) {
        self.clock += 1;
        if !self.plugins.contains_key(&digest) && self.plugins.len() >= MAX_CACHED_PLUGINS {
            let oldest = self
                .plugins
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(d, _)| d.clone());
            if let Some(d) = oldest {
                self.plugins.remove(&d);
            }
        }
        self.plugins.entry(digest).or_insert((plugin, self.clock)).1 = self.clock;
    }
}

#[cfg(test)]
#[test]
fn the_cache_keeps_the_most_recently_used_plugins() {
    let mut cache = Cache::<usize>::default();
    let digest = |i: usize| Digest::of(&i.to_le_bytes());
    for i in 0..MAX_CACHED_PLUGINS {
        cache.insert(digest(i), i);
    }
    // 0 is used again: 1 is now the least recently used.
    assert_eq!(cache.get(&digest(0)), Some(0));
    cache.insert(digest(1000), 1000);
    assert_eq!(cache.plugins.len(), MAX_CACHED_PLUGINS);
    assert_eq!(cache.get(&digest(1)), None);
    assert_eq!(cache.get(&digest(0)), Some(0));
    assert_eq!(cache.get(&digest(1000)), Some(1000));
    let mut reason = "é".repeat(200);
    cut_reason(&mut reason);
    assert_eq!(reason.len(), MAX_REASON_BYTES);
    let mut reason = format!("a{}", "é".repeat(200));
    cut_reason(&mut reason);
    assert_eq!(reason.len(), MAX_REASON_BYTES - 1);
}

/// A decision's reason (deny, refuse, reject) is cut to this many bytes.
pub const MAX_REASON_BYTES: usize = 256;

/// Cuts `reason` to [`MAX_REASON_BYTES`] on a character boundary.
fn cut_reason(reason: &mut String) {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
}

/// Per-call limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time one hook call may use, and instantiating the component
    /// for it as much again (checked on 1 ms epoch ticks; each also stops
    /// after 10× this in wall-clock time, whatever the CPU: `Stalled`).
    pub deadline: Duration,
    /// Linear memory one call may use.
    pub memory_bytes: usize,
    /// Hook calls that may run at once (pooling allocator slots).
    pub max_concurrent: u32,
    /// The wall-clock bound of each phase; `None`: 10× `deadline` (at
    /// least 20 ms), what an API caller can wait. The agents' edge calls
    /// run on a pool of their own, bounded by a CPU share, and may wait
    /// longer for a CPU.
    pub stall_after: Option<Duration>,
    /// Give up the CPU at every 1 ms epoch tick (`sched_yield`), so a
    /// call that spends its whole deadline hands the CPU to the threads
    /// waiting for it (the agent's proxy, an instance's process) at least
    /// once a millisecond instead of once a scheduler slice. The agents'
    /// edge calls do; under a flood of such calls it took the p99 of
    /// another instance's requests from 15.3 ms to 11.2 ms (2 cores).
    pub yield_each_tick: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_millis(5),
            memory_bytes: 32 * 1024 * 1024,
            max_concurrent: 256,
            stall_after: None,
            yield_each_tick: false,
        }
    }
}

/// `sha256:` and 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// The digest of a blob.
    pub fn of(bytes: &[u8]) -> Self {
        let hash = Sha256::digest(bytes);
        let mut s = String::with_capacity(71);
        s.push_str("sha256:");
        for b in hash {
            s.push_str(&format!("{b:02x}"));
        }
        Self(s)
    }

    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let hex = s.strip_prefix("sha256:").unwrap_or("");
        if hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(s.to_string()))
        } else {
            Err(DigestError(s.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex characters, for log lines.
    pub fn short(&self) -> &str {
        self.0.get(7..19).unwrap_or(&self.0)
    }
}

/// A string that is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not sha256: followed by 64 lowercase hex characters")]
pub struct DigestError(String);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why bytes are not a usable plugin (each a 400 at upload).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the plugin is {0} bytes; at most {MAX_COMPONENT_BYTES} are accepted")]
    TooBig(usize),
    #[error("not WebAssembly: a component starts with the bytes \\0asm")]
    NotWasm,
    #[error(
        "a core WebAssembly module, not a component: wrap it with `wasm-tools component new` (cargo xtask build-plugins does)"
    )]
    CoreModule,
    #[error("not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error("the component does not target the world tidegate:policy/policy@0.1.0: {0}")]
    WrongWorld(String),
    #[error("the plugin failed when asked which hooks it implements: {0}")]
    Hooks(CallError),
}

/// What went wrong inside one hook call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {digest} {hook}: {cause}")]
pub struct CallError {
    pub digest: String,
    pub hook: &'static str,
    pub cause: Cause,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cause {
    #[error("did not finish within {0} ms of CPU time (stopped)")]
    Timeout(u64),
    /// Stopped by the wall-clock bound before its CPU budget ran out: the
    /// thread waited (an overloaded host), the plugin is not to blame.
    #[error("did not finish within {0} ms of wall-clock time, the host being busy (stopped)")]
    Stalled(u64),
    #[error("tried to use more than {0} MiB of memory (stopped)")]
    Memory(usize),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("could not start: {0}")]
    Instantiate(String),
}

impl Cause {
    /// A short label for metrics: `timeout`, `memory`, `trap`, `instantiate`.
    pub fn kind(&self) -> &'static str {
        match self {
            Cause::Timeout(_) => "timeout",
            Cause::Stalled(_) => "stalled",
            Cause::Memory(_) => "memory",
            Cause::Trap(_) => "trap",
            Cause::Instantiate(_) => "instantiate",
        }
    }
}

/// What one call's store holds.
struct CallState {
    digest: Arc<str>,
    hook: &'static str,
    memory_cap: usize,
    /// Bytes of every linear memory of this call's instances together.
    memory_total: usize,
    /// The total before the last grow this limiter allowed (restored if
    /// wasmtime then fails that grow).
    memory_before_grow: usize,
    memory_hit: bool,
    /// This thread's CPU time when the current phase (instantiation, then
    /// the hook) began, its CPU budget, and a wall-clock bound.
    cpu_start: Duration,
    budget: Duration,
    wall_start: Instant,
    wall_limit: Duration,
    timed_out: bool,
    /// The wall-clock bound stopped it (not the CPU budget).
    stalled: bool,
}

/// The CPU time the calling thread has used.
pub fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

impl CallState {
    /// Starts a phase with `budget` of CPU time.
    fn phase(&mut self, budget: Duration) {
        self.cpu_start = thread_cpu();
        self.budget = budget;
        self.wall_start = Instant::now();
    }

    /// Called by the epoch ticker's deadline (every ms while wasm runs):
    /// the plugin goes on while it is within its CPU budget, so a busy
    /// machine that preempts the thread does not fail a well-behaved
    /// plugin; the wall-clock bound caps how long a caller can wait.
    fn over_budget(&mut self) -> bool {
        let cpu = thread_cpu().saturating_sub(self.cpu_start) >= self.budget;
        let wall = self.wall_start.elapsed() >= self.wall_limit;
        self.timed_out |= cpu || wall;
        self.stalled |= wall && !cpu;
        cpu || wall
    }
}

impl ResourceLimiter for CallState {
    /// Called for each memory's first allocation too: the cap holds for
    /// all of the call's memories together.
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory_total.saturating_sub(current) + desired;
        if total > self.memory_cap {
            self.memory_hit = true;
            wasmtime::bail!("memory cap of {} bytes reached", self.memory_cap);
        }
        self.memory_before_grow = self.memory_total;
        self.memory_total = total;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.memory_total = self.memory_before_grow;
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl bindings::tidegate::policy::log::Host for CallState {
    fn log(&mut self, level: Level, message: String) {
        // A plugin's line is bounded so that it cannot flood the host's log.
        let mut message = message;
        if message.len() > 1024 {
            let mut end = 1024;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let (digest, hook) = (&*self.digest, self.hook);
        match level {
            Level::Debug => tracing::debug!(plugin = digest, hook, "{message}"),
            Level::Info => tracing::info!(plugin = digest, hook, "{message}"),
            Level::Warn => tracing::warn!(plugin = digest, hook, "{message}"),
            Level::Error => tracing::error!(plugin = digest, hook, "{message}"),
        }
    }
}

impl bindings::tidegate::policy::clock::Host for CallState {
    fn now_ms(&mut self) -> u64 {
        unix_ms()
    }
}

impl bindings::tidegate::policy::types::Host for CallState {}

/// The engine, the linker and the compiled plugins of one process.
pub struct Host {
    engine: Engine,
    linker: Linker<CallState>,
    limits: Limits,
    cache: Mutex<Cache>,
    ticker: Arc<Ticker>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Advances the engine's epoch every millisecond while calls are being
/// made, and parks after 100 ms without one (so an idle process does not
/// wake 1000 times a second, and a busy one never pays for a wake-up).
struct Ticker {
    engine: Engine,
    in_flight: AtomicUsize,
    /// Unix ms of the last call's start.
    last_call_ms: AtomicU64,
    parked: AtomicBool,
    thread: Mutex<Option<std::thread::Thread>>,
}

impl Ticker {
    fn start(engine: Engine) -> std::io::Result<Arc<Self>> {
        let ticker = Arc::new(Self {
            engine,
            in_flight: AtomicUsize::new(0),
            last_call_ms: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let weak: Weak<Ticker> = Arc::downgrade(&ticker);
        let handle = std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                loop {
                    let Some(t) = weak.upgrade() else { return };
                    let quiet = t.in_flight.load(Ordering::Acquire) == 0
                        && unix_ms().saturating_sub(t.last_call_ms.load(Ordering::Relaxed)) > 100;
                    if quiet {
                        t.parked.store(true, Ordering::Release);
                        // A call that started in between sees `parked` and unparks us.
                        let started_since = t.in_flight.load(Ordering::Acquire) > 0;
                        drop(t);
                        if !started_since {
                            // The timeout lets a dropped host end the thread.
                            std::thread::park_timeout(Duration::from_millis(500));
                        }
                        if let Some(t) = weak.upgrade() {
                            t.parked.store(false, Ordering::Release);
                        }
                        continue;
                    }
                    drop(t);
                    std::thread::sleep(Duration::from_millis(1));
                    match weak.upgrade() {
                        Some(t) => t.engine.increment_epoch(),
                        None => return,
                    }
                }
            })?;
        if let Ok(mut slot) = ticker.thread.lock() {
            *slot = Some(handle.thread().clone());
        }
        Ok(ticker)
    }

    fn enter(&self) -> TickGuard<'_> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.last_call_ms.store(unix_ms(), Ordering::Relaxed);
        if self.parked.load(Ordering::Acquire)
            && let Ok(slot) = self.thread.lock()
            && let Some(t) = slot.as_ref()
        {
            t.unpark();
        }
        TickGuard(self)
    }
}

struct TickGuard<'a>(&'a Ticker);

impl Drop for TickGuard<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Host {
    /// A host with these per-call limits.
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        let (memories, core_instances, tables) = if tidegate_schema::config::planted("plugin-caps")
        {
            // The red team's positive control: caps far above what its
            // attack holds.
            (64, 64, 64)
        } else {
            (
                MAX_MEMORIES_PER_COMPONENT,
                MAX_CORE_INSTANCES_PER_COMPONENT,
                MAX_TABLES_PER_COMPONENT,
            )
        };
        let mut pool = PoolingAllocationConfig::default();
        // Room for `max_concurrent` calls of components at every cap at
        // once: one challenge's plugin cannot starve another's of slots
        // (the memory slots are address space, reserved and not touched).
        pool.total_component_instances(limits.max_concurrent)
            .total_core_instances(limits.max_concurrent * core_instances)
            .total_memories(limits.max_concurrent * memories)
            .total_tables(limits.max_concurrent * tables)
            .max_memory_size(limits.memory_bytes)
            // One component may not hold more than a policy needs (its own
            // module, the WASI adapter, shims): many memories or instances
            // would drain the slots every other challenge's plugin shares.
            // Such a component fails its dry run at upload.
            .max_memories_per_component(memories)
            .max_core_instances_per_component(core_instances)
            .max_tables_per_component(tables)
            // Reset a used slot by rewriting only the pages the call dirtied
            // (found with the PAGEMAP_SCAN ioctl, Linux ≥ 6.7) instead of
            // madvise: no TLB shootdown and no page faults on the next call.
            // Without the ioctl this is a memset of at most these bytes.
            .pagemap_scan(wasmtime::Enabled::Auto)
            .linear_memory_keep_resident(2 * 1024 * 1024)
            .table_keep_resident(64 * 1024);
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            // Explicit bounds checks instead of guard pages and signal
            // handlers: a reused slot then needs no mprotect (and no TLB
            // shootdown across the process's threads) when a call grew its
            // memory; policy code is small, so the checks cost little. Each
            // slot reserves only the memory cap.
            .signals_based_traps(false)
            .memory_guard_size(0)
            .memory_reservation(limits.memory_bytes as u64)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!(root_cause(&e)))?;
        let mut linker = Linker::new(&engine);
        bindings::Policy::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!(root_cause(&e)))?;
        let ticker = Ticker::start(engine.clone())?;
        Ok(Self {
            engine,
            linker,
            limits,
            cache: Mutex::new(Cache::default()),
            ticker,
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The plugin with this digest, if it was loaded before.
    pub fn get(&self, digest: &Digest) -> Option<Arc<Plugin>> {
        self.cache.lock().ok()?.get(digest)
    }

    /// Validates, compiles and pre-instantiates `bytes`, or returns the
    /// cached plugin of the same digest. Asks the plugin which hooks it
    /// implements (a call under the usual limits).
    pub fn load(&self, bytes: &[u8]) -> Result<Arc<Plugin>, LoadError> {
        check_header(bytes)?;
        let digest = Digest::of(bytes);
        if let Some(p) = self.get(&digest) {
            return Ok(p);
        }
        let component =
            Component::new(&self.engine, bytes).map_err(|e| LoadError::Invalid(root_cause(&e)))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::WrongWorld(root_cause(&e)))?;
        let pre =
            bindings::PolicyPre::new(pre).map_err(|e| LoadError::WrongWorld(root_cause(&e)))?;
        let mut plugin = Plugin {
            digest: digest.clone(),
            label: Arc::from(digest.as_str()),
            pre,
            engine: self.engine.clone(),
            ticker: self.ticker.clone(),
            limits: self.limits,
            hooks: Hooks::empty(),
            size: bytes.len(),
        };
        plugin.hooks = plugin
            .call("hooks", |p, s| p.call_hooks(s))
            .map_err(LoadError::Hooks)?;
        let plugin = Arc::new(plugin);
        if let Ok(mut cache) = self.cache.lock() {
            // A racing load of the same bytes wins or loses harmlessly.
            cache.insert(digest, plugin.clone());
        }
        Ok(plugin)
    }

    /// Drops cached plugins whose digest is not in `keep`.
    pub fn retain(&self, keep: &dyn Fn(&Digest) -> bool) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.plugins.retain(|d, _| keep(d));
        }
    }

    /// How many compiled plugins are cached.
    pub fn cached(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.plugins.len())
    }
}

fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.len() > MAX_COMPONENT_BYTES {
        return Err(LoadError::TooBig(bytes.len()));
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotWasm);
    }
    // The 4 bytes after the magic: version 1, layer 0 for a core module;
    // layer 1 for a component.
    match &bytes[4..8] {
        [1, 0, 0, 0] => Err(LoadError::CoreModule),
        [_, _, 1, 0] => Ok(()),
        other => Err(LoadError::Invalid(format!(
            "unknown WebAssembly version/layer bytes {other:02x?}"
        ))),
    }
}

/// The innermost message of an error chain (wasmtime's outer layers say
/// little, e.g. "failed to parse WebAssembly module").
fn root_cause(e: &wasmtime::Error) -> String {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    chain.join(": ")
}

/// A compiled, pre-instantiated plugin.
pub struct Plugin {
    digest: Digest,
    label: Arc<str>,
    pre: bindings::PolicyPre<CallState>,
    engine: Engine,
    ticker: Arc<Ticker>,
    limits: Limits,
    hooks: Hooks,
    size: usize,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin")
            .field("digest", &self.digest)
            .field("hooks", &self.hooks)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// The hooks the plugin says it implements.
    pub fn hooks(&self) -> Hooks {
        self.hooks
    }

    /// The hooks as their WIT names.
    pub fn hook_names(&self) -> Vec<&'static str> {
        [
            (Hooks::ADMIT_SPAWN, "admit-spawn"),
            (Hooks::RENEW, "renew"),
            (Hooks::ADMIT_CONNECTION, "admit-connection"),
            (Hooks::ON_IDLE, "on-idle"),
        ]
        .into_iter()
        .filter(|(h, _)| self.hooks.contains(*h))
        .map(|(_, n)| n)
        .collect()
    }

    /// The component's size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// `admit-spawn`; `None` when the plugin does not implement it.
    pub fn admit_spawn(&self, req: &SpawnRequest) -> Option<Result<SpawnDecision, CallError>> {
        self.hooks.contains(Hooks::ADMIT_SPAWN).then(|| {
            self.call("admit-spawn", |p, s| p.call_admit_spawn(s, req))
                .map(|mut d| {
                    if let SpawnDecision::Deny(r) = &mut d {
                        cut_reason(r);
                    }
                    d
                })
        })
    }

    /// `renew`; `None` when the plugin does not implement it.
    pub fn renew(&self, info: &InstanceInfo) -> Option<Result<RenewDecision, CallError>> {
        self.hooks.contains(Hooks::RENEW).then(|| {
            self.call("renew", |p, s| p.call_renew(s, info))
                .map(|mut d| {
                    if let RenewDecision::Refuse(r) = &mut d {
                        cut_reason(r);
                    }
                    d
                })
        })
    }

    /// `admit-connection`; `None` when the plugin does not implement it.
    pub fn admit_connection(&self, conn: &Connection) -> Option<Result<Verdict, CallError>> {
        self.hooks.contains(Hooks::ADMIT_CONNECTION).then(|| {
            self.call("admit-connection", |p, s| p.call_admit_connection(s, conn))
                .map(|mut v| {
                    if let Verdict::Reject(r) = &mut v {
                        cut_reason(r);
                    }
                    v
                })
        })
    }

    /// `on-idle`; `None` when the plugin does not implement it.
    pub fn on_idle(&self, activity: &Activity) -> Option<Result<IdleDecision, CallError>> {
        self.hooks
            .contains(Hooks::ON_IDLE)
            .then(|| self.call("on-idle", |p, s| p.call_on_idle(s, activity)))
    }

    /// Instantiates into a fresh store with the deadline and memory cap,
    /// runs `f`, and drops the store.
    fn call<T>(
        &self,
        hook: &'static str,
        f: impl FnOnce(&bindings::Policy, &mut Store<CallState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let deadline = self.limits.deadline;
        let mut store = Store::new(
            &self.engine,
            CallState {
                digest: self.label.clone(),
                hook,
                memory_cap: self.limits.memory_bytes,
                memory_total: 0,
                memory_before_grow: 0,
                memory_hit: false,
                cpu_start: Duration::ZERO,
                budget: deadline,
                wall_start: Instant::now(),
                // Generous against preemption, still well inside what an
                // API caller waits (50 ms with the default 5 ms).
                wall_limit: self
                    .limits
                    .stall_after
                    .unwrap_or((deadline * 10).max(Duration::from_millis(20))),
                timed_out: false,
                stalled: false,
            },
        );
        store.limiter(|s| s);
        let yielding = self.limits.yield_each_tick;
        store.epoch_deadline_callback(move |mut ctx| {
            if ctx.data_mut().over_budget() {
                Ok(UpdateDeadline::Interrupt)
            } else {
                if yielding {
                    std::thread::yield_now();
                }
                Ok(UpdateDeadline::Continue(1))
            }
        });
        let ticks = deadline.as_millis().max(1) as u64;
        // Yielding is checked on every tick, not only past the deadline.
        let first = if yielding { 1 } else { ticks };
        let _ticking = self.ticker.enter();
        // Instantiating (host code and the component's initialisers) has
        // one budget, the hook another.
        store.data_mut().phase(deadline);
        store.set_epoch_deadline(first);
        let err = |cause| CallError {
            digest: self.digest.to_string(),
            hook,
            cause,
        };
        let policy = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| err(classify(&e, &store, ticks, self.limits, true)))?;
        // The hook's budget is its own: instantiating is mostly the
        // host's work (about 1 ms of CPU in a debug build, more on a
        // thread's first call), which must not eat a well-behaved hook's.
        store.data_mut().phase(deadline);
        store.set_epoch_deadline(first);
        f(&policy, &mut store).map_err(|e| err(classify(&e, &store, ticks, self.limits, false)))
    }
}

fn classify(
    e: &wasmtime::Error,
    store: &Store<CallState>,
    ticks: u64,
    limits: Limits,
    instantiating: bool,
) -> Cause {
    if store.data().memory_hit {
        return Cause::Memory(limits.memory_bytes / (1024 * 1024));
    }
    if store.data().stalled {
        return Cause::Stalled(store.data().wall_limit.as_millis() as u64);
    }
    if store.data().timed_out || e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return Cause::Timeout(ticks);
    }
    let msg = root_cause(e);
    if instantiating && e.downcast_ref::<Trap>().is_none() {
        return Cause::Instantiate(msg);
    }
    Cause::Trap(msg)
}

#[cfg(test)]
mod tests;
