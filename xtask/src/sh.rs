//! Small helpers for running programs from xtask.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use tidegate_local::display_command as display;

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

/// `cargo build` of the controller and agent packages' binaries (the
/// daemons and the `tidegate` CLI; the agent embeds the eBPF object) of the
/// workspace at `dir`; callers add flags or environment.
pub(crate) fn build_daemons(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir).args([
        "build",
        "-p",
        "tidegate-controller",
        "-p",
        "tidegate-agent",
        "--bins",
    ]);
    cmd
}

/// Runs `cmd` quietly and returns its stdout when it exits 0.
pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One HTTP/1.0 request to `addr` (`ip:port`) with an optional bearer token;
/// the status and body, if anything answered within 5 s.
pub(crate) fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &addr.parse().ok()?,
        std::time::Duration::from_secs(2),
    )
    .ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let status = answer.split_whitespace().nth(1)?.parse().ok()?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}
