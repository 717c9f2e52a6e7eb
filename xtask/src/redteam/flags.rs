//! After a run: the flags the range minted must appear in nothing a
//! player, another team or another worker can read. The flags are read
//! from the instances' secret records (etcd's admin view); then every
//! key another worker's etcd role may read, every daemon's log
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
    let mut flags = minted(r)?;
    if flags.is_empty() {
        bail!("the range's secret records hold no flag: the sweep would find nothing");
    }
    flags.push(r.secret_env_value.clone());
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
    // Everything worker b's etcd user reads (its grants), but its own
    // secrets: the flag of team locked's instance, which it runs.
    let ks = tidegate_schema::Keyspace::default();
    let b = tidegate_schema::WorkerId::parse(&r.b_cfg.worker_id).map_err(anyhow::Error::msg)?;
    let user = tidegate_local::etcd::worker_user(&r.b_cfg.worker_id);
    for grant in ks.worker_grants(&b) {
        if grant
            .key
            .starts_with(&ks.prefix(tidegate_schema::Kind::Secrets))
        {
            continue;
        }
        let what = format!("etcd {} (read as worker b)", grant.key);
        outputs.push((what, values(r, &user, &grant.key)?));
    }
    let found: Vec<String> = outputs
        .iter()
        .filter(|(_, text)| flags.iter().any(|f| text.contains(f.as_str())))
        .map(|(what, _)| what.clone())
        .collect();
    println!(
        "flags: {} minted and a secret env value; searched {} outputs (logs, configs, API answers, metrics, activity, etcd as worker b, this report); found in {}",
        flags.len() - 1,
        outputs.len(),
        found.len()
    );
    if !found.is_empty() {
        bail!("a minted flag appears in: {}", found.join(", "));
    }
    Ok(())
}

/// The values under `prefix`, one per line, read as etcd user `user`.
fn values(r: &Range, user: &str, prefix: &str) -> Result<String> {
    r.etcdctl_ok(user, &["get", "--prefix", prefix, "--print-value-only"])
}

/// The flags of the range's instances, from their secret records.
fn minted(r: &Range) -> Result<Vec<String>> {
    Ok(values(r, "root", "/tidegate/secrets/")?
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
