//! Solver checks of this worker's instances: one task per running,
//! team-held instance whose record names a solver. It runs the solver once
//! the instance runs and then every `interval_secs`, and keeps the last
//! outcome for the instance's status record (healthy when the run's output
//! holds the instance's flag; otherwise the reason, with the output's tail).
//! With `replace_unhealthy`, a failed check also asks the reconciler to
//! make the instance's containers again (at most
//! [`MAX_SOLVER_REPLACEMENTS`] times).
//! The task ends with the instance: dropping its [`Checker`] aborts it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::Client;
use tidegate_schema::spec::MAX_SOLVER_REPLACEMENTS;
use tidegate_schema::{InstanceRecord, Keyspace, SolverHealth, SolverRecord, WorkerId};

use super::{Vetted, secret_of};
use crate::runtime::{Runtime, SolverTarget};

/// At most this many solver runs at once on one worker (each is a
/// container of up to half a CPU): a challenge with many instances and a
/// short interval queues its checks instead of loading the worker.
pub(super) const MAX_CONCURRENT_RUNS: usize = 2;

/// How soon a check that could not run (the instance is not running, its
/// flag could not be read) is tried again.
const RETRY_SECS: u64 = 15;

/// What a check needs of the agent.
#[derive(Clone)]
pub(super) struct Context {
    pub(super) runtime: Arc<Runtime>,
    pub(super) client: Client,
    pub(super) ks: Keyspace,
    pub(super) worker: WorkerId,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    /// Shared by every check of this worker: [`MAX_CONCURRENT_RUNS`].
    pub(super) runs: Arc<tokio::sync::Semaphore>,
}

/// A running instance's solver task and its last outcome.
#[derive(Debug)]
pub(super) struct Checker {
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

/// What the task tells the reconciler.
#[derive(Debug, Default)]
struct Shared {
    last: Option<SolverHealth>,
    /// A failed check asks for the instance's containers to be made again.
    replace: bool,
    /// Replacements done (counted by the reconciler once it removed the
    /// containers).
    replacements: u32,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How one check went.
#[derive(Debug)]
enum Outcome {
    /// The solver printed the instance's flag.
    Passed,
    /// The solver ran and did not print it: the instance is unhealthy (and
    /// replaced if the spec says so).
    Failed(String),
    /// The solver could not be run (its image, Docker): unhealthy, with the
    /// reason, but remaking the instance would not help.
    NotRun(String),
    /// Nothing to check now (the instance is not running, being replaced or
    /// restarted; its flag cannot be read): the last outcome stands and the
    /// check is tried again soon.
    Later(String),
}

impl Checker {
    /// Starts checking `record`'s instance (None: it has no solver, or no
    /// team yet — a pooled instance has no flag to find).
    pub(super) fn start(ctx: Context, record: &InstanceRecord) -> Option<Self> {
        let solver = record.solver.clone()?;
        if record.is_pooled() {
            return None;
        }
        let shared = Arc::new(Mutex::new(Shared::default()));
        let slot = shared.clone();
        let record = record.clone();
        let task = tokio::spawn(async move {
            let interval = Duration::from_secs(u64::from(solver.interval_secs));
            // Instances started together (a rush, an agent restart) do not
            // all check at once.
            tokio::time::sleep(first_delay(record.id.as_str(), interval)).await;
            loop {
                let outcome = {
                    let _permit = ctx.runs.acquire().await;
                    check(&ctx, &record, &solver).await
                };
                let checked_at = tidegate_schema::time::unix_secs();
                let (healthy, detail, failed) = match outcome {
                    Outcome::Passed => (true, String::new(), false),
                    Outcome::Failed(d) => (false, d, true),
                    Outcome::NotRun(d) => (false, d, false),
                    Outcome::Later(why) => {
                        tracing::debug!(instance = %record.id, why, "solver check put off");
                        tokio::time::sleep(interval.min(Duration::from_secs(RETRY_SECS))).await;
                        continue;
                    }
                };
                ctx.metrics.solver_checked(healthy);
                {
                    let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
                    let replace = failed
                        && solver.replace_unhealthy
                        && !s.replace
                        && s.replacements < MAX_SOLVER_REPLACEMENTS;
                    if healthy {
                        tracing::debug!(instance = %record.id, "solver check passed");
                    } else {
                        tracing::warn!(instance = %record.id, detail = %detail, replace, replacements = s.replacements, "solver check failed: instance unhealthy");
                    }
                    s.last = Some(SolverHealth {
                        healthy,
                        checked_at,
                        detail: tail(&detail, SolverHealth::MAX_DETAIL),
                        replacements: s.replacements,
                    });
                    s.replace |= replace;
                }
                tokio::time::sleep(interval).await;
            }
        });
        Some(Self { shared, task })
    }

    /// The last check's outcome (None before the first one ends).
    pub(super) fn health(&self) -> Option<SolverHealth> {
        let s = self.lock();
        s.last.clone().map(|mut h| {
            h.replacements = s.replacements;
            h
        })
    }

    /// Whether a failed check asked for the instance's containers to be
    /// made again (once per ask).
    pub(super) fn take_replacement(&self) -> bool {
        std::mem::take(&mut self.lock().replace)
    }

