use std::process::Command;

use anyhow::Result;

use super::plan::plan_host;
use super::secrets::{Secrets, certificates};
use super::{Inventory, q};

const INVENTORY: &str = r#"
name = "ctf"
domain = "ctf.example.org"
[[host]]
name = "a"
address = "198.18.200.2"
zone = "z1"
roles = ["etcd", "controller", "agent"]
[[host]]
name = "b"
address = "198.18.200.6"
zone = "z2"
roles = ["etcd", "controller", "agent"]
[[host]]
name = "c"
address = "198.18.200.10"
zone = "z3"
roles = ["etcd", "agent"]
"#;

/// Empty files for every certificate and key the plan reads.
fn fake_pki(inv: &Inventory) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "").unwrap();
    for (name, _, _) in certificates(inv) {
        for file in [format!("{name}.pem"), format!("{name}-key.pem")] {
            std::fs::write(dir.path().join(&file), &file).unwrap();
        }
    }
    dir
}

fn inventory(text: &str) -> Result<Inventory> {
    let inv: Inventory = toml::from_str(text)?;
    inv.validate()?;
    Ok(inv)
}

#[test]
fn inventories_are_checked_with_the_culprit_named() {
    assert!(inventory(INVENTORY).is_ok());
    let two_etcd = INVENTORY.replacen("roles = [\"etcd\", \"agent\"]", "roles = [\"agent\"]", 1);
    let e = inventory(&two_etcd).unwrap_err().to_string();
    assert!(e.contains("2 etcd members: use an odd number"), "{e}");
    let twice = INVENTORY.replace("\"198.18.200.6\"", "\"198.18.200.2\"");
    let e = inventory(&twice).unwrap_err().to_string();
    assert!(e.contains("address 198.18.200.2 is used twice"), "{e}");
    let bad_name = INVENTORY.replace("name = \"c\"", "name = \"C_1\"");
    let e = inventory(&bad_name).unwrap_err().to_string();
    assert!(e.contains("\"C_1\": name must be a DNS label"), "{e}");
    let unknown = format!(
        "{INVENTORY}\n[[host]]\nname = \"d\"\naddress = \"198.18.200.14\"\nzone = \"z\"\nroles = [\"db\"]\n"
    );
    assert!(inventory(&unknown).is_err());
}

#[test]
fn units_keep_only_the_agents_capabilities() {
    let inv = inventory(INVENTORY).unwrap();
    let (secrets, dir) = (Secrets::placeholders(), fake_pki(&inv));
    let plan = plan_host(&inv, &inv.hosts[0], &secrets, Some(dir.path()), None).unwrap();
    let unit = |n: &str| {
        String::from_utf8(
            plan.files
                .iter()
                .find(|f| f.path == format!("/etc/systemd/system/{n}.service"))
                .unwrap()
                .bytes
                .to_vec(),
        )
        .unwrap()
    };
    let agent = unit("tidegate-agent");
    assert!(
        agent.contains("CapabilityBoundingSet=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n"),
        "{agent}"
    );
    assert!(
        agent.contains("AmbientCapabilities=CAP_BPF CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n"),
        "{agent}"
    );
    assert!(agent.contains("SupplementaryGroups=docker\n"), "{agent}");
    assert!(agent.contains("User=tidegate\n"), "{agent}");
    let controller = unit("tidegate-controller");
    assert!(
        controller.contains("CapabilityBoundingSet=\n"),
        "{controller}"
    );
    assert!(!controller.contains("AmbientCapabilities"), "{controller}");
    let etcd = unit("tidegate-etcd");
    assert!(
        etcd.contains("Type=notify\n") && etcd.contains("User=etcd\n"),
        "{etcd}"
    );
    // The direct mode runs the same command with the same bounding set.
    let s = plan
        .services
        .iter()
        .find(|s| s.name == "tidegate-agent")
        .unwrap();
    let cmd = s.direct_command();
    assert!(cmd.contains("setpriv --bounding-set=-all,+bpf,+net_admin,+net_bind_service -- '/usr/local/bin/tidegate-agent' '--config' '/etc/tidegate/agent.toml'"), "{cmd}");
    // Every etcd endpoint is in the configs, over TLS, with auth.
    let toml = String::from_utf8(
        plan.files
            .iter()
            .find(|f| f.path == "/etc/tidegate/agent.toml")
            .unwrap()
            .bytes
            .to_vec(),
    )
    .unwrap();
    assert!(toml.contains("etcd = [\"https://198.18.200.2:2379\", \"https://198.18.200.6:2379\", \"https://198.18.200.10:2379\"]"), "{toml}");
    // The agent is its worker's own etcd user, by password and by its
    // certificate, with a password of its own.
    let worker = &inv.hosts[0].name;
    assert!(
        toml.contains(&format!(
            "[etcd_auth]\nusername = \"tidegate-worker-{worker}\""
        )),
        "{toml}"
    );
    let file = |path: &str| {
        let f = plan.files.iter().find(|f| f.path == path).unwrap();
        String::from_utf8(f.bytes.to_vec()).unwrap()
    };
    assert_eq!(
        file("/etc/tidegate/pki/etcd-agent.pem"),
        format!("client-tidegate-worker-{worker}.pem")
    );
    let password = file("/etc/tidegate/etcd-password-agent");
    assert_eq!(password.trim(), secrets.worker_password(worker));
    assert_ne!(
        secrets.worker_password(worker),
        secrets.worker_password(&inv.hosts[1].name)
    );
}

