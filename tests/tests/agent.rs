//! The agent against real Docker, real etcd and a real controller: hardened
//! containers, lease expiry, restart adoption, orphans, resync after
//! compaction, hostile records, network isolation, fencing, crash loops and
//! missing images.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Client, CompactionOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::daemons::{ADMIN, Agent, Controller, eventually, web_spec};
use tidegate_lab::docker::docker;
use tidegate_lab::etcd::EtcdCluster;
use tidegate_lab::images::{DEMO_EXIT, DEMO_SILENT, DEMO_SOLVER, ensure_demo_images};
use tidegate_lab::keys;
use tidegate_lab::netns::NetnsHost;
use tidegate_lab::process::Supervised;
use tidegate_schema::config::{AgentConfig, ConfigFile, ControllerConfig};

/// etcd, a controller, one agent; everything removed on drop (containers
/// included, also the ones a test leaves).
struct Cluster {
    agent: Option<Agent>,
    controller: Controller,
    client: Client,
    _etcd: EtcdCluster,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drop(self.agent.take());
        if let Ok(containers) = worker_containers(&worker()) {
            for id in containers {
                let _ = docker(&["rm", "-f", "-v", &id]);
            }
        }
    }
}

fn worker_containers(worker: &str) -> tidegate_lab::Result<Vec<String>> {
    let filter = format!("label=tidegate.worker={worker}");
    Ok(docker(&["ps", "-aq", "--no-trunc", "--filter", &filter])?
        .lines()
        .map(String::from)
        .collect())
}

/// The worker id of this test process (several test processes share one Docker engine).
fn worker() -> String {
    format!("worker-a-{}", std::process::id())
}

async fn cluster(configure: impl FnOnce(&mut AgentConfig)) -> Cluster {
    cluster_with(configure, |_| {}).await
}

