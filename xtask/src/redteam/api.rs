//! Attacks through the CTF platform's API calls, as a player steers them:
//! another team's instance id passed with the player's own team, another
//! team's flag submitted as the player's own, and one team's request
//! floods and boot/destroy loops.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::range::Range;
use super::{Attack, From, Verdict};
use crate::cluster::PLATFORM_TOKEN;

pub(super) fn attacks() -> Vec<Attack> {
    let idor = |name: &str, method: &'static str, tail: &'static str, body: Value| {
        Attack::new(
            format!("{name} alice's instance as team mallory (?team=)"),
            From::Network,
            "team-scope",
            move |r| {
                let path = format!("/v1/instances/{}{tail}?team=mallory", r.alice.id);
                let (status, said) = platform(r, method, &path, &body)?;
                Ok(if status == 404 {
                    Verdict::Blocked(format!("404 {}", said["error"]))
                } else {
                    Verdict::Succeeded(format!("{status}: {said}"))
                })
            },
        )
    };
    vec![
        idor("read", "GET", "", Value::Null),
        idor(
            "check a flag on",
            "POST",
            "/flag",
            json!({"flag": "CTF{x}"}),
        ),
        idor("renew", "POST", "/renew", Value::Null),
        Attack::new(
            "submit alice's instance flag as team mallory (flag sharing)",
            From::Network,
            "team-scope",
            shared_flag,
        ),
        // Before the queue's: nothing is added to a pool while spawns wait.
        Attack::new(
            "read a pooled instance (no team's yet) as team mallory (?team=)",
            From::Network,
            "team-scope",
            |r| pooled_as_mallory(r, "GET"),
        ),
        Attack::new(
            "remove a pooled instance as team mallory (draining the pool)",
            From::Network,
            "team-scope",
            |r| pooled_as_mallory(r, "DELETE"),
        ),
        Attack::new(
            "read carol's place in the waiting queue as team mallory (?team=)",
            From::Network,
            "team-scope",
            |r| queue_place_as_mallory(r, "GET"),
        ),
        Attack::new(
            "give up carol's place in the waiting queue as team mallory (?team=)",
            From::Network,
            "team-scope",
            |r| queue_place_as_mallory(r, "DELETE"),
        ),
        // Last of the team-scope attacks: a control run deletes it.
        idor("delete", "DELETE", "", Value::Null),
        Attack::new(
            "flood spawns as one team (60 at once)",
            From::Network,
            "rate-limit",
            flood,
        ),
        Attack::new(
            "hold 300 TCP connections to alice's instance from one address",
            From::Network,
            "tcp-caps",
            hold_connections,
        ),
        Attack::new(
            "boot/destroy loop of one team for 30 s: containers created",
            From::Network,
            "rate-limit",
            boot_destroy,
        ),
    ]
}

/// Attacks on a control plane of two replicas (run last: they add to the
/// numbering of docs/security.md at its end).
pub(super) fn replica_attacks() -> Vec<Attack> {
    vec![Attack::new(
        "flood spawns as one team through both replicas (40, alternating)",
        From::Network,
        "rate-limit",
        flood_both,
    )]
}

