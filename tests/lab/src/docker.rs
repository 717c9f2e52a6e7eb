//! Containers a test starts itself, labelled with the test's pid, and the
//! sweep of those a killed test left behind (the engine helpers are
//! `tidegate_local::docker`'s).

use tidegate_local::Result;
pub use tidegate_local::docker::*;

/// The label every container a test starts carries, with the test's pid, so
/// that leftovers of a killed test can be recognised.
pub const TEST_LABEL: &str = "tidegate.test.owner";

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
        docker(&["logs", &self.id]).unwrap_or_else(|e| format!("(no logs: {e})"))
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
        let alive = owner
            .parse::<u32>()
            .is_ok_and(tidegate_local::process::pid_alive);
        if !alive {
            docker(&["rm", "-f", "-v", id])?;
            removed += 1;
        }
    }
    Ok(removed)
}
