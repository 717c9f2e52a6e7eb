//! `cargo xtask setup`: installs and starts what the project needs, idempotently.
//!
//! Every step first checks whether its work is already done and only then
//! acts, so a second run changes nothing and says so.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tidegate_local::docker::{self, DAEMON_JSON, DOCKERD_LOG};

use crate::sh;

/// Debian packages the project uses (ENVIRONMENT.md says why each).
const PACKAGES: &[&str] = &[
    "etcd-server",
    "etcd-client",
    "docker.io",
    "busybox-static",
    "cmake",
    "protobuf-compiler",
    "libprotobuf-dev",
    "bpftool",
    "iproute2",
    "iptables",
    "jq",
    "curl",
    "iperf3",
    "wrk",
    "haproxy",
    "nginx",
    "ncat",
    // Slow-disk faults on etcd: `strace -e inject=fdatasync:delay_enter=…`.
    "strace",
    // Clock-skew faults (a controller and an agent ±30 s): LD_PRELOAD.
    "libfaketime",
    "openssh-client",
    "dropbear-bin",
    "openssl",
    "chromium",
    "systemd",
    // CTFd (integrations/ctfd tests, `deploy local --ctfd`) runs in a venv.
    "python3-venv",
];

const BPF_LINKER_VERSION: &str = "0.10.0";

/// One step: its name and what it runs.
type Step = (&'static str, fn() -> Result<Outcome>);

/// What one step did.
enum Outcome {
    AlreadyDone(String),
    Changed(String),
}

/// Runs every step; returns how many changed something.
pub(crate) fn run() -> Result<usize> {
    if !is_root() {
        bail!("setup installs packages and starts dockerd: run it as root");
    }
    let steps: [Step; 8] = [
        ("debian packages", packages),
        ("promtool", promtool),
        ("rust toolchains", rust_toolchains),
        ("bpf-linker", bpf_linker),
        ("docker engine", docker_engine),
        ("bpffs", bpffs),
        ("kernel key quotas", key_quotas),
        ("demo images", demo_images),
    ];
    let mut changed = 0;
    for (name, step) in steps {
        match step().with_context(|| format!("setup step {name:?}"))? {
            Outcome::AlreadyDone(what) => println!("ok      {name}: {what}"),
            Outcome::Changed(what) => {
                changed += 1;
                println!("changed {name}: {what}");
            }
        }
    }
    if changed == 0 {
        println!("setup: nothing to do, everything was already in place");
    } else {
        println!("setup: {changed} step(s) changed this machine");
    }
    Ok(changed)
}

fn is_root() -> bool {
    sh::output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn package_installed(pkg: &str) -> bool {
    sh::output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", pkg]))
        .is_some_and(|s| s.starts_with("ii"))
}

fn packages() -> Result<Outcome> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(Outcome::AlreadyDone(format!(
            "all {} installed",
            PACKAGES.len()
        )));
    }
    println!("installing {}", missing.join(" "));
    // Without an init system, Debian's maintainer scripts would start nginx,
    // haproxy, docker and etcd with their default configs. A policy-rc.d that
    // answers 101 ("action forbidden") stops that; it is removed afterwards.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        sh::run(Command::new("chmod").args(["755", "/usr/sbin/policy-rc.d"]))?;
    }
    let result = (|| {
        sh::run(Command::new("apt-get").args(["update", "-q"]))?;
        sh::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )
    })();
    if ours {
        std::fs::remove_file(policy)?;
    }
    result?;
    Ok(Outcome::Changed(format!("installed {}", missing.join(" "))))
}

/// Where setup puts promtool.
pub(crate) const PROMTOOL: &str = "/usr/local/bin/promtool";