/// 40 spawns of one team in a row, every other one sent to the standby
/// (which forwards it to the scheduler with the platform's token). The
/// team's bucket is one, wherever the platform sends its calls: at most
/// its burst plus its rate over the run get past it, not one bucket's
/// worth per replica.
fn flood_both(r: &Range) -> Result<Verdict> {
    let rate = tidegate_schema::config::RateLimits::default().spawn;
    let scheduler = r.plane.url.trim_start_matches("http://");
    let standby = r.standby.trim_start_matches("http://");
    let body = json!({"challenge": "rt-web", "team": "relay"});
    let mut answers = std::collections::BTreeMap::<(&str, u16), usize>::new();
    let started = Instant::now();
    for i in 0..40 {
        let (to, name) = if i % 2 == 0 {
            (standby, "standby")
        } else {
            (scheduler, "scheduler")
        };
        let (status, said) = platform_at(to, "POST", "/v1/instances", &body)?;
        // A refused token or a failed hop says nothing about the bucket.
        let hop_failed =
            status == 503 && (said.get("leader").is_some() || said["reason"] == "not_scheduler");
        anyhow::ensure!(
            status != 401 && !hop_failed,
            "{name} answered {status}: {said}"
        );
        *answers.entry((name, status)).or_default() += 1;
    }
    // What got through is removed: later rows and controls start clean.
    let (_, listed) = platform(r, "GET", "/v1/instances?team=relay", &Value::Null)?;
    for id in listed["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["id"].as_str())
    {
        platform(r, "DELETE", &format!("/v1/instances/{id}"), &Value::Null)?;
    }
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    // Past the bucket: made (201), queued (202) or refused after it (409
    // per_team_max, 503 no room).
    let passed: usize = answers
        .iter()
        .filter(|((_, status), _)| *status != 429)
        .map(|(_, n)| n)
        .sum();
    let allowed = f64::from(rate.burst) + f64::from(rate.per_minute) * minutes + 1.0;
    let through_standby = answers
        .iter()
        .any(|((name, status), _)| *name == "standby" && *status != 429);
    anyhow::ensure!(
        through_standby,
        "the standby forwarded nothing past the bucket: {answers:?}"
    );
    Ok(if (passed as f64) <= allowed {
        Verdict::Blocked(format!(
            "{passed} past the team's bucket (allowed {allowed:.0}): {answers:?}"
        ))
    } else {
        Verdict::Succeeded(format!(
            "{passed} past the team's bucket, more than its {allowed:.0}: {answers:?}"
        ))
    })
}

/// A platform-token call to the controller: status and JSON answer.
fn platform(r: &Range, method: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
    platform_at(
        r.plane.url.trim_start_matches("http://"),
        method,
        path,
        body,
    )
}

/// [`platform`] to the controller at `addr` (for threads of their own).
fn platform_at(addr: &str, method: &str, path: &str, body: &Value) -> Result<(u16, Value)> {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, said) = crate::sh::http(addr, method, path, Some(PLATFORM_TOKEN), &body)
        .with_context(|| format!("{method} {path}: no answer from the controller"))?;
    Ok((status, serde_json::from_str(&said).unwrap_or(Value::Null)))
}

/// Team carol's place in the waiting queue of `rt-queue` (made on first
/// use): a challenge so large (16 GiB) that each worker takes one, so the
/// third team's spawn waits.
fn carols_place(r: &Range) -> Result<String> {
    let (_, queue) = platform(
        r,
        "GET",
        "/v1/queue?challenge=rt-queue&team=carol",
        &Value::Null,
    )?;
    if let Some(id) = queue["queued"][0]["id"].as_str() {
        return Ok(id.to_string());
    }
    let spec = json!({"image": tidegate_local::images::DEMO_HTTP, "limits": {"memory_mib": 16384},
        "ports": [{"name": "web", "port": 8080, "protocol": "http"}]});
    let (status, said) = super::range::call(&r.plane, "PUT", "/v1/challenges/rt-queue", &spec)?;
    anyhow::ensure!(
        status == 201 || status == 200,
        "creating rt-queue: {status} {said}"
    );
    for team in ["qa", "qb", "qc", "carol"] {
        let (status, said) = platform(
            r,
            "POST",
            "/v1/instances",
            &json!({"challenge": "rt-queue", "team": team}),
        )?;
        match (status, team) {
            (202, "carol") => return said["id"].as_str().map(String::from).context("no id"),
            (201 | 202, _) => {}
            _ => anyhow::bail!("spawning rt-queue for {team}: {status} {said}"),
        }
    }
    anyhow::bail!("rt-queue never filled: carol's spawn was not queued")
}

/// Mallory reads or gives up carol's queued spawn by its id with its own
/// team: it must be answered as missing and the place must stay.
fn queue_place_as_mallory(r: &Range, method: &str) -> Result<Verdict> {
    let place = carols_place(r)?;
    let path = format!("/v1/instances/{place}?team=mallory");
    let (status, said) = platform(r, method, &path, &Value::Null)?;
    let (_, queue) = platform(r, "GET", "/v1/queue?team=carol", &Value::Null)?;
    let kept = queue["queued"][0]["id"] == place.as_str();
    Ok(if status == 404 && kept {
        Verdict::Blocked(format!("404 {}; carol's place kept", said["error"]))
    } else {
        Verdict::Succeeded(format!("{status}: {said}; carol's place kept: {kept}"))
    })
}

