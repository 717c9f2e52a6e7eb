//! What a run does to the running cluster: etcd auth (once), and the demo
//! challenges with their images.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use tidegate_schema::Keyspace;

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

/// Turns on etcd auth once: users root, tidegate-controller and
/// tidegate-agent, each but root with a role reading and writing the key
/// root. Remembered in the state dir; checked again (users listed) on
/// every run. Whether it changed anything.
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
    let users = r.run(&format!("{etcdctl} user list"), None)?;
    let has = |u: &str| users.lines().any(|l| l.trim() == u);
    let want = ["root", "tidegate-controller", "tidegate-agent"];
    if marker.exists() && want.iter().all(|u| has(u)) {
        return Ok(false);
    }
    let mut script = String::from("set -e\n");
    for (user, password) in [
        ("root", &s.etcd_root_password),
        ("tidegate-controller", &s.etcd_controller_password),
        ("tidegate-agent", &s.etcd_agent_password),
    ] {
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
    let _ = writeln!(
        script,
        "{etcdctl} role add root >/dev/null 2>&1 || true\n{etcdctl} user grant-role root root >/dev/null 2>&1 || true"
    );
    // Every key under the key root (the daemons' default).
    let keys = Keyspace::default().root_prefix();
    for role in ["tidegate-controller", "tidegate-agent"] {
        let _ = writeln!(
            script,
            "{etcdctl} role add {role} >/dev/null 2>&1 || true\n{etcdctl} role grant-permission {role} --prefix=true readwrite {keys} >/dev/null\n{etcdctl} user grant-role {role} {role} >/dev/null 2>&1 || true"
        );
    }
    let _ = writeln!(script, "{etcdctl} auth enable");
    r.run("sh -s", Some(script.as_bytes()))?;
    std::fs::write(&marker, "etcd auth was enabled by cargo xtask deploy\n")?;
    println!("etcd: auth enabled (users root, tidegate-controller, tidegate-agent)");
    Ok(true)
}

/// Registers the demo challenges that are missing or differ, and copies
/// their images to agents that lack them. How many changes it made.
pub(super) fn demo(inv: &Inventory, api: &str, s: &Secrets) -> Result<usize> {
    let mut changes = 0;
    for h in inv.with_role(Role::Agent) {
        let r = Remote { inv, host: h };
        for image in ["tidegate/demo-http:1", "tidegate/demo-tcp:1"] {
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
