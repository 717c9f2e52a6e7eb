//! Small helpers for running programs from xtask.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use tidegate_lab::display_command as display;

/// Runs `cmd`, echoing it first, with output going to our terminal.
/// Fails with the command line and exit status when it does not succeed.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    println!("  $ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed with {status}", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout when it exits 0.
pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
