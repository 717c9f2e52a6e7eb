//! After a run: the flags the range minted must appear in nothing a
//! player, another team or another worker can read. The flags are read
//! from the instance records (etcd's admin view); then every daemon's log
//! and file in the range's directory, every API answer about instances and
//! challenges (with the platform's token), both agents' `/metrics` (with
//! and without the scrape token) and `/activity`, and the report's own
//! lines are searched for each.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::range::{Range, call};
use crate::sh;

/// Searches every output for every minted flag; an error names where one
/// was found.
pub(super) fn sweep(r: &Range, report: &str) -> Result<()> {
    let flags = minted(r)?;
    if flags.is_empty() {
        bail!("the range's instance records hold no flag: the sweep would find nothing");
    }
    let mut outputs: Vec<(String, String)> = vec![("this report".into(), report.to_string())];
    files(r.dir(), &mut outputs);
    for path in ["/v1/instances", "/v1/challenges"] {
        let (_, body) = call(&r.plane, "GET", path, &Value::Null)?;
        outputs.push((format!("GET {path}"), body.to_string()));
    }
    for inst in [
        &r.mallory,
        &r.mallory_egress,
        &r.mallory_raw,
        &r.alice,
        &r.locked,
    ] {
        let path = format!("/v1/instances/{}", inst.id);
        let (_, body) = call(&r.plane, "GET", &path, &Value::Null)?;
        outputs.push((format!("GET {path}"), body.to_string()));
    }
    let token =
        std::fs::read_to_string(r.dir().join("scrape-token")).context("the scrape token")?;
    for (agent, listen) in [("a", r.a_cfg.metrics_listen), ("b", r.b_cfg.metrics_listen)] {
        for (path, auth) in [("/metrics", false), ("/metrics", true), ("/activity", true)] {
            let header = r.dir().join("scrape-header");
            tidegate_local::daemons::write_private(
                &header,
                format!("Authorization: Bearer {}\n", token.trim()).as_bytes(),
            )?;
            let mut curl = Command::new("curl");
            curl.args(["-s", "--max-time", "5"]);
            if auth {
                curl.arg("-H").arg(format!("@{}", header.display()));
            }
            let body = sh::output(curl.arg(format!("http://{listen}{path}"))).unwrap_or_default();
            let what = if auth { " (scrape token)" } else { "" };
            outputs.push((format!("agent {agent} {path}{what}"), body));
        }
    }
    let found: Vec<String> = outputs
        .iter()
        .filter(|(_, text)| flags.iter().any(|f| text.contains(f.as_str())))
        .map(|(what, _)| what.clone())
        .collect();
    println!(
        "flags: {} minted; searched {} outputs (logs, configs, API answers, metrics, activity, this report); found in {}",
        flags.len(),
        outputs.len(),
        found.len()
    );
    if !found.is_empty() {
        bail!("a minted flag appears in: {}", found.join(", "));
    }
    Ok(())
}

/// The flags of the range's instances, from their records.
fn minted(r: &Range) -> Result<Vec<String>> {
    let values = sh::output(
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &r.endpoints().join(",")])
            .args([
                "get",
                "--prefix",
                "/tidegate/instances/",
                "--print-value-only",
            ]),
    )
    .context("etcdctl get the instance records")?;
    Ok(values
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["flag"].as_str().map(String::from))
        .filter(|f| f.len() >= 8)
        .collect())
}

/// Every regular file under `dir` (logs, configs), by path.
fn files(dir: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((
                path.display().to_string(),
                String::from_utf8_lossy(&bytes).into(),
            ));
        }
    }
}