/// As [`cluster`], the controller's settings changed by `controller`.
async fn cluster_with(
    configure: impl FnOnce(&mut AgentConfig),
    controller: impl FnOnce(&mut ControllerConfig),
) -> Cluster {
    ensure_demo_images().unwrap();
    let etcd = EtcdCluster::start(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let controller = Controller::start_on(&etcd, "c1", dir.path(), None, controller).await;
    let client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let agent = Agent::start(&etcd, &worker(), dir.path(), configure).await;
    assert!(eventually(10, || controller.is_leader()).await);
    assert!(
        eventually(10, || async {
            controller
                .call(Method::GET, "/v1/workers", None, None)
                .await
                .1["workers"][0]["id"]
                == worker().as_str()
        })
        .await,
        "the agent never registered"
    );
    Cluster {
        agent: Some(agent),
        controller,
        client,
        _etcd: etcd,
        dir,
    }
}

impl Cluster {
    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    async fn spawn(&self, challenge: &str, team: &str) -> String {
        let (s, body) = self.controller.spawn(challenge, team).await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    async fn status(&self, id: &str) -> Value {
        self.controller
            .call(Method::GET, &format!("/v1/instances/{id}"), None, None)
            .await
            .1["status"]
            .clone()
    }

    async fn wait_status(&self, id: &str, want: &str) {
        let ok = eventually(30, || async {
            self.status(id)
                .await
                .as_str()
                .is_some_and(|s| s.starts_with(want))
        })
        .await;
        assert!(
            ok,
            "instance {id} never reached {want:?}: {}\n{}",
            self.status(id).await,
            self.agent().proc.log_tail(20)
        );
    }

    /// The instance's record as etcd holds it.
    async fn record(&self, id: &str) -> Value {
        let rec = self
            .client
            .clone()
            .get(keys::instance(id), None)
            .await
            .unwrap();
        serde_json::from_slice(rec.kvs()[0].value()).unwrap()
    }

    /// The container id and address the agent reported for an instance.
    /// The status record the instance's owner wrote (Null before one).
    async fn status_record(&self, id: &str) -> Value {
        let worker = self.record(id).await["worker"]
            .as_str()
            .unwrap()
            .to_string();
        let resp = self
            .client
            .clone()
            .get(keys::status(&worker, id), None)
            .await
            .unwrap();
        resp.kvs().first().map_or(Value::Null, |kv| {
            serde_json::from_slice(kv.value()).unwrap()
        })
    }

    async fn reported(&self, id: &str) -> (String, String) {
        let ep = self.status_record(id).await;
        (
            ep["container_id"].as_str().unwrap().to_string(),
            ep["address"].as_str().unwrap_or_default().to_string(),
        )
    }
}

fn inspect(container: &str, format: &str) -> String {
    docker(&["inspect", "--format", format, container]).unwrap()
}

fn gone(container: &str) -> bool {
    docker(&["inspect", container]).is_err()
}

async fn wait_gone(container: &str) -> bool {
    eventually(15, || async { gone(container) }).await
}

#[tokio::test]
async fn a_spawned_instance_runs_hardened_with_no_published_ports_and_is_removed_on_delete() {
    let c = cluster(|_| {}).await;
    let mut spec = web_spec();
    spec["limits"] = json!({"memory_mib": 64, "cpus": 0.25, "pids": 32});
    spec["env"] = json!({"MODE": "test"});
    c.controller.put_challenge("web", spec).await;
    let id = c.spawn("web", "team-1").await;
    c.wait_status(&id, "running").await;
    let (container, address) = c.reported(&id).await;

    let labels: Value =
        serde_json::from_str(&inspect(&container, "{{json .Config.Labels}}")).unwrap();
    assert_eq!(labels["tidegate.instance"], id.as_str());
    assert_eq!(labels["tidegate.challenge"], "web");
    assert_eq!(labels["tidegate.team"], "team-1");
    assert_eq!(
        inspect(&container, "{{json .HostConfig.CapDrop}}"),
        r#"["ALL"]"#
    );
    assert_eq!(
        inspect(&container, "{{json .HostConfig.SecurityOpt}}"),
        r#"["no-new-privileges"]"#
    );
    assert_eq!(
        inspect(&container, "{{.HostConfig.Memory}}"),
        (64 * 1024 * 1024).to_string()
    );
    assert_eq!(inspect(&container, "{{.HostConfig.NanoCpus}}"), "250000000");
    assert_eq!(inspect(&container, "{{.HostConfig.PidsLimit}}"), "32");
    // Bounded by default: read-only root, /tmp of 64 MiB, 8 MiB of log in
    // two files, nofile and nproc.
    assert_eq!(
        inspect(&container, "{{.HostConfig.ReadonlyRootfs}}"),
        "true"
    );
    let tmpfs: Value =
        serde_json::from_str(&inspect(&container, "{{json .HostConfig.Tmpfs}}")).unwrap();
    assert_eq!(tmpfs["/tmp"], "rw,nosuid,nodev,size=64m,mode=1777");
    assert_eq!(
        inspect(&container, "{{json .HostConfig.LogConfig}}"),
        r#"{"Type":"json-file","Config":{"max-file":"2","max-size":"4096k"}}"#
    );
    let ulimits = inspect(&container, "{{json .HostConfig.Ulimits}}");
    assert!(
        ulimits.contains(r#"{"Name":"nofile","Hard":1024,"Soft":1024}"#)
            && ulimits.contains(r#"{"Name":"nproc","Hard":256,"Soft":256}"#),
        "{ulimits}"
    );
    assert_eq!(
        inspect(&container, "{{.HostConfig.NetworkMode}}"),
        "tidegate-isolated"
    );
    let ports = inspect(&container, "{{json .NetworkSettings.Ports}}");
    assert!(!ports.contains("HostPort"), "published ports: {ports}");
    let env = inspect(&container, "{{json .Config.Env}}");
    assert!(env.contains("\"MODE=test\""), "{env}");

    // The agent reaches the container; the page shows the instance's flag,
    // which the agent read from the secret only it may read (not from the
    // record, which every worker reads).
    let rec = c.record(&id).await;
    assert!(rec.get("flag").is_none(), "{rec}");
    let worker = rec["worker"].as_str().unwrap();
    let secret = c
        .client
        .clone()
        .get(keys::secret(worker, &id), None)
        .await
        .unwrap();
    let flag = serde_json::from_slice::<Value>(secret.kvs()[0].value()).unwrap()["flag"]
        .as_str()
        .unwrap()
        .to_string();
    let page = reqwest::get(format!("http://{address}:8080/cgi-bin/flag"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(page.trim(), flag);

    let (s, _) = c
        .controller
        .call(Method::DELETE, &format!("/v1/instances/{id}"), None, None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(
        wait_gone(&container).await,
        "container {container} survived the delete"
    );
    assert!(
        c.agent()
            .metric("tidegate_agent_reconcile_seconds_count")
            .await
            .unwrap()
            >= 1.0
    );
}

#[tokio::test]
async fn lease_expiry_with_no_controller_removes_the_container() {
    let c = cluster(|_| {}).await;
    c.controller.put_challenge("web", web_spec()).await;
    let challenge = tidegate_controller::Challenges::new(
        c.client.clone(),
        tidegate_schema::Keyspace::default(),
    )
    .get(&tidegate_schema::ChallengeName::parse("web").unwrap())
    .await
    .unwrap()
    .value;
    // Stop the controller, then schedule by hand with a 3 s lifetime.
    c.controller.proc.signal("KILL").unwrap();
    let lead =
        tidegate_controller::campaign(&c.client, &tidegate_schema::Keyspace::default(), "test", 5)
            .await
            .unwrap();
    let plan = tidegate_controller::SpawnPlan {
        keys: tidegate_schema::Keyspace::default(),
        leader_key: lead.key.clone(),
        token: lead.token,
        challenge,
        team: tidegate_schema::TeamId::parse("t1").unwrap(),
        worker: tidegate_schema::WorkerId::parse(&worker()).unwrap(),
        domain: "ctf.localhost".into(),
        tcp_ports: 20000..=20999,
        ttl_secs: 3,
        now: 0,
        challenge_revision: 0,
        secret_env: Default::default(),
        guards: Vec::new(),
    };
    let s = tidegate_controller::spawn(&c.client, &plan, |_| "flag{x}".into())
        .await
        .unwrap();
    let id = s.record.id.to_string();
    assert!(
        eventually(10, || async {
            !worker_containers(&worker()).unwrap().is_empty()
        })
        .await,
        "no container started for {id}"
    );
    let container = worker_containers(&worker()).unwrap().remove(0);
    assert!(
        wait_gone(&container).await,
        "the container of expired instance {id} survived"
    );
}

#[tokio::test]
async fn a_killed_agent_adopts_its_containers_and_removes_an_orphan() {
    let mut c = cluster(|_| {}).await;
    c.controller.put_challenge("web", web_spec()).await;
    let mut ids = Vec::new();
    for team in ["t1", "t2", "t3"] {
        let id = c.spawn("web", team).await;
        ids.push(id);
    }
    let mut containers = Vec::new();
    for id in &ids {
        c.wait_status(id, "running").await;
        let (container, _) = c.reported(id).await;
        containers.push((
            container.clone(),
            inspect(&container, "{{.State.StartedAt}}"),
        ));
    }
    let mut agent = c.agent.take().unwrap();
    agent.proc.kill().unwrap(); // SIGKILL: no shutdown code runs
    let orphan = docker(&[
        "run",
        "-d",
        "--label",
        &format!("tidegate.worker={}", worker()),
        "--label",
        &format!("tidegate.cluster={}", tidegate_lab::daemons::lab_cluster()),
        "--label",
        "tidegate.instance=00000000ff",
        "--network",
        "tidegate-isolated",
        "tidegate/demo-http:2",
    ])
    .unwrap();
    c.agent = Some(agent.restart(c.dir.path()).await);
    assert!(wait_gone(&orphan).await, "the orphan survived the restart");
    for (container, started) in &containers {
        assert!(
            !gone(container),
            "adopted container {container} was removed"
        );
        assert_eq!(
            &inspect(container, "{{.State.StartedAt}}"),
            started,
            "container {container} was restarted"
        );
    }
    let now: BTreeSet<String> = worker_containers(&worker()).unwrap().into_iter().collect();
    let want: BTreeSet<String> = containers.into_iter().map(|(c, _)| c).collect();
    assert_eq!(now, want);
    assert!(c.agent().log().contains("adopted a running container"));
}

#[tokio::test]
async fn after_a_compaction_while_the_agent_was_down_it_ends_with_exactly_the_right_containers() {
    let mut c = cluster(|_| {}).await;
    c.controller.put_challenge("web", web_spec()).await;
    let keep = c.spawn("web", "t1").await;
    let drop_me = c.spawn("web", "t2").await;
    c.wait_status(&keep, "running").await;
    c.wait_status(&drop_me, "running").await;
    let (kept, _) = c.reported(&keep).await;
    let (dropped, _) = c.reported(&drop_me).await;

    let mut agent = c.agent.take().unwrap();
    agent.proc.kill().unwrap();
    c.controller
        .call(
            Method::DELETE,
            &format!("/v1/instances/{drop_me}"),
            None,
            None,
        )
        .await;
    let added = c.spawn("web", "t3").await;
    let rev = c
        .client
        .clone()
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.client
        .clone()
        .compact(rev, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();

    c.agent = Some(agent.restart(c.dir.path()).await);
    c.wait_status(&added, "running").await;
    let (new_container, _) = c.reported(&added).await;
    assert!(
        wait_gone(&dropped).await,
        "the deleted instance's container survived"
    );
    let now: BTreeSet<String> = worker_containers(&worker()).unwrap().into_iter().collect();
    assert_eq!(now, BTreeSet::from([kept, new_container]));
}

#[tokio::test]
async fn garbage_under_an_instance_key_is_logged_and_skipped() {
    let c = cluster(|_| {}).await;
    c.controller.put_challenge("web", web_spec()).await;
    let mut client = c.client.clone();
    client
        .put(keys::instance("abcdef0123"), "{not json", None)
        .await
        .unwrap();
    client
        .put(keys::instance("NOT-AN-ID"), "{}", None)
        .await
        .unwrap();
    let id = c.spawn("web", "t1").await;
    c.wait_status(&id, "running").await;
    let log = c.agent().log();
    assert!(
        log.contains(&keys::instance("abcdef0123")) && log.contains("malformed instance record"),
        "{log}"
    );
    assert!(log.contains(&keys::instance("NOT-AN-ID")), "{log}");
    assert!(c.agent().proc.is_alive());
    assert!(
        c.agent()
            .metric("tidegate_agent_malformed_records_total")
            .await
            .unwrap()
            >= 2.0
    );
}

/// Whether `container` can open a TCP connection to `ip:port` within 2 s.
fn can_connect(container: &str, ip: &str, port: u16) -> bool {
    docker(&[
        "exec",
        container,
        "sh",
        "-c",
        &format!("echo | nc -w 2 {ip} {port}"),
    ])
    .is_ok()
}

#[tokio::test]
async fn instances_cannot_reach_each_other_or_the_outside_unless_egress_is_on() {
    let c = cluster(|_| {}).await;
    c.controller.put_challenge("web", web_spec()).await;
    let mut open = web_spec();
    open["egress"] = json!(true);
    c.controller.put_challenge("open", open).await;
    let a = c.spawn("web", "t1").await;
    let b = c.spawn("web", "t2").await;
    let e = c.spawn("open", "t3").await;
    for id in [&a, &b, &e] {
        c.wait_status(id, "running").await;
    }
    let (ca, _) = c.reported(&a).await;
    let (_, ip_b) = c.reported(&b).await;
    let (ce, _) = c.reported(&e).await;

    // "Outside": a test host in its own netns, answering on port 9000.
    let host = NetnsHost::create().unwrap();
    let outside = host.addr().to_string();
    let log = c.dir.path().join("outside.log");
    let _server = Supervised::spawn(
        "outside",
        "ip",
        &[
            "netns",
            "exec",
            host.name(),
            "ncat",
            "-lk",
            &outside,
            "9000",
            "-c",
            "echo hi",
        ]
        .map(String::from),
        &log,
    )
    .unwrap();
    assert!(
        eventually(5, || async { can_connect(&ce, &outside, 9000) }).await,
        "egress instance cannot reach the outside host"
    );
    assert!(
        can_connect(&ca, "127.0.0.1", 8080),
        "the instance cannot reach itself"
    );
    assert!(
        !can_connect(&ca, &ip_b, 8080),
        "instance a reached instance b"
    );
    assert!(
        !can_connect(&ca, &outside, 9000),
        "instance a reached the outside without egress"
    );
}

#[tokio::test]
async fn a_record_from_a_fenced_scheduler_is_refused() {
    let c = cluster(|_| {}).await;
    c.controller.put_challenge("web", web_spec()).await;
    let id = c.spawn("web", "t1").await;
    c.wait_status(&id, "running").await;
    let rec = c
        .client
        .clone()
        .get(keys::instance(&id), None)
        .await
        .unwrap();
    let mut stale: Value = serde_json::from_slice(rec.kvs()[0].value()).unwrap();
    let token = stale["token"].as_i64().unwrap();
    assert!(token > 1);
    // Written by hand after the current leader wrote, with an older token.
    stale["id"] = json!("00000000aa");
    stale["token"] = json!(1);
    c.client
        .clone()
        .put(keys::instance("00000000aa"), stale.to_string(), None)
        .await
        .unwrap();
    let refused = eventually(10, || async {
        c.agent()
            .log()
            .contains("refusing a record from a fenced scheduler")
    })
    .await;
    assert!(refused, "{}", c.agent().log());
    let log = c.agent().log();
    assert!(
        log.contains(&format!(
            "with token 1: a scheduler with the newer token {token} was already writing"
        )),
        "{log}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        worker_containers(&worker()).unwrap().len(),
        1,
        "a container was started for the stale record"
    );
    // The same old token on another challenge's record is another shard's
    // leader, which may hold an older token than web's: started.
    c.controller.put_challenge("other", web_spec()).await;
    let mut other = stale.clone();
    other["id"] = json!("00000000bb");
    other["challenge"] = json!("other");
    other["http"][0]["hostname"] = json!("00000000bb.ctf.localhost");
    // Checked against other's current spec.
    other.as_object_mut().unwrap().remove("spec_revision");
    let w = stale["worker"].as_str().unwrap();
    let got = c
        .client
        .clone()
        .get(keys::secret(w, &id), None)
        .await
        .unwrap();
    let mut secret: Value = serde_json::from_slice(got.kvs()[0].value()).unwrap();
    secret["instance"] = json!("00000000bb");
    c.client
        .clone()
        .put(keys::secret(w, "00000000bb"), secret.to_string(), None)
        .await
        .unwrap();
    c.client
        .clone()
        .put(keys::instance("00000000bb"), other.to_string(), None)
        .await
        .unwrap();
    assert!(
        eventually(30, || async {
            worker_containers(&worker()).unwrap().len() == 2
        })
        .await,
        "another shard's record with an older token was fenced: {}",
        c.agent().log()
    );
}

#[tokio::test]
async fn a_crashing_container_is_restarted_with_backoff_then_marked_failed() {
    let c = cluster(|c| c.max_restarts = 2).await;
    c.controller
        .put_challenge(
            "crash",
            json!({"image": DEMO_EXIT, "ports": [{"name": "web", "port": 80, "protocol": "http"}]}),
        )
        .await;
    let id = c.spawn("crash", "t1").await;
    c.wait_status(&id, "failed").await;
    let status = c.status(&id).await;
    assert_eq!(status, "failed: exited with code 3 after 2 restarts");
    let (container, _) = c.reported(&id).await;
    assert_eq!(
        inspect(&container, "{{.RestartCount}}"),
        "0",
        "docker restarted it, not the agent"
    );
}

#[tokio::test]
async fn a_missing_image_is_reported_once_without_a_retry_storm() {
    let c = cluster(|_| {}).await;
    c.controller
        .put_challenge("ghost", json!({"image": "tidegate/does-not-exist:1", "ports": [{"name": "web", "port": 80, "protocol": "http"}]}))
        .await;
    let id = c.spawn("ghost", "t1").await;
    c.wait_status(&id, "failed").await;
    let status = c.status(&id).await;
    assert!(
        status
            .as_str()
            .unwrap()
            .contains("image tidegate/does-not-exist:1 is not on this worker"),
        "{status}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = c.agent().log().matches("image missing").count();
    assert_eq!(
        attempts, 1,
        "the agent retried a missing image {attempts} times"
    );
}

#[tokio::test]
async fn membership_comes_back_after_its_lease_is_lost_and_leaves_on_clean_shutdown() {
    let mut c = cluster(|_| {}).await;
    let key = keys::worker(&worker());
    let lease = c
        .client
        .clone()
        .get(key.as_str(), None)
        .await
        .unwrap()
        .kvs()[0]
        .lease();
    c.client.clone().lease_revoke(lease).await.unwrap();
    let back = eventually(10, || async {
        let kvs = c.client.clone().get(key.as_str(), None).await.unwrap();
        kvs.kvs().first().is_some_and(|kv| kv.lease() != lease)
    })
    .await;
    assert!(
        back,
        "the worker did not register again after losing its lease"
    );
    assert_eq!(
        c.agent().metric("tidegate_agent_registrations_total").await,
        Some(2.0)
    );

    // SIGTERM: the agent revokes its lease, so the worker leaves at once.
    let agent = c.agent.take().unwrap();
    agent.proc.signal("TERM").unwrap();
    let left = eventually(5, || async {
        c.client
            .clone()
            .get(key.as_str(), None)
            .await
            .unwrap()
            .kvs()
            .is_empty()
    })
    .await;
    assert!(left, "the worker key outlived a clean shutdown");
    assert!(
        eventually(10, || async { !agent.proc.is_alive() }).await,
        "the agent did not exit on SIGTERM"
    );
    assert!(agent.log().contains("deregistered"), "{}", agent.log());
}

#[tokio::test]
async fn a_second_agent_with_a_live_worker_id_exits_64_and_the_first_keeps_its_instances() {
    let c = cluster(|_| {}).await;
    c.controller.put_challenge("web", web_spec()).await;
    let id = c.spawn("web", "t1").await;
    c.wait_status(&id, "running").await;
    let (container, _) = c.reported(&id).await;
    let key = keys::worker(&worker());
    let lease_of = || async {
        let got = c.client.clone().get(key.as_str(), None).await.unwrap();
        got.kvs().first().map(|kv| kv.lease())
    };
    let lease = lease_of().await;

    // The same worker_id on other ports, as a copied config would be.
    let mut cfg = AgentConfig::from_file(&c.agent().config).unwrap();
    let port = |_| tidegate_lab::ports::free_port().unwrap();
    cfg.metrics_listen.set_port(port(()));
    cfg.http_entry.set_port(port(()));
    let second = c.dir.path().join("second.toml");
    tidegate_lab::daemons::write_config(&cfg, &second).unwrap();
    let run = tokio::process::Command::new(tidegate_lab::daemons::binary("tidegate-agent"))
        .args(["--config", &second.display().to_string()])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the second agent kept running")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains(&format!("worker_id {} is held by a live agent", worker())),
        "{stderr}"
    );
    assert_eq!(lease_of().await, lease, "the worker key changed hands");
    assert!(c.agent().proc.is_alive());
    assert!(!gone(&container), "the first agent's container was removed");
    assert_eq!(
        c.agent().metric("tidegate_agent_registrations_total").await,
        Some(1.0)
    );
    c.wait_status(&id, "running").await;
}

/// A Docker call that hangs for one instance (pulling its image from a
/// "registry" that takes the connection and never answers) holds up that
/// instance only: instances spawned after it start while it still hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_docker_call_for_one_instance_holds_up_no_other() {
    let c = cluster(|a| a.pull_images = true).await;
    let registry = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = registry.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for conn in registry.incoming().flatten() {
            keep.lock().unwrap().push(conn);
        }
    });
    // Whether Docker's pull still waits on one of its connections.
    let hanging = || {
        held.lock().unwrap().iter().any(|conn| {
            conn.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            // Open and silent: WouldBlock (or bytes it sent); closed: 0.
            !matches!(conn.peek(&mut byte), Ok(0))
        })
    };
    let stuck_spec = json!({"image": format!("127.0.0.1:{port}/stuck:1"),
        "ports": [{"name": "web", "port": 80, "protocol": "http"}]});
    assert!(
        c.controller
            .put_challenge("stuck", stuck_spec)
            .await
            .0
            .is_success()
    );
    assert!(
        c.controller
            .put_challenge("web", web_spec())
            .await
            .0
            .is_success()
    );
    let stuck = c.spawn("stuck", "t0").await;
    assert!(
        eventually(20, || async { hanging() }).await,
        "Docker never connected to the silent registry: {}\n{}",
        c.status(&stuck).await,
        c.agent().proc.log_tail(30)
    );
    let teams: Vec<String> = (1..=4).map(|i| format!("t{i}")).collect();
    let others = futures::future::join_all(teams.iter().map(|t| c.spawn("web", t))).await;
    for id in &others {
        c.wait_status(id, "running").await;
    }
    assert!(
        hanging(),
        "the pull ended before the others ran: this does not show they did not wait for it"
    );
    // Its step is still in the pull: nothing reported for it yet.
    assert_eq!(c.status(&stuck).await, "pending");
}

/// A record whose container is not what its challenge's spec makes (a
/// capability added by hand) is refused once: its status says so and
/// stays failed, with no container made and no retry.
#[tokio::test]
async fn a_record_unlike_its_spec_is_refused_once_and_stays_failed() {
    let c = cluster(|_| {}).await;
    c.controller.put_challenge("web", web_spec()).await;
    let id = c.spawn("web", "t1").await;
    c.wait_status(&id, "running").await;
    let mut forged = c.record(&id).await;
    let forged_id = "00000ca95b";
    forged["id"] = json!(forged_id);
    let host = forged["http"][0]["hostname"]
        .as_str()
        .unwrap()
        .replace(&id, forged_id);
    forged["http"][0]["hostname"] = json!(host);
    forged["container"]["cap_add"] = json!(["SYS_ADMIN"]);
    let mut etcd = c.client.clone();
    let lease = etcd.lease_grant(120, None).await.unwrap().id();
    etcd.put(
        keys::instance(forged_id),
        forged.to_string(),
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    c.wait_status(forged_id, "failed").await;
    let status = c.status(forged_id).await;
    assert!(
        status.as_str().unwrap().contains("refused by the agent"),
        "{status}"
    );
    // Passes go on every 500 ms: the refusal is not tried again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.status(forged_id).await, status);
    let refusals = c
        .agent()
        .log()
        .matches("refused: the record's containers")
        .count();
    assert_eq!(refusals, 1, "{}", c.agent().proc.log_tail(20));
    assert_eq!(worker_containers(&worker()).unwrap().len(), 1);
}

/// The solver containers of this test's worker, running or not.
fn solver_containers() -> Vec<String> {
    let worker = format!("label=tidegate.worker={}", worker());
    docker(&[
        "ps",
        "-aq",
        "--filter",
        "label=tidegate.solver",
        "--filter",
        &worker,
    ])
    .unwrap_or_default()
    .lines()
    .map(String::from)
    .collect()
}

/// A challenge's solver finds each instance's flag (healthy); once the
/// instance stops serving it, the next run marks it unhealthy with the
/// output's tail, which only the admin token sees (API, dashboard) and
/// the metrics count; it heals when the flag is back. A solver that
/// crashes is unhealthy from its first run. No solver container outlives
/// its run or its instance.
#[tokio::test]
async fn a_solver_that_stops_finding_the_flag_marks_the_instance_unhealthy_within_one_interval() {
    const INTERVAL: u64 = 10;
    const TIMEOUT: u64 = 8;
    let running = cluster(|_| {}).await;
    let c = &running;
    let mut spec = web_spec();
    // The demo page serves /flag, a file of the worker's disk the test can
    // break the way a player wrecks an instance.
    spec["flag"] = json!({"file": "/flag"});
    spec["solver"] =
        json!({"image": DEMO_SOLVER, "interval_secs": INTERVAL, "timeout_secs": TIMEOUT});
    assert_eq!(
        c.controller.put_challenge("web", spec).await.0,
        StatusCode::CREATED
    );
    let id = c.spawn("web", "team-1").await;
    c.wait_status(&id, "running").await;
    let solver = |token: Option<&'static str>| {
        let path = format!("/v1/instances/{id}");
        async move { c.controller.call(Method::GET, &path, None, token).await.1["solver"].clone() }
    };
    let solver = &solver;
    let state_is = |want: &'static str, secs: u64| async move {
        eventually(secs, || async {
            solver(Some(ADMIN)).await["state"] == want
        })
        .await
    };
    assert!(
        state_is("healthy", INTERVAL + TIMEOUT).await,
        "the first check never passed: {}\n{}",
        solver(Some(ADMIN)).await,
        c.agent().proc.log_tail(20)
    );
    assert!(
        eventually(5, || async { solver_containers().is_empty() }).await,
        "a solver container outlived its run"
    );

    // The flag file on the worker loses the flag.
    let cfg = AgentConfig::from_file(&c.agent().config).unwrap();
    let flag_file = cfg.worker_flag_dir().join(&id).join("flag");
    let flag = std::fs::read_to_string(&flag_file).unwrap();
    assert!(flag.starts_with("flag{"), "{flag}");
    std::fs::write(&flag_file, "broken\n").unwrap();
    // The next run (at most one interval away) and its timeout.
    assert!(
        state_is("unhealthy", INTERVAL + TIMEOUT + 2).await,
        "still {} one interval after the flag went",
        solver(Some(ADMIN)).await
    );
    let seen = solver(Some(ADMIN)).await;
    let detail = seen["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("without printing the instance's flag") && detail.contains("broken"),
        "{seen}"
    );
    assert!(!detail.contains(flag.trim()), "{seen}");
    // The platform sees that it is unhealthy, not why.
    let platform = solver(None).await;
    assert_eq!(platform["state"], "unhealthy");
    assert!(platform.get("detail").is_none(), "{platform}");
    // The dashboard shows the reason; the metrics count it.
    let (_, dashboard) = c
        .controller
        .call(Method::GET, "/v1/dashboard", None, Some(ADMIN))
        .await;
    let row = dashboard["instances"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["id"] == id.as_str()).cloned())
        .unwrap_or_default();
    assert_eq!(row["solver"]["state"], "unhealthy", "{dashboard}");
    assert!(
        row["solver"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("broken")),
        "{row}"
    );
    let metrics = reqwest::get(format!("{}/metrics", c.controller.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tidegate_controller_instances_unhealthy 1"),
        "{metrics}"
    );
    let runs = |result: &'static str| async move {
        c.agent()
            .metric(&format!(
                "tidegate_agent_solver_checks_total{{result=\"{result}\"}}"
            ))
            .await
            .unwrap_or_default()
    };
    assert!(runs("healthy").await >= 1.0 && runs("unhealthy").await >= 1.0);

    // The flag is back: healthy again at the next run.
    std::fs::write(&flag_file, &flag).unwrap();
    assert!(
        state_is("healthy", INTERVAL + TIMEOUT + 2).await,
        "still {} one interval after the flag came back",
        solver(Some(ADMIN)).await
    );

    // A solver that crashes: unhealthy from its first run, naming its exit.
    let mut crashing = web_spec();
    crashing["solver"] = json!({"image": DEMO_EXIT, "interval_secs": INTERVAL, "timeout_secs": 5});
    assert_eq!(
        c.controller.put_challenge("crash", crashing).await.0,
        StatusCode::CREATED
    );
    let other = c.spawn("crash", "team-1").await;
    c.wait_status(&other, "running").await;
    let path = format!("/v1/instances/{other}");
    let crashed = eventually(INTERVAL + 5, || async {
        c.controller
            .call(Method::GET, &path, None, Some(ADMIN))
            .await
            .1["solver"]["state"]
            == "unhealthy"
    })
    .await;
    let seen = c
        .controller
        .call(Method::GET, &path, None, Some(ADMIN))
        .await
        .1;
    assert!(crashed, "{seen}");
    let detail = seen["solver"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("the solver exited 3") && detail.contains("crashing"),
        "{seen}"
    );

    // Deleting the instances ends their checks: no solver container stays.
    for i in [&id, &other] {
        let (status, body) = c
            .controller
            .call(Method::DELETE, &format!("/v1/instances/{i}"), None, None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    tokio::time::sleep(Duration::from_secs(INTERVAL + 2)).await;
    assert!(solver_containers().is_empty(), "{:?}", solver_containers());
}

/// `replace_unhealthy`: a failed check makes the worker remove the
/// instance's containers and make them again, keeping its id, hostname,
/// team, expiry and flag (its flag file written afresh, which heals what
/// the test broke); the next check passes and counts the replacement.
#[tokio::test]
async fn an_unhealthy_instance_is_replaced_in_place_when_its_spec_says_so() {
    const INTERVAL: u64 = 10;
    let running = cluster(|_| {}).await;
    let c = &running;
    let mut spec = web_spec();
    spec["flag"] = json!({"file": "/flag"});
    spec["solver"] = json!({"image": DEMO_SOLVER, "interval_secs": INTERVAL,
        "timeout_secs": 8, "replace_unhealthy": true});
    assert_eq!(
        c.controller.put_challenge("web", spec).await.0,
        StatusCode::CREATED
    );
    let id = c.spawn("web", "team-1").await;
    c.wait_status(&id, "running").await;
    let path = format!("/v1/instances/{id}");
    let get = || async {
        c.controller
            .call(Method::GET, &path, None, Some(ADMIN))
            .await
            .1
    };
    assert!(
        eventually(INTERVAL + 8, || async {
            get().await["solver"]["state"] == "healthy"
        })
        .await,
        "{}",
        get().await
    );
    let before = get().await;
    let (container, _) = c.reported(&id).await;
    let cfg = AgentConfig::from_file(&c.agent().config).unwrap();
    let flag_file = cfg.worker_flag_dir().join(&id).join("flag");
    let flag = std::fs::read_to_string(&flag_file).unwrap();
    std::fs::write(&flag_file, "broken\n").unwrap();
    // Found unhealthy, replaced, and healthy at the check after.
    let healed = eventually(3 * INTERVAL, || async {
        let solver = get().await["solver"].clone();
        solver["state"] == "healthy" && solver["replacements"] == 1
    })
    .await;
    let after = get().await;
    assert!(healed, "{after}\n{}", c.agent().proc.log_tail(20));
    let (replaced, _) = c.reported(&id).await;
    assert_ne!(replaced, container, "the containers were not made again");
    assert!(gone(&container), "the old container is still there");
    for field in ["id", "team", "challenge", "expires_at", "http"] {
        assert_eq!(before[field], after[field], "{field} changed");
    }
    assert_eq!(std::fs::read_to_string(&flag_file).unwrap(), flag);
    assert_eq!(
        c.agent()
            .metric("tidegate_agent_solver_replacements_total")
            .await,
        Some(1.0)
    );
    assert!(
        c.agent()
            .log()
            .contains("replacing the containers of an instance its solver check found unhealthy")
    );
}

/// The rollout's answer (admin).
async fn rollout_of(c: &Cluster, challenge: &str) -> Value {
    rollout_of_at(&c.controller, challenge).await
}

/// What must not change when an instance is replaced, and its container.
async fn identity(c: &Cluster, id: &str) -> (Value, String) {
    let (_, got) = c
        .controller
        .call(
            Method::GET,
            &format!("/v1/instances/{id}"),
            None,
            Some(ADMIN),
        )
        .await;
    let keep = json!([got["id"], got["team"], got["expires_at"], got["http"]]);
    (keep, c.reported(id).await.0)
}

/// Puts `spec` as challenge `web` and spawns `teams` instances of it; once
/// each runs, their ids and identities, in spawn order.
async fn web_instances(
    c: &Cluster,
    spec: &Value,
    teams: usize,
) -> (Vec<String>, Vec<(Value, String)>) {
    assert_eq!(
        c.controller.put_challenge("web", spec.clone()).await.0,
        StatusCode::CREATED
    );
    let mut ids = Vec::new();
    for team in 1..=teams {
        ids.push(c.spawn("web", &format!("team-{team}")).await);
    }
    let mut before = Vec::new();
    for id in &ids {
        c.wait_status(id, "running").await;
        before.push(identity(c, id).await);
    }
    (ids, before)
}

/// Puts `spec` as challenge `web` with rollout `query`; the 200's body.
async fn start_rollout(c: &Controller, spec: Value, query: &str) -> Value {
    let (s, body) = c.put_challenge_with("web", spec, query).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    body
}

/// Issue #23's rollout must-show, on a real engine: 5 live instances, a new
/// spec (another env) put with `?rollout=gated&canary=1&batch=2`. The
/// canary is replaced first (same id, team, expiry, hostname and flag file,
/// a new container running the new env), the gate opens once the
/// challenge's solver finds the flag on it, and the other 4 follow in
/// batches of 2; the rollout ends `done` with every instance on the new
/// revision.
#[tokio::test]
async fn a_gated_rollout_replaces_the_canary_opens_on_its_solver_check_and_follows_in_batches() {
    let running = cluster(|_| {}).await;
    let c = &running;
    let mut spec = web_spec();
    spec["flag"] = json!({"file": "/flag"});
    spec["solver"] = json!({"image": DEMO_SOLVER, "interval_secs": 10, "timeout_secs": 8});
    let (ids, before) = web_instances(c, &spec, 5).await;
    let cfg = AgentConfig::from_file(&c.agent().config).unwrap();
    let flag_of = |id: &str| std::fs::read_to_string(cfg.worker_flag_dir().join(id).join("flag"));
    let flags: Vec<String> = ids.iter().map(|id| flag_of(id).unwrap()).collect();

    // A rollout that would move a port is refused before anything is written.
    let mut moved = spec.clone();
    moved["ports"][0]["port"] = json!(8081);
    let (s, body) = c
        .controller
        .put_challenge_with("web", moved, "rollout=gated")
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "ports", "{body}");

    let mut next = spec.clone();
    next["env"] = json!({"ROLLOUT": "2"});
    let body = start_rollout(
        &c.controller,
        next.clone(),
        "rollout=gated&canary=1&batch=2",
    )
    .await;
    let to = body["revision"].as_i64().unwrap();
    assert_eq!(body["rollout"]["to_revision"], to, "{body}");
    // A second rollout while this one runs is refused, and writes nothing.
    let (s, body) = c
        .controller
        .put_challenge_with("web", next, "rollout=gated")
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");

    // Watch it: the phases in order, and how many were picked in each.
    let mut phases: Vec<(String, usize)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    let mut finished = false;
    while !finished && std::time::Instant::now() < deadline {
        let r = rollout_of(c, "web").await;
        let phase = r["phase"].as_str().unwrap_or_default().to_string();
        let picked = r["replaced"].as_array().map_or(0, Vec::len);
        if phases.last() != Some(&(phase.clone(), picked)) {
            phases.push((phase.clone(), picked));
        }
        finished = phase == "done";
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = rollout_of(c, "web").await;
    assert!(
        finished,
        "{r}\nphases: {phases:?}\n{}",
        c.controller.proc.log_tail(30)
    );
    // The canary alone went through the gate; batches never passed 2 at once.
    let gate: Vec<_> = phases.iter().filter(|(p, _)| p == "gate").collect();
    assert!(gate.iter().all(|(_, n)| *n == 1), "{phases:?}");
    assert!(!gate.is_empty(), "the gate was never seen: {phases:?}");
    let mut last = 1;
    for (p, n) in &phases {
        if p == "batches" || p == "done" {
            assert!(*n <= last + 2, "more than a batch at once: {phases:?}");
            last = *n;
        }
    }
    assert_eq!(r["replaced"].as_array().unwrap().len(), 5, "{r}");
    assert_eq!(r["running_new"], 5, "{r}");
    assert_eq!(
        r["canaries"][0], ids[0],
        "the oldest instance is the canary: {r}"
    );

    for (i, id) in ids.iter().enumerate() {
        let (keep, container) = identity(c, id).await;
        assert_eq!(
            keep, before[i].0,
            "{id}: id, team, expiry or hostname changed"
        );
        assert_ne!(container, before[i].1, "{id}: not replaced");
        assert!(gone(&before[i].1), "{id}: its old container is still there");
        let env = inspect(&container, "{{json .Config.Env}}");
        assert!(env.contains("ROLLOUT=2"), "{id} runs {env}");
        assert_eq!(flag_of(id).unwrap(), flags[i], "{id}: its flag changed");
        assert_eq!(c.record(id).await["spec_revision"], to);
    }
    assert_eq!(
        c.controller
            .metric("tidegate_controller_rollout_replacements_total")
            .await,
        Some(5.0)
    );
}

/// A broken image: the canary never runs, so the rollout stops at the
/// gate; `abort` writes the old spec back and moves the canary onto it,
/// and the instances the rollout did not reach are never touched.
#[tokio::test]
async fn a_broken_image_stops_at_the_gate_and_abort_restores_the_canary_alone() {
    broken_rollout_is_held_and_aborted(DEMO_EXIT).await;
}

/// A broken image that runs: the canary's solver check fails (it accepts
/// and never answers), the instance is marked unhealthy, the rollout stops
/// at the gate, and abort restores the canary alone.
#[tokio::test]
async fn an_image_failing_its_solver_stops_at_the_gate_and_abort_restores_the_canary_alone() {
    broken_rollout_is_held_and_aborted(DEMO_SILENT).await;
}

async fn broken_rollout_is_held_and_aborted(broken_image: &str) {
    let running = cluster(|_| {}).await;
    let c = &running;
    let mut spec = web_spec();
    spec["solver"] = json!({"image": DEMO_SOLVER, "interval_secs": 10, "timeout_secs": 8});
    let (ids, before) = web_instances(c, &spec, 3).await;
    let mut broken = spec.clone();
    broken["image"] = json!(broken_image);
    let body = start_rollout(&c.controller, broken, "rollout=gated&canary=1&batch=5").await;
    let from = body["rollout"]["from_revision"].as_i64().unwrap();

    // At the gate with the canary picked, and it stays there.
    assert!(
        eventually(30, || async {
            let r = rollout_of(c, "web").await;
            r["phase"] == "gate" && r["replaced"] == json!([ids[0]])
        })
        .await,
        "{}",
        rollout_of(c, "web").await
    );
    // The rollout record names its canary before the canary's record is
    // rewritten.
    assert!(
        eventually(10, || async {
            c.record(&ids[0]).await["container"]["image"] == broken_image
        })
        .await,
        "the canary was not rewritten to {broken_image}: {}",
        c.record(&ids[0]).await
    );
    tokio::time::sleep(Duration::from_secs(15)).await;
    let r = rollout_of(c, "web").await;
    assert_eq!(r["phase"], "gate", "{r}");
    assert_eq!(r["replaced"], json!([ids[0]]), "{r}");
    assert!(
        r["detail"].as_str().unwrap().contains(ids[0].as_str()),
        "the gate does not say which canary it waits for: {r}"
    );
    if broken_image == DEMO_SILENT {
        // It runs; its solver check is what failed.
        let canary = format!("/v1/instances/{}", ids[0]);
        assert!(
            eventually(20, || async {
                c.controller
                    .call(Method::GET, &canary, None, Some(ADMIN))
                    .await
                    .1["solver"]["state"]
                    == "unhealthy"
            })
            .await,
            "the canary's failing solver did not mark it unhealthy: {}",
            c.controller
                .call(Method::GET, &canary, None, Some(ADMIN))
                .await
                .1
        );
    }

    // The platform's token cannot act on a rollout, nor name a bad action.
    let (s, body) = c
        .controller
        .call(Method::POST, "/v1/challenges/web/rollout/abort", None, None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (s, body) = c
        .controller
        .call(
            Method::POST,
            "/v1/challenges/web/rollout/rollback",
            None,
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "action", "{body}");
    let (s, body) = c
        .controller
        .call(
            Method::POST,
            "/v1/challenges/web/rollout/abort",
            None,
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(
        eventually(30, || async {
            rollout_of(c, "web").await["phase"] == "aborted"
        })
        .await,
        "{}\n{}",
        rollout_of(c, "web").await,
        c.controller.proc.log_tail(30)
    );
    let r = rollout_of(c, "web").await;
    let restored = r["restored_revision"].as_i64().unwrap();
    assert!(restored > from, "{r}");
    // The challenge's spec is the old one again, at the restored revision.
    let (_, challenge) = c
        .controller
        .call(Method::GET, "/v1/challenges/web", None, Some(ADMIN))
        .await;
    assert_eq!(challenge["spec"]["image"], spec["image"], "{challenge}");
    assert_eq!(challenge["revision"], restored, "{challenge}");
    // The canary runs the old image again, as itself (its owner reports
    // the revision of its rewritten record: a canary that ran the broken
    // image reported running before).
    assert!(
        eventually(60, || async {
            let rec = c.record(&ids[0]).await;
            let st = c.status_record(&ids[0]).await;
            rec["container"]["image"] == spec["image"]
                && st["spec_revision"] == rec["spec_revision"]
                && st["status"]["state"] == "running"
        })
        .await,
        "the canary does not run the restored revision: {}",
        c.status_record(&ids[0]).await
    );
    let (keep, container) = identity(c, &ids[0]).await;
    assert_eq!(keep, before[0].0);
    assert_ne!(container, before[0].1);
    assert_eq!(
        inspect(&container, "{{.Config.Image}}"),
        spec["image"].as_str().unwrap()
    );
    // The others were never touched.
    for (i, id) in ids.iter().enumerate().skip(1) {
        assert_eq!(identity(c, id).await, before[i], "{id} was touched");
        assert_eq!(c.record(id).await["spec_revision"], from);
    }
    // Over: asks are refused.
    let (s, _) = c
        .controller
        .call(
            Method::POST,
            "/v1/challenges/web/rollout/continue",
            None,
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
}

/// Names of the instance containers the engine created since `since` (unix
/// seconds), one line each.
/// Names of the containers the engine created after `since` (to the
/// nanosecond: an instance created earlier in the same second is not one of
/// them).
fn created_since(since: std::time::Duration) -> Vec<String> {
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    docker(&[
        "events",
        "--since",
        &format!("{}.{:09}", since.as_secs(), since.subsec_nanos()),
        "--until",
        &until.to_string(),
        "--filter",
        "type=container",
        "--filter",
        "event=create",
        "--format",
        "{{.Actor.Attributes.name}}",
    ])
    .unwrap()
    .lines()
    .map(str::to_string)
    .collect()
}

/// A leader kill mid-rollout: a standby takes over and finishes it from the
/// record, and no instance is replaced twice (the engine created exactly
/// one new container for each, counted from its own events).
#[tokio::test]
async fn a_rollout_resumes_under_the_next_leader_and_replaces_no_instance_twice() {
    let mut running = cluster(|_| {}).await;
    let standby = Controller::start(&running._etcd, "c2", running.dir.path()).await;
    let c = &running;
    let spec = web_spec();
    let (ids, before) = web_instances(c, &spec, 6).await;
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let mut next = spec.clone();
    next["env"] = json!({"ROLLOUT": "3"});
    let to = at_the_gate(c, next).await;
    ask_rollout(&c.controller, "continue").await;
    // Kill the leader once the batches have begun and before they end.
    assert!(
        eventually(60, || async {
            let r = rollout_of(c, "web").await;
            r["phase"] == "batches" && r["replaced"].as_array().map_or(0, Vec::len) >= 2
        })
        .await,
        "{}",
        rollout_of(c, "web").await
    );
    running.controller.proc.kill().unwrap();
    let at_kill = rollout_of_at(&standby, "web").await;
    assert_ne!(
        at_kill["phase"], "done",
        "the kill came too late: {at_kill}"
    );
    assert!(eventually(30, || standby.is_leader()).await);
    assert!(
        eventually(120, || async {
            rollout_of_at(&standby, "web").await["phase"] == "done"
        })
        .await,
        "{}\n{}",
        rollout_of_at(&standby, "web").await,
        standby.proc.log_tail(30)
    );
    let r = rollout_of_at(&standby, "web").await;
    let replaced: BTreeSet<&str> = r["replaced"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(replaced.len(), 6, "{r}");
    assert_eq!(r["replaced"].as_array().unwrap().len(), 6, "{r}");
    let created = created_since(since);
    for (i, id) in ids.iter().enumerate() {
        let name = format!("tidegate-{id}");
        let n = created.iter().filter(|c| **c == name).count();
        assert_eq!(n, 1, "{id} got {n} new containers: {created:?}");
        let (_, got) = standby
            .call(
                Method::GET,
                &format!("/v1/instances/{id}"),
                None,
                Some(ADMIN),
            )
            .await;
        let keep = json!([got["id"], got["team"], got["expires_at"], got["http"]]);
        assert_eq!(
            keep, before[i].0,
            "{id}: id, team, expiry or hostname changed"
        );
        assert_eq!(running.record(id).await["spec_revision"], to);
    }
}

/// `pause` holds a rollout where it is, even past an organizer's
/// `continue` (no instance is picked while it is paused); `resume` lets it
/// go on to the end.
#[tokio::test]
async fn a_paused_rollout_replaces_nothing_until_it_is_resumed() {
    let running = cluster(|_| {}).await;
    let c = &running;
    let spec = web_spec();
    let (ids, _) = web_instances(c, &spec, 3).await;
    let mut next = spec.clone();
    next["env"] = json!({"ROLLOUT": "5"});
    let to = at_the_gate(c, next).await;
    let ask = |action: &'static str| ask_rollout(&c.controller, action);
    assert_eq!(ask("pause").await["paused"], true);
    assert_eq!(ask("continue").await["continued"], true);
    // The driver steps once a second: a few steps with the gate open.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let r = rollout_of(c, "web").await;
    assert_eq!(r["paused"], true, "{r}");
    assert_eq!(r["replaced"].as_array().map_or(0, Vec::len), 1, "{r}");
    let at_new = |id: &str| {
        let id = id.to_string();
        async move { c.record(&id).await["spec_revision"] == to }
    };
    let mut rewritten = 0;
    for id in &ids {
        rewritten += usize::from(at_new(id).await);
    }
    assert_eq!(rewritten, 1, "a paused rollout rewrote another instance");
    assert_eq!(ask("resume").await["paused"], false);
    assert!(
        eventually(90, || async {
            rollout_of(c, "web").await["phase"] == "done"
        })
        .await,
        "{}",
        rollout_of(c, "web").await
    );
    for id in &ids {
        assert!(at_new(id).await, "{id} was left on the old revision");
    }
}

/// Starts a gated rollout of web to `next` (canary 1, batch 1, no solver)
/// and waits for its canary to run at the gate, which waits for an
/// organizer's continue; the revision it rolls to.
async fn at_the_gate(c: &Cluster, next: Value) -> i64 {
    let body = start_rollout(&c.controller, next, "rollout=gated&canary=1&batch=1").await;
    assert!(
        eventually(30, || async {
            let r = rollout_of(c, "web").await;
            r["phase"] == "gate" && r["running_new"] == 1
        })
        .await,
        "{}",
        rollout_of(c, "web").await
    );
    body["revision"].as_i64().unwrap()
}

/// An organizer's ask of web's rollout; its 200 answer.
async fn ask_rollout(c: &Controller, action: &str) -> Value {
    let (s, body) = c
        .call(
            Method::POST,
            &format!("/v1/challenges/web/rollout/{action}"),
            None,
            Some(ADMIN),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{action}: {body}");
    body
}

async fn rollout_of_at(c: &Controller, challenge: &str) -> Value {
    c.call(
        Method::GET,
        &format!("/v1/challenges/{challenge}/rollout"),
        None,
        Some(ADMIN),
    )
    .await
    .1
}

/// An agent down while the rollout rewrote its instance: started again, it
/// finds the container made from the old revision (its label says which)
/// and makes the new one, instead of adopting the old one as the new
/// revision.
#[tokio::test]
async fn an_agent_restarted_after_the_rewrite_makes_the_new_revision_instead_of_adopting_the_old() {
    // The worker may be away long enough for its instance to be kept.
    let mut running = cluster_with(|_| {}, |c| c.worker_grace_secs = 120).await;
    let spec = web_spec();
    let (ids, before) = web_instances(&running, &spec, 1).await;
    let id = &ids[0];
    let mut agent = running.agent.take().unwrap();
    agent.proc.kill().unwrap();
    let mut next = spec.clone();
    next["env"] = json!({"ROLLOUT": "4"});
    let body = start_rollout(&running.controller, next, "rollout=gated&canary=1&batch=1").await;
    let to = body["revision"].as_i64().unwrap();
    assert!(
        eventually(30, || async {
            running.record(id).await["spec_revision"] == to
        })
        .await,
        "the canary was never rewritten: {}",
        rollout_of(&running, "web").await
    );
    // The old container is still there, labelled with the old revision.
    let old: i64 = inspect(
        &before[0].1,
        "{{index .Config.Labels \"tidegate.spec-revision\"}}",
    )
    .parse()
    .unwrap();
    assert!(old < to, "the old container says revision {old}");
    running.agent = Some(agent.restart(running.dir.path()).await);
    let c = &running;
    assert!(
        eventually(60, || async {
            rollout_of(c, "web").await["running_new"] == 1
        })
        .await,
        "{}\n{}",
        rollout_of(c, "web").await,
        c.agent().proc.log_tail(20)
    );
    let (keep, container) = identity(c, id).await;
    assert_eq!(keep, before[0].0);
    assert_ne!(container, before[0].1, "the old container was adopted");
    assert!(gone(&before[0].1), "the old container is still there");
    let env = inspect(&container, "{{json .Config.Env}}");
    assert!(env.contains("ROLLOUT=4"), "{id} runs {env}");
    assert_eq!(
        inspect(
            &container,
            "{{index .Config.Labels \"tidegate.spec-revision\"}}"
        ),
        to.to_string()
    );
}

/// A rollout that changes `secret_env` gives the replaced instance the
/// values of the new revision, new names included (they travel in its
/// secret, which the rollout rewrites with the record).
#[tokio::test]
async fn a_replaced_instance_gets_the_new_secret_env_values() {
    let running = cluster(|_| {}).await;
    let c = &running;
    let mut spec = web_spec();
    spec["secret_env"] = json!({"API_KEY": "old-key"});
    let (ids, before) = web_instances(c, &spec, 1).await;
    let id = &ids[0];
    let env = inspect(&before[0].1, "{{json .Config.Env}}");
    assert!(env.contains("API_KEY=old-key"), "{id} runs {env}");
    let mut next = spec.clone();
    next["env"] = json!({"ROLLOUT": "5"});
    next["secret_env"] = json!({"API_KEY": "new-key", "BOT_PASSWORD": "added"});
    start_rollout(&c.controller, next, "rollout=gated&canary=1&batch=1").await;
    assert!(
        eventually(60, || async {
            rollout_of(c, "web").await["running_new"] == 1
        })
        .await,
        "{}",
        rollout_of(c, "web").await
    );
    let (keep, container) = identity(c, id).await;
    assert_eq!(keep, before[0].0);
    let env = inspect(&container, "{{json .Config.Env}}");
    for want in ["ROLLOUT=5", "API_KEY=new-key", "BOT_PASSWORD=added"] {
        assert!(env.contains(want), "{id} runs {env}, without {want}");
    }
}

/// A replacement that fails holds the batches, saying which; the
/// organizer's `continue` leaves the instances failed then behind and the
/// rollout goes on, once per `continue`: a later failure holds it again.
#[tokio::test]
async fn a_failed_replacement_holds_the_batches_until_continue_leaves_it_behind() {
    let running = cluster(|cfg| cfg.max_restarts = 1).await;
    let c = &running;
    let spec = web_spec();
    let (ids, _) = web_instances(c, &spec, 3).await;
    let mut broken = spec.clone();
    broken["image"] = json!(DEMO_EXIT);
    start_rollout(&c.controller, broken, "rollout=gated&canary=1&batch=5").await;
    let ask = |what: &'static str| async move {
        let path = format!("/v1/challenges/web/rollout/{what}");
        let (s, body) = c
            .controller
            .call(Method::POST, &path, None, Some(ADMIN))
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
    };
    let held_on = |n: usize| async move {
        let r = rollout_of(c, "web").await;
        r["phase"] == "batches"
            && r["replaced"].as_array().map_or(0, Vec::len) == n
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("failed on the new revision"))
    };
    // The canary fails; `continue` opens the gate, and the batches stop on it.
    c.wait_status(&ids[0], "failed").await;
    ask("continue").await;
    assert!(
        eventually(30, || held_on(1)).await,
        "{}",
        rollout_of(c, "web").await
    );
    let r = rollout_of(c, "web").await;
    assert!(
        r["detail"].as_str().unwrap().contains(ids[0].as_str()),
        "{r}"
    );
    assert_eq!(
        r["continued"], false,
        "the gate's continue was not spent: {r}"
    );
    // Left behind: the next batch (the other two) is replaced, and fails.
    ask("continue").await;
    assert!(
        eventually(60, || held_on(3)).await,
        "{}",
        rollout_of(c, "web").await
    );
    assert_eq!(rollout_of(c, "web").await["skipped"], json!([ids[0]]));
    c.wait_status(&ids[1], "failed").await;
    c.wait_status(&ids[2], "failed").await;
    ask("continue").await;
    assert!(
        eventually(30, || async {
            rollout_of(c, "web").await["phase"] == "done"
        })
        .await,
        "{}",
        rollout_of(c, "web").await
    );
    let r = rollout_of(c, "web").await;
    let skipped: BTreeSet<&str> = r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let all: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    assert_eq!(skipped, all, "{r}");
    assert!(r["detail"].as_str().unwrap().contains("left behind"), "{r}");
    // Left behind, not deleted: each keeps its record, on the new revision.
    for id in &ids {
        assert_eq!(c.record(id).await["spec_revision"], r["to_revision"]);
    }
}
