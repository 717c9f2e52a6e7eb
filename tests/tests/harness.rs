//! The harness proves itself: real etcd, real Docker with the demo images,
//! real netns hosts, and nothing left behind, also when a test dies.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tidegate_lab::docker::{Container, docker, require_engine};
use tidegate_lab::etcd::{EtcdCluster, healthy};
use tidegate_lab::images::{self, DEMO_HTTP, DEMO_HTTP_BODY, DEMO_SSH, DEMO_SSH_PORT, DEMO_TCP};
use tidegate_lab::netns::NetnsHost;
use tidegate_lab::process::{Supervised, pid_alive, wait_until};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The id of the member that leads, asked of a member that is up.
async fn leader_index(cluster: &EtcdCluster, up: &[usize]) -> usize {
    let ep = &cluster.endpoints()[up[0]];
    let mut c = etcd_client::Client::connect([ep], None).await.unwrap();
    let status = c.status().await.unwrap();
    let leader = status.leader();
    for &i in up {
        let mut c = etcd_client::Client::connect([&cluster.endpoints()[i]], None)
            .await
            .unwrap();
        if c.status().await.unwrap().header().unwrap().member_id() == leader {
            return i;
        }
    }
    panic!("no member reports itself as leader {leader:x}");
}

#[test]
fn three_member_etcd_keeps_accepting_writes_after_its_leader_is_killed() {
    let mut cluster = EtcdCluster::start(3).unwrap();
    runtime().block_on(async {
        let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
            .await
            .unwrap();
        client.put("/t/before", "1", None).await.unwrap();
        let leader = leader_index(&cluster, &[0, 1, 2]).await;
        let pid = cluster.process(leader).unwrap().pid();
        cluster.kill_member(leader).unwrap();
        assert!(!pid_alive(pid), "etcd pid {pid} survived SIGKILL");
        let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();

        // A client of the survivors only: the write needs a new leader elected.
        let eps: Vec<String> = survivors
            .iter()
            .map(|&i| cluster.endpoints()[i].clone())
            .collect();
        let mut client = etcd_client::Client::connect(&eps, None).await.unwrap();
        let mut written = false;
        for _ in 0..100 {
            if client.put("/t/after", "2", None).await.is_ok() {
                written = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            written,
            "no write accepted by the 2 surviving members within 10 s"
        );
        let new_leader = leader_index(&cluster, &survivors).await;
        assert_ne!(new_leader, leader);

        // The killed member comes back from its data dir and catches up.
        cluster.restart_member(leader).unwrap();
        cluster.wait_healthy(leader).unwrap();
        let mut c = etcd_client::Client::connect([&cluster.endpoints()[leader]], None)
            .await
            .unwrap();
        let got = c.get("/t/after", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"2");
    });
}

#[test]
fn a_replaced_etcd_member_rejoins_empty_under_a_new_id_and_catches_up() {
    let mut cluster = EtcdCluster::start(3).unwrap();
    runtime().block_on(async {
        let mut client = etcd_client::Client::connect(cluster.endpoints(), None)
            .await
            .unwrap();
        client.put("/t/before", "1", None).await.unwrap();
        let leader = leader_index(&cluster, &[0, 1, 2]).await;
        let follower = (leader + 1) % 3;
        let old_id = cluster.member_id(follower).unwrap();
        let old_pid = cluster.process(follower).unwrap().pid();
        let new_id = cluster.replace_member(follower).unwrap();
        assert!(
            !pid_alive(old_pid),
            "the replaced member {old_pid} still runs"
        );
        assert_ne!(new_id, old_id, "a replaced member must get a new id");
        cluster.wait_healthy(follower).unwrap();
        // Written after the replacement (through the members that stayed:
        // the first client's connection to the replaced one is broken),
        // it reaches the new member through raft.
        let survivors: Vec<String> = (0..3)
            .filter(|&i| i != follower)
            .map(|i| cluster.endpoints()[i].clone())
            .collect();
        let mut client = etcd_client::Client::connect(&survivors, None)
            .await
            .unwrap();
        client.put("/t/after", "2", None).await.unwrap();
        let mut c = etcd_client::Client::connect([&cluster.endpoints()[follower]], None)
            .await
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..100 {
            // Serializable: answered from the new member's own store.
            let opts = etcd_client::GetOptions::new()
                .with_prefix()
                .with_serializable();
            seen = c
                .get("/t/", Some(opts))
                .await
                .map(|r| r.kvs().iter().map(|kv| kv.value().to_vec()).collect())
                .unwrap_or_default();
            if seen.len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen, vec![b"2".to_vec(), b"1".to_vec()]);
        let members = client.member_list().await.unwrap();
        assert_eq!(members.members().len(), 3, "remove + add keeps 3 members");
    });
}

#[test]
fn etcd_is_removed_on_drop_and_on_panic() {
    let cluster = EtcdCluster::start(1).unwrap();
    let pid = cluster.process(0).unwrap().pid();
    let dir = cluster.members()[0].data_dir.clone();
    let addr = cluster.members()[0].client_addr();
    assert!(healthy(addr) && dir.exists());
    drop(cluster);
    assert!(!pid_alive(pid), "etcd {pid} alive after drop");
    assert!(!dir.exists(), "{} left behind", dir.display());

    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let cluster = EtcdCluster::start(1).unwrap();
        tx.send((
            cluster.process(0).unwrap().pid(),
            cluster.members()[0].data_dir.clone(),
        ))
        .unwrap();
        panic!("a failing test");
    })
    .join();
    assert!(result.is_err());
    let (pid, dir) = rx.recv().unwrap();
    assert!(!pid_alive(pid), "etcd {pid} alive after a panic");
    assert!(!dir.exists());
}

