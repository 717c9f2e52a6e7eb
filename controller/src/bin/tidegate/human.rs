//! Answers as plain tables for people (`--json` prints the API's JSON).

use serde_json::Value;

use crate::{ChallengeCmd, Command, InstanceCmd, PolicyCmd, QueueCmd, WorkerCmd};

/// A plain table, columns padded to their widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut s = line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        s += &line(r);
    }
    s
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Time left until `expires_at` (unix seconds) at `now`: `45s`, `29m`,
/// `1h05m`, `expired`; `-` when it is not a number.
fn time_left(expires_at: &Value, now: u64) -> String {
    let Some(at) = expires_at.as_u64() else {
        return "-".into();
    };
    match at.saturating_sub(now) {
        0 => "expired".into(),
        s => span(s),
    }
}

/// Time since `queued_at` (unix seconds) at `now`, as [`time_left`] says
/// it; `-` when it is not a number.
fn waited(queued_at: &Value, now: u64) -> String {
    queued_at
        .as_u64()
        .map_or_else(|| "-".into(), |at| span(now.saturating_sub(at)))
}

/// A duration as people say it: `45s`, `29m`, `1h05m`.
fn span(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `committed/allocatable` of one resource of a worker, e.g. `768Mi/1024Mi`
/// (`-` from an agent that does not say what it gives).
fn committed_of(w: &Value, resource: &str, show: impl Fn(u64) -> String) -> String {
    match (
        w["committed"][resource].as_u64(),
        w["allocatable"][resource].as_u64(),
    ) {
        (Some(c), Some(a)) => format!("{}/{}", show(c), show(a)),
        _ => "-".into(),
    }
}

/// The STATUS cell: the status, each service's state, and an unhealthy
/// solver check with its reason when the answer carries one.
fn status_cell(i: &Value) -> String {
    let mut cell = text(&i["status"]);
    if let Some(services) = i["services"].as_object() {
        let states: Vec<String> = services
            .iter()
            .map(|(name, state)| format!("{name} {}", text(state)))
            .collect();
        cell = format!("{cell} ({})", states.join(", "));
    }
    if i["solver"]["state"] == "unhealthy" {
        cell = match i["solver"]["detail"].as_str() {
            Some(why) => format!("{cell}, unhealthy: {why}"),
            None => format!("{cell}, unhealthy"),
        };
    }
    cell
}

fn instance_rows(items: &[Value]) -> String {
    let now = now();
    let rows = items
        .iter()
        .map(|i| {
            let http: Vec<String> = i["http"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|h| text(&h["url"]))
                .collect();
            let tcp: Vec<String> = i["tcp"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| text(&t["port"]))
                .collect();
            vec![
                text(&i["id"]),
                text(&i["challenge"]),
                text(&i["team"]),
                text(&i["worker"]),
                status_cell(i),
                time_left(&i["expires_at"], now),
                [http, tcp.iter().map(|p| format!("tcp:{p}")).collect()]
                    .concat()
                    .join(" "),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "CHALLENGE",
            "TEAM",
            "WORKER",
            "STATUS",
            "EXPIRES_IN",
            "ENDPOINTS",
        ],
        rows,
    )
}

/// Waiting spawns (`GET /v1/queue`'s `queued`), in admission order.
fn queue_rows(items: &[Value], now: u64) -> String {
    let rows = items
        .iter()
        .map(|q| {
            vec![
                text(&q["position"]),
                text(&q["id"]),
                text(&q["team"]),
                text(&q["challenge"]),
                text(&q["reason"]),
                waited(&q["queued_at"], now),
            ]
        })
        .collect();
    table(
        &["POSITION", "ID", "TEAM", "CHALLENGE", "REASON", "WAITED"],
        rows,
    )
}

/// A spawn that waits for room (a `202` to a spawn, or a `GET` of its id):
/// its place, and that asking about it keeps the place.
fn queued_line(v: &Value) -> String {
    format!(
        "queued: {}, position {} of {} ({})\n\
         it keeps its place while `tidegate instance get {}` asks at least every {}s\n",
        text(&v["id"]),
        text(&v["position"]),
        text(&v["waiting"]),
        text(&v["reason"]),
        text(&v["id"]),
        text(&v["hold_secs"]),
    )
}

pub(crate) fn human(cmd: &Command, v: &Value) -> String {
    match cmd {
        Command::Challenge(ChallengeCmd::Ls) => {
            let rows = v["challenges"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let ports: Vec<String> = c["spec"]["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            format!(
                                "{}/{}:{}",
                                text(&p["protocol"]),
                                text(&p["name"]),
                                text(&p["port"])
                            )
                        })
                        .collect();
                    vec![
                        text(&c["name"]),
                        text(&c["revision"]),
                        text(&c["spec"]["image"]),
                        ports.join(" "),
                    ]
                })
                .collect();
            let mut s = table(&["NAME", "REVISION", "IMAGE", "PORTS"], rows);
            for e in v["errors"].as_array().into_iter().flatten() {
                s += &format!("unreadable: {} ({})\n", text(&e["key"]), text(&e["error"]));
            }
            s
        }
        Command::Challenge(ChallengeCmd::Apply { .. }) => {
            let verb = if v["created"] == true {
                "created"
            } else {
                "updated"
            };
            format!(
                "challenge {} {verb} at revision {}\n",
                text(&v["name"]),
                text(&v["revision"])
            )
        }
        Command::Instance(InstanceCmd::Ls { .. }) => {
            instance_rows(v["instances"].as_array().map(Vec::as_slice).unwrap_or(&[]))
        }
        Command::Instance(InstanceCmd::Spawn { .. } | InstanceCmd::Get { .. })
            if v["status"] == "queued" =>
        {
            queued_line(v)
        }
        Command::Instance(
            InstanceCmd::Spawn { .. } | InstanceCmd::Get { .. } | InstanceCmd::Renew { .. },
        ) => instance_rows(std::slice::from_ref(v)),
        Command::Queue(QueueCmd::Ls { .. }) => queue_rows(
            v["queued"].as_array().map(Vec::as_slice).unwrap_or(&[]),
            now(),
        ),
        Command::Worker(WorkerCmd::Ls) => {
            let rows = v["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| {
                    vec![
                        text(&w["id"]),
                        text(&w["http_entry"]),
                        text(&w["tcp_host"]),
                        format!("{}/{}", text(&w["instances"]), text(&w["capacity"])),
                        committed_of(w, "memory_mib", |m| format!("{m}Mi")),
                        committed_of(w, "millicpus", |m| format!("{}", m as f64 / 1000.0)),
                        committed_of(w, "pids", |p| p.to_string()),
                        match (&w["networks_used"], &w["networks_free"]) {
                            (Value::Null, _) | (_, Value::Null) => "-".into(),
                            (used, free) => format!("{}/{}", text(used), text(free)),
                        },
                        text(&w["version"]),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "HTTP_ENTRY",
                    "TCP_HOST",
                    "USED/CAPACITY",
                    "MEMORY",
                    "CPUS",
                    "PIDS",
                    "NETWORKS USED/FREE",
                    "VERSION",
                ],
                rows,
            )
        }
        Command::Policy(PolicyCmd::Upload { .. } | PolicyCmd::Get { .. }) => format!(
            "challenge {}: policy {}\nhooks: {}\nsize: {} bytes, fallback: {}, revision {}\n",
            text(&v["challenge"]),
            text(&v["digest"]),
            v["hooks"]
                .as_array()
                .map(|h| h.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            text(&v["size"]),
            text(&v["fallback"]),
            text(&v["revision"]),
        ),
        Command::Policy(PolicyCmd::Rm { challenge }) => {
            format!("challenge {challenge}: policy removed\n")
        }
        Command::Status => format!(
            "replica {} is {} (token {})\nleader: {} at {}\n{}etcd revision {}, {} member(s)\n",
            text(&v["id"]),
            text(&v["role"]),
            text(&v["token"]),
            text(&v["leader"]["id"]),
            text(&v["leader"]["url"]),
            shard_lines(&v["shards"]),
            text(&v["etcd"]["revision"]),
            v["etcd"]["members"].as_array().map_or(0, Vec::len),
        ),
        _ => serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
    }
}

