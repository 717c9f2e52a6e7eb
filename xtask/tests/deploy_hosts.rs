//! `cargo xtask deploy --inventory`: three hosts (network namespaces, each
//! running dropbear as its sshd and given a directory as its root) get a
//! whole cluster from nothing over SSH: etcd with TLS and auth, two
//! controllers, three agents. The demo instances answer through every host;
//! a second run changes nothing; `--down --purge` leaves nothing running.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tidegate_local::netns::{NetnsHost, Routed};
use tidegate_local::process::Supervised;
use tidegate_schema::{Keyspace, Kind};

const XTASK: &str = env!("CARGO_BIN_EXE_xtask");

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `cargo xtask deploy --inventory <inv> <args>` with the test's (dev)
/// binaries, or with `TIDEGATE_DEPLOY_PROFILE=release` building and
/// shipping release ones as in production.
fn deploy(inventory: &Path, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(XTASK);
    cmd.args(["deploy", "--inventory"]).arg(inventory);
    match std::env::var("TIDEGATE_DEPLOY_PROFILE") {
        Ok(profile) => cmd.args(["--profile", &profile]),
        Err(_) => cmd
            .args(["--profile", "dev"])
            .env("TIDEGATE_PREBUILT", prebuilt(inventory)),
    };
    let out = cmd.args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("--- deploy {args:?} ---\n{text}");
    (out.status.success(), text)
}

/// A copy of the test build's daemons beside the inventory, made once: other
/// tests may rebuild target/debug while this one runs, and a changed binary
/// would make the no-op run copy it again.
fn prebuilt(inventory: &Path) -> PathBuf {
    let dir = inventory.with_file_name("bin");
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let built = Path::new(XTASK).parent().unwrap();
        for name in ["tidegate-controller", "tidegate-agent", "tidegate"] {
            std::fs::copy(built.join(name), dir.join(name)).unwrap();
        }
    }
    dir
}

/// Watches, while a deploy runs, every process's command line for the
/// cluster's secrets (once `secrets.toml` exists) and the hosts'
/// `/etc/tidegate` for secret files others could read (a file being
/// written must be its owner's alone).
struct SecretWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl SecretWatch {
    fn start(secrets: PathBuf, dirs: Vec<PathBuf>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut looks, mut leaks) = (0, std::collections::BTreeSet::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let values: Vec<(String, String)> = std::fs::read_to_string(&secrets)
                    .ok()
                    .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
                    .map(|t| {
                        t.into_iter()
                            .filter_map(|(k, v)| Some((k, v.as_str()?.to_string())))
                            .filter(|(_, v)| v.len() >= 16)
                            .collect()
                    })
                    .unwrap_or_default();
                for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                        continue;
                    };
                    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                    for (name, value) in &values {
                        if cmdline.contains(value.as_str()) {
                            let argv0 = cmdline.split(' ').next().unwrap_or("");
                            leaks.insert(format!("{name} in the argv of {argv0}"));
                        }
                    }
                }
                for dir in &dirs {
                    open_files(dir, &mut leaks);
                }
                looks += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            (looks, leaks.into_iter().collect())
        });
        Self { stop, thread }
    }

    /// How many times it looked, and what leaked.
    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Files under `dir` that others may read, also while being written
/// (`*.deploy-tmp`): every one may hold a secret but certificates and
/// etcd's member config (names, addresses and paths).
fn open_files(dir: &Path, leaks: &mut std::collections::BTreeSet<String>) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            open_files(&path, leaks);
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let name = name.trim_end_matches(".deploy-tmp");
        let mode = meta.permissions().mode() & 0o777;
        let public = (name.ends_with(".pem") && !name.contains("-key")) || name == "etcd.yml";
        if mode & 0o007 != 0 && !public {
            leaks.insert(format!("{} was {mode:o}", path.display()));
        }
    }
}

/// A test host with an sshd that lets the test's key in as root. The
/// authorized key lives in a home directory mounted over /root in the
/// sshd's own mount namespace, so the machine's /root is never touched.
struct SshHost {
    net: NetnsHost,
    name: String,
    root: PathBuf,
    _sshd: Supervised,
}