/// Prometheus's own checker of the text format (`promtool check metrics`),
/// which a test runs on both daemons' `/metrics`: taken out of Debian's
/// `prometheus` package without installing (or starting) the server.
fn promtool() -> Result<Outcome> {
    if let Some(v) = sh::output(Command::new(PROMTOOL).arg("--version")) {
        return Ok(Outcome::AlreadyDone(
            v.lines().next().unwrap_or_default().to_string(),
        ));
    }
    let work = tempfile::tempdir()?;
    sh::run(Command::new("apt-get").current_dir(work.path()).args([
        "download",
        "-q",
        "prometheus",
    ]))?;
    let deb = std::fs::read_dir(work.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download prometheus left no .deb")?;
    let unpacked = work.path().join("x");
    sh::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    std::fs::copy(unpacked.join("usr/bin/promtool"), PROMTOOL)
        .context("the prometheus package has no usr/bin/promtool")?;
    Ok(Outcome::Changed(format!(
        "extracted {PROMTOOL} from Debian's prometheus package"
    )))
}

fn rust_toolchains() -> Result<Outcome> {
    let mut did = Vec::new();
    let nightly_src = sh::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src")));
    if !nightly_src {
        sh::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        did.push("nightly with rust-src");
    }
    let installed = sh::output(Command::new("rustup").args(["target", "list", "--installed"]))
        .unwrap_or_default();
    for target in ["wasm32-wasip2", "wasm32-unknown-unknown"] {
        if !installed.lines().any(|l| l.trim() == target) {
            sh::run(Command::new("rustup").args(["target", "add", target]))?;
            did.push(target);
        }
    }
    Ok(if did.is_empty() {
        Outcome::AlreadyDone(
            "nightly rust-src, wasm32-wasip2, wasm32-unknown-unknown present".into(),
        )
    } else {
        Outcome::Changed(format!("added {}", did.join(", ")))
    })
}

fn bpf_linker() -> Result<Outcome> {
    if let Some(v) = sh::output(Command::new("bpf-linker").arg("--version")) {
        return Ok(Outcome::AlreadyDone(v.trim().to_string()));
    }
    sh::run(Command::new("cargo").args([
        "install",
        "--locked",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
    ]))?;
    Ok(Outcome::Changed(format!(
        "installed bpf-linker {BPF_LINKER_VERSION}"
    )))
}

fn docker_engine() -> Result<Outcome> {
    let mut did = Vec::new();
    let path = Path::new("/etc/docker/daemon.json");
    let wanted: serde_json::Value = serde_json::from_str(DAEMON_JSON)?;
    let current = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    let config_changed = current.as_ref() != Some(&wanted);
    if config_changed {
        std::fs::create_dir_all("/etc/docker")?;
        std::fs::write(path, serde_json::to_string_pretty(&wanted)?)?;
        did.push(
            "wrote /etc/docker/daemon.json (198.18.0.0/15 networks, userns-remap)".to_string(),
        );
    }
    let running = docker::engine_up();
    if running && config_changed {
        stop_dockerd()?;
        did.push("stopped dockerd to apply the new config".into());
    }
    if !running || config_changed {
        start_dockerd()?;
        did.push(format!("started dockerd (log: {DOCKERD_LOG})"));
    }
    let subnet = docker::bridge_subnet()?;
    if subnet != "198.18.0.0/24" {
        bail!(
            "the running Docker engine's bridge is {subnet}, not 198.18.0.0/24; \
             stop that dockerd and run setup again"
        );
    }
    Ok(if did.is_empty() {
        Outcome::AlreadyDone(format!("running, bridge {subnet}"))
    } else {
        Outcome::Changed(did.join("; "))
    })
}

fn stop_dockerd() -> Result<()> {
    let pid = std::fs::read_to_string("/var/run/docker.pid")
        .context("dockerd runs with an old config but /var/run/docker.pid is missing")?;
    sh::run(Command::new("kill").arg(pid.trim()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while docker::engine_up() || Path::new("/var/run/docker.pid").exists() {
        if Instant::now() > deadline {
            bail!("dockerd (pid {}) did not stop within 30 s", pid.trim());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn start_dockerd() -> Result<()> {
    if let Some(dir) = Path::new(DOCKERD_LOG).parent() {
        std::fs::create_dir_all(dir)?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(DOCKERD_LOG)?;
    println!("  $ dockerd  (in the background, own session)");
    // Its own process group, so that neither Ctrl-C here nor the end of this
    // process takes the engine down with it.
    use std::os::unix::process::CommandExt;
    Command::new("dockerd")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("could not start dockerd (is docker.io installed?)")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !docker::engine_up() {
        if Instant::now() > deadline {
            bail!("dockerd did not answer within 60 s; see {DOCKERD_LOG}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(())
}

fn bpffs() -> Result<Outcome> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        return Ok(Outcome::AlreadyDone("mounted at /sys/fs/bpf".into()));
    }
    sh::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    Ok(Outcome::Changed("mounted bpffs at /sys/fs/bpf".into()))
}

/// Raises the kernel's key quotas to [`docker::KEY_QUOTAS`] where they are
/// lower (never lowers one).
fn key_quotas() -> Result<Outcome> {
    let mut raised = Vec::new();
    for (name, least) in docker::KEY_QUOTAS {
        let path = Path::new("/proc/sys").join(name.replace('.', "/"));
        let now: u64 = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} is not a number", path.display()))?;
        if now < least {
            std::fs::write(&path, least.to_string())
                .with_context(|| format!("raising {name} to {least}"))?;
            raised.push(format!("{name} {now} → {least}"));
        }
    }
    Ok(if raised.is_empty() {
        Outcome::AlreadyDone("kernel.keys.maxkeys and maxbytes are high enough".into())
    } else {
        Outcome::Changed(format!(
            "raised {} (a session keyring per container)",
            raised.join(", ")
        ))
    })
}

fn demo_images() -> Result<Outcome> {
    let built = tidegate_local::images::ensure_demo_images()?;
    Ok(if built.is_empty() {
        Outcome::AlreadyDone("tidegate demo images present".into())
    } else {
        Outcome::Changed(format!("built {}", built.join(", ")))
    })
}
