//! Attacks through a policy plugin: a component made to drain the slots of
//! the plugin pool every challenge's plugin shares.

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::range::{Range, allowlist_component, call};
use super::{Attack, From, Verdict};
use crate::cluster::api;

pub(super) fn attacks() -> Vec<Attack> {
    vec![Attack::new(
        "upload a policy component holding 40 memories (40 core modules)",
        From::Organizer,
        "plugin-caps",
        forty_memories,
    )]
}

/// The allowlist component with 40 extra core modules of one memory each,
/// uploaded to a challenge of its own: blocked if refused naming a cap and
/// the locked challenge's policy still decides (an unlisted team's spawn refused);
/// through if it is accepted.
fn forty_memories(r: &Range) -> Result<Verdict> {
    let wasm = tidegate_local::plugins::with_memories(&allowlist_component()?, 40);
    let spec = json!({
        "image": "tidegate/demo-http:2",
        "ports": [{"name": "web", "port": 8080, "protocol": "http"}],
    });
    let (status, body) = call(&r.plane, "PUT", "/v1/challenges/rt-hungry", &spec)?;
    anyhow::ensure!(
        status == 201 || status == 200,
        "registering rt-hungry: {status} {body}"
    );
    let out = api(
        r.plane.dir(),
        &r.plane.url,
        "PUT",
        "/v1/challenges/rt-hungry/policy",
        wasm,
    );
    let _ = call(&r.plane, "DELETE", "/v1/challenges/rt-hungry", &Value::Null);
    let out = out?;
    let (text, status) = out.rsplit_once(' ').context("curl printed no status")?;
    if status == "200" {
        return Ok(Verdict::Succeeded(format!("accepted: {text}")));
    }
    let error = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error"].as_str().map(String::from))
        .unwrap_or_else(|| text.to_string());
    anyhow::ensure!(
        status == "400" && error.contains("exceeds the configured maximum"),
        "refused, but not by a cap: {status} {error}"
    );
    // The other challenge's policy still decides.
    let (spawned, answer) = call(
        &r.plane,
        "POST",
        "/v1/instances",
        &json!({"challenge": "rt-locked", "team": "outsider"}),
    )?;
    anyhow::ensure!(
        spawned == 403,
        "rt-locked's allowlist did not refuse team outsider's spawn: {spawned} {answer}"
    );
    Ok(Verdict::Blocked(format!(
        "400 {error}; rt-locked's allowlist still refuses team outsider's spawn (403)"
    )))
}
