//! `--dry-run`: every step a run would take, printed; nothing is built,
//! written or contacted.

use std::path::Path;

use anyhow::Result;

use super::plan::plan_host;
use super::secrets::Secrets;
use super::{Init, Inventory, InventoryArgs, Role};

/// Prints what `cargo xtask deploy --inventory` would do.
pub(super) fn print(inv: &Inventory, state: &Path, args: &InventoryArgs) -> Result<()> {
    if args.down {
        for role in [Role::Agent, Role::Controller, Role::Etcd] {
            for h in inv.with_role(role) {
                println!("would stop {role:?} on {} ({})", h.name, h.address);
            }
        }
        if args.purge {
            println!(
                "would remove /etc/tidegate, etcd's data, the binaries and units on every host"
            );
        }
        return Ok(());
    }
    println!(
        "would build tidegate-controller, tidegate-agent (with the eBPF object) and tidegate ({} profile)",
        args.profile
    );
    println!(
        "would make (once) tokens and etcd passwords in {} and the etcd CA and certificates in {}",
        state.join("secrets.toml").display(),
        state.join("pki").display()
    );
    let fake = Secrets::placeholders();
    for h in &inv.hosts {
        let roles: Vec<String> = h
            .roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect();
        println!(
            "host {} ({}, zone {}, roles {}): check ssh {}@{}:{} and its prerequisites",
            h.name,
            h.address,
            h.zone,
            roles.join("+"),
            inv.ssh.user,
            h.address,
            inv.ssh.port
        );
        if inv.init == Init::Systemd {
            println!("  would create the system user tidegate (group docker) if missing");
        }
        for f in plan_host(inv, h, &fake, None, None)?.files {
            println!("  would copy {} if it differs (sha256)", f.path);
        }
    }
    for (step, role) in [
        (
            "start or restart (if its files changed) tidegate-etcd",
            Role::Etcd,
        ),
        ("start or restart tidegate-controller", Role::Controller),
        ("start or restart tidegate-agent", Role::Agent),
    ] {
        for h in inv.with_role(role) {
            println!("would {step} on {} ({:?})", h.name, inv.init);
        }
        match role {
            Role::Etcd => {
                println!("would wait for `etcdctl endpoint health` on every member");
                let workers: Vec<String> = inv
                    .with_role(Role::Agent)
                    .iter()
                    .map(|h| tidegate_local::etcd::worker_user(&h.name))
                    .collect();
                println!(
                    "would enable etcd auth: users root, tidegate-controller (readwrite on {}) and one per worker, reading what routing needs and its own secrets, writing only its own keys: {}",
                    tidegate_schema::Keyspace::default().root_prefix(),
                    workers.join(", ")
                );
            }
            Role::Controller => println!(
                "would wait until every controller answers /v1/status and a scheduler is elected"
            ),
            Role::Agent => {
                println!(
                    "would set \"userns-remap\": \"default\" in /etc/docker/daemon.json on each agent host where it is unset, and restart docker (systemd)"
                );
                println!("would wait until every agent is in /v1/workers");
            }
        }
    }
    if inv.demo {
        println!(
            "would register demo-http, demo-tcp and demo-web-bot if missing, and load their images on agents that lack them"
        );
    }
    Ok(())
}
