//! Attacks with worker b's stolen etcd credential (its user and password,
//! as its config names them): read another worker's secrets, write what
//! only the scheduler or another worker writes. Each write puts back the
//! value that is there (keeping its lease), so a control run that lets it
//! through changes nothing; the lease revoke runs last.

use anyhow::{Context, Result};
use serde_json::Value;
use tidegate_local::etcd::worker_user;

use super::range::Range;
use super::{Attack, From, Verdict};

pub(super) fn attacks() -> Vec<Attack> {
    let attack = |name: &str, run: fn(&Range) -> Result<Verdict>| {
        Attack::new(
            format!("{name} (worker b's etcd user)"),
            From::Worker,
            "etcd-roles",
            run,
        )
    };
    vec![
        attack("read worker a's secret: mallory's flag", read_secret),
        attack("write an instance record for worker b", write_instance),
        attack("put worker a's membership", |r| {
            put_back(r, "/tidegate/workers/worker-a")
        }),
        attack("put the status of worker a's instance", |r| {
            put_back(r, &format!("/tidegate/status/worker-a/{}", r.mallory.id))
        }),
        attack("put a challenge's spec", |r| {
            put_back(r, "/tidegate/challenges/rt-web")
        }),
        attack("revoke the lease of alice's instance", revoke),
    ]
}

/// etcdctl as worker b's user: (succeeded, what it said).
fn as_b(r: &Range, args: &[&str]) -> Result<(bool, String)> {
    let (ok, out, err) = r.etcdctl(&worker_user(&r.b_cfg.worker_id), args)?;
    // etcdctl's last line is its answer (the lines before are its client's
    // retry warnings).
    let last = err.lines().last().unwrap_or_default().to_string();
    Ok((ok, if ok { out } else { last }))
}

/// etcdctl as the admin; its stdout, or an error naming what failed.
fn as_root(r: &Range, args: &[&str]) -> Result<String> {
    r.etcdctl_ok("root", args)
}

fn verdict(ok: bool, said: String, got: impl FnOnce(&str) -> String) -> Verdict {
    if ok {
        Verdict::Succeeded(got(&said))
    } else {
        Verdict::Blocked(said)
    }
}

fn read_secret(r: &Range) -> Result<Verdict> {
    let key = format!("/tidegate/secrets/worker-a/{}", r.mallory.id);
    let (ok, said) = as_b(r, &["get", &key, "--print-value-only"])?;
    // Never the flag itself in the report: the flag sweep reads it.
    let ok = ok && said.contains("\"flag\"");
    Ok(verdict(ok, said, |s| {
        format!("{key}: {} bytes with the flag", s.len())
    }))
}

fn write_instance(r: &Range) -> Result<Verdict> {
    let rec = as_root(
        r,
        &[
            "get",
            &format!("/tidegate/instances/{}", r.mallory.id),
            "--print-value-only",
        ],
    )?;
    let mut rec: Value = serde_json::from_str(&rec).context("mallory's record")?;
    let id = "00000b0b0b";
    rec["id"] = id.into();
    rec["worker"] = r.b_cfg.worker_id.clone().into();
    rec["http"] = serde_json::json!([]);
    rec["tcp"][0]["port"] = 29991.into();
    let key = format!("/tidegate/instances/{id}");
    let (ok, said) = as_b(r, &["put", &key, &rec.to_string()])?;
    if ok {
        as_root(r, &["del", &key])?;
    }
    Ok(verdict(ok, said, |_| format!("{key} written")))
}

/// Puts the value that is at `key` back, keeping its lease.
fn put_back(r: &Range, key: &str) -> Result<Verdict> {
    let value = as_root(r, &["get", key, "--print-value-only"])?;
    if value.is_empty() {
        anyhow::bail!("{key} is not there to overwrite");
    }
    let (ok, said) = as_b(r, &["put", "--ignore-lease", key, &value])?;
    Ok(verdict(ok, said, |_| format!("{key} written")))
}

fn revoke(r: &Range) -> Result<Verdict> {
    let key = format!("/tidegate/instances/{}", r.alice.id);
    let got = as_root(r, &["get", &key, "-w", "json"])?;
    let lease = serde_json::from_str::<Value>(&got)?["kvs"][0]["lease"]
        .as_i64()
        .with_context(|| format!("no lease on {key}: {got}"))?;
    let (ok, said) = as_b(r, &["lease", "revoke", &format!("{lease:x}")])?;
    Ok(verdict(ok, said, |_| {
        format!("lease {lease:x} revoked: alice's instance is gone")
    }))
}
