//! Operations (#9) on a live local cluster: both daemons' Prometheus
//! endpoints read with `curl` after real spawns and traffic, and the
//! organizer dashboard loaded in headless Chromium.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::time::Duration;

use common::{Plane, get, plane};
use reqwest::{Method, StatusCode};
use tidegate_lab::daemons::{ADMIN, echo_spec, eventually, web_spec};
use tidegate_lab::plugins::component;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// `curl -sf url`: the body, or the failure with curl's stderr.
fn curl(url: &str) -> String {
    curl_with(url, None)
}

/// [`curl`] with `Authorization: Bearer <token>` when given.
fn curl_with(url: &str, token: Option<String>) -> String {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "-f", "--max-time", "5", url]);
    if let Some(h) = &auth {
        cmd.args(["-H", h]);
    }
    let out = cmd.output().expect("running curl");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The sum of every sample of `name` whose labels contain all of `labels`
/// (e.g. `hook="renew"`); `None` when no sample matches.
fn total(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = series.split_once('{').unwrap_or((series, ""));
        if n == name && labels.iter().all(|want| l.contains(want)) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(f64::NAN);
        }
    }
    found
}

/// Asserts each `(name, labels)` has a sample and their sum is above zero.
fn assert_non_zero(what: &str, text: &str, wanted: &[(&str, &[&str])]) {
    let mut missing = Vec::new();
    for (name, labels) in wanted {
        match total(text, name, labels) {
            Some(v) if v > 0.0 => {}
            other => missing.push(format!("{name}{labels:?} = {other:?}")),
        }
    }
    assert!(
        missing.is_empty(),
        "{what}: zero or absent: {missing:#?}\n--- {what} /metrics ---\n{text}"
    );
}

/// Reads a line echoed by an instance's public TCP port on `host`.
async fn echo_line(host: &str, port: u16) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(b"ping\n").await.is_err() {
        return false;
    }
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        BufReader::new(&mut s).read_line(&mut line),
    )
    .await;
    matches!(read, Ok(Ok(_))) && line == "ping\n"
}