/// A pooled instance of `rt-pool` (made on first use: a warm pool of one,
/// its flag in `/flag`), by the organizers' list: its id.
fn pooled_id(r: &Range) -> Result<String> {
    let listed = |r: &Range| -> Result<Option<String>> {
        let (_, pools) = super::range::call(&r.plane, "GET", "/v1/pools", &Value::Null)?;
        Ok(pools["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["challenge"] == "rt-pool")
            .flat_map(|p| p["instances"].as_array().cloned().unwrap_or_default())
            .find_map(|i| i["id"].as_str().map(String::from)))
    };
    if let Some(id) = listed(r)? {
        return Ok(id);
    }
    let spec = json!({"image": tidegate_local::images::DEMO_HTTP, "pool": {"min": 1, "max": 1},
        "flag": {"file": "/flag"}, "limits": {"memory_mib": 32, "cpus": 0.05, "pids": 32},
        "tmpfs": [{"path": "/tmp", "size_mib": 8}],
        "ports": [{"name": "web", "port": 8080, "protocol": "http"}]});
    let (status, said) = super::range::call(&r.plane, "PUT", "/v1/challenges/rt-pool", &spec)?;
    anyhow::ensure!(
        status == 201 || status == 200,
        "creating rt-pool: {status} {said}"
    );
    for _ in 0..50 {
        if let Some(id) = listed(r)? {
            return Ok(id);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("rt-pool's pool stayed empty")
}

/// Mallory names a pooled instance (no team's yet) with its own team: it
/// must be answered as missing and stay in the pool.
fn pooled_as_mallory(r: &Range, method: &str) -> Result<Verdict> {
    let id = pooled_id(r)?;
    let (status, said) = platform(
        r,
        method,
        &format!("/v1/instances/{id}?team=mallory"),
        &Value::Null,
    )?;
    let (_, pools) = super::range::call(&r.plane, "GET", "/v1/pools", &Value::Null)?;
    let kept = pools.to_string().contains(&id);
    Ok(if status == 404 && kept {
        Verdict::Blocked(format!("404 {}; still pooled", said["error"]))
    } else {
        Verdict::Succeeded(format!("{status}: {said}; still pooled: {kept}"))
    })
}

/// Mallory got alice's flag (from alice, or a writeup) and submits it as
/// its own: it must be incorrect, and named as alice's.
fn shared_flag(r: &Range) -> Result<Verdict> {
    let secrets = r.etcdctl_ok(
        "root",
        &[
            "get",
            "--prefix",
            "/tidegate/secrets/",
            "--print-value-only",
        ],
    )?;
    let flag = secrets
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["instance"] == r.alice.id.as_str())
        .and_then(|v| v["flag"].as_str().map(String::from))
        .context("alice's instance has no secret record")?;
    let (status, said) = platform(
        r,
        "POST",
        "/v1/flags/check",
        &json!({"challenge": "rt-web", "team": "mallory", "flag": flag}),
    )?;
    // The report never holds the flag itself (the flag sweep reads it).
    Ok(
        if status == 200 && said["correct"] == false && said["owner"]["team"] == "alice" {
            Verdict::Blocked(format!(
                "incorrect, shared: {}, owner {}",
                said["shared"], said["owner"]
            ))
        } else {
            Verdict::Succeeded(format!("{status}: {said}"))
        },
    )
}

fn spawn(r: &Range, team: &str) -> Result<(u16, Value)> {
    platform(
        r,
        "POST",
        "/v1/instances",
        &json!({"challenge": "rt-web", "team": team}),
    )
}

fn flood(r: &Range) -> Result<Verdict> {
    let mut answers = std::collections::BTreeMap::<u16, usize>::new();
    for _ in 0..60 {
        let (status, _) = spawn(r, "flooder")?;
        *answers.entry(status).or_default() += 1;
    }
    let limited = answers.get(&429).copied().unwrap_or(0);
    Ok(if limited > 0 {
        Verdict::Blocked(format!("answers {answers:?}"))
    } else {
        Verdict::Succeeded(format!("no 429 in 60 spawns: {answers:?}"))
    })
}

fn boot_destroy(r: &Range) -> Result<Verdict> {
    let team = "looper";
    let since = unix_now();
    let started = Instant::now();
    let addr = r.plane.url.trim_start_matches("http://");
    // Three loops at once (the challenge's per_team_max): without the
    // bucket they create containers well past its allowance, however
    // long each container takes to make.
    let loop_once = || -> Result<usize> {
        let mut spawned = 0;
        let body = json!({"challenge": "rt-web", "team": team});
        while started.elapsed() < Duration::from_secs(30) {
            let (status, answer) = platform_at(addr, "POST", "/v1/instances", &body)?;
            if status != 201 {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            spawned += 1;
            let id = answer["id"].as_str().context("a 201 without an id")?;
            // Until the agent has made its container (it reports a status
            // other than pending), or 3 s.
            let path = format!("/v1/instances/{id}");
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(3)
                && platform_at(addr, "GET", &path, &Value::Null)?.1["status"] == "pending"
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            platform_at(addr, "DELETE", &path, &Value::Null)?;
        }
        Ok(spawned)
    };
    let mut spawned = 0;
    std::thread::scope(|s| -> Result<()> {
        let loops: Vec<_> = (0..3).map(|_| s.spawn(loop_once)).collect();
        for l in loops {
            spawned += l
                .join()
                .map_err(|_| anyhow::anyhow!("a boot/destroy loop panicked"))??;
        }
        Ok(())
    })?;
    let elapsed = started.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let created = containers_created(r, team, since)?;
    // The range's controller runs with the default buckets.
    let rate = tidegate_schema::config::RateLimits::default().spawn;
    let allowed =
        rate.burst as f64 + elapsed.as_secs_f64() * f64::from(rate.per_minute) / 60.0 + 1.0;
    let seen = format!(
        "{created} containers created ({spawned} spawns answered 201, 3 loops) in {:.0} s; the spawn bucket allows {allowed:.0}",
        elapsed.as_secs_f64()
    );
    Ok(if (created as f64) <= allowed {
        Verdict::Blocked(seen)
    } else {
        Verdict::Succeeded(seen)
    })
}

/// 300 connections to alice's TCP port on agent a from this host's one
/// address, each asked to echo a line: more than the per-source cap
/// (256 by default) served means the cap is not there.
fn hold_connections(r: &Range) -> Result<Verdict> {
    use std::io::{Read, Write};
    let to = std::net::SocketAddr::new(r.a_cfg.tcp_host, r.alice.tcp_port);
    let mut held = Vec::new();
    let mut served = 0;
    for _ in 0..300 {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)) else {
            continue;
        };
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 5];
        if s.write_all(b"ping\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping\n" {
            served += 1;
        }
        held.push(s);
    }
    let cap = r.a_cfg.tcp_max_connections_per_source;
    let seen = format!("{served} of 300 served (tcp_max_connections_per_source = {cap})");
    Ok(if served == 0 {
        anyhow::bail!("no connection was served at all: {seen}")
    } else if served <= cap as usize {
        Verdict::Blocked(seen)
    } else {
        Verdict::Succeeded(seen)
    })
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How many containers of `team` the engine created since `since`.
fn containers_created(r: &Range, team: &str, since: u64) -> Result<usize> {
    let out = std::process::Command::new("docker")
        .args([
            "events",
            "--since",
            &since.to_string(),
            "--until",
            &unix_now().to_string(),
            "--filter",
            "type=container",
            "--filter",
            "event=create",
            "--filter",
            &format!("label=tidegate.team={team}"),
            "--filter",
            &format!(
                "label=tidegate.cluster={}",
                r.a_cfg.cluster_label.as_deref().unwrap_or_default()
            ),
            "--format",
            "{{.Actor.ID}}",
        ])
        .output()
        .context("docker events")?;
    anyhow::ensure!(
        out.status.success(),
        "docker events: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}
