//! The demo challenge images, built locally from Debian's static binaries
//! (there is no registry): a rootfs folder, `tar`, `docker import`.
//!
//! Bump an image's tag whenever its recipe changes: presence of the tag is
//! what "already built" means.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use crate::docker::{docker, image_exists, require_engine};
use crate::error::{Error, Result, run};

/// busybox `httpd` serving a page on [`DEMO_HTTP_PORT`]; `/cgi-bin/flag`
/// prints the instance's `FLAG`, or `/flag` without one (`flag.file`).
pub const DEMO_HTTP: &str = "tidegate/demo-http:2";
pub const DEMO_HTTP_PORT: u16 = 8080;
/// The text the demo page contains.
pub const DEMO_HTTP_BODY: &str = "tidegate demo-http: it works";

/// busybox `nc -ll -e cat` (a forked `cat` per connection) on [`DEMO_TCP_PORT`]: a line echo.
pub const DEMO_TCP: &str = "tidegate/demo-tcp:1";
pub const DEMO_TCP_PORT: u16 = 1337;

/// dropbear on [`DEMO_SSH_PORT`]; root logs in with the public key given in
/// the container's `AUTHORIZED_KEY` environment variable.
pub const DEMO_SSH: &str = "tidegate/demo-ssh:1";
pub const DEMO_SSH_PORT: u16 = 2222;

/// The three services of `demo-web-bot`, one busybox image run with a
/// command per service:
/// - `db`: answers every connection on [`DEMO_DB_PORT`] with its `VALUE`;
/// - `app`: busybox `httpd` on 8080 whose `/cgi-bin/page` renders what
///   `db` answers;
/// - `bot`: fetches the app's page by service name every 5 s with its
///   `FLAG` in a cookie (the way XSS admin bots visit), and answers its last
///   fetch on [`DEMO_BOT_PORT`].
pub const DEMO_WEB_BOT: &str = "tidegate/demo-web-bot:1";
pub const DEMO_DB_PORT: u16 = 6379;
pub const DEMO_BOT_PORT: u16 = 9000;
/// The value `demo-web-bot`'s db holds, which the app's page shows.
pub const DEMO_DB_VALUE: &str = "hello from db";

/// The `demo-web-bot` challenge: app (routed), db, bot (the only service
/// with the flag), started db → app → bot.
pub const DEMO_WEB_BOT_SPEC: &str = r#"{
  "services": {
    "app": {"image": "tidegate/demo-web-bot:1", "command": ["/bin/sh", "/app.sh"],
            "depends_on": ["db"], "ready": {"http": {"port": 8080, "path": "/"}},
            "limits": {"memory_mib": 64, "cpus": 0.25, "pids": 64},
            "tmpfs": [{"path": "/tmp", "size_mib": 8}]},
    "db": {"image": "tidegate/demo-web-bot:1", "command": ["/bin/sh", "/db.sh"],
           "env": {"VALUE": "hello from db"}, "ready": {"tcp": 6379},
           "limits": {"memory_mib": 32, "cpus": 0.25, "pids": 32},
           "tmpfs": [{"path": "/tmp", "size_mib": 8}]},
    "bot": {"image": "tidegate/demo-web-bot:1", "command": ["/bin/sh", "/bot.sh"],
            "depends_on": ["app"], "ready": {"tcp": 9000},
            "limits": {"memory_mib": 32, "cpus": 0.25, "pids": 64},
            "tmpfs": [{"path": "/tmp", "size_mib": 8}]}
  },
  "ports": [{"name": "web", "port": 8080, "protocol": "http", "service": "app"}],
  "flag": {"services": ["bot"]}
}"#;

/// How to build one image: its name, a rootfs builder, `docker import --change` lines.
type Recipe = (
    &'static str,
    fn(&Path) -> Result<()>,
    &'static [&'static str],
);

/// busybox `nc` on 8080 that accepts and never answers: a hung challenge.
pub const DEMO_SILENT: &str = "tidegate/demo-silent:1";

/// busybox `sh` that prints a line and exits with code 3: a crashing challenge.
pub const DEMO_EXIT: &str = "tidegate/demo-exit:1";

/// busybox `yes`: writes without end, never exits (a runaway solver).
pub const DEMO_FLOOD: &str = "tidegate/demo-flood:1";

/// The solver of [`DEMO_HTTP`] challenges: busybox `wget` of
/// `http://$TARGET/cgi-bin/flag` (at most 5 s), printed.
pub const DEMO_SOLVER: &str = "tidegate/demo-solver:1";

const BUSYBOX: &str = "/bin/busybox";
const DROPBEAR: &str = "/usr/sbin/dropbear";

