//! The rush as an event makes it: teams arriving over seconds, a mix of
//! challenge sizes, three agents, and every team playing a while then
//! deleting its instance so the room goes round. Run three ways in the
//! same run: the old behaviour (a slot count per worker, no queue: a
//! refused team retries after Retry-After), placement by memory with the
//! waiting queue, and the same with a warm pool for the small challenge.

use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{Mode, RushPlane, sized_web};
use crate::bench::{ADMIN_TOKEN, Figures, percentile};
use crate::sh;

/// The challenges of the mix: name and memory limit (MiB); teams take
/// them in turn.
const MIX: [(&str, u32); 3] = [("small", 32), ("medium", 64), ("large", 128)];

/// The shape of one run.
struct Shape {
    teams: usize,
    /// Teams arrive evenly over this many ms.
    arrive_ms: u64,
    /// Each team plays this long once its instance serves, then deletes it.
    play_ms: u64,
    /// The old behaviour's slots per worker.
    slots: u32,
    /// The new behaviour's memory per worker (about the same room as the
    /// slots for the mix).
    memory_mib: u64,
    /// The small challenge's pool in the last row.
    pool: (u32, u32),
}

impl Shape {
    fn of(mode: Mode) -> Self {
        Self {
            teams: mode.count(200, 12),
            arrive_ms: mode.count(10_000, 1_000) as u64,
            play_ms: mode.count(5_000, 1_000) as u64,
            slots: mode.count(10, 2) as u32,
            memory_mib: mode.count(768, 160) as u64,
            pool: (mode.count(3, 1) as u32, mode.count(6, 2) as u32),
        }
    }
}

/// The three ways, in the table's order.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    Old,
    Queue,
    Pool,
}

impl Way {
    fn describe(self) -> &'static str {
        match self {
            Self::Old => "old: slots, no queue, no pool (503, retry)",
            Self::Queue => "placement by memory + queue",
            Self::Pool => "placement by memory + queue + pool (small)",
        }
    }
}

/// One row of the table.
struct Row {
    way: Way,
    admitted_per_s: f64,
    all_routable_s: f64,
    p50: f64,
    p99: f64,
    queue_p99: f64,
    jain: f64,
    unavailable: u64,
    too_many: u64,
    queued: u64,
    /// Each worker's peak committed memory (MiB).
    peaks: Vec<u64>,
    /// The largest allocatable memory (MiB) a worker reported.
    allocatable: u64,
}

pub(super) fn run(bin_dir: &std::path::Path, mode: Mode, figures: &mut Figures) -> Result<()> {
    let shape = Shape::of(mode);
    let mut rows = Vec::new();
    for way in [Way::Old, Way::Queue, Way::Pool] {
        let row = one(bin_dir, &shape, way)?;
        println!(
            "event of {} teams, {}: {:.1} admitted/s, all routable after {:.1} s, spawn → routable p50 {:.0} ms p99 {:.0} ms, queue wait p99 {:.0} ms, Jain {:.2}, {} × 503, {} × 429, {} × 202, peak committed {:?} MiB",
            shape.teams,
            way.describe(),
            row.admitted_per_s,
            row.all_routable_s,
            row.p50,
            row.p99,
            row.queue_p99,
            row.jain,
            row.unavailable,
            row.too_many,
            row.queued,
            row.peaks
        );
        rows.push(row);
    }
    report(&shape, &rows, figures);
    Ok(())
}

fn one(bin_dir: &std::path::Path, shape: &Shape, way: Way) -> Result<Row> {
    let what = match way {
        Way::Old => "event-old",
        Way::Queue => "event-queue",
        Way::Pool => "event-pool",
    };
    let rush = RushPlane::start(bin_dir, what, 3, |cfg| match way {
        Way::Old => cfg.capacity = shape.slots,
        Way::Queue | Way::Pool => {
            cfg.capacity = 1000;
            cfg.allocatable_memory_mib = Some(shape.memory_mib);
        }
    })?;
    for (name, memory) in MIX {
        let mut extra = String::from(r#","flag":{"file":"/flag"}"#);
        if way == Way::Old {
            extra.push_str(r#","queue":false"#);
        }
        if way == Way::Pool && name == "small" {
            extra.push_str(&format!(
                r#","pool":{{"min":{},"max":{}}}"#,
                shape.pool.0, shape.pool.1
            ));
        }
        rush.put_challenge(name, &sized_web(memory, &extra))?;
    }
    if way == Way::Pool {
        let min = shape.pool.0 as usize;
        let full = tidegate_local::process::wait_until(std::time::Duration::from_secs(120), || {
            rush.pool_ready("small") >= min
        });
        if !full {
            bail!(
                "the pool of small was not running: {}",
                rush.call("GET", "/v1/pools", "").unwrap_or_default()
            );
        }
    }
    let names: Vec<&str> = MIX.iter().map(|(n, _)| *n).collect();
    let out = sh::output(Command::new(bin_dir.join("route-bench")).args([
        "event",
        &rush.plane.url,
        ADMIN_TOKEN,
        &shape.teams.to_string(),
        &shape.arrive_ms.to_string(),
        &shape.play_ms.to_string(),
        &names.join(","),
        &rush.agents[0].1,
    ]))
    .context("route-bench event failed")?;
    drop(rush);
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    row(way, shape.teams, &v)
}

fn numbers(v: &serde_json::Value, key: &str) -> Vec<f64> {
    v[key]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_f64)
        .collect()
}

/// The row of one run from route-bench's answer.
fn row(way: Way, teams: usize, v: &serde_json::Value) -> Result<Row> {
    let (arrived, admitted, routable) = (
        numbers(v, "arrived_ms"),
        numbers(v, "admitted_ms"),
        numbers(v, "routable_ms"),
    );
    if [&arrived, &admitted, &routable]
        .iter()
        .any(|s| s.len() != teams)
    {
        bail!("route-bench event returned samples for fewer than {teams} teams: {v}");
    }
    let waits: Vec<f64> = routable.iter().zip(&arrived).map(|(r, a)| r - a).collect();
    let queue: Vec<f64> = admitted.iter().zip(&arrived).map(|(d, a)| d - a).collect();
    let first = arrived.iter().copied().fold(f64::INFINITY, f64::min);
    let last_admitted = admitted.iter().copied().fold(0.0, f64::max);
    let count = |k: &str| v[k].as_u64().unwrap_or(0);
    let peaks = v["peaks"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, p)| p[0].as_u64())
        .collect();
    // What the agents said they could hold (the old way leaves it at its
    // default, the host's memory less a reserve: slots bound it there).
    let allocatable = v["peaks"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, p)| p[1].as_u64())
        .max()
        .unwrap_or(0);
    Ok(Row {
        way,
        admitted_per_s: teams as f64 * 1000.0 / (last_admitted - first).max(1.0),
        all_routable_s: routable.iter().copied().fold(0.0, f64::max) / 1000.0,
        p50: percentile(waits.clone(), 0.5),
        p99: percentile(waits.clone(), 0.99),
        queue_p99: percentile(queue, 0.99),
        jain: jain(&waits),
        unavailable: count("unavailable"),
        too_many: count("too_many"),
        queued: count("queued"),
        peaks,
        allocatable,
    })
}

