//! Attacks through a challenge's solver check: an organizer's solver image
//! that writes without end and never exits, run by the agent against every
//! instance of the challenge.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};
use tidegate_local::images::{DEMO_FLOOD, DEMO_HTTP};
use tidegate_local::process::wait_until;

use super::range::{Range, call};
use super::{Attack, From, Verdict};

/// The flooding solver's `timeout_secs`.
const TIMEOUT_SECS: u64 = 3;

pub(super) fn attacks() -> Vec<Attack> {
    vec![Attack::new(
        "a solver that writes without end and never exits",
        From::Organizer,
        "solver-limits",
        endless_solver,
    )]
}

/// A challenge whose solver is `yes` (DEMO_FLOOD), one instance of it:
/// blocked if, within the timeout and 10 s, the instance's check says the
/// solver did not finish in time with a detail within its 512 bytes, and
/// no solver container is left of it; through if one still runs then.
fn endless_solver(r: &Range) -> Result<Verdict> {
    let spec = json!({
        "image": DEMO_HTTP,
        "ports": [{"name": "web", "port": 8080, "protocol": "http"}],
        "solver": {"image": DEMO_FLOOD, "interval_secs": 60, "timeout_secs": TIMEOUT_SECS},
    });
    let (status, body) = call(&r.plane, "PUT", "/v1/challenges/rt-solver", &spec)?;
    anyhow::ensure!(
        status == 201 || status == 200,
        "registering rt-solver: {status} {body}"
    );
    let (status, spawned) = call(
        &r.plane,
        "POST",
        "/v1/instances",
        &json!({"challenge": "rt-solver", "team": "author"}),
    )?;
    anyhow::ensure!(status == 201, "spawning rt-solver: {status} {spawned}");
    let id = spawned["id"].as_str().unwrap_or_default().to_string();
    let path = format!("/v1/instances/{id}");
    let solver_container = format!("tidegate-{id}_solver");
    let exists = |name: &str| {
        std::process::Command::new("docker")
            .args(["inspect", "--format", "{{.State.Status}}", name])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // Until its first run has started (the instance runs), at most 60 s.
    let started = Instant::now();
    let began = wait_until(Duration::from_secs(60), || exists(&solver_container));
    let mut check = Value::Null;
    let ended = began
        && wait_until(Duration::from_secs(TIMEOUT_SECS + 10), || {
            check = call(&r.plane, "GET", &path, &Value::Null)
                .map(|(_, v)| v["solver"].clone())
                .unwrap_or_default();
            check["state"] == "unhealthy" && !exists(&solver_container)
        });
    let still_running = exists(&solver_container);
    let _ = call(&r.plane, "DELETE", &path, &Value::Null);
    let _ = call(&r.plane, "DELETE", "/v1/challenges/rt-solver", &Value::Null);
    anyhow::ensure!(
        began,
        "no solver run began within 60 s of the spawn ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    if still_running {
        return Ok(Verdict::Succeeded(format!(
            "its container still runs {TIMEOUT_SECS} + 10 s after it started"
        )));
    }
    let detail = check["detail"].as_str().unwrap_or_default();
    anyhow::ensure!(
        ended && detail.contains("did not finish within"),
        "the run ended, but the check says {check}"
    );
    Ok(Verdict::Blocked(format!(
        "stopped at its timeout and removed; the check: unhealthy, {} bytes of detail",
        detail.len()
    )))
}
