//! Attacks from inside an instance: root in team mallory's container with
//! its shell and the `player` tool, going for the host's disk and the
//! neighbours' traffic; and the records and agents a stolen credential can
//! fake.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tidegate_local::process::wait_until;
use tidegate_schema::config::{AgentConfig, ConfigFile};

use super::range::{Instance, Range};
use super::{Attack, From, Verdict};
use crate::sh;

pub(super) fn attacks() -> Vec<Attack> {
    vec![
        Attack::new(
            "ARP reply claiming alice's instance address",
            From::Instance,
            "neighbour-pinning",
            arp_claim,
        ),
        Attack::new(
            "stdout at full speed to fill the worker's disk",
            From::Instance,
            "log-limit",
            log_flood,
        ),
        Attack::new(
            "root in an instance is root on the host (uid 0 → 0)",
            From::Instance,
            "userns",
            host_root,
        ),
        Attack::new(
            "plant a setuid-root file for the host",
            From::Instance,
            "userns",
            planted_setuid,
        ),
        Attack::new(
            "fill /tmp beyond its size",
            From::Instance,
            "tmpfs-size",
            fill_tmp,
        ),
        Attack::new(
            "write the flag file (/flag, a file of the worker's disk)",
            From::Instance,
            "flag-file",
            write_flag_file,
        ),
        Attack::new(
            "fill the root filesystem",
            From::Instance,
            "read-only-rootfs",
            fill_root,
        ),
        Attack::new(
            "a record whose TCP port is a daemon's (7080)",
            From::Worker,
            "port-range",
            daemon_port,
        ),
        Attack::new(
            "a record whose cap_add has SYS_ADMIN",
            From::Worker,
            "spec-derived",
            |r| unlike_spec(r, "SYS_ADMIN"),
        ),
        Attack::new(
            "a record whose image is not its spec's",
            From::Worker,
            "spec-derived",
            |r| unlike_spec(r, "image"),
        ),
        Attack::new(
            "a record whose solver check is not its spec's",
            From::Worker,
            "spec-derived",
            |r| unlike_spec(r, "solver"),
        ),
        Attack::new(
            "a second agent with worker a's id",
            From::Worker,
            "unique-worker",
            duplicate_worker,
        ),
    ]
}

/// The MAC address of `inst`'s container.
fn mac(inst: &Instance) -> Result<String> {
    sh::output(Command::new("docker").args([
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.MacAddress}}{{end}}",
        &inst.container,
    ]))
    .map(|m| m.trim().to_string())
    .filter(|m| !m.is_empty())
    .with_context(|| format!("no MAC for {}", inst.container))
}

/// The host's neighbour entry for `addr`: (device, MAC, state).
fn neighbour(addr: std::net::IpAddr) -> Option<(String, String)> {
    let out = sh::output(Command::new("ip").args(["neigh", "show", &addr.to_string()]))?;
    let line = out.lines().next()?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let mac = words
        .iter()
        .position(|w| *w == "lladdr")
        .and_then(|i| words.get(i + 1))?;
    Some((
        mac.to_string(),
        words.last().copied().unwrap_or("").to_string(),
    ))
}