/// deploy/systemd/*.service and deploy/etcd/etcd.example.yml are what
/// deploy writes for the first host of deploy/inventory.example.toml.
/// `TIDEGATE_UPDATE_DEPLOY=1 cargo test -p xtask` rewrites them.
#[test]
fn the_files_in_deploy_are_what_deploy_writes() {
    let deploy = crate::workspace_root().join("deploy");
    let inv = Inventory::load(&deploy.join("inventory.example.toml")).unwrap();
    let (secrets, pki) = (Secrets::placeholders(), fake_pki(&inv));
    let plan = plan_host(&inv, &inv.hosts[0], &secrets, Some(pki.path()), None).unwrap();
    let update = std::env::var_os("TIDEGATE_UPDATE_DEPLOY").is_some();
    let mut compared = 0;
    for f in &plan.files {
        let committed = if let Some(unit) = f.path.strip_prefix("/etc/systemd/system/") {
            deploy.join("systemd").join(unit)
        } else if f.path == "/etc/tidegate/etcd.yml" {
            deploy.join("etcd/etcd.example.yml")
        } else {
            continue;
        };
        if update {
            std::fs::create_dir_all(committed.parent().unwrap()).unwrap();
            std::fs::write(&committed, &f.bytes).unwrap();
        }
        let text = std::fs::read(&committed).unwrap_or_default();
        assert!(
            text[..] == f.bytes[..],
            "{} differs from what deploy writes to {}; TIDEGATE_UPDATE_DEPLOY=1 cargo test -p xtask rewrites it",
            committed.display(),
            f.path
        );
        compared += 1;
    }
    assert_eq!(compared, 4, "three units and etcd.yml");
}

/// systemd's own checker finds nothing wrong in the units but the
/// binaries not being installed on this machine.
#[test]
fn systemd_accepts_the_units() {
    let deploy = crate::workspace_root().join("deploy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(
            [
                "systemd/tidegate-etcd.service",
                "systemd/tidegate-controller.service",
                "systemd/tidegate-agent.service",
                "etcd/tidegate-etcd-backup.service",
                "etcd/tidegate-etcd-backup.timer",
            ]
            .map(|u| deploy.join(u)),
        )
        .output()
        .expect("systemd-analyze (cargo xtask setup installs systemd)");
    let text = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("is not executable: No such file or directory"))
        .collect();
    assert!(complaints.is_empty(), "{text}");
}

#[test]
fn the_example_load_balancer_config_is_valid() {
    let cfg = crate::workspace_root().join("deploy/haproxy.example.cfg");
    let out = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()
        .expect("haproxy (cargo xtask setup installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && !text.contains("WARNING"), "{text}");
}

#[test]
fn shell_quoting_survives_quotes() {
    assert_eq!(q("a b"), "'a b'");
    assert_eq!(q("it's"), r"'it'\''s'");
}