    /// The instance's containers were removed to be made again.
    pub(super) fn replaced(&self) {
        self.lock().replacements += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The first check waits up to a tenth of the interval (at most 10 s),
/// spread by the instance's id.
fn first_delay(id: &str, interval: Duration) -> Duration {
    let spread = (interval / 10).min(Duration::from_secs(10));
    let millis = u64::try_from(spread.as_millis()).unwrap_or(u64::MAX);
    if millis == 0 {
        return Duration::ZERO;
    }
    // FNV-1a: stable, and enough to spread ids.
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    Duration::from_millis(hash % millis)
}

/// One check: the instance's flag from its secret, where the solver reaches
/// it, one run.
async fn check(ctx: &Context, record: &InstanceRecord, solver: &SolverRecord) -> Outcome {
    let flag = match secret_of(&ctx.client, &ctx.ks, &ctx.worker, record).await {
        Ok(secret) if !secret.flag.is_empty() => secret.flag,
        Ok(_) => return Outcome::Later("the instance has no flag yet".into()),
        Err(e) => {
            return Outcome::Later(format!("could not read the instance's flag: {}", vetted(e)));
        }
    };
    let target = match target(ctx, record, solver).await {
        Ok(t) => t,
        Err(why) => return Outcome::Later(why),
    };
    let run = match ctx.runtime.run_solver(&record.id, solver, &target).await {
        Ok(run) => run,
        Err(e) => return Outcome::NotRun(format!("could not run the solver: {e}")),
    };
    if contains(&run.output, flag.as_bytes()) {
        return Outcome::Passed;
    }
    let ended = match run.exit_code {
        Some(code) => format!("the solver exited {code}"),
        None => format!("the solver did not finish within {} s", solver.timeout_secs),
    };
    // The output is the player-reachable instance's: one line, no control
    // characters (it ends up in logs, the CLI and the dashboard).
    let text = String::from_utf8_lossy(&run.output);
    let printable: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let head = format!("{ended} without printing the instance's flag; its output ends: ");
    let room = SolverHealth::MAX_DETAIL.saturating_sub(head.len());
    Outcome::Failed(format!("{head}{}", tail(printable.trim_end(), room)))
}

/// Where the solver reaches the instance: inside its one container's
/// network namespace, or at the service's address on its network.
async fn target(
    ctx: &Context,
    record: &InstanceRecord,
    solver: &SolverRecord,
) -> Result<SolverTarget, String> {
    let observed = ctx
        .runtime
        .list_instance(&record.id)
        .await
        .map_err(|e| format!("could not list the instance's containers: {e}"))?;
    let wanted = solver.service.as_ref().map(|s| s.to_string());
    let unit = observed
        .into_iter()
        .find(|o| o.service == wanted && o.running)
        .ok_or_else(|| match &wanted {
            Some(s) => format!("the instance's service {s} is not running"),
            None => "the instance's container is not running".to_string(),
        })?;
    match wanted {
        None => Ok(SolverTarget::Namespace { container: unit.id }),
        Some(s) => unit
            .address
            .map(SolverTarget::Address)
            .ok_or_else(|| format!("the instance's service {s} has no address")),
    }
}

fn vetted(e: Vetted) -> String {
    match e {
        Vetted::Unavailable(why) | Vetted::Refused(why) | Vetted::NoSecret(why) => why,
        Vetted::Gone => "the instance is gone".into(),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The end of `s` in at most `max` bytes, marked with "…" when cut (on a
/// character boundary).
fn tail(s: &str, max: usize) -> String {
    const MORE: &str = "…";
    if s.len() <= max {
        return s.to_string();
    }
    let Some(room) = max.checked_sub(MORE.len()) else {
        return String::new();
    };
    let mut start = s.len() - room;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("{MORE}{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_is_found_anywhere_in_the_output_and_never_as_empty() {
        assert!(contains(b"solved: flag{abc}\n", b"flag{abc}"));
        assert!(!contains(b"solved: flag{ab}\n", b"flag{abc}"));
        assert!(!contains(b"anything", b""));
    }

    #[test]
    fn first_checks_spread_within_a_tenth_of_the_interval_at_most_ten_seconds() {
        let hour = Duration::from_secs(3600);
        let delays: std::collections::BTreeSet<_> = (0..50)
            .map(|i| first_delay(&format!("i-{i}"), hour))
            .collect();
        assert!(delays.len() > 40, "ids do not spread: {delays:?}");
        assert!(delays.iter().all(|d| *d < Duration::from_secs(10)));
        assert!(first_delay("i-1", Duration::from_secs(20)) < Duration::from_secs(2));
        assert_eq!(first_delay("i-1", Duration::ZERO), Duration::ZERO);
        assert_eq!(first_delay("i-1", hour), first_delay("i-1", hour));
    }

    #[test]
    fn a_tail_keeps_the_end_within_its_bytes_on_a_character_boundary() {
        assert_eq!(tail("short", 10), "short");
        assert_eq!(tail("0123456789", 7), "…6789");
        // 'é' is two bytes: never cut in half, never past `max`.
        assert_eq!(tail("aééé", 5), "…é");
        assert_eq!(tail("aééé", 4), "…");
        assert_eq!(tail("abcdef", 2), "");
        for max in 0..12 {
            assert!(tail("aééé-xyz", max).len() <= max);
        }
    }
}