/// mallory's NET_RAW instance claims alice's address with gratuitous ARP
/// replies; the host's entry for alice must keep alice's MAC.
fn arp_claim(r: &Range) -> Result<Verdict> {
    let (victim, attacker) = (&r.alice, &r.mallory_raw);
    let (victim_mac, attacker_mac) = (mac(victim)?, mac(attacker)?);
    // The host talks to alice (as the agent does), so it has an entry.
    let url = format!(
        "http://{}:{}/",
        victim.address,
        tidegate_local::images::REDTEAM_HTTP_PORT
    );
    sh::output(Command::new("curl").args(["-sf", "-m", "3", &url]))
        .context("alice's instance does not answer the host")?;
    let before = neighbour(victim.address).context("the host has no entry for alice")?;
    if before.0 != victim_mac {
        bail!("the host's entry for alice is {before:?} before the attack, not {victim_mac}");
    }
    // Past the kernel's 1 s lock time of a fresh entry.
    std::thread::sleep(Duration::from_millis(1500));
    let sent = r.exec(
        attacker,
        &[
            "/player",
            "arp-claim",
            "eth0",
            &victim.address.to_string(),
            "5",
        ],
    )?;
    if !sent.starts_with("sent") {
        bail!("the ARP claim was not sent: {sent}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = neighbour(victim.address).context("the entry for alice vanished")?;
    Ok(if after.0 == attacker_mac {
        Verdict::Succeeded(format!(
            "the host now sends alice's traffic to mallory ({attacker_mac}, {})",
            after.1
        ))
    } else {
        Verdict::Blocked(format!("{sent}; the entry stays {} ({})", after.0, after.1))
    })
}

/// The container's json-file log parts on the host, in bytes.
fn log_bytes(inst: &Instance) -> Result<u64> {
    let path =
        sh::output(Command::new("docker").args(["inspect", "-f", "{{.LogPath}}", &inst.container]))
            .map(|p| p.trim().to_string())
            .context("no log path")?;
    let dir = std::path::Path::new(&path)
        .parent()
        .context("log path has no directory")?;
    let name = std::path::Path::new(&path)
        .file_name()
        .context("log path has no name")?
        .to_string_lossy()
        .to_string();
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(&name) {
            total += e.metadata()?.len();
        }
    }
    Ok(total)
}

/// Free bytes of the filesystem holding Docker's data.
fn docker_free() -> Result<u64> {
    let out = sh::output(Command::new("df").args(["-B1", "--output=avail", "/var/lib/docker"]))
        .context("df /var/lib/docker")?;
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .context("df printed no number")
}

/// 30 s of `yes`-speed output into the container's log (PID 1's stdout);
/// what stays on disk must be at most `limits.log_mib` (8 MiB), and the
/// worker's free space must not drop by more.
fn log_flood(r: &Range) -> Result<Verdict> {
    const LIMIT: u64 = 8 << 20;
    let secs = if r.planted.is_some() { "5" } else { "30" };
    let free = docker_free()?;
    let out = r.exec(
        &r.mallory,
        &["sh", "-c", &format!("/player spam {secs} > /proc/1/fd/1")],
    )?;
    // Docker writes the log asynchronously.
    std::thread::sleep(Duration::from_secs(1));
    let kept = log_bytes(&r.mallory)?;
    let dropped = free.saturating_sub(docker_free()?);
    let seen = format!(
        "{secs} s of output; {kept} bytes kept; the disk's free space dropped by {dropped} bytes"
    );
    // (The disk is shared with the rest of the machine: 64 MiB of slack.)
    Ok(if kept > LIMIT || dropped > LIMIT + (64 << 20) {
        Verdict::Succeeded(seen)
    } else {
        let _ = out;
        Verdict::Blocked(seen)
    })
}

/// The bytes `/player fill` says it wrote (`wrote N bytes...`).
fn written(out: &str) -> Result<u64> {
    out.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| out.to_string())
}

/// Writes 128 MiB into the 64 MiB `/tmp`.
fn fill_tmp(r: &Range) -> Result<Verdict> {
    let out = r.exec(&r.mallory, &["/player", "fill", "/tmp/fill", "128"])?;
    let _ = r.exec(&r.mallory, &["rm", "-f", "/tmp/fill"]);
    let written = written(&out)?;
    Ok(if written > 64 << 20 {
        Verdict::Succeeded(out)
    } else {
        Verdict::Blocked(out)
    })
}

/// Writes 1 MiB over the instance's flag file: the file is the worker's
/// (`flag_dir`), so a writable one would let a player forge the flag its
/// instance serves and fill the worker's disk past any tmpfs size.
fn write_flag_file(r: &Range) -> Result<Verdict> {
    let before = r.exec(&r.mallory, &["cat", "/flag"])?;
    if !before.contains("flag{") {
        bail!("mallory's /flag holds no flag: {before:?}");
    }
    let out = r.exec(&r.mallory, &["/player", "fill", "/flag", "1"])?;
    let written = written(&out)?;
    Ok(if written > 0 {
        Verdict::Succeeded(out)
    } else {
        Verdict::Blocked(out)
    })
}

/// Writes 64 MiB into the image's own filesystem.
fn fill_root(r: &Range) -> Result<Verdict> {
    let out = r.exec(&r.mallory, &["/player", "fill", "/fill", "64"])?;
    let _ = r.exec(&r.mallory, &["rm", "-f", "/fill"]);
    let written = written(&out)?;
    Ok(if written > 0 {
        Verdict::Succeeded(out)
    } else {
        Verdict::Blocked(out)
    })
}

/// etcdctl on the range's etcd as its admin (as a thief of it would).
fn etcdctl(r: &Range, args: &[&str]) -> Option<String> {
    r.etcdctl_ok("root", args).ok()
}

