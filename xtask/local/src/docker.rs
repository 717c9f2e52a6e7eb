//! The Docker engine, driven through the `docker` CLI (a real client).

use std::process::{Command, Stdio};

use crate::error::{Error, Result, run};

/// The daemon config `cargo xtask setup` writes: every Docker network on
/// 198.18.0.0/15 (the benchmarking range), nothing on 172.16/12; root in a
/// container mapped to the unprivileged `dockremap` range of the host.
pub const DAEMON_JSON: &str = r#"{
  "bip": "198.18.0.1/24",
  "default-address-pools": [{"base": "198.19.0.0/17", "size": 24}],
  "userns-remap": "default"
}"#;

/// The kernel's key quotas each agent host needs (`sysctl` name, least
/// value). With `userns-remap` every container runs as the one remapped
/// uid, and each takes a session keyring from that uid's quota: at the
/// kernel's default of 200 keys, the 201st container fails to start
/// ("unable to create session key: disk quota exceeded").
pub const KEY_QUOTAS: [(&str, u64); 2] = [
    ("kernel.keys.maxkeys", 20_000),
    ("kernel.keys.maxbytes", 2_000_000),
];

/// Where the dockerd that setup starts writes its log.
pub const DOCKERD_LOG: &str = "/var/log/tidegate/dockerd.log";

/// Whether a Docker engine answers on the default socket.
pub fn engine_up() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Fails with a message saying what to do when no engine answers.
pub fn require_engine() -> Result<()> {
    if engine_up() {
        Ok(())
    } else {
        Err(Error::NotReady(
            "no Docker engine answers on /var/run/docker.sock: run `cargo xtask setup`".into(),
        ))
    }
}

/// The subnet of the default bridge network.
pub fn bridge_subnet() -> Result<String> {
    Ok(run(Command::new("docker").args([
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{(index .IPAM.Config 0).Subnet}}",
    ]))?
    .trim()
    .to_string())
}

/// Runs `docker args...` and returns its trimmed stdout.
pub fn docker(args: &[&str]) -> Result<String> {
    Ok(run(Command::new("docker").args(args))?.trim().to_string())
}

/// Removes every container with `label` (e.g. `tidegate.cluster=lab-7`),
/// then every network with it (instances with services have their own):
/// what it removed, as `container ID` / `network ID`. Best effort: one that
/// cannot be removed (an agent removing it at the same moment) does not
/// stop the others; the first error is returned only when nothing could be
/// removed.
/// Removes the flag files the agents of cluster `label` wrote (under the
/// default `flag_dir`; see `AgentConfig::worker_flag_dir`).
pub fn remove_flag_files(cluster: &str) {
    if cluster.is_empty() || cluster.contains('/') || cluster.starts_with('.') {
        return;
    }
    let dir = tidegate_schema::config::AgentConfig::default()
        .flag_dir
        .join(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

pub fn remove_labelled(label: &str) -> Result<Vec<String>> {
    let filter = format!("label={label}");
    let mut removed = Vec::new();
    let mut first_error = None;
    for (list, remove, what) in [
        (&["ps", "-aq"][..], &["rm", "-f", "-v"][..], "container"),
        (
            &["network", "ls", "-q"][..],
            &["network", "rm"][..],
            "network",
        ),
    ] {
        let mut args = list.to_vec();
        args.extend(["--filter", &filter]);
        let ids = match docker(&args) {
            Ok(ids) => ids,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        for id in ids.split_whitespace() {
            let mut args = remove.to_vec();
            args.push(id);
            match docker(&args) {
                Ok(_) => removed.push(format!("{what} {id}")),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
    }
    match first_error {
        Some(e) if removed.is_empty() => Err(e),
        _ => Ok(removed),
    }
}

/// Whether the image `name` is present in the engine.
pub fn image_exists(name: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", name]).is_ok()
}