/// Builds whichever demo images are missing; returns the names it built.
pub fn ensure_demo_images() -> Result<Vec<String>> {
    require_engine()?;
    let recipes: [Recipe; 8] = [
        (
            DEMO_WEB_BOT,
            web_bot_rootfs,
            &[r#"CMD ["/bin/sh", "/app.sh"]"#],
        ),
        (
            DEMO_HTTP,
            http_rootfs,
            &[r#"CMD ["/bin/busybox", "httpd", "-f", "-v", "-p", "8080", "-h", "/www"]"#],
        ),
        (
            DEMO_TCP,
            busybox_rootfs,
            &[r#"CMD ["/bin/busybox", "nc", "-ll", "-p", "1337", "-e", "/bin/busybox", "cat"]"#],
        ),
        (
            DEMO_SSH,
            ssh_rootfs,
            &[r#"CMD ["/bin/sh", "/start-ssh.sh"]"#],
        ),
        (
            DEMO_EXIT,
            busybox_rootfs,
            &[r#"CMD ["/bin/sh", "-c", "echo crashing; exit 3"]"#],
        ),
        (
            DEMO_SOLVER,
            busybox_rootfs,
            // Not `wget -T`: Debian's busybox wget crashes on it.
            &[r#"CMD ["/bin/sh", "-c", "timeout 5 wget -q -O - http://$TARGET/cgi-bin/flag"]"#],
        ),
        (
            DEMO_FLOOD,
            busybox_rootfs,
            &[r#"CMD ["/bin/busybox", "yes", "flood"]"#],
        ),
        (
            DEMO_SILENT,
            busybox_rootfs,
            &[r#"CMD ["/bin/busybox", "nc", "-ll", "-p", "8080", "-e", "/bin/sleep", "600"]"#],
        ),
    ];
    let mut built = Vec::new();
    for (name, rootfs, changes) in recipes {
        if image_exists(name) {
            continue;
        }
        build(name, rootfs, changes)?;
        built.push(name.to_string());
    }
    Ok(built)
}

fn build(name: &str, rootfs: fn(&Path) -> Result<()>, changes: &[&str]) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("tidegate-image-")
        .tempdir()?;
    let root = work.path().join("rootfs");
    std::fs::create_dir_all(&root)?;
    rootfs(&root)?;
    import_rootfs(work.path(), &root, name, changes)
}

/// `tar` of `root` (owned by root) imported as image `name` with `changes`.
fn import_rootfs(work: &Path, root: &Path, name: &str, changes: &[&str]) -> Result<()> {
    let tar = work.join("rootfs.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["--owner=0", "--group=0", "-cf"])
        .arg(&tar)
        .arg("."))?;
    let mut args = vec!["import".to_string()];
    for change in changes {
        args.push("--change".into());
        args.push((*change).to_string());
    }
    args.push(tar.display().to_string());
    args.push(name.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    docker(&args)?;
    Ok(())
}

/// Copies the dynamic libraries `binary` needs into `root`, at the paths ldd reports.
fn copy_libraries(root: &Path, binary: &Path) -> Result<()> {
    for line in run(Command::new("ldd").arg(binary))?.lines() {
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            copy_into(root, path)?;
        }
    }
    Ok(())
}

fn write(root: &Path, path: &str, contents: &str, mode: u32) -> Result<()> {
    let file = root.join(path.trim_start_matches('/'));
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&file, contents)?;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// `/bin/busybox` with a symlink per applet, a passwd with root and nobody, /tmp.
fn busybox_rootfs(root: &Path) -> Result<()> {
    if !Path::new(BUSYBOX).exists() {
        return Err(Error::NotReady(format!(
            "{BUSYBOX} is missing: install busybox-static (`cargo xtask setup`)"
        )));
    }
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(BUSYBOX, bin.join("busybox"))?;
    for applet in run(Command::new(BUSYBOX).arg("--list"))?.lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" {
            symlink("busybox", bin.join(applet))?;
        }
    }
    std::fs::create_dir_all(root.join("tmp"))?;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    write(
        root,
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    write(root, "/etc/group", "root:x:0:\nnogroup:x:65534:\n", 0o644)?;
    Ok(())
}

fn http_rootfs(root: &Path) -> Result<()> {
    busybox_rootfs(root)?;
    write(
        root,
        "/www/index.html",
        &format!("<!doctype html><title>demo-http</title><p>{DEMO_HTTP_BODY}</p>\n"),
        0o644,
    )?;
    write(
        root,
        "/www/cgi-bin/flag",
        "#!/bin/sh\nf=\"$FLAG\"\n[ -z \"$f\" ] && [ -r /flag ] && f=\"$(cat /flag)\"\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s\\n' \"$f\"\n",
        0o755,
    )
}

fn web_bot_rootfs(root: &Path) -> Result<()> {
    busybox_rootfs(root)?;
    write(
        root,
        "/db.sh",
        &format!("exec /bin/busybox nc -ll -p {DEMO_DB_PORT} -e /bin/sh /db-answer.sh\n"),
        0o755,
    )?;
    write(root, "/db-answer.sh", "echo \"$VALUE\"\n", 0o755)?;
    write(
        root,
        "/www/index.html",
        "<!doctype html><title>demo-web-bot</title><p><a href=\"/cgi-bin/page\">the page</a>\n",
        0o644,
    )?;
    write(
        root,
        "/www/cgi-bin/page",
        &format!(
            "#!/bin/sh\nvalue=$(/bin/busybox nc -w 2 db {DEMO_DB_PORT} </dev/null)\n\
             printf 'Content-Type: text/html\\r\\n\\r\\n<!doctype html><p>db says: %s</p>\\n' \"$value\"\n"
        ),
        0o755,
    )?;
    write(
        root,
        "/app.sh",
        "exec /bin/busybox httpd -f -v -p 8080 -h /www\n",
        0o755,
    )?;
    write(
        root,
        "/bot.sh",
        &format!(
            "echo 'no visit yet' > /tmp/last\n\
             /bin/busybox nc -ll -p {DEMO_BOT_PORT} -e /bin/busybox cat /tmp/last &\n\
             while :; do\n\
             printf 'GET /cgi-bin/page HTTP/1.0\\r\\nHost: app\\r\\nCookie: flag=%s\\r\\n\\r\\n' \"$FLAG\" \\\n\
             | /bin/busybox nc -w 3 app 8080 > /tmp/next 2>&1 && mv /tmp/next /tmp/last\n\
             sleep 5\n\
             done\n"
        ),
        0o755,
    )
}

fn ssh_rootfs(root: &Path) -> Result<()> {
    busybox_rootfs(root)?;
    if !Path::new(DROPBEAR).exists() {
        return Err(Error::NotReady(format!(
            "{DROPBEAR} is missing: install dropbear-bin (`cargo xtask setup`)"
        )));
    }
    copy_into(root, DROPBEAR)?;
    copy_libraries(root, Path::new(DROPBEAR))?;
    write(root, "/etc/shadow", "root:*:19000:0:99999:7:::\n", 0o600)?;
    write(root, "/etc/shells", "/bin/sh\n", 0o644)?;
    std::fs::create_dir_all(root.join("etc/dropbear"))?;
    std::fs::create_dir_all(root.join("root"))?;
    write(
        root,
        "/start-ssh.sh",
        "#!/bin/sh\nset -e\nmkdir -p /root/.ssh\nprintf '%s\\n' \"$AUTHORIZED_KEY\" > /root/.ssh/authorized_keys\n\
         chmod 700 /root /root/.ssh\nchmod 600 /root/.ssh/authorized_keys\n\
         exec /usr/sbin/dropbear -F -E -R -s -p 2222\n",
        0o755,
    )
}

/// Copies the host file at `path` to the same path under `root`, following links.
fn copy_into(root: &Path, path: &str) -> Result<()> {
    let dest = root.join(path.trim_start_matches('/'));
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(path, &dest)?;
    Ok(())
}

/// An image holding one binary of the project's (with the libraries `ldd`
/// lists) that runs it with `args`. Tagged by the binary's size and mtime,
/// so a rebuilt binary gets a new image. Returns the image name.
pub fn binary_image(repo: &str, binary: &Path, args: &[&str]) -> Result<String> {
    require_engine()?;
    let name = stamped(repo, binary)?;
    if image_exists(&name) {
        return Ok(name);
    }
    let work = tempfile::Builder::new()
        .prefix("tidegate-image-")
        .tempdir()?;
    let root = work.path().join("rootfs");
    let dest = root.join("app");
    std::fs::create_dir_all(&root)?;
    std::fs::copy(binary, &dest)?;
    copy_libraries(&root, binary)?;
    let cmd = serde_json::to_string(
        &std::iter::once("/app")
            .chain(args.iter().copied())
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    import_rootfs(work.path(), &root, &name, &[&format!("CMD {cmd}")])?;
    Ok(name)
}

/// An `ssh` client command for a demo SSH challenge: key `key`, no host-key
/// checks or prompts, 3 s connect timeout, running `command` as root.
pub fn ssh_command(key: &Path, host: &str, port: u16, command: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-i")
        .arg(key)
        .args(["-p", &port.to_string()])
        .args(["-o", "StrictHostKeyChecking=no"])
        .args(["-o", "UserKnownHostsFile=/dev/null"])
        .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=3"])
        .args(["-o", "LogLevel=ERROR"])
        .arg(format!("root@{host}"))
        .arg(command);
    cmd
}

/// A fresh ed25519 key pair in `dir` (no passphrase): the private key's
/// path and the public key's text, for the demo SSH image's `AUTHORIZED_KEY`.
pub fn ssh_keypair(dir: &Path) -> Result<(std::path::PathBuf, String)> {
    let key = dir.join("id");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()?;
    if !status.success() {
        return Err(Error::NotReady(format!("ssh-keygen exited with {status}")));
    }
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    Ok((key, public.trim().to_string()))
}

/// `repo` tagged by `binary`'s size and mtime.
fn stamped(repo: &str, binary: &Path) -> Result<String> {
    let meta = std::fs::metadata(binary)?;
    let stamp = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(format!("{repo}:{:x}-{stamp}", meta.len()))
}

/// The port iperf3's server listens on in [`bench_tcp_image`].
pub const BENCH_IPERF_PORT: u16 = 5201;
/// The port the echo server listens on in [`bench_tcp_image`].
pub const BENCH_ECHO_PORT: u16 = 1337;

/// The TCP benchmark's instance: busybox, Debian's `iperf3` server on
/// [`BENCH_IPERF_PORT`] and the project's `tcp-echo` (the binary at `echo`)
/// on [`BENCH_ECHO_PORT`]. Tagged by `echo`'s size and mtime.
pub fn bench_tcp_image(echo: &Path) -> Result<String> {
    const IPERF3: &str = "/usr/bin/iperf3";
    require_engine()?;
    let name = stamped("tidegate/bench-tcp", echo)?;
    if image_exists(&name) {
        return Ok(name);
    }
    if !Path::new(IPERF3).exists() {
        return Err(Error::NotReady(format!(
            "{IPERF3} is missing: install iperf3 (`cargo xtask setup`)"
        )));
    }
    let work = tempfile::Builder::new()
        .prefix("tidegate-image-")
        .tempdir()?;
    let root = work.path().join("rootfs");
    busybox_rootfs(&root)?;
    copy_into(&root, IPERF3)?;
    copy_libraries(&root, Path::new(IPERF3))?;
    std::fs::copy(echo, root.join("app"))?;
    copy_libraries(&root, echo)?;
    let start = format!(
        "{IPERF3} -s -p {BENCH_IPERF_PORT} -D && exec /app --listen 0.0.0.0:{BENCH_ECHO_PORT}"
    );
    let cmd = serde_json::to_string(&["/bin/sh", "-c", &start]).unwrap_or_default();
    import_rootfs(work.path(), &root, &name, &[&format!("CMD {cmd}")])?;
    Ok(name)
}

/// The port the red team's instances serve HTTP on (busybox `httpd`).
pub const REDTEAM_HTTP_PORT: u16 = 8080;
/// The port the red team's instances echo TCP on (the project's `tcp-echo`).
pub const REDTEAM_TCP_PORT: u16 = 1337;

/// The red team's instance: a player's shell (busybox), the `player` tool
/// at `/player` (the binary at `player`), busybox `httpd` on
/// [`REDTEAM_HTTP_PORT`] serving `/www` (with `/cgi-bin/flag`) and `tcp-echo`
/// (at `echo`) on [`REDTEAM_TCP_PORT`]. Tagged by both binaries.
pub fn redteam_image(player: &Path, echo: &Path) -> Result<String> {
    require_engine()?;
    let (p, e) = (stamped("x", player)?, stamped("x", echo)?);
    let name = format!(
        "tidegate/redteam:{}-{}",
        p.trim_start_matches("x:"),
        e.trim_start_matches("x:")
    );
    if image_exists(&name) {
        return Ok(name);
    }
    let work = tempfile::Builder::new()
        .prefix("tidegate-image-")
        .tempdir()?;
    let root = work.path().join("rootfs");
    http_rootfs(&root)?;
    std::fs::copy(player, root.join("player"))?;
    copy_libraries(&root, player)?;
    std::fs::copy(echo, root.join("echo"))?;
    copy_libraries(&root, echo)?;
    let start = format!(
        "/echo --listen 0.0.0.0:{REDTEAM_TCP_PORT} & exec /bin/busybox httpd -f -p {REDTEAM_HTTP_PORT} -h /www"
    );
    let cmd = serde_json::to_string(&["/bin/sh", "-c", &start]).unwrap_or_default();
    import_rootfs(work.path(), &root, &name, &[&format!("CMD {cmd}")])?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use tidegate_schema::{ChallengeSpec, decode_json};

    #[test]
    fn the_demo_web_bot_spec_is_valid_and_gives_the_flag_to_the_bot_only() {
        let spec: ChallengeSpec =
            decode_json(super::DEMO_WEB_BOT_SPEC.as_bytes()).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(spec.service_names(), ["app", "bot", "db"]);
        let services = tidegate_schema::ServiceRecord::all_of(&spec);
        let with_flag: Vec<_> = services
            .iter()
            .filter(|(_, s)| s.secrets)
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(with_flag, ["bot"]);
    }
}