/// Writes an instance record by hand (as the scheduler would: with its
/// secret, for worker `rec.worker`, both under a new lease of `ttl`
/// seconds).
fn put_instance(r: &Range, rec: &serde_json::Value, ttl: u32) -> Result<()> {
    let granted =
        etcdctl(r, &["lease", "grant", &ttl.to_string()]).context("etcdctl lease grant")?;
    let lease = granted.split_whitespace().nth(1).context("no lease id")?;
    let (id, worker) = (
        rec["id"].as_str().context("no id")?,
        rec["worker"].as_str().context("no worker")?,
    );
    let secret = serde_json::json!({"v": 1, "instance": id, "worker": worker,
        "flag": "flag{hand-written}"});
    for (key, value) in [
        (
            format!("/tidegate/secrets/{worker}/{id}"),
            secret.to_string(),
        ),
        (format!("/tidegate/instances/{id}"), rec.to_string()),
    ] {
        etcdctl(r, &["put", &format!("--lease={lease}"), &key, &value])
            .with_context(|| format!("etcdctl put {key}"))?;
    }
    Ok(())
}

fn etcd_get(r: &Range, key: &str) -> Option<String> {
    etcdctl(r, &["get", key, "--print-value-only"])
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// A copy of mallory's record, written by hand, whose TCP port is 7080
/// (the controller API's default): agent a must not steer it.
fn daemon_port(r: &Range) -> Result<Verdict> {
    let key = |id: &str| format!("/tidegate/instances/{id}");
    let mut rec: serde_json::Value =
        serde_json::from_str(&etcd_get(r, &key(&r.mallory.id)).context("mallory's record")?)?;
    let id = "00000de7a1";
    rec["id"] = id.into();
    rec["http"] = serde_json::json!([]);
    rec["tcp"][0]["port"] = 7080.into();
    put_instance(r, &rec, 120)?;
    let target = format!("{}:7080", r.a_cfg.tcp_host);
    let mut last = String::new();
    let echoed = wait_until(Duration::from_secs(20), || {
        last = r
            .player(
                &[],
                &["send", &r.a_cfg.tcp_host.to_string(), "7080", "", "hello"],
            )
            .unwrap_or_default();
        last == "hello"
    });
    let _ = etcdctl(r, &["del", &key(id)]);
    Ok(if echoed {
        Verdict::Succeeded(format!("{target} reached the hand-written instance"))
    } else {
        Verdict::Blocked(format!("{target}: {last}"))
    })
}

/// Mallory's root, seen from the host: `/proc/self/uid_map` in the
/// container maps uid 0 to 0 only without `userns-remap`.
fn host_root(r: &Range) -> Result<Verdict> {
    let map = r.exec(&r.mallory, &["cat", "/proc/self/uid_map"])?;
    let first = map.lines().next().unwrap_or("");
    let fields: Vec<&str> = first.split_whitespace().collect();
    match fields.as_slice() {
        ["0", "0", ..] => Ok(Verdict::Succeeded(format!(
            "uid_map {first:?}: root is the host's root"
        ))),
        ["0", outside, ..] => Ok(Verdict::Blocked(format!(
            "uid_map {first:?}: root is uid {outside} on the host"
        ))),
        _ => bail!("unreadable uid_map in mallory's container: {map:?}"),
    }
}

/// A setuid file that mallory's root makes, seen from the host (through
/// `/proc/<pid>/root`): without userns-remap it is owned by the host's
/// root, a setuid-root program waiting for anyone on the host to run it;
/// with remapping, by the unprivileged uid root maps to.
fn planted_setuid(r: &Range) -> Result<Verdict> {
    use std::os::unix::fs::MetadataExt;
    r.exec(&r.mallory, &["/bin/busybox", "cp", "/player", "/tmp/suid"])?;
    r.exec(&r.mallory, &["/bin/busybox", "chmod", "4755", "/tmp/suid"])?;
    let pid = sh::output(Command::new("docker").args([
        "inspect",
        "-f",
        "{{.State.Pid}}",
        &r.mallory.container,
    ]))
    .context("mallory's pid")?;
    let path = format!("/proc/{}/root/tmp/suid", pid.trim());
    let meta = std::fs::metadata(&path).with_context(|| path.clone());
    let _ = r.exec(&r.mallory, &["/bin/busybox", "rm", "-f", "/tmp/suid"]);
    let meta = meta?;
    if meta.mode() & 0o4000 == 0 {
        bail!(
            "{path}: the setuid bit did not stick (mode {:o})",
            meta.mode()
        );
    }
    Ok(match meta.uid() {
        0 => Verdict::Succeeded(format!("{path}: setuid, owned by the host's root")),
        uid => Verdict::Blocked(format!("{path}: setuid, owned by uid {uid} on the host")),
    })
}

/// A copy of mallory's record for worker a, written by hand (with etcd's
/// admin credential), whose container is not what its spec makes: with
/// SYS_ADMIN added, or another image. No container may start for it.
fn unlike_spec(r: &Range, change: &str) -> Result<Verdict> {
    let key = |id: &str| format!("/tidegate/instances/{id}");
    let mut rec: serde_json::Value =
        serde_json::from_str(&etcd_get(r, &key(&r.mallory.id)).context("mallory's record")?)?;
    let id = match change {
        "image" => "0000001a9e",
        "solver" => "00005017e5",
        _ => "00000ca95a",
    };
    rec["id"] = id.into();
    rec["http"] = serde_json::json!([]);
    rec["tcp"][0]["port"] = 29990.into();
    if change == "image" {
        rec["container"]["image"] = tidegate_local::images::DEMO_HTTP.into();
    } else if change == "solver" {
        // A container of the thief's choosing on the instance's network,
        // started by the agent every minute.
        rec["solver"] = serde_json::json!({"image": tidegate_local::images::DEMO_HTTP,
            "interval_secs": 60, "timeout_secs": 5, "target_port": 8080});
    } else {
        rec["container"]["cap_add"] = serde_json::json!([change]);
    }
    put_instance(r, &rec, 120)?;
    let filter = format!("label=tidegate.instance={id}");
    let mut found = String::new();
    let started = wait_until(Duration::from_secs(10), || {
        found = sh::output(Command::new("docker").args(["ps", "-aq", "--filter", &filter]))
            .unwrap_or_default()
            .trim()
            .to_string();
        !found.is_empty()
    });
    let _ = etcdctl(r, &["del", &key(id)]);
    if started {
        return Ok(Verdict::Succeeded(format!(
            "container {found} was made for it"
        )));
    }
    let log = r.a.log_tail(200);
    let refused = log
        .lines()
        .any(|l| l.contains("refused: the record's container") && l.contains(id));
    if !refused {
        bail!(
            "no container for {id}, but agent a did not say it refused it:\n{}",
            r.a.log_tail(10)
        );
    }
    Ok(Verdict::Blocked(
        "no container in 10 s; agent a refused it (tidegate_agent_unlike_spec_records_total)"
            .into(),
    ))
}

/// A second agent started with worker a's id (on host b, as a thief with
/// worker a's credential would): it must exit 64 and leave a's key alone.
fn duplicate_worker(r: &Range) -> Result<Verdict> {
    let key = "/tidegate/workers/worker-a";
    let before = etcd_get(r, key).context("worker a is not registered")?;
    let mut cfg: AgentConfig = AgentConfig::from_file(&r.dir().join("worker-a.toml"))?;
    let b = std::net::IpAddr::V4(r.host_b.addr());
    cfg.advertise_address = b;
    cfg.tcp_host = b;
    cfg.http_entry = std::net::SocketAddr::new(b, 8081);
    cfg.metrics_listen = std::net::SocketAddr::new(b, 9465);
    let path = r.dir().join("thief.toml");
    tidegate_local::daemons::write_config(&cfg, &path)?;
    let mut cmd = r.host_b.command("env");
    if let Some(p) = &r.planted {
        cmd.arg(format!("TIDEGATE_PLANTED={p}"));
    }
    let mut child = cmd
        .arg(r.bin_dir.join("tidegate-agent"))
        .arg("--config")
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut code = None;
    wait_until(Duration::from_secs(20), || {
        code = child.try_wait().ok().flatten().map(|s| s.code());
        code.is_some()
    });
    let after = etcd_get(r, key).unwrap_or_default();
    if code.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let taken = after != before;
    Ok(match code {
        Some(Some(64)) if !taken => {
            Verdict::Blocked("the thief's agent exited 64; worker a's key unchanged".into())
        }
        _ => Verdict::Succeeded(format!(
            "the thief's agent {}; worker a's key {}",
            code.map_or("kept running".to_string(), |c| format!("exited {c:?}")),
            if taken {
                "now names the thief"
            } else {
                "unchanged"
            }
        )),
    })
}
