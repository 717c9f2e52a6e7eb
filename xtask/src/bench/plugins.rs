//! `plugins`: the cost of a policy call (fresh instance from the
//! pre-instantiated component, the call, the drop) and spawn decisions per
//! second through a controller with and without a policy.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::{ADMIN_TOKEN, ControlPlane, Figures, Mode, api, median};
use crate::{sh, workspace_root};

/// One `plugin-bench calls` figure set: p50 and p99 (µs), calls/s, compile
/// (ms), and the calls the host stopped at their deadline (all rounds).
type Calls = (f64, f64, f64, f64, f64);

pub(super) fn run(mode: Mode) -> Result<Figures> {
    println!("building the controller, plugin-bench and the plugins");
    let bin_dir = mode.build(
        &["tidegate-controller", "tidegate-tests"],
        &["tidegate-controller", "plugin-bench"],
    )?;
    let root = workspace_root();
    let built = tidegate_local::plugins::build(
        &root.join("plugins"),
        &crate::target_dir().join("plugins"),
        &[],
    )
    .map_err(anyhow::Error::msg)?;
    let path = |name: &str| {
        built
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.component.clone())
            .with_context(|| format!("plugin {name} was not built"))
    };
    let bench = bin_dir.join("plugin-bench");
    let spawn = plugin_calls(mode, &bench, &path("team-limit")?, "admit-spawn")?;
    let connection = plugin_calls(mode, &bench, &path("allowlist")?, "admit-connection")?;
    println!(
        "admit-spawn p50 {:.1} µs p99 {:.1} µs; admit-connection p50 {:.1} µs p99 {:.1} µs; \
         stopped at the deadline: {} and {}",
        spawn.0, spawn.1, connection.0, connection.1, spawn.4, connection.4
    );

    // Spawn decisions through the API: etcd, one controller, no agents.
    // Without a policy a spawn reaches placement and is answered 503 (no
    // worker); with `allowlist` it is decided (403) by the plugin before
    // placement. Same etcd read of the challenge in both.
    let plane = ControlPlane::start(&bin_dir, 1)?;
    let (dir, url) = (plane.dir(), plane.url.as_str());
    let http = |method: &str, path: &str, body: Vec<u8>| api(dir, url, method, path, body);
    let spec = r#"{"image":"tidegate/demo-http:2","ports":[{"name":"web","port":8080,"protocol":"http"}]}"#;
    let out = http("PUT", "/v1/challenges/web", spec.as_bytes().to_vec())?;
    if !out.ends_with(" 201") {
        bail!("creating the challenge: {out}");
    }
    let without = spawn_rate(mode, &bench, url, "503")?;
    let out = http(
        "PUT",
        "/v1/challenges/web/policy",
        std::fs::read(path("allowlist")?)?,
    )?;
    if !out.ends_with(" 200") {
        bail!("uploading allowlist: {out}");
    }
    let with = spawn_rate(mode, &bench, url, "403")?;
    println!("spawn answers/s: {without:.0} without a policy, {with:.0} decided by allowlist");
    Ok(figures(mode, spawn, connection, without, with))
}

/// Median of the rounds of `plugin-bench calls` for one plugin and hook.
fn plugin_calls(mode: Mode, bench: &Path, component: &Path, hook: &str) -> Result<Calls> {
    let (mut p50, mut p99, mut rate, mut compile) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut stopped = 0.0;
    let calls = mode.count(20_000, 2_000).to_string();
    for _ in 0..mode.rounds() {
        let out = sh::output(Command::new(bench).args([
            "calls",
            &component.display().to_string(),
            hook,
            &calls,
        ]))
        .with_context(|| format!("plugin-bench calls {} {hook} failed", component.display()))?;
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("plugin-bench said {out:?}"))?;
        let f = |k: &str| v[k].as_f64().context("plugin-bench output");
        p50.push(f("p50_us")?);
        p99.push(f("p99_us")?);
        rate.push(f("calls_per_sec")?);
        compile.push(f("compile_ms")?);
        stopped += f("stopped")?;
    }
    Ok((
        median(p50),
        median(p99),
        median(rate),
        median(compile),
        stopped,
    ))
}

/// Spawn answers per second from `plugin-bench api` (16 clients).
fn spawn_rate(mode: Mode, bench: &Path, url: &str, status: &str) -> Result<f64> {
    let secs = mode.secs(3).to_string();
    let out = sh::output(Command::new(bench).args(["api", url, ADMIN_TOKEN, "16", &secs]))
        .context("plugin-bench api failed")?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("plugin-bench said {out:?}"))?;
    let per_sec = v["per_sec"].as_object().context("plugin-bench output")?;
    if per_sec.keys().any(|k| k != status) {
        bail!("spawns answered other than {status}: {v}");
    }
    per_sec
        .get(status)
        .and_then(|r| r.as_f64())
        .context("no answers at all")
}

/// The figures, and the report section.
fn figures(mode: Mode, spawn: Calls, connection: Calls, without: f64, with: f64) -> Figures {
    let (s50, s99, srate, scompile, sstopped) = spawn;
    let (c50, c99, crate_, ccompile, cstopped) = connection;
    let verdict = if s99 <= 50.0 && c99 <= 50.0 {
        "met"
    } else {
        "NOT met"
    };
    let (rounds, calls, secs) = (mode.rounds(), mode.count(20_000, 2_000), mode.secs(3));
    let section = format!(
        "## Policy plugins (issue #7)\n\n\
         `cargo xtask bench plugins`. One policy call = what the controller and the agents do per decision: a \
         fresh instance from the cached, pre-instantiated component (pooling allocator), the hook call with its \
         CPU-time deadline and memory cap armed, and the store dropped. {calls} calls one after another after 1,000 \
         warm-up calls, median of {rounds} runs; release build, examples built by `cargo xtask build-plugins`.\n\n\
         | call | p50 | p99 | calls/s (1 thread) | compile once |\n|---|---|---|---|---|\n\
         | `team-limit` admit-spawn | {s50:.1} µs | {s99:.1} µs | {srate:.0} | {scompile:.0} ms |\n\
         | `allowlist` admit-connection | {c50:.1} µs | {c99:.1} µs | {crate_:.0} | {ccompile:.0} ms |\n\n\
         Calls the host stopped at their 5 ms deadline (a preempted call on a busy machine; the agent and the \
         controller fall back for those): {sstopped:.0} admit-spawn, {cstopped:.0} admit-connection. Target \
         instantiate + call + drop p99 ≤ 50 µs: **{verdict}**.\n\n\
         Spawn decisions through the API (release controller, 1-member etcd, 16 clients for {secs} s, each spawn a new \
         team): with `allowlist` denying, **{with:.0} decisions/s**; the same requests with no policy, which read \
         the same challenge and then fail placement (no worker, 503): {without:.0}/s. The plugin's share of a \
         decision is the call above; the rest is HTTP, the etcd read of the challenge and the per-leader spawn lock.\n"
    );
    Figures {
        values: vec![
            ("admit-spawn p99 µs".into(), s99),
            ("admit-connection p99 µs".into(), c99),
            ("admit-spawn calls/s".into(), srate),
            ("spawn decisions/s without a policy".into(), without),
            ("spawn decisions/s with allowlist".into(), with),
        ],
        report: Some(("Policy plugins".into(), section)),
    }
}
