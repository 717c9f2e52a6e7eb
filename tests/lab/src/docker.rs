//! The Docker engine, driven through the `docker` CLI (a real client).

use std::process::{Command, Stdio};

use crate::error::{Error, Result, run};

/// The daemon config `cargo xtask setup` writes: every Docker network on
/// 198.18.0.0/15 (the benchmarking range), nothing on 172.16/12.
pub const DAEMON_JSON: &str = r#"{
  "bip": "198.18.0.1/24",
  "default-address-pools": [{"base": "198.19.0.0/16", "size": 24}]
}"#;

/// Where the dockerd that setup starts writes its log.
pub const DOCKERD_LOG: &str = "/var/log/tidegate/dockerd.log";

/// The label every container a test starts carries, with the test's pid, so
/// that leftovers of a killed test can be recognised.
pub const TEST_LABEL: &str = "tidegate.test.owner";

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

/// Whether the image `name` is present in the engine.
pub fn image_exists(name: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", name]).is_ok()
}

/// A container started by a test; removed (with its anonymous volumes) on drop.
#[derive(Debug)]
pub struct Container {
    id: String,
}

impl Container {
    /// `docker run -d` with the test label plus `args` (options, image, command).
    pub fn run(args: &[&str]) -> Result<Self> {
        require_engine()?;
        let owner = format!("{TEST_LABEL}={}", std::process::id());
        let mut full = vec!["run", "-d", "--label", &owner];
        full.extend_from_slice(args);
        let id = docker(&full)?;
        Ok(Self { id })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's address on its first network.
    pub fn ip(&self) -> Result<String> {
        docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
            &self.id,
        ])
        .map(|s| s.split_whitespace().next().unwrap_or_default().to_string())
    }

    /// `docker exec` in the container.
    pub fn exec(&self, cmd: &[&str]) -> Result<String> {
        let mut full = vec!["exec", self.id.as_str()];
        full.extend_from_slice(cmd);
        docker(&full)
    }

    /// The container's log output so far.
    pub fn logs(&self) -> String {
        run(Command::new("docker").args(["logs", &self.id]))
            .unwrap_or_else(|e| format!("(no logs: {e})"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.id]);
    }
}

/// Removes test containers whose owning test process is gone (it was killed
/// before its guards could run). Returns how many it removed.
pub fn sweep_dead_test_containers() -> Result<usize> {
    let rows = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label={TEST_LABEL}"),
        "--format",
        &format!("{{{{.ID}}}} {{{{.Label \"{TEST_LABEL}\"}}}}"),
    ])?;
    let mut removed = 0;
    for row in rows.lines() {
        let mut parts = row.split_whitespace();
        let (Some(id), Some(owner)) = (parts.next(), parts.next()) else {
            continue;
        };
        let alive = owner.parse::<u32>().is_ok_and(crate::process::pid_alive);
        if !alive {
            docker(&["rm", "-f", "-v", id])?;
            removed += 1;
        }
    }
    Ok(removed)
}