/// Challenges: `web` under the allowlist policy (admit-spawn and
/// admit-connection), `echo` (TCP), `slow` under a runaway plugin whose
/// fallback denies.
async fn challenges(p: &Plane) {
    let c = &p.controller;
    for (name, spec) in [
        ("web", web_spec()),
        ("echo", echo_spec()),
        ("slow", web_spec()),
    ] {
        let (s, body) = c.put_challenge(name, spec).await;
        assert!(s.is_success(), "{name}: {body}");
    }
    for (challenge, plugin) in [("web", "allowlist"), ("slow", "runaway")] {
        let (s, body) = c.put_policy(challenge, component(plugin)).await;
        assert!(s.is_success(), "{challenge}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_metrics_endpoint_shows_the_named_metrics_after_a_spawn() {
    // Metrics, not deadlines: on a loaded 2-core run a debug build's
    // allowlist call can cross 5 ms of CPU and fall back (the runaway
    // plugin here runs at the controller, whose deadline stays 5 ms).
    let p = plane(|c| c.plugin_deadline_ms = 50).await;
    let c = &p.controller;
    challenges(&p).await;

    // Refusals: the allowlist denies mallory; the runaway plugin fails and
    // the challenge's fallback (deny) applies.
    let (s, body) = c.spawn("web", "mallory").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (s, body) = c.spawn("slow", "red").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");

    let (web, host, owner) = p.running("web", "red").await;
    // Until it has compiled a challenge's plugin, an agent admits that
    // challenge's traffic without a call: wait for web's and slow's.
    assert!(
        eventually(60, || async {
            p.a.metric("tidegate_policy_plugins{state=\"loaded\"}")
                .await
                == Some(2.0)
        })
        .await,
        "agent a never loaded web's and slow's policies:\n{}",
        p.a.proc.log_tail(20)
    );
    let (s, _, body) = get(&p.a_http, &host, None).await;
    assert_eq!(s, 200, "{body}");
    let (s, echo) = c.spawn("echo", "red").await;
    assert_eq!(s, StatusCode::CREATED, "{echo}");
    let port = echo["tcp"][0]["port"].as_u64().unwrap() as u16;
    assert!(
        eventually(30, || echo_line(&p.a_host, port)).await,
        "the echo instance never answered on {}:{port}",
        p.a_host
    );
    // A renewal a moment later extends the instance.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, body) = c
        .call(
            Method::POST,
            &format!("/v1/instances/{web}/renew"),
            None,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // Probes run every 2 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let text = curl(&format!("{}/metrics", c.url));
    assert_non_zero(
        "controller",
        &text,
        &[
            ("tidegate_controller_etcd_rtt_seconds_count", &[]),
            ("tidegate_controller_etcd_watch_lag_seconds_count", &[]),
            ("tidegate_controller_etcd_revision", &[]),
            ("tidegate_controller_leader", &[]),
            ("tidegate_controller_shards_led", &[]),
            ("tidegate_controller_shards", &[]),
            ("tidegate_controller_leader_changes_total", &[]),
            ("tidegate_controller_spawns_total", &[]),
            ("tidegate_controller_renewals_total", &[]),
            (
                "tidegate_controller_refusals_total",
                &["op=\"spawn\"", "reason=\"policy_deny\""],
            ),
            (
                "tidegate_controller_refusals_total",
                &["op=\"spawn\"", "reason=\"policy_fallback_deny\""],
            ),
            (
                "tidegate_controller_plugin_call_seconds_count",
                &["hook=\"admit-spawn\""],
            ),
            (
                "tidegate_controller_plugin_failures_total",
                &["hook=\"admit-spawn\""],
            ),
            ("tidegate_controller_instances", &["status=\"running\""]),
            ("tidegate_controller_workers", &[]),
            ("tidegate_controller_capacity", &[]),
            // Its own spawn writes, timed.
            ("tidegate_controller_etcd_write_seconds_count", &[]),
            // etcd's own health, read from the member's /metrics (the
            // lab's etcd is plain http, so its client URL serves it).
            ("tidegate_controller_etcd_member_up", &[]),
            ("tidegate_controller_etcd_member_has_leader", &[]),
            ("tidegate_controller_etcd_member_is_leader", &[]),
            (
                "tidegate_controller_etcd_member_wal_fsync_seconds_count",
                &[],
            ),
            (
                "tidegate_controller_etcd_member_backend_commit_seconds_count",
                &[],
            ),
            ("tidegate_controller_etcd_member_db_size_bytes", &[]),
            ("tidegate_controller_etcd_member_db_quota_bytes", &[]),
        ],
    );
    // The spawns were 2 (web, echo); the refusals 2; exactly as made.
    assert_eq!(
        total(&text, "tidegate_controller_spawns_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        total(
            &text,
            "tidegate_controller_refusals_total",
            &["op=\"spawn\""]
        ),
        Some(2.0),
        "{text}"
    );

    // Agent a took the player's request and TCP connection.
    let a = curl_with(&p.a.metrics_url, p.a.scrape_token());
    let web_label = format!("instance=\"{web}\"");
    assert_non_zero(
        "agent a",
        &a,
        &[
            ("tidegate_agent_etcd_rtt_seconds_count", &[]),
            ("tidegate_agent_etcd_revision", &[]),
            ("tidegate_agent_routes", &[]),
            ("tidegate_agent_tcp_routes", &[]),
            ("tidegate_http_requests_total", &[&web_label]),
            ("tidegate_http_request_seconds_count", &[&web_label]),
            ("tidegate_tcp_connections_total", &[]),
            ("tidegate_tcp_received_bytes_total", &[]),
            ("tidegate_policy_calls_total", &[]),
            (
                "tidegate_policy_edge_decisions_total",
                &["decision=\"allow\""],
            ),
        ],
    );
    // The owner of the web instance runs its container and saw its own
    // endpoint write come back through its watch.
    let b = curl_with(&p.b.metrics_url, p.b.scrape_token());
    let owner_metrics = if owner == p.a.worker { a } else { b.clone() };
    // Every series the Grafana dashboard charts and the alert rules read
    // is one the daemons expose.
    let exposed = format!("{text}\n{owner_metrics}\n{b}");
    for (file, text, at_least) in [
        (
            "deploy/grafana/tidegate.json",
            include_str!("../../deploy/grafana/tidegate.json"),
            20,
        ),
        (
            "deploy/prometheus/tidegate-alerts.yml",
            include_str!("../../deploy/prometheus/tidegate-alerts.yml"),
            12,
        ),
    ] {
        let mut charted: Vec<&str> = text
            .match_indices("tidegate_")
            .map(|(i, _)| {
                let rest = &text[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        charted.sort_unstable();
        charted.dedup();
        let unknown: Vec<&&str> = charted
            .iter()
            .filter(|m| !exposed.lines().any(|l| l.starts_with(**m)))
            .collect();
        assert!(
            charted.len() > at_least && unknown.is_empty(),
            "{file} reads series no daemon exposes: {unknown:?} (of {})",
            charted.len()
        );
    }
    assert_non_zero(
        "owner",
        &owner_metrics,
        &[
            ("tidegate_agent_containers", &["state=\"running\""]),
            ("tidegate_agent_etcd_watch_lag_seconds_count", &[]),
            ("tidegate_agent_reconcile_seconds_count", &[]),
            ("tidegate_agent_etcd_write_seconds_count", &[]),
        ],
    );
}

/// `promtool` (put by `cargo xtask setup`) on the alert rules: they load,
/// and their unit tests (deploy/prometheus/tidegate-alerts.test.yml) show
/// each alert firing on its fault and quiet on a healthy cluster. That the
/// series they read exist is checked against live daemons above.
#[test]
fn the_alert_rules_load_and_fire_on_their_faults() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus");
    for args in [
        ["check", "rules", "tidegate-alerts.yml"],
        ["test", "rules", "tidegate-alerts.test.yml"],
    ] {
        let out = std::process::Command::new("/usr/local/bin/promtool")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("promtool (cargo xtask setup puts it in /usr/local/bin)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Per-instance series and `/activity` name instances (an id is the first
/// label of its hostnames): only the scrape token gets them.
#[tokio::test]
async fn instance_names_are_served_only_to_the_scrape_token() {
    let p = plane(|_| {}).await;
    challenges(&p).await;
    let (id, host, owner) = p.running("web", "red").await;
    let owner = if owner == p.a.worker { &p.a } else { &p.b };
    let served = eventually(10, || async { get(&p.a_http, &host, None).await.0 == 200 }).await;
    assert!(served, "agent a does not serve {host}");
    let token = owner
        .scrape_token()
        .expect("the lab gives agents a scrape token");
    let base = owner.metrics_url.trim_end_matches("/metrics");
    let label = format!("instance=\"{id}\"");
    let named = eventually(10, || async {
        curl_with(&owner.metrics_url, Some(token.clone())).contains(&label)
    })
    .await;
    assert!(named, "the token gets no per-instance series of {id}");
    for who in [None, Some("not-the-token".to_string())] {
        let public = curl_with(&owner.metrics_url, who.clone());
        assert!(
            !public.contains(&id) && public.contains("tidegate_agent_routes"),
            "{who:?} sees instance {id} (or no agent series):\n{public}"
        );
        let activity = reqwest::Client::new().get(format!("{base}/activity"));
        let activity = match &who {
            Some(t) => activity.bearer_auth(t),
            None => activity,
        };
        let r = activity.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{who:?}");
        assert!(!r.text().await.unwrap().contains(&id));
    }
    let r = reqwest::Client::new()
        .get(format!("{base}/activity"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains(&id));
}

/// `promtool check metrics` (Prometheus's own parser and linter of the
/// text format, put by `cargo xtask setup`) on `text`: its complaints.
fn promtool(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("/usr/local/bin/promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask setup puts it in /usr/local/bin)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Both daemons' `/metrics`, with every kind of series present (refusals,
/// plugin calls, per-instance HTTP and TCP traffic, edge decisions), are
/// valid Prometheus text: every sample under the HELP and TYPE of its
/// family, counters ending in `_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_daemons_metrics_pass_prometheus_own_checker() {
    assert!(
        promtool("tidegate_x_total{instance=\"a\"} 1\n").is_err(),
        "promtool accepts a sample without HELP and TYPE: it would catch nothing"
    );
    // Metrics, not deadlines: a loaded run must not make the policy fall back.
    let p = plane(|c| c.plugin_deadline_ms = 50).await;
    let c = &p.controller;
    challenges(&p).await;
    let (s, body) = c.spawn("web", "mallory").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (_, host, _) = p.running("web", "red").await;
    let (s, _, body) = get(&p.a_http, &host, None).await;
    assert_eq!(s, 200, "{body}");
    let (s, echo) = c.spawn("echo", "red").await;
    assert_eq!(s, StatusCode::CREATED, "{echo}");
    let port = echo["tcp"][0]["port"].as_u64().unwrap() as u16;
    assert!(eventually(30, || echo_line(&p.a_host, port)).await);
    for (what, url, token) in [
        ("controller", format!("{}/metrics", c.url), None),
        ("agent a", p.a.metrics_url.clone(), p.a.scrape_token()),
        ("agent b", p.b.metrics_url.clone(), p.b.scrape_token()),
    ] {
        let text = curl_with(&url, token);
        if let Err(complaints) = promtool(&text) {
            panic!("{what}: promtool check metrics: {complaints}\n--- /metrics ---\n{text}");
        }
    }
}

/// Runs headless Chromium (Debian's package, as root: no sandbox) with a
/// throwaway profile; returns its stdout.
fn chromium(args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            // Let the page's fetch finish and render before the DOM is taken.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .expect("running chromium (installed by cargo xtask setup)");
    assert!(
        out.status.success(),
        "chromium {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_live_instance_in_headless_chromium() {
    let p = plane(|_| {}).await;
    let c = &p.controller;
    challenges(&p).await;
    let (s, body) = c.spawn("web", "mallory").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (id, _, worker) = p.running("web", "red").await;
    let page = format!("{}/dashboard", c.url);
    let with_token = format!("{page}#token={ADMIN}");

    let dom = chromium(&["--dump-dom", &with_token]);
    let td = |label: &str, text: &str| format!("<td data-label=\"{label}\">{text}</td>");
    let td_class = |label: &str, class: &str, text: &str| {
        format!("<td class=\"{class}\" data-label=\"{label}\">{text}</td>")
    };
    for (what, needle) in [
        (
            "the live instance",
            [
                td("instance", &id),
                td("team", "red"),
                td("challenge", "web"),
                td("worker", &worker),
                td_class("status", "running", "running"),
            ]
            .concat(),
        ),
        (
            "both workers",
            [
                td("worker", &p.a.worker),
                td_class("state", "registered", "registered"),
            ]
            .concat(),
        ),
        (
            "both workers",
            [
                td("worker", &p.b.worker),
                td_class("state", "registered", "registered"),
            ]
            .concat(),
        ),
        (
            "the refusal",
            [
                td("op", "spawn"),
                td("team", "mallory"),
                td("challenge", "web"),
                td_class("reason", "error", "policy_deny"),
            ]
            .concat(),
        ),
        (
            "the policies",
            [
                td("hooks", "admit-spawn, admit-connection"),
                td("fallback", "deny"),
            ]
            .concat(),
        ),
        (
            "the instances per challenge",
            [
                td("challenge", "web"),
                td("live", "1"),
                td_class("running", "running", "1"),
            ]
            .concat(),
        ),
        (
            "this minute's spawn and refusal in the chart",
            "1 spawn, 1 refusal,".to_string(),
        ),
        ("the chart's bars", "<rect ".to_string()),
    ] {
        assert!(
            dom.contains(&needle),
            "the dashboard does not show {what} ({needle}):\n{dom}"
        );
    }

    // The team filter: another team's name hides red's instance and
    // mallory's refusal; mallory's shows only the refusal.
    let dom = chromium(&["--dump-dom", &format!("{with_token}&team=blue")]);
    assert!(!dom.contains(&td("instance", &id)), "{dom}");
    assert!(!dom.contains(&td("team", "mallory")), "{dom}");
    assert!(
        dom.contains("no live instance of a team matching the filter"),
        "{dom}"
    );
    let dom = chromium(&["--dump-dom", &format!("{with_token}&team=mall")]);
    assert!(!dom.contains(&td("instance", &id)), "{dom}");
    assert!(dom.contains(&td("team", "mallory")), "{dom}");

    // Without a token it asks for one and shows nothing; a wrong one is refused.
    let dom = chromium(&["--dump-dom", &page]);
    assert!(!dom.contains(&id), "{dom}");
    assert!(
        dom.contains(r#"<form id="login">"#),
        "no login form shown:\n{dom}"
    );
    let dom = chromium(&["--dump-dom", &format!("{page}#token=not-the-admin-token")]);
    assert!(!dom.contains(&id), "{dom}");
    assert!(dom.contains("unknown token"), "{dom}");
    // The platform token is not enough: the dashboard is for organizers.
    let dom = chromium(&[
        "--dump-dom",
        &format!("{page}#token={}", tidegate_lab::daemons::PLATFORM),
    ]);
    assert!(!dom.contains(&id), "{dom}");
    assert!(dom.contains("this needs the admin token"), "{dom}");

    // A phone-sized screenshot, kept as the test's artifact.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let shot = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=412,1400",
        &with_token,
    ]);
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG: {}", shot.display());
    eprintln!(
        "dashboard screenshot: {} ({} bytes)",
        shot.display(),
        png.len()
    );
}

/// Whether Docker runs a container of instance `id`.
fn container_exists(id: &str) -> bool {
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=tidegate.instance={id}"),
        ])
        .output()
        .expect("running docker");
    !String::from_utf8_lossy(&out.stdout).trim().is_empty()
}

/// The answer to `GET /` of `host` through both agents.
async fn through_both(p: &Plane, host: &str) -> (u16, u16) {
    (
        get(&p.a_http, host, None).await.0,
        get(&p.b_http, host, None).await.0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_snapshot_restore_brings_instances_and_routes_back() {
    let mut p = plane(|_| {}).await;
    let c = &p.controller;
    let (s, body) = c.put_challenge("web", web_spec()).await;
    assert!(s.is_success(), "{body}");
    let (kept, kept_host, _) = p.running("web", "red").await;
    assert_eq!(through_both(&p, &kept_host).await, (200, 200));

    // Backup, as deploy/README.md says: etcdctl snapshot save.
    let snapshot = p._dir.path().join("backup.db");
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", p._etcd.endpoints().join(",")))
        .args(["snapshot", "save"])
        .arg(&snapshot)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An instance spawned after the backup: the restore loses it.
    let (lost, lost_host, _) = p.running("web", "blue").await;
    assert_eq!(through_both(&p, &lost_host).await, (200, 200));

    // Disaster: every member's data is wiped; restore per the guide.
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/etcd/restore-member.sh");
    p._etcd.restore_from(&snapshot, &script).unwrap();

    // The backed-up instance is served again through both agents and the
    // API knows it; the later one is gone everywhere, container included.
    let c = &p.controller;
    let settled = eventually(30, || async {
        through_both(&p, &kept_host).await == (200, 200)
            && through_both(&p, &lost_host).await == (404, 404)
            && !container_exists(&lost)
    })
    .await;
    assert!(
        settled,
        "after the restore: kept {kept} answers {:?}, lost {lost} answers {:?} (container there: {})\n--- agent a ---\n{}",
        through_both(&p, &kept_host).await,
        through_both(&p, &lost_host).await,
        container_exists(&lost),
        p.a.log()
    );
    let (s, body) = c
        .call(Method::GET, &format!("/v1/instances/{kept}"), None, None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "running", "{body}");
    let (s, body) = c
        .call(Method::GET, &format!("/v1/instances/{lost}"), None, None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert!(container_exists(&kept));

    // The cluster works on: a new spawn runs and is routed.
    let (_, new_host, _) = p.running("web", "green").await;
    assert!(
        eventually(10, || async {
            through_both(&p, &new_host).await == (200, 200)
        })
        .await
    );
}

#[test]
fn total_sums_matching_samples_only() {
    let text = "# HELP x y\nx{a=\"1\",b=\"2\"} 3\nx{a=\"1\"} 4\nxy 9\nx 1\n";
    assert_eq!(total(text, "x", &["a=\"1\""]), Some(7.0));
    assert_eq!(total(text, "x", &[]), Some(8.0));
    assert_eq!(total(text, "x", &["b=\"2\""]), Some(3.0));
    assert_eq!(total(text, "z", &[]), None);
}

/// The samples of histogram `name` (with `labels`) above `le`: its count
/// less its `le` bucket.
fn above(text: &str, name: &str, labels: &[&str], le: &str) -> f64 {
    let le_label = format!("le=\"{le}\"");
    let mut with_le: Vec<&str> = labels.to_vec();
    with_le.push(&le_label);
    total(text, &format!("{name}_count"), labels).unwrap_or(0.0)
        - total(text, &format!("{name}_bucket"), &with_le).unwrap_or(0.0)
}

/// A slow disk on the etcd member (its fdatasync delayed 300 ms by
/// `strace -e inject`, as the chaos slow-disk fault does) shows in the
/// series the controller exports from the member's own metrics, the one
/// `TidegateEtcdSlowFsync` reads; before it, no fsync took over 128 ms
/// (etcd's buckets double from 1 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_etcd_disk_shows_in_the_controllers_etcd_series() {
    let etcd = tidegate_lab::etcd::EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let c = tidegate_lab::daemons::Controller::start(&etcd, "c1", dir.path()).await;
    let member = etcd.endpoints()[0]
        .trim_start_matches("http://")
        .to_string();
    let labels = [format!("member=\"{member}\"")];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let fsync = "tidegate_controller_etcd_member_wal_fsync_seconds";
    let url = format!("{}/metrics", c.url);
    assert!(
        eventually(30, || async {
            total(&curl(&url), "tidegate_controller_etcd_member_up", &labels) == Some(1.0)
        })
        .await,
        "the controller never read the member's metrics:\n{}",
        curl(&url)
    );
    let before = curl(&url);
    assert_eq!(above(&before, fsync, &labels, "0.128"), 0.0, "{before}");

    let pid = etcd.process(0).unwrap().pid();
    let _slow =
        tidegate_lab::faults::slow_disk(pid, 300_000, &dir.path().join("strace.log")).unwrap();
    // strace attaches in a moment; writes keep coming until the member's
    // next read shows them.
    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let mut slow = 0.0;
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    for i in 0.. {
        client
            .put(format!("/slow-disk-test/{i}"), "x", None)
            .await
            .unwrap();
        slow = above(&curl(&url), fsync, &labels, "0.128");
        if slow >= 3.0 || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        slow >= 3.0,
        "300 ms fsyncs did not show above 128 ms in {fsync}: {slow}\n{}",
        std::fs::read_to_string(dir.path().join("strace.log")).unwrap_or_default()
    );
}
