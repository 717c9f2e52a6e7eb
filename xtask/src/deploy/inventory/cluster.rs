//! What a run does to the running cluster: etcd auth (a user and role per
//! daemon, each worker its own), and the demo challenges with their images.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use tidegate_local::etcd::{CONTROLLER_USER, worker_user};
use tidegate_schema::{Grant, Keyspace, WorkerId};

use super::secrets::Secrets;
use super::ssh::Remote;
use super::{Host, Inventory, Role, at, etcd_urls, q};
use crate::sh::http;

/// `etcdctl` with the root client certificate against every member.
pub(super) fn etcdctl_prefix(inv: &Inventory, root: &Path) -> String {
    format!(
        "ETCDCTL_API=3 etcdctl --endpoints={} --cacert={} --cert={} --key={} --command-timeout=5s",
        etcd_urls(inv, inv.ports.etcd_client).join(","),
        q(&at(root, "/etc/tidegate/pki/ca.pem")),
        q(&at(root, "/etc/tidegate/pki/etcd-root.pem")),
        q(&at(root, "/etc/tidegate/pki/etcd-root-key.pem")),
    )
}

/// The etcd users of `inv`'s daemons, with their passwords and grants:
/// root, the controllers' (readwrite on the key root), and one per agent
/// host, granted exactly [`Keyspace::worker_grants`].
fn users(inv: &Inventory, s: &Secrets) -> Result<Vec<(String, String, Vec<Grant>)>> {
    let ks = Keyspace::default();
    let mut users = vec![
        ("root".to_string(), s.etcd_root_password.clone(), Vec::new()),
        (
            CONTROLLER_USER.to_string(),
            s.etcd_controller_password.clone(),
            vec![Grant {
                key: ks.root_prefix(),
                prefix: true,
                write: true,
            }],
        ),
    ];
    for h in inv.with_role(Role::Agent) {
        let id = WorkerId::parse(&h.name).map_err(anyhow::Error::msg)?;
        users.push((
            worker_user(&h.name),
            s.worker_password(&h.name),
            ks.worker_grants(&id),
        ));
    }
    Ok(users)
}

/// Turns on etcd auth with a user and role per daemon: root, the
/// controllers', and each worker's own. Runs its script when a user is
/// missing (a new cluster, a new agent host, an upgrade from the shared
/// agent user) or auth was never enabled; every step is idempotent.
/// Whether it changed anything.
pub(super) fn etcd_auth(
    inv: &Inventory,
    host: &Host,
    etcdctl: &str,
    s: &Secrets,
    state: &Path,
) -> Result<bool> {
    let r = Remote { inv, host };
    let marker = state.join("etcd-auth-enabled");
    // With client-cert-auth the root certificate's CN authenticates as root
    // once auth is on (and anyone may list users while it is off).
    let listed = r.run(&format!("{etcdctl} user list"), None)?;
    let has = |u: &str| listed.lines().any(|l| l.trim() == u);
    let users = users(inv, s)?;
    let missing: Vec<&str> = users
        .iter()
        .map(|(u, _, _)| u.as_str())
        .filter(|u| !has(u))
        .collect();
    if marker.exists() && missing.is_empty() {
        return Ok(false);
    }
    let mut script = String::from("set -e\n");
    for (user, password, _) in &users {
        if !has(user) {
            // printf is the shell's own: the password is in no argv (the
            // script itself reaches the host on stdin).
            let _ = writeln!(
                script,
                "printf '%s\\n' {} | {etcdctl} user add {user} --interactive=false >/dev/null",
                q(password)
            );
        }
    }
    for (user, _, grants) in &users {
        let _ = writeln!(script, "{etcdctl} role add {user} >/dev/null 2>&1 || true");
        for grant in grants {
            let _ = writeln!(
                script,
                "{etcdctl} role grant-permission {user} {} >/dev/null",
                grant.etcdctl_args().join(" ")
            );
        }
        let _ = writeln!(
            script,
            "{etcdctl} user grant-role {user} {user} >/dev/null 2>&1 || true"
        );
    }
    // Ignored by etcd when auth is on already.
    let _ = writeln!(script, "{etcdctl} auth enable >/dev/null");
    r.run("sh -s", Some(script.as_bytes()))?;
    std::fs::write(&marker, "etcd auth was enabled by cargo xtask deploy\n")?;
    println!("etcd: auth on; users added: {}", missing.join(", "));
    Ok(true)
}

/// Deletes the etcd users (and their roles) no daemon of the inventory
/// runs as: the agents' shared `tidegate-agent` of earlier releases, and
/// workers no longer in the inventory. Run once every agent runs as its
/// own user. Whether it deleted any.
pub(super) fn etcd_prune_users(
    inv: &Inventory,
    host: &Host,
    etcdctl: &str,
    s: &Secrets,
) -> Result<bool> {
    let r = Remote { inv, host };
    let listed = r.run(&format!("{etcdctl} user list"), None)?;
    let wanted: Vec<String> = users(inv, s)?.into_iter().map(|(u, _, _)| u).collect();
    let stale: Vec<&str> = listed
        .lines()
        .map(str::trim)
        .filter(|u| {
            *u == "tidegate-agent"
                || (u.starts_with(&worker_user("")) && !wanted.iter().any(|w| w == u))
        })
        .collect();
    if stale.is_empty() {
        return Ok(false);
    }
    let mut script = String::from("set -e\n");
    for user in &stale {
        let _ = writeln!(
            script,
            "{etcdctl} user delete {user} >/dev/null\n{etcdctl} role delete {user} >/dev/null 2>&1 || true"
        );
    }
    r.run("sh -s", Some(script.as_bytes()))?;
    println!(
        "etcd: deleted users no daemon runs as: {}",
        stale.join(", ")
    );
    Ok(true)
}

/// Registers the demo challenges that are missing or differ, and copies
/// their images to agents that lack them. How many changes it made.
pub(super) fn demo(inv: &Inventory, api: &str, s: &Secrets) -> Result<usize> {
    let mut changes = 0;
    for h in inv.with_role(Role::Agent) {
        let r = Remote { inv, host: h };
        for image in [
            "tidegate/demo-http:2",
            "tidegate/demo-tcp:1",
            tidegate_local::images::DEMO_WEB_BOT,
        ] {
            if r.run(
                &format!("docker image inspect {image} >/dev/null 2>&1"),
                None,
            )
            .is_ok()
            {
                continue;
            }
            let saved = Command::new("docker")
                .args(["save", image])
                .output()
                .context("docker save (run cargo xtask setup for the demo images)")?;
            if !saved.status.success() {
                bail!(
                    "docker save {image}: {}",
                    String::from_utf8_lossy(&saved.stderr)
                );
            }
            r.run("docker load -q", Some(&saved.stdout))?;
            println!("host {:<12} loaded {image}", h.name);
            changes += 1;
        }
    }
    // Only missing ones: an organizer's later change to them stays.
    for (name, spec) in crate::deploy::DEMO_CHALLENGES {
        let path = format!("/v1/challenges/{name}");
        match http(api, "GET", &path, Some(&s.admin_token), "") {
            Some((200, _)) => continue,
            Some((404, _)) => {}
            other => bail!("reading challenge {name}: {other:?}"),
        }
        match http(api, "PUT", &path, Some(&s.admin_token), spec) {
            Some((200 | 201, _)) => {
                println!("challenge   {name} registered");
                changes += 1;
            }
            other => bail!("registering {name}: {other:?}"),
        }
    }
    Ok(changes)
}
