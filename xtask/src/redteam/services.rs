//! Attacks on instances with services: from team mallory's `demo-web-bot`
//! instance (and from its one-image one), reach team alice's db, which
//! lives on alice's instance's own network. The two instances are spawned
//! for this attack only (the rest of the range does not pay for them) and
//! deleted after it.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tidegate_local::images::{DEMO_DB_PORT, DEMO_DB_VALUE, DEMO_WEB_BOT_SPEC};
use tidegate_local::process::wait_until;

use super::range::{Range, call};
use super::{Attack, From, Verdict};
use crate::sh;

pub(super) fn attacks() -> Vec<Attack> {
    vec![Attack::new(
        "read another team's db on its instance's own network",
        From::Instance,
        "instance-networks",
        neighbour_db,
    )]
}

/// Instances spawned for one attack (ids, and their first HTTP hostname),
/// deleted when dropped.
pub(super) struct Spawned<'a> {
    range: &'a Range,
    pub(super) ids: Vec<String>,
    pub(super) hosts: Vec<String>,
}

impl Drop for Spawned<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = call(
                &self.range.plane,
                "DELETE",
                &format!("/v1/instances/{id}"),
                &Value::Null,
            );
        }
    }
}

/// Spawns `challenge` for each of `teams` and waits until all run. A
/// spawn may wait in the queue behind a place an earlier attack left (the
/// team-scope rows' 16 GiB `rt-queue`, which no worker has room for): it
/// is admitted once that place's hold runs out, its own kept by the polls.
pub(super) fn spawn_running<'a>(
    r: &'a Range,
    challenge: &str,
    teams: &[&str],
) -> Result<Spawned<'a>> {
    let mut spawned = Spawned {
        range: r,
        ids: Vec::new(),
        hosts: Vec::new(),
    };
    for team in teams {
        let (status, body) = call(
            &r.plane,
            "POST",
            "/v1/instances",
            &serde_json::json!({"challenge": challenge, "team": team}),
        )?;
        if status != 201 && status != 202 {
            bail!("spawning {challenge} for {team}: {status} {body}");
        }
        let id = body["id"].as_str().context("no id")?;
        spawned.ids.push(id.to_string());
    }
    for id in &spawned.ids {
        let mut last = Value::Null;
        let up = wait_until(Duration::from_secs(180), || {
            last = call(
                &r.plane,
                "GET",
                &format!("/v1/instances/{id}"),
                &Value::Null,
            )
            .map(|(_, b)| b)
            .unwrap_or(Value::Null);
            last["status"] == "running"
        });
        if !up {
            bail!("instance {id} never ran: {last}");
        }
        let host = last["http"][0]["hostname"].as_str().unwrap_or("");
        spawned.hosts.push(host.to_string());
    }
    Ok(spawned)
}

fn neighbour_db(r: &Range) -> Result<Verdict> {
    let spec: Value = serde_json::from_str(DEMO_WEB_BOT_SPEC)?;
    let (status, body) = call(&r.plane, "PUT", "/v1/challenges/rt-services", &spec)?;
    if status != 201 && status != 200 {
        bail!("registering rt-services: {status} {body}");
    }
    let spawned = spawn_running(r, "rt-services", &["alice", "mallory"])?;
    let (alice, mallory) = (&spawned.ids[0], &spawned.ids[1]);
    let db = format!("tidegate-{alice}-db");
    let address = sh::output(Command::new("docker").args([
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &db,
    ]))
    .map(|a| a.trim().to_string())
    .filter(|a| !a.is_empty())
    .with_context(|| format!("no address for {db}"))?;
    // Its own app reads it: the probe works.
    let probe = format!("nc -w 2 {address} {DEMO_DB_PORT} </dev/null");
    let own = docker_exec(&format!("tidegate-{alice}-app"), &probe);
    if own.trim() != DEMO_DB_VALUE {
        bail!("alice's own app cannot read its db at {address}: {own:?}");
    }
    let mut tried = Vec::new();
    for from in [
        format!("tidegate-{mallory}-app"),
        r.mallory.container.clone(),
    ] {
        let got = docker_exec(&from, &probe);
        if got.contains(DEMO_DB_VALUE) {
            return Ok(Verdict::Succeeded(format!(
                "{from} read alice's db at {address}:{DEMO_DB_PORT}: {:?}",
                got.trim()
            )));
        }
        tried.push(from);
    }
    Ok(Verdict::Blocked(format!(
        "nothing from {} reached {address}:{DEMO_DB_PORT} (alice's own app did)",
        tried.join(" or ")
    )))
}

/// `sh -c script` in `container`: its stdout (empty when it failed).
fn docker_exec(container: &str, script: &str) -> String {
    sh::output(Command::new("docker").args(["exec", container, "sh", "-c", script]))
        .unwrap_or_default()
}