/// Jain's fairness index of `xs`: 1 when all are equal, 1/n when one
/// takes everything.
fn jain(xs: &[f64]) -> f64 {
    let sum: f64 = xs.iter().sum();
    let squares: f64 = xs.iter().map(|x| x * x).sum();
    if squares == 0.0 {
        return 1.0;
    }
    sum * sum / (xs.len() as f64 * squares)
}

fn report(shape: &Shape, rows: &[Row], figures: &mut Figures) {
    let table: String = rows
        .iter()
        .map(|r| {
            let peaks: Vec<String> = r.peaks.iter().map(u64::to_string).collect();
            format!(
                "| {} | {:.1} | {:.1} s | {:.0} ms | {:.0} ms | {:.0} ms | {:.2} | {} | {} | {} | {} of {} |\n",
                r.way.describe(),
                r.admitted_per_s,
                r.all_routable_s,
                r.p50,
                r.p99,
                r.queue_p99,
                r.jain,
                r.unavailable,
                r.too_many,
                r.queued,
                peaks.join(" / "),
                r.allocatable
            )
        })
        .collect();
    let (teams, slots, memory) = (shape.teams, shape.slots, shape.memory_mib);
    let sizes: Vec<String> = MIX.iter().map(|(n, m)| format!("{n} {m} MiB")).collect();
    for r in rows {
        let key = match r.way {
            Way::Old => "old",
            Way::Queue => "queue",
            Way::Pool => "queue+pool",
        };
        figures.values.extend([
            (format!("event {key} all routable s"), r.all_routable_s),
            (format!("event {key} spawn to routable p99 ms"), r.p99),
            (format!("event {key} admitted per s"), r.admitted_per_s),
        ]);
    }
    if let Some((_, section)) = figures.report.as_mut() {
        section.push_str(&format!(
            "\n### An event's start: teams arriving, sizes mixed, room going round\n\n\
             {teams} teams arrive evenly over {:.0} s against one release controller and three release \
             agents; team i spawns the i-th of three challenges in turn ({}, the demo HTTP image with its \
             flag in `/flag`), waits for its instance as a player's page would (a 503 or 429 is retried \
             after its Retry-After; a 202's place is asked about every second; the instance is polled \
             every 200 ms until it answers 200), plays {:.0} s, then deletes it, so room goes round. The \
             admin token (no rate limit). Three fresh clusters in the same run: the old behaviour (each \
             worker a slot count of {slots}, `queue = false`, no pool), placement by memory with each \
             worker giving {memory} MiB (about the same room for this mix) and the waiting queue, and the \
             same with `pool = {{ min = {}, max = {} }}` on the small challenge. Spawn → routable is from \
             the team's first request to its first 200; the queue wait from it to the 201 or the place \
             becoming its instance; admitted/s is teams over the time from the first arrival to the last \
             admission; Jain's index is of the spawn → routable times (1 is every team waiting alike). \
             Peak committed is each worker's highest sum of its instances' memory limits over the run \
             (sampled every 250 ms), against the largest allocatable a worker reported: {memory} MiB in the \
             new rows; the old row keeps the default (the host's memory less a reserve), so only its slots \
             bound it. Queued places are asked about every second, so queue waits are to about a second; \
             429 stays 0 because the admin token has no rate limit.\n\n\
             | | admitted/s | all routable | spawn → routable p50 | p99 | queue wait p99 | Jain | 503 | 429 | 202 | peak committed MiB per worker |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n\
             {table}",
            shape.arrive_ms as f64 / 1000.0,
            sizes.join(", "),
            shape.play_ms as f64 / 1000.0,
            shape.pool.0,
            shape.pool.1,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::jain;

    #[test]
    fn jain_is_one_for_equal_waits_and_one_over_n_for_one_taker() {
        assert!((jain(&[3.0, 3.0, 3.0]) - 1.0).abs() < 1e-9);
        assert!((jain(&[5.0, 0.0, 0.0, 0.0]) - 0.25).abs() < 1e-9);
        assert!(jain(&[1.0, 2.0, 3.0]) < 1.0);
    }
}
