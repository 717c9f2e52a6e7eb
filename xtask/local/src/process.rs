//! Processes a test starts, tied to the test's own life.
//!
//! A [`Supervised`] program runs under a small `sh` watchdog that holds the
//! read end of a pipe whose write end only this process has. When the guard
//! drops, or when the test process dies for any reason (including SIGKILL),
//! the pipe closes and the watchdog kills the program with SIGKILL. No
//! `unsafe` (`pre_exec`/`PR_SET_PDEATHSIG`) is needed for that.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result, display};

/// The watchdog: starts "$@" with output appended to $LOG, prints its pid,
/// waits for stdin to close, then kills it.
const WATCHDOG: &str = r#"log="$1"; shift
"$@" </dev/null >>"$log" 2>&1 &
child=$!
echo "$child"
cat >/dev/null
kill -9 "$child" 2>/dev/null
wait "$child" 2>/dev/null
exit 0"#;

/// A program running under the watchdog; killed on drop.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    pid: u32,
    log: PathBuf,
    watchdog: Child,
    lifeline: Option<ChildStdin>,
}

impl Supervised {
    /// Starts `program args...` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, program: &str, args: &[String], log: &Path) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(WATCHDOG)
            .arg("tidegate-watchdog")
            .arg(log)
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut watchdog = cmd.spawn().map_err(|source| Error::Spawn {
            command: display(&cmd),
            source,
        })?;
        let lifeline = watchdog.stdin.take();
        let stdout = watchdog
            .stdout
            .take()
            .ok_or_else(|| Error::NotReady(format!("{name}: watchdog has no stdout")))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let pid = line.trim().parse().map_err(|_| {
            Error::NotReady(format!("{name}: watchdog printed {line:?}, not a pid"))
        })?;
        Ok(Self {
            name: name.to_string(),
            pid,
            log: log.to_path_buf(),
            watchdog,
            lifeline,
        })
    }

    /// The program's own pid (not the watchdog's).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where its output goes.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether the program is still running (not a zombie).
    pub fn is_alive(&self) -> bool {
        pid_alive(self.pid)
    }

    /// Sends `signal` (e.g. "KILL", "STOP", "CONT") to the program.
    pub fn signal(&self, signal: &str) -> Result<()> {
        crate::error::run(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(self.pid.to_string()),
        )
        .map(drop)
    }

    /// Kills the program now and waits until it is gone.
    pub fn kill(&mut self) -> Result<()> {
        self.lifeline.take();
        let _ = self.watchdog.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.is_alive() {
            if Instant::now() > deadline {
                return Err(Error::NotReady(format!(
                    "{} (pid {}) still alive 10 s after SIGKILL",
                    self.name, self.pid
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The last `n` lines of its log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Whether `pid` names a live process (zombies count as dead).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Polls `ready` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