fn ssh_host(name: &str, dir: &Path, public_key: &str) -> SshHost {
    let net = NetnsHost::create().unwrap();
    let home = dir.join(format!("{name}-home"));
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(home.join(".ssh/authorized_keys"), public_key).unwrap();
    run(Command::new("chmod").args(["-R", "go-rwx"]).arg(&home));
    let host_key = dir.join(format!("{name}-hostkey"));
    run(Command::new("dropbearkey")
        .args(["-t", "ed25519", "-f"])
        .arg(&host_key));
    let script = format!(
        "mount --bind {home} /root && exec dropbear -F -E -s -p {addr}:22 -r {key} -P {pid}",
        home = home.display(),
        addr = net.addr(),
        key = host_key.display(),
        pid = dir.join(format!("{name}-dropbear.pid")).display(),
    );
    let args: Vec<String> = [
        "netns",
        "exec",
        net.name(),
        "unshare",
        "--mount",
        "sh",
        "-c",
        &script,
    ]
    .map(String::from)
    .to_vec();
    let sshd = Supervised::spawn(
        &format!("sshd-{name}"),
        "ip",
        &args,
        &dir.join(format!("{name}-dropbear.log")),
    )
    .unwrap();
    let addr = std::net::SocketAddr::from((net.addr(), 22));
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
    assert!(up, "dropbear on {addr}: {}", sshd.log_tail(20));
    let root = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(&root).unwrap();
    SshHost {
        net,
        name: name.to_string(),
        root,
        _sshd: sshd,
    }
}

