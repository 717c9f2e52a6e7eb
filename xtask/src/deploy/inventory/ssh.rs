//! Commands on a host over SSH (the inventory's user, port, key and options).

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::{Host, Inventory};

/// A host of the inventory, reached over SSH.
pub(super) struct Remote<'a> {
    pub(super) inv: &'a Inventory,
    pub(super) host: &'a Host,
}

impl Remote<'_> {
    fn command(&self) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
        cmd.arg("-p").arg(self.inv.ssh.port.to_string());
        if let Some(id) = &self.inv.ssh.identity {
            cmd.arg("-i").arg(id);
        }
        cmd.args(&self.inv.ssh.options);
        cmd.arg(format!("{}@{}", self.inv.ssh.user, self.host.address));
        cmd
    }

    /// Runs `script` with the remote shell; its stdout, or an error naming
    /// the host and carrying stderr.
    pub(super) fn run(&self, script: &str, stdin: Option<&[u8]>) -> Result<String> {
        let mut cmd = self.command();
        cmd.arg(script)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("host {}: starting ssh", self.host.name))?;
        if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(bytes)
                .with_context(|| format!("host {}: sending over ssh", self.host.name))?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "host {} ({}): `{}` failed ({}): {}",
                self.host.name,
                self.host.address,
                script.lines().next().unwrap_or(""),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