/// With more than one shard: how many each controller leads, and which.
fn shard_lines(shards: &Value) -> String {
    let Some(leaders) = shards["leaders"].as_array().filter(|l| l.len() > 1) else {
        return String::new();
    };
    let mut by: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for l in leaders {
        let who = l["leader"]["id"].as_str().unwrap_or("(none)").to_string();
        by.entry(who).or_default().push(text(&l["shard"]));
    }
    let mut out = format!("shards: {}\n", leaders.len());
    for (who, list) in by {
        out += &format!("  {who}: {} ({})\n", list.len(), list.join(" "));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn worker_resources_read_committed_over_allocatable() {
        let w = json!({"committed": {"memory_mib": 768, "millicpus": 1500, "pids": 256},
            "allocatable": {"memory_mib": 1024, "millicpus": 16000, "pids": 4000}});
        assert_eq!(
            committed_of(&w, "memory_mib", |m| format!("{m}Mi")),
            "768Mi/1024Mi"
        );
        assert_eq!(
            committed_of(&w, "millicpus", |m| format!("{}", m as f64 / 1000.0)),
            "1.5/16"
        );
        let old = json!({"committed": {"memory_mib": 0}});
        assert_eq!(committed_of(&old, "memory_mib", |m| m.to_string()), "-");
    }

    #[test]
    fn time_left_reads_as_people_say_it() {
        let now = 1_000_000;
        assert_eq!(time_left(&json!(now + 45), now), "45s");
        assert_eq!(time_left(&json!(now + 29 * 60 + 59), now), "29m");
        assert_eq!(time_left(&json!(now + 3600 + 5 * 60), now), "1h05m");
        assert_eq!(time_left(&json!(now), now), "expired");
        assert_eq!(time_left(&json!(now - 10), now), "expired");
        assert_eq!(time_left(&Value::Null, now), "-");
    }

    #[test]
    fn instance_table_shows_time_left_not_unix_seconds() {
        let expires = now() + 29 * 60 + 30;
        let out = instance_rows(&[json!({
            "id": "a3f4b92c8d", "challenge": "web", "team": "t1", "worker": "w1",
            "status": "running", "expires_at": expires, "http": [], "tcp": [{"port": 20001}],
        })]);
        assert!(out.starts_with("ID"), "{out}");
        assert!(out.contains("EXPIRES_IN"), "{out}");
        assert!(out.contains(" 29m "), "{out}");
        assert!(!out.contains(&expires.to_string()), "{out}");
    }

    #[test]
    fn an_unhealthy_instance_shows_it_with_the_reason_in_its_status() {
        let row = |solver: Value| {
            status_cell(&json!({"status": "running", "solver": solver,
                "services": {"app": "ready"}}))
        };
        assert_eq!(
            row(json!({"state": "unhealthy", "checked_at": 1, "detail": "the solver exited 1"})),
            "running (app ready), unhealthy: the solver exited 1"
        );
        assert_eq!(
            row(json!({"state": "unhealthy", "checked_at": 1})),
            "running (app ready), unhealthy"
        );
        assert_eq!(
            row(json!({"state": "healthy", "checked_at": 1})),
            "running (app ready)"
        );
    }

    #[test]
    fn queue_table_shows_places_in_order_and_how_long_they_waited() {
        let now = 1_000_000;
        let out = queue_rows(
            &[
                json!({"id": "a3f4b92c8d", "challenge": "web", "team": "t1", "status": "queued",
                    "position": 1, "waiting": 2, "reason": "no_capacity", "queued_at": now - 65,
                    "hold_secs": 30}),
                json!({"id": "b3f4b92c8d", "challenge": "pwn", "team": "team-2",
                    "status": "queued", "position": 2, "waiting": 2, "reason": "policy",
                    "queued_at": now - 3725, "hold_secs": 30}),
            ],
            now,
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "POSITION  ID          TEAM    CHALLENGE  REASON       WAITED",
                "1         a3f4b92c8d  t1      web        no_capacity  1m",
                "2         b3f4b92c8d  team-2  pwn        policy       1h02m",
            ],
            "{out}"
        );
        assert_eq!(waited(&json!(now), now), "0s");
        assert_eq!(waited(&json!(now + 5), now), "0s");
        assert_eq!(waited(&Value::Null, now), "-");
        assert_eq!(
            queue_rows(&[], now),
            "POSITION  ID  TEAM  CHALLENGE  REASON  WAITED\n"
        );
    }

    #[test]
    fn a_queued_spawn_says_its_place() {
        let v = json!({"id": "a3f4b92c8d", "challenge": "web", "team": "t1", "status": "queued",
            "position": 3, "waiting": 12, "reason": "no_capacity", "detail": "no worker has room",
            "queued_at": 0, "hold_secs": 30});
        let cmd = Command::Instance(InstanceCmd::Spawn {
            challenge: "web".into(),
            team: "t1".into(),
        });
        let out = human(&cmd, &v);
        assert!(
            out.starts_with("queued: a3f4b92c8d, position 3 of 12 (no_capacity)\n"),
            "{out}"
        );
        assert!(out.contains("every 30s"), "{out}");
        // An admitted instance is still a table.
        let running = json!({"id": "a3f4b92c8d", "challenge": "web", "team": "t1",
            "worker": "w1", "status": "running", "expires_at": 0, "http": [], "tcp": []});
        assert!(human(&cmd, &running).starts_with("ID"));
    }
}