/// The pid in a host's pidfile of `service`, if it runs.
fn service_pid(h: &SshHost, service: &str) -> Option<u32> {
    let text = std::fs::read_to_string(h.root.join(format!("run/tidegate/{service}.pid"))).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

const SERVICES: [&str; 3] = ["tidegate-etcd", "tidegate-controller", "tidegate-agent"];

/// Ends whatever the deploy started, even when the test failed half-way,
/// and removes the agents' containers.
struct Cleanup<'a> {
    hosts: &'a [SshHost],
    workers: Vec<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for h in self.hosts {
            for s in SERVICES {
                if let Some(pid) = service_pid(h, s) {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
        for w in &self.workers {
            let ids = Command::new("docker")
                .args([
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=tidegate.worker={w}"),
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            for id in ids.split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
    }
}

/// One HTTP/1.0 GET with a Host header: (status, body).
fn get(addr: &str, host: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "--max-time", "5", "-H", &format!("Host: {host}")]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    cmd.args(["-w", "\n%{http_code}", &format!("http://{addr}{path}")]);
    let out = String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn post(addr: &str, path: &str, token: &str, body: &str) -> serde_json::Value {
    let out = run(Command::new("curl").args([
        "-s",
        "--max-time",
        "10",
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-H",
        "Content-Type: application/json",
        "-d",
        body,
        &format!("http://{addr}{path}"),
    ]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{path}: {e}: {out}"))
}

/// A line echoed through `addr`.
fn echo(addr: std::net::SocketAddr) -> bool {
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    if s.write_all(b"hello tidegate\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line == "hello tidegate\n"
}

/// `cmd` (an etcdctl) against `endpoint` with `dir`'s ca.pem and the given
/// client certificate and key from `dir`.
fn etcdctl(mut cmd: Command, endpoint: &str, dir: &Path, (cert, key): (&str, &str)) -> Command {
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg(format!("--cacert={}", dir.join("ca.pem").display()))
        .arg(format!("--cert={}", dir.join(cert).display()))
        .arg(format!("--key={}", dir.join(key).display()));
    cmd
}

fn eventually(secs: u64, mut ok: impl FnMut() -> bool) -> bool {
    (0..secs * 4).any(|_| {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
        false
    })
}

#[test]
fn an_inventory_of_three_ssh_hosts_becomes_a_working_cluster_and_a_second_run_is_a_no_op() {
    let dir = tempfile::Builder::new()
        .prefix("tidegate-deploy-")
        .tempdir()
        .unwrap();
    let key = dir.path().join("id_ed25519");
    run(Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "tidegate-deploy-test",
            "-f",
        ])
        .arg(&key));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    // Agents in the namespaces reach their containers through this machine.
    let _routed = Routed::enable().unwrap();
    let pid = std::process::id();
    let hosts: Vec<SshHost> = ["a", "b", "c"]
        .iter()
        .map(|n| ssh_host(&format!("d{pid}{n}"), dir.path(), &public))
        .collect();
    let _cleanup = Cleanup {
        hosts: &hosts,
        workers: hosts.iter().map(|h| h.name.clone()).collect(),
    };
    let mut inventory = format!(
        "name = \"deploy-test\"\ndomain = \"ctf.test\"\ninit = \"direct\"\n# The hosts share this machine's Docker engine from namespaces of their own.\nallow_host_access = true\nartifact_dir = {:?}\n\n[ssh]\nidentity = {:?}\noptions = [\"-o\", \"StrictHostKeyChecking=no\", \"-o\", \"UserKnownHostsFile=/dev/null\", \"-o\", \"LogLevel=ERROR\"]\n",
        dir.path().join("artifacts").display().to_string(),
        key.display().to_string(),
    );
    for (i, h) in hosts.iter().enumerate() {
        // All three run etcd and an agent (one zone each); a and b a controller.
        let roles = if i < 2 {
            "[\"etcd\", \"controller\", \"agent\"]"
        } else {
            "[\"etcd\", \"agent\"]"
        };
        inventory.push_str(&format!(
            "\n[[host]]\nname = {:?}\naddress = \"{}\"\nzone = \"zone-{i}\"\nroles = {roles}\nroot = {:?}\n",
            h.name,
            h.net.addr(),
            h.root.display().to_string(),
        ));
    }
    let inv = dir.path().join("inventory.toml");
    std::fs::write(&inv, &inventory).unwrap();

    // The dry run says what it would do and does nothing.
    let (ok, out) = deploy(&inv, &["--dry-run"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("would start or restart (if its files changed) tidegate-etcd on"),
        "{out}"
    );
    assert!(out.contains("would enable etcd auth: users root"), "{out}");
    assert!(
        hosts
            .iter()
            .all(|h| SERVICES.iter().all(|s| service_pid(h, s).is_none())),
        "the dry run started something"
    );
    assert!(
        !dir.path().join(".deploy-test.deploy").exists(),
        "the dry run wrote state"
    );

    // From nothing, watched: no secret in any process's argv (local or
    // the hosts'), no secret file open to others at any moment.
    let watcher = SecretWatch::start(
        dir.path().join(".deploy-test.deploy/secrets.toml"),
        hosts.iter().map(|h| h.root.join("etc/tidegate")).collect(),
    );
    let (ok, out) = deploy(&inv, &[]);
    let (looks, leaks) = watcher.stop();
    assert!(ok, "{out}");
    assert!(looks > 10, "the secret watch looked only {looks} times");
    assert!(
        leaks.is_empty(),
        "secrets leaked during the deploy:\n{}",
        leaks.join("\n")
    );
    // Every agent host's engine is told to remap container root.
    for h in &hosts {
        let json =
            std::fs::read_to_string(h.root.join("etc/docker/daemon.json")).unwrap_or_default();
        assert!(
            json.contains("\"userns-remap\": \"default\""),
            "{}: daemon.json {json:?}",
            h.name
        );
    }
    for h in &hosts {
        assert!(
            service_pid(h, "tidegate-etcd").is_some(),
            "{}: no etcd",
            h.name
        );
        assert!(
            service_pid(h, "tidegate-agent").is_some(),
            "{}: no agent",
            h.name
        );
    }
    let secrets: toml::Value = toml::from_str(
        &std::fs::read_to_string(dir.path().join(".deploy-test.deploy/secrets.toml")).unwrap(),
    )
    .unwrap();
    let platform = secrets["platform_token"].as_str().unwrap().to_string();
    let admin = secrets["admin_token"].as_str().unwrap().to_string();
    let api = format!("{}:7080", hosts[0].net.addr());

    // etcd speaks only TLS, and with auth on, a client certificate without
    // the right user cannot read tidegate's keys.
    let pki = dir.path().join(".deploy-test.deploy/pki");
    let etcd0 = format!("https://{}:2379", hosts[0].net.addr());
    let keys = Keyspace::default();
    let plain = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints=http://{}:2379", hosts[0].net.addr()),
            "--command-timeout=3s",
            "get",
            &keys.root_prefix(),
            "--prefix",
            "--keys-only",
        ])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "etcd answered plain HTTP");
    // Each agent is its worker's own etcd user (here by its certificate's
    // CN): it reads what routing needs, not another worker's secrets, and
    // writes nothing of the scheduler's.
    let as_user = |user: &str, args: &[&str]| {
        let (cert, key) = (
            format!("client-{user}.pem"),
            format!("client-{user}-key.pem"),
        );
        etcdctl(Command::new("etcdctl"), &etcd0, &pki, (&cert, &key))
            .args(args)
            .output()
            .unwrap()
    };
    let worker_a = format!("tidegate-worker-{}", hosts[0].name);
    let as_a = |args: &[&str]| as_user(&worker_a, args);
    let denied = as_a(&["user", "list"]);
    assert!(
        !denied.status.success(),
        "a worker's certificate may list etcd users: auth is off"
    );
    let workers = keys.prefix(Kind::Workers);
    let allowed = as_a(&["get", &workers, "--prefix", "--keys-only"]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&allowed.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .count(),
        3
    );
    let others = format!("{}{}/", keys.prefix(Kind::Secrets), hosts[1].name);
    for args in [
        vec!["get", others.as_str(), "--prefix"],
        vec!["put", "/tidegate/instances/00000000aa", "{}"],
        vec!["put", "/tidegate/challenges/demo-http", "{}"],
    ] {
        let out = as_a(&args);
        assert!(
            !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("permission denied"),
            "worker a may {args:?}"
        );
    }
    // No user is left that every agent shares.
    let listed = as_user("root", &["user", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(!listed.lines().any(|l| l == "tidegate-agent"), "{listed}");
    for h in &hosts {
        let user = format!("tidegate-worker-{}", h.name);
        assert!(listed.lines().any(|l| l == user), "{listed}");
    }

    // The backup timer's snapshot works on a member, through its loopback
    // listener with the root certificate (deploy/etcd/tidegate-etcd-backup.service).
    let snapshot = dir.path().join("backup.db");
    let root_pki = hosts[0].root.join("etc/tidegate/pki");
    let saved = etcdctl(
        hosts[0].net.command("etcdctl"),
        "https://127.0.0.1:2379",
        &root_pki,
        ("etcd-root.pem", "etcd-root-key.pem"),
    )
    .args(["snapshot", "save"])
    .arg(&snapshot)
    .output()
    .unwrap();
    assert!(
        saved.status.success() && snapshot.exists(),
        "{}",
        String::from_utf8_lossy(&saved.stderr)
    );

    // The demo instances answer through every host.
    let web = post(
        &api,
        "/v1/instances",
        &platform,
        r#"{"challenge": "demo-http", "team": "red"}"#,
    );
    let hostname = web["http"][0]["hostname"]
        .as_str()
        .unwrap_or_else(|| panic!("{web}"))
        .to_string();
    let tcp = post(
        &api,
        "/v1/instances",
        &platform,
        r#"{"challenge": "demo-tcp", "team": "red"}"#,
    );
    let port = tcp["tcp"][0]["port"]
        .as_u64()
        .unwrap_or_else(|| panic!("{tcp}")) as u16;
    for h in &hosts {
        let entry = format!("{}:80", h.net.addr());
        assert!(
            eventually(60, || {
                let (s, body) = get(&entry, &hostname, "/", None);
                s == 200 && body.contains("tidegate demo-http")
            }),
            "demo-http through {}: {:?}",
            h.name,
            get(&entry, &hostname, "/", None)
        );
        assert!(
            eventually(30, || echo(std::net::SocketAddr::from((
                h.net.addr(),
                port
            )))),
            "demo-tcp through {} port {port}",
            h.name
        );
    }
    // Every daemon serves its metrics; the dashboard data has the instance.
    for h in &hosts {
        let (s, body) = get(&format!("{}:9464", h.net.addr()), "x", "/metrics", None);
        assert!(
            s == 200 && body.contains("tidegate_agent_etcd_rtt_seconds_count"),
            "{}: {s}",
            h.name
        );
        // The agent runs with only CAP_BPF, CAP_NET_ADMIN and
        // CAP_NET_BIND_SERVICE (the unit's set) and still steers TCP by eBPF.
        assert!(
            body.contains("tidegate_tcp_ebpf_steering 1"),
            "{}: eBPF did not load",
            h.name
        );
    }
    let (s, body) = get(&api, "x", "/v1/dashboard", Some(&admin));
    assert!(s == 200 && body.contains(&hostname), "{s} {body}");

    // A second run: every file unchanged, every service left alone.
    let before: Vec<Option<u32>> = hosts
        .iter()
        .flat_map(|h| SERVICES.map(|s| service_pid(h, s)))
        .collect();
    let (ok, out) = deploy(&inv, &[]);
    assert!(ok, "{out}");
    assert!(out.contains(": 0 file(s) written"), "{out}");
    assert!(
        out.contains("0 service(s) (re)started, 8 already running; 0 other change(s);"),
        "{out}"
    );
    assert!(out.contains("deploy deploy-test: nothing changed"), "{out}");
    let after: Vec<Option<u32>> = hosts
        .iter()
        .flat_map(|h| SERVICES.map(|s| service_pid(h, s)))
        .collect();
    assert_eq!(before, after, "the second run restarted something");

    // Changed configs restart exactly those services, one host after the
    // other: the next restarts only once the previous is back.
    for h in &hosts[1..] {
        let agent_toml = h.root.join("etc/tidegate/agent.toml");
        let mut text = std::fs::read_to_string(&agent_toml).unwrap();
        text.push_str("# edited by hand\n");
        std::fs::write(&agent_toml, text).unwrap();
    }
    // An etcd user no daemon runs as any more (the agents' shared user of
    // earlier releases, a worker taken out of the inventory) is deleted
    // once every agent runs as its own.
    for user in ["tidegate-agent", "tidegate-worker-gone"] {
        let mut add = etcdctl(
            Command::new("etcdctl"),
            &etcd0,
            &pki,
            ("client-root.pem", "client-root-key.pem"),
        );
        let added = add
            .args(["user", "add", user, "--interactive=false"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().unwrap().write_all(b"old-password\n")?;
                child.wait()
            })
            .unwrap();
        assert!(added.success(), "adding {user}");
    }
    let (ok, out) = deploy(&inv, &[]);
    assert!(ok, "{out}");
    assert!(
        out.contains("etcd: deleted users no daemon runs as: tidegate-agent, tidegate-worker-gone"),
        "{out}"
    );
    let listed = as_user("root", &["user", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        !listed.contains("tidegate-agent") && !listed.contains("tidegate-worker-gone"),
        "{listed}"
    );
    assert!(out.contains(": 2 file(s) written"), "{out}");
    let steps: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("tidegate-agent restarted") || l.contains("tidegate-agent back"))
        .collect();
    let (b, c) = (&hosts[1].name, &hosts[2].name);
    assert_eq!(steps.len(), 4, "{out}");
    for (line, (host, what)) in
        steps
            .iter()
            .zip([(b, "restarted"), (b, "back"), (c, "restarted"), (c, "back")])
    {
        assert!(
            line.contains(host.as_str()) && line.contains(what),
            "{line:?} in:\n{out}"
        );
    }
    let again: Vec<Option<u32>> = hosts
        .iter()
        .flat_map(|h| SERVICES.map(|s| service_pid(h, s)))
        .collect();
    let moved: Vec<usize> = (0..before.len())
        .filter(|i| before[*i] != again[*i])
        .collect();
    assert_eq!(
        moved,
        [5, 8],
        "only the agents of b and c should restart: {before:?} → {again:?}"
    );

    // Down and purge: nothing runs, nothing is left in the hosts' roots.
    let (ok, out) = deploy(&inv, &["--down", "--purge"]);
    assert!(ok, "{out}");
    for h in &hosts {
        for s in SERVICES {
            assert_eq!(service_pid(h, s), None, "{} {s} still runs", h.name);
        }
        assert!(!h.root.join("etc/tidegate").exists());
        assert!(!h.root.join("var/lib/tidegate/etcd").exists());
    }
}
