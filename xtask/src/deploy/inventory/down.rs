//! `--down [--purge]`: stops every service (agents, controllers, etcd),
//! and with `--purge` removes what deploy installed, etcd's data included.

use std::fmt::Write as _;

use anyhow::Result;

use super::services::stop_script;
use super::ssh::Remote;
use super::{Init, Inventory, Role, at, q};

pub(super) fn down(inv: &Inventory, purge: bool) -> Result<()> {
    for role in [Role::Agent, Role::Controller, Role::Etcd] {
        let svc = match role {
            Role::Agent => "tidegate-agent",
            Role::Controller => "tidegate-controller",
            Role::Etcd => "tidegate-etcd",
        };
        for h in inv.with_role(role) {
            let root = inv.root_of(h);
            let mut script = stop_script(inv.init, &root, svc);
            if inv.init == Init::Systemd {
                let _ = write!(
                    script,
                    "; systemctl disable --quiet {svc} 2>/dev/null || true"
                );
            }
            Remote { inv, host: h }.run(&script, None)?;
            println!("host {:<12} {svc} stopped", h.name);
        }
    }
    if purge {
        for h in &inv.hosts {
            let root = inv.root_of(h);
            let paths = [
                "/etc/tidegate",
                "/var/lib/tidegate/etcd",
                "/usr/local/bin/tidegate",
                "/usr/local/bin/tidegate-controller",
                "/usr/local/bin/tidegate-agent",
                "/etc/systemd/system/tidegate-etcd.service",
                "/etc/systemd/system/tidegate-controller.service",
                "/etc/systemd/system/tidegate-agent.service",
                "/run/tidegate",
                "/var/log/tidegate",
            ]
            .map(|p| q(&at(&root, p)))
            .join(" ");
            Remote { inv, host: h }.run(&format!("rm -rf {paths}"), None)?;
            println!("host {:<12} purged", h.name);
        }
    }
    Ok(())
}