/// Run by `a_killed_test_process_leaves_no_child_behind` as a separate
/// process: starts a supervised `sleep`, prints its pid, waits to be killed.
#[test]
#[ignore = "helper, started by another test"]
fn helper_parent_that_gets_killed() {
    let Some(log) = std::env::var_os("TIDEGATE_HELPER_LOG") else {
        return;
    };
    let log = std::path::PathBuf::from(log);
    let child = Supervised::spawn("sleep", "sleep", &["600".into()], &log).unwrap();
    println!("CHILD {}", child.pid());
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_killed_test_process_leaves_no_child_behind() {
    let exe = std::env::current_exe().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let mut parent = Command::new(exe)
        .args([
            "--exact",
            "helper_parent_that_gets_killed",
            "--ignored",
            "--nocapture",
        ])
        .env("TIDEGATE_HELPER_LOG", logs.path().join("child.log"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = parent.stdout.take().unwrap();
    let child: u32 = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("CHILD ").map(|p| p.trim().parse().unwrap()))
        .expect("helper printed no child pid");
    assert!(pid_alive(child));
    parent.kill().unwrap(); // SIGKILL: no destructor runs in the helper
    parent.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || !pid_alive(child)),
        "child {child} outlived its SIGKILLed parent"
    );
}

fn curl(url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Retries `f` for up to 10 s while a freshly started server comes up.
fn eventually<T>(mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no answer within 10 s");
}

#[test]
fn demo_images_run_and_answer_real_clients() {
    require_engine().unwrap();
    images::ensure_demo_images().unwrap();

    let web = Container::run(&["-e", "FLAG=flag{harness}", DEMO_HTTP]).unwrap();
    let ip = web.ip().unwrap();
    let (code, body) =
        eventually(|| Some(curl(&format!("http://{ip}:8080/"))).filter(|(c, _)| *c == 200));
    assert_eq!(code, 200);
    assert!(body.contains(DEMO_HTTP_BODY), "{body}");
    let (_, flag) = curl(&format!("http://{ip}:8080/cgi-bin/flag"));
    assert_eq!(flag.trim(), "flag{harness}");

    let echo = Container::run(&[DEMO_TCP]).unwrap();
    let ip = echo.ip().unwrap();
    let reply = eventually(|| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf 'hello tidegate\\n' | ncat -w 3 {ip} 1337"))
            .output()
            .ok()?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        (!s.is_empty()).then_some(s)
    });
    assert_eq!(
        reply,
        "hello tidegate\n",
        "echo container log: {}",
        echo.logs()
    );

    let keydir = tempfile::tempdir().unwrap();
    let (key, public) = tidegate_lab::images::ssh_keypair(keydir.path()).unwrap();
    let ssh = Container::run(&["-e", &format!("AUTHORIZED_KEY={public}"), DEMO_SSH]).unwrap();
    let ip = ssh.ip().unwrap();
    let out = eventually(|| {
        let out = tidegate_lab::images::ssh_command(
            &key,
            &ip.to_string(),
            DEMO_SSH_PORT,
            "echo ssh-says-hi; cat /proc/1/cmdline | tr '\\0' ' '",
        )
        .output()
        .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert!(out.starts_with("ssh-says-hi\n"), "{out}");
    assert!(out.contains("dropbear"), "{out}");

    // The guards remove their containers.
    let ids = [
        web.id().to_string(),
        echo.id().to_string(),
        ssh.id().to_string(),
    ];
    drop((web, echo, ssh));
    for id in ids {
        assert!(
            docker(&["inspect", &id]).is_err(),
            "container {id} left behind"
        );
    }
}

#[test]
fn netns_hosts_are_reachable_and_removed() {
    let a = NetnsHost::create().unwrap();
    let b = NetnsHost::create().unwrap();
    assert_ne!(a.addr(), b.addr());
    for host in [&a, &b] {
        let octets = host.addr().octets();
        assert_eq!(
            (octets[0], octets[1] & 0xfe),
            (198, 18),
            "{} outside 198.18.0.0/15",
            host.addr()
        );
    }
    // A server inside `a` answers a client on this side.
    let log = tempfile::NamedTempFile::new().unwrap();
    let addr = a.addr().to_string();
    let server = Supervised::spawn(
        "ncat",
        "ip",
        &[
            "netns",
            "exec",
            a.name(),
            "ncat",
            "-l",
            &addr,
            "9000",
            "-c",
            "echo from-netns",
        ]
        .map(String::from),
        log.path(),
    )
    .unwrap();
    let reply = eventually(|| {
        let out = Command::new("ncat")
            .args(["--recv-only", "-w", "2", &addr, "9000"])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        (!s.is_empty()).then_some(s)
    });
    assert_eq!(reply.trim(), "from-netns");
    drop(server);

    let names = [a.name().to_string(), b.name().to_string()];
    drop((a, b));
    let list = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for name in names {
        assert!(
            !list.split_whitespace().any(|w| w == name),
            "netns {name} left behind: {list}"
        );
    }
}
