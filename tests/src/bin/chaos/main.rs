//! `chaos`: the fault-injection suite behind `cargo xtask chaos`.
//!
//! Brings up 3 etcd members, 2 controllers and 3 agents, each on its own
//! test host (a network namespace with a 198.18.128.0/17 address; the agents
//! share this machine's Docker engine), runs a steady load (see [`load`]),
//! injects one fault per phase, records everything (see [`history`]) and
//! checks the invariants (see [`check`]). Prints a table per phase ending
//! with `violations: N`; exits 1 if N > 0 or a request failed unexpectedly.
//!
//! Usage: `chaos [--short] [--out DIR]` (root, Docker running, binaries
//! built; `$TIDEGATE_BIN_DIR` points at other controller/agent binaries).

mod check;
mod history;
mod load;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Client, CompactionOptions, GetOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tidegate_lab::daemons::{ADMIN, Agent, Controller, lab_cluster, remove_lab_containers, sample};
use tidegate_lab::docker::docker;
use tidegate_lab::etcd::{EtcdCluster, MemberHost};
use tidegate_lab::faults::LossyLink;
use tidegate_lab::images::{DEMO_HTTP, DEMO_TCP, ensure_demo_images};
use tidegate_lab::netns::{NetnsHost, Routed};
use tidegate_schema::config::{AgentConfig, ControllerConfig};
use tidegate_schema::{Keyspace, Kind};

use crate::history::{
    Clock, Fault, Op, Phase, Settle, Target, count_etcd_packets, learn, record_etcd,
    sample_etcd_requests,
};
use crate::load::Shared;

type Res<T> = Result<T, String>;

/// How long each part of a phase lasts.
#[derive(Debug, Clone, Copy)]
struct Pace {
    baseline: f64,
    lead: f64,
    hold: f64,
    recover: f64,
}

/// Shards of the run's controllers: with two controllers, each leads some,
/// so a fault on one pauses only its shards' spawns.
const CHAOS_SHARDS: u16 = 4;

const FULL: Pace = Pace {
    baseline: 15.0,
    lead: 4.0,
    hold: 8.0,
    recover: 8.0,
};
const SHORT: Pace = Pace {
    baseline: 6.0,
    lead: 2.0,
    hold: 6.0,
    recover: 6.0,
};

/// Removes every container of this run's agents (label
/// `tidegate.cluster=lab-<pid>`) on drop, after the agents are gone.
struct Containers;

impl Drop for Containers {
    fn drop(&mut self) {
        remove_lab_containers();
    }
}

/// The cluster. Fields drop in order: processes, containers, etcd, hosts,
/// then the forwarding rules.
struct Lab {
    agents: Vec<Option<Agent>>,
    controllers: Vec<Controller>,
    _containers: Containers,
    etcd: EtcdCluster,
    client: Client,
    agent_hosts: Vec<NetnsHost>,
    controller_hosts: Vec<NetnsHost>,
    etcd_hosts: Vec<NetnsHost>,
    /// A fourth etcd endpoint of the controllers: a link to the members
    /// that loses chosen answers.
    lossy: LossyLink,
    _routed: Routed,
    dir: PathBuf,
}

fn hosts(n: usize) -> Res<Vec<NetnsHost>> {
    (0..n)
        .map(|_| NetnsHost::create().map_err(|e| format!("creating a test host: {e}")))
        .collect()
}

fn challenge(image: &str, port: Value) -> Value {
    json!({
        "image": image,
        "ports": [port],
        "ttl": {"default_secs": 30, "max_secs": 150, "max_renewals": 100},
    })
}

impl Lab {
    async fn start(dir: &Path) -> Res<Lab> {
        ensure_demo_images().map_err(|e| format!("demo images: {e}"))?;
        let routed = Routed::enable().map_err(|e| format!("forwarding rules: {e}"))?;
        let etcd_hosts = hosts(3)?;
        let controller_hosts = hosts(2)?;
        let agent_hosts = hosts(3)?;
        let etcd = EtcdCluster::start_on(&etcd_hosts.iter().collect::<Vec<_>>())
            .map_err(|e| format!("etcd: {e}"))?;
        // The run's own client connects like the daemons (require-leader):
        // a plain client's watch stays on a member cut off from the others
        // and would record its deletes only after the heal (false "lost
        // delete" reports in the minority phase).
        let client = tidegate_etcd::connect(&etcd.endpoints(), None, None)
            .await
            .map_err(|e| format!("etcd client: {e}"))?;
        // It rides through member loss like the daemons.
        tokio::spawn(tidegate_etcd::prune_dead_members(
            client.clone(),
            etcd.endpoints(),
        ));
        let members = etcd.members().iter().map(|m| m.client_addr()).collect();
        let lossy = LossyLink::start_on(SocketAddr::from(([0, 0, 0, 0], 0)), members).await;
        // Long worker grace: a killed or cut-off agent's instances must
        // survive it (deleting them would be a loss the checker reports).
        let mut controllers = Vec::new();
        for (i, host) in controller_hosts.iter().enumerate() {
            let id = format!("c{i}");
            let link = format!("http://{}:{}", host.host_side_addr(), lossy.port());
            let grace = |c: &mut ControllerConfig| {
                c.worker_grace_secs = 120;
                c.etcd.push(link);
                // Scheduling spread over every controller: each fault on
                // "the leader" hits some shards and leaves the others'.
                c.shards = CHAOS_SHARDS;
            };
            controllers.push(Controller::start_on(&etcd, &id, dir, Some(host), grace).await);
        }
        let mut agents = Vec::new();
        for (i, host) in agent_hosts.iter().enumerate() {
            let settings = |c: &mut AgentConfig| {
                c.capacity = 10;
                c.membership_ttl_secs = 6;
            };
            agents.push(Some(
                Agent::start_on(&etcd, &format!("w{i}"), dir, settings, host).await,
            ));
        }
        let lab = Lab {
            agents,
            controllers,
            _containers: Containers,
            etcd,
            client,
            agent_hosts,
            controller_hosts,
            etcd_hosts,
            lossy,
            _routed: routed,
            dir: dir.to_path_buf(),
        };
        let web = web(Value::Null);
        let echo = challenge(
            DEMO_TCP,
            json!({"name": "echo", "port": 1337, "protocol": "tcp"}),
        );
        // Two services on a network of their own per instance, served
        // pinned (the first request routes the connection, then splice).
        let pair = json!({
            "http_mode": "pinned",
            "services": {
                "app": {"image": DEMO_HTTP, "depends_on": ["side"]},
                "side": {"image": DEMO_HTTP, "ready": {"tcp": 8080}},
            },
            "ports": [{"name": "web", "port": 8080, "protocol": "http", "service": "app"}],
            "ttl": {"default_secs": 30, "max_secs": 150, "max_renewals": 100},
        });
        let mut warm = challenge(
            DEMO_HTTP,
            json!({"name": "web", "port": 8080, "protocol": "http"}),
        );
        warm["pool"] = json!({"min": 2, "max": 3});
        warm["flag"] = json!({"file": "/flag"});
        for (name, spec) in [("web", web), ("echo", echo), ("pair", pair), ("warm", warm)] {
            let (status, body) = lab.controllers[0].put_challenge(name, spec).await;
            if !status.is_success() {
                return Err(format!("PUT challenge {name}: {status} {body}"));
            }
        }
        Ok(lab)
    }

    /// The controller that says it leads (waits up to 15 s for one).
    async fn leader(&self) -> Res<usize> {
        for _ in 0..150 {
            for (i, c) in self.controllers.iter().enumerate() {
                if c.proc.is_alive() && c.is_leader().await {
                    return Ok(i);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err("no controller leads after 15 s".into())
    }

    /// The controller that leads the shard of `challenge`.
    async fn leader_of(&self, challenge: &str) -> Res<usize> {
        let shard = tidegate_schema::shards::shard_of(challenge, CHAOS_SHARDS);
        for _ in 0..150 {
            for (i, c) in self.controllers.iter().enumerate() {
                if c.proc.is_alive()
                    && c.status().await["shards"]["led"]
                        .as_array()
                        .is_some_and(|l| l.iter().any(|s| s.as_u64() == Some(u64::from(shard))))
                {
                    return Ok(i);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!(
            "nobody leads shard {shard} ({challenge}) after 15 s"
        ))
    }

    /// The etcd member that leads the raft group (falls back to member 0).
    async fn etcd_leader(&self) -> usize {
        for (i, endpoint) in self.etcd.endpoints().iter().enumerate() {
            if let Ok(mut c) = Client::connect([endpoint.as_str()], None).await
                && let Ok(s) = c.status().await
                && s.header().is_some_and(|h| h.member_id() == s.leader())
            {
                return i;
            }
        }
        0
    }

    fn worker_logs(&self) -> Vec<String> {
        self.agents
            .iter()
            .map(|a| a.as_ref().map(Agent::log).unwrap_or_default())
            .collect()
    }
}

/// Runs the phases under load and returns the history.
async fn run(lab: &mut Lab, s: &Arc<Shared>, pace: Pace) -> Res<()> {
    let mut phase = Phases {
        s: s.clone(),
        index: 0,
    };

    phase.begin("baseline");
    sleep(pace.baseline).await;
    phase.end(lab).await?;

    controller_faults(lab, s, &mut phase, pace).await?;
    etcd_faults(lab, &mut phase, pace).await?;
    consensus_faults(lab, &mut phase, pace).await?;
    skewed_scheduler(lab, &mut phase, pace).await?;
    replaced_member(lab, &mut phase, pace).await?;
    rollout_through_a_leader_kill(lab, s, &mut phase, pace).await?;
    renewals_under_silent_etcd(lab, s, &mut phase, pace).await?;
    agent_faults(lab, &mut phase, pace).await?;
    compaction_under_a_cut_watch(lab, s, &mut phase, pace).await
}

/// Controller `l` killed (SIGKILL) for `secs`, then started again.
async fn kill_controller_for(lab: &mut Lab, phase: &Phases, l: usize, secs: f64) -> Res<()> {
    let f = phase.fault(&format!("SIGKILL c{l}"), Target::Controller(l));
    lab.controllers[l]
        .proc
        .signal("KILL")
        .map_err(|e| e.to_string())?;
    sleep(secs).await;
    lab.controllers[l].restart(&lab.dir).await;
    phase.heal(f);
    Ok(())
}

/// The leader killed, then paused past its lease with requests queued.
async fn controller_faults(
    lab: &mut Lab,
    s: &Arc<Shared>,
    phase: &mut Phases,
    pace: Pace,
) -> Res<()> {
    phase.begin("kill leader controller");
    sleep(pace.lead).await;
    let l = lab.leader().await?;
    // Each fault's window opens just before it is injected.
    kill_controller_for(lab, phase, l, pace.hold).await?;
    sleep(pace.recover).await;
    phase.end(lab).await?;

    phase.begin("pause leader past its lease");
    sleep(pace.lead).await;
    let l = lab.leader().await?;
    let f = phase.fault(
        &format!("SIGSTOP c{l} {:.0} s", pace.hold),
        Target::Controller(l),
    );
    lab.controllers[l]
        .proc
        .signal("STOP")
        .map_err(|e| e.to_string())?;
    // Requests queued at the paused leader: it handles them when it wakes,
    // after another replica took over. None may commit with its token
    // (those it forwards to the new leader commit with the new one). Teams of their own,
    // so that no "team already has one" answer comes before the fenced Txn.
    let queued: Vec<_> = (0..6)
        .map(|i| {
            let s = s.clone();
            let team = format!("paused-{}-{i}", phase.index);
            tokio::spawn(async move { s.spawn("web", &team, Some(l)).await })
        })
        .collect();
    sleep(pace.hold).await;
    lab.controllers[l]
        .proc
        .signal("CONT")
        .map_err(|e| e.to_string())?;
    phase.heal(f);
    for q in queued {
        let _ = q.await;
    }
    sleep(pace.recover).await;
    phase.end(lab).await?;

    Ok(())
}

/// One etcd member lost, then two (quorum).
async fn etcd_faults(lab: &mut Lab, phase: &mut Phases, pace: Pace) -> Res<()> {
    phase.begin("kill one etcd member");
    sleep(pace.lead).await;
    let m = lab.etcd_leader().await;
    let f = phase.fault(
        &format!("SIGKILL etcd m{m} (raft leader)"),
        Target::Etcd(vec![m]),
    );
    lab.etcd.kill_member(m).map_err(|e| e.to_string())?;
    sleep(pace.hold).await;
    lab.etcd.restart_member(m).map_err(|e| e.to_string())?;
    lab.etcd.wait_healthy(m).map_err(|e| e.to_string())?;
    phase.heal(f);
    sleep(pace.recover).await;
    phase.end(lab).await?;

    phase.begin("kill two etcd members (quorum loss)");
    sleep(pace.lead).await;
    let m = lab.etcd_leader().await;
    let other = (m + 1) % 3;
    let f = phase.fault(
        &format!("SIGKILL etcd m{m}, m{other}"),
        Target::Etcd(vec![m, other]),
    );
    phase.check_rate(f);
    lab.etcd.kill_member(m).map_err(|e| e.to_string())?;
    lab.etcd.kill_member(other).map_err(|e| e.to_string())?;
    sleep(pace.hold).await;
    for i in [m, other] {
        lab.etcd.restart_member(i).map_err(|e| e.to_string())?;
    }
    for i in 0..3 {
        lab.etcd.wait_healthy(i).map_err(|e| e.to_string())?;
    }
    phase.heal(f);
    sleep(pace.recover).await;
    phase.end(lab).await?;

    Ok(())
}

/// How long each fdatasync and fsync of the slow-disk member takes longer
/// (µs): in the 200–500 ms of a dying disk.
const SLOW_FSYNC_US: u32 = 300_000;

/// The failure review's faults of consensus: a slow disk under etcd's raft
/// leader (its fsyncs delayed by `strace -e inject`), the raft leader cut
/// off from the other two members (the minority side of a partition), and
/// the leading controller cut off from etcd, not killed (its lease lapses,
/// another takes over, and what it still tries is fenced).
async fn consensus_faults(lab: &mut Lab, phase: &mut Phases, pace: Pace) -> Res<()> {
    phase.begin("slow disk on the etcd raft leader");
    sleep(pace.lead).await;
    let m = lab.etcd_leader().await;
    let pid = lab
        .etcd
        .process(m)
        .ok_or("etcd member is not running")?
        .pid();
    let f = phase.fault(
        &format!(
            "etcd m{m} (raft leader): fsync {} ms slower, {:.0} s",
            SLOW_FSYNC_US / 1000,
            pace.hold
        ),
        Target::EtcdStalled(m),
    );
    phase.check_rate(f);
    let strace = tidegate_lab::faults::slow_disk(
        pid,
        SLOW_FSYNC_US,
        &lab.dir.join(format!("strace-m{m}.log")),
    )?;
    sleep(pace.hold).await;
    // The tracer's end detaches it: the member's disk is fast again.
    drop(strace);
    phase.heal(f);
    sleep(pace.recover).await;
    phase.end(lab).await?;

    phase.begin("etcd raft leader cut off from the other members");
    sleep(pace.lead).await;
    let m = lab.etcd_leader().await;
    let f = phase.fault(
        &format!(
            "etcd m{m} (raft leader) cut off from m{}, m{} {:.0} s",
            (m + 1) % 3,
            (m + 2) % 3,
            pace.hold
        ),
        Target::EtcdMinority(m),
    );
    let host = &lab.etcd_hosts[m];
    for (j, other) in lab.etcd_hosts.iter().enumerate() {
        if j == m {
            continue;
        }
        let other = other.addr().to_string();
        for rule in [["-I", "INPUT", "-s"], ["-I", "OUTPUT", "-d"]] {
            let mut argv = vec!["iptables", "-w"];
            argv.extend_from_slice(&rule);
            argv.extend_from_slice(&[&other, "-j", "DROP"]);
            host.exec(&argv)
                .map_err(|e| format!("cutting etcd m{m} off: {e}"))?;
        }
    }
    sleep(pace.hold).await;
    host.heal().map_err(|e| e.to_string())?;
    phase.heal(f);
    sleep(pace.recover).await;
    phase.end(lab).await?;

    phase.begin("leading controller cut off from etcd");
    sleep(pace.lead).await;
    let l = lab.leader().await?;
    let f = phase.fault(
        &format!("c{l} (scheduler) cut off from etcd {:.0} s", pace.hold),
        Target::Controller(l),
    );
    // Its packets to every etcd endpoint it has (the members and the
    // lossy link) are dropped: connections hang, as on a real partition.
    let host = &lab.controller_hosts[l];
    let lossy = lab.lossy.port().to_string();
    for port in ["2379", lossy.as_str()] {
        host.exec(&[
            "iptables", "-w", "-I", "OUTPUT", "-p", "tcp", "--dport", port, "-j", "DROP",
        ])
        .map_err(|e| format!("cutting c{l} off etcd: {e}"))?;
    }
    sleep(pace.hold).await;
    lab.controller_hosts[l].heal().map_err(|e| e.to_string())?;
    phase.heal(f);
    sleep(pace.recover).await;
    phase.end(lab).await
}

/// How far the skewed controller's clock runs ahead, and the skewed
/// agent's behind (seconds): the failure review's ±30 s.
const SKEW_SECS: i64 = 30;

/// The standby restarted with its wall clock [`SKEW_SECS`] ahead
/// (libfaketime), then the leader killed so that the skewed one schedules
/// over instances the other granted, for twice the hold; then both run
/// with the true clock again. Leases are durations, so nothing may end
/// early except by the skew of the expiries the skewed one granted.
async fn skewed_scheduler(lab: &mut Lab, phase: &mut Phases, pace: Pace) -> Res<()> {
    phase.begin("the scheduler's clock 30 s ahead");
    sleep(pace.lead).await;
    let l = lab.leader().await?;
    let k = (l + 1) % lab.controllers.len();
    let env = tidegate_lab::daemons::faketime(SKEW_SECS)?;
    let skew = phase.fault(
        &format!("c{k}'s clock {SKEW_SECS:+} s"),
        Target::ControllerClock(k, SKEW_SECS),
    );
    let f = phase.fault(
        &format!("restart c{k} (standby) with its clock {SKEW_SECS:+} s"),
        Target::Controller(k),
    );
    lab.controllers[k].restart_under(&lab.dir, &env).await;
    phase.heal(f);
    sleep(pace.lead).await;
    kill_controller_for(lab, phase, l, pace.hold).await?;
    sleep(pace.hold).await;
    let f = phase.fault(
        &format!("restart c{k} with the true clock"),
        Target::Controller(k),
    );
    lab.controllers[k].restart(&lab.dir).await;
    phase.heal(f);
    phase.heal(skew);
    sleep(pace.recover).await;
    phase.end(lab).await
}

/// A follower etcd member replaced under load as an operator replaces a
/// dead machine: killed, `member remove`, data dir wiped, `member add`,
/// started empty; it catches up from the leader under a new member id.
async fn replaced_member(lab: &mut Lab, phase: &mut Phases, pace: Pace) -> Res<()> {
    phase.begin("an etcd member replaced under load");
    sleep(pace.lead).await;
    let m = (lab.etcd_leader().await + 1) % 3;
    let f = phase.fault(
        &format!("replace etcd m{m}: remove, wipe, add, rejoin empty"),
        Target::Etcd(vec![m]),
    );
    let etcd = &mut lab.etcd;
    let id = tokio::task::block_in_place(|| etcd.replace_member(m))
        .map_err(|e| format!("replacing etcd m{m}: {e}"))?;
    tokio::task::block_in_place(|| lab.etcd.wait_healthy(m)).map_err(|e| e.to_string())?;
    phase.heal(f);
    describe(
        phase,
        f,
        format!("replace etcd m{m}: remove, wipe, add, rejoined as {id}"),
    );
    sleep(pace.recover).await;
    phase.end(lab).await
}

/// The `web` challenge's spec (as [`Lab::start`] puts it), with `env`.
fn web(env: Value) -> Value {
    let mut spec = challenge(
        DEMO_HTTP,
        json!({"name": "web", "port": 8080, "protocol": "http"}),
    );
    if !env.is_null() {
        spec["env"] = env;
    }
    spec
}

/// How many seconds the next leader has to finish the rollout (its
/// batches one after another, each as slow as the engine's starts).
const ROLLOUT_FINISH: u32 = 180;

/// A gated rollout of `web` (canary 1, batches of 2) under the load: the
/// organizer's `continue` at the gate, then the leader killed while the
/// batches go on. The next leader finishes it from its record; the checker
/// holds every rewrite to its switch window, its routes and team, and
/// replaces no instance twice.
async fn rollout_through_a_leader_kill(
    lab: &mut Lab,
    s: &Arc<Shared>,
    phase: &mut Phases,
    pace: Pace,
) -> Res<()> {
    phase.begin("a rollout through a leader kill");
    // Four instances of teams the load does not touch, renewed through the
    // phase: the load's own ones live seconds and are often deleted mid
    // switch, which proves nothing about the switch.
    let mut mine = Vec::new();
    for i in 0..4 {
        let call = s
            .spawn("web", &format!("rollout-{}-{i}", phase.index), None)
            .await;
        mine.extend(call.instance);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = {
        let (s, stop, ids) = (s.clone(), stop.clone(), mine.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for id in &ids {
                    let path = format!("/v1/instances/{id}/renew");
                    s.call(Op::Renew, &path, None, Some(id.clone()), None).await;
                }
                sleep(3.0).await;
            }
        })
    };
    for _ in 0..200 {
        let running = s.live(|k| k.running_since.is_some());
        if mine.iter().all(|id| running.iter().any(|(r, _)| r == id)) {
            break;
        }
        sleep(0.1).await;
    }
    sleep(pace.lead).await;
    // The leader of web's shard: the one that moves the rollout.
    let l = lab.leader_of("web").await?;
    let path = "/v1/challenges/web/rollout";
    let spec = web(json!({"ROLLOUT": phase.index.to_string()}));
    let (status, body) = lab.controllers[l]
        .put_challenge_with("web", spec, "rollout=gated&canary=1&batch=2")
        .await;
    if status != StatusCode::OK {
        return Err(format!("starting the rollout of web: {status} {body}"));
    }
    let harness = |msg: String| phase.s.history().harness_errors.push(msg);
    let mut r = Value::Null;
    for _ in 0..300 {
        r = rollout_at(lab, l).await;
        if r["phase"] != "canary" {
            break;
        }
        sleep(0.1).await;
    }
    if r["phase"] == "gate" {
        let (status, body) = lab.controllers[l]
            .call(Method::POST, &format!("{path}/continue"), None, Some(ADMIN))
            .await;
        if status != StatusCode::OK {
            harness(format!("continue at the gate: {status} {body}"));
        }
    } else {
        harness(format!("the rollout never reached its gate: {r}"));
    }
    for _ in 0..100 {
        r = rollout_at(lab, l).await;
        if r["phase"] != "gate" {
            break;
        }
        sleep(0.1).await;
    }
    println!(
        "chaos: [{:6.1} s]   rollout at {}, {} of {} live picked",
        phase.s.clock.now(),
        r["phase"],
        r["replaced"].as_array().map_or(0, Vec::len),
        r["live"]
    );
    kill_controller_for(lab, phase, l, pace.hold).await?;
    let mut done = false;
    for _ in 0..ROLLOUT_FINISH {
        let next = lab.leader().await?;
        r = rollout_at(lab, next).await;
        if r["phase"] == "done" {
            done = true;
            break;
        }
        sleep(1.0).await;
    }
    if !done {
        harness(format!(
            "the rollout did not finish within {ROLLOUT_FINISH} s of the restart: {r}"
        ));
    }
    println!(
        "chaos: [{:6.1} s]   rollout {}: {}",
        phase.s.clock.now(),
        r["phase"],
        r["detail"]
    );
    sleep(pace.recover).await;
    stop.store(true, Ordering::Relaxed);
    let _ = renewer.await;
    for id in &mine {
        s.delete(id).await;
    }
    phase.end(lab).await
}

/// `web`'s rollout as controller `i` answers it.
async fn rollout_at(lab: &Lab, i: usize) -> Value {
    lab.controllers[i]
        .call(Method::GET, "/v1/challenges/web/rollout", None, Some(ADMIN))
        .await
        .1
}

/// Rewrites what fault `f` says (once its outcome is known).
fn describe(phase: &Phases, f: usize, what: String) {
    phase.s.history().faults[f].what = what;
}

/// How long an etcd member stays silent in [`renewals_under_silent_etcd`]:
/// longer than the etcd clients' keep-alive timeout (2 s), so that
/// connections to it are declared dead with requests in flight, and shorter
/// than an agent's membership TTL (6 s).
const SILENT_SECS: f64 = 3.0;

/// Every live instance renewed in a loop while etcd's raft leader is paused
/// and resumed, then while another member's replies are dropped, then while
/// the controllers' link to etcd loses the answers to writes it passed on
/// (committed, unanswered). No instance may be lost to a renewal.
async fn renewals_under_silent_etcd(
    lab: &mut Lab,
    s: &Arc<Shared>,
    phase: &mut Phases,
    pace: Pace,
) -> Res<()> {
    phase.begin("renew loop: etcd leader paused, replies dropped, answers lost");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let renewer = tokio::spawn(load::renew_all(s.clone(), stop.clone()));
    sleep(pace.lead).await;
    let m = lab.etcd_leader().await;
    let f = phase.fault(
        &format!("SIGSTOP etcd m{m} (raft leader) {SILENT_SECS:.0} s"),
        Target::EtcdStalled(m),
    );
    let member = lab.etcd.process(m).ok_or("etcd member is not running")?;
    member.signal("STOP").map_err(|e| e.to_string())?;
    sleep(SILENT_SECS).await;
    member.signal("CONT").map_err(|e| e.to_string())?;
    phase.heal(f);
    sleep(pace.lead).await;

    let m = (lab.etcd_leader().await + 1) % 3;
    let port = lab.etcd.members()[m].client_addr().port().to_string();
    let f = phase.fault(
        &format!("drop etcd m{m}'s replies to controllers {SILENT_SECS:.0} s"),
        Target::EtcdStalled(m),
    );
    // Only the replies to the controllers: the agents and this run's own
    // watch keep hearing from it.
    let host = &lab.etcd_hosts[m];
    for c in &lab.controller_hosts {
        let to = c.addr().to_string();
        host.exec(&[
            "iptables", "-w", "-I", "OUTPUT", "-p", "tcp", "--sport", &port, "-d", &to, "-j",
            "DROP",
        ])
        .map_err(|e| format!("dropping replies: {e}"))?;
    }
    sleep(SILENT_SECS).await;
    host.heal().map_err(|e| e.to_string())?;
    phase.heal(f);
    sleep(pace.lead).await;

    // The controllers' fourth endpoint loses the answer to the next write
    // through it, once a second: committed, and unanswered.
    let before = lab.lossy.lost();
    let f = phase.fault(
        &format!("lose write answers on an etcd link {:.0} s", pace.hold),
        Target::EtcdStalled(3),
    );
    let until = std::time::Instant::now() + Duration::from_secs_f64(pace.hold);
    while std::time::Instant::now() < until {
        lab.lossy.arm(1);
        sleep(1.0).await;
    }
    lab.lossy.arm(0);
    phase.heal(f);
    sleep(pace.recover).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let renewed = renewer.await.map_err(|e| e.to_string())?;
    println!(
        "  renew loop: {renewed} renewals asked; {} write answers lost",
        lab.lossy.lost() - before
    );
    phase.end(lab).await
}

/// An agent killed and restarted, then another partitioned.
async fn agent_faults(lab: &mut Lab, phase: &mut Phases, pace: Pace) -> Res<()> {
    phase.begin("kill -9 an agent, restart it");
    sleep(pace.lead).await;
    let a = 1;
    let agent = lab.agents[a].take().ok_or("agent w1 is not running")?;
    let f = phase.fault("SIGKILL agent w1", Target::Agent(a));
    agent.proc.signal("KILL").map_err(|e| e.to_string())?;
    sleep(pace.hold).await;
    lab.agents[a] = Some(agent.restart(&lab.dir).await);
    phase.heal(f);
    sleep(pace.recover).await;
    phase.end(lab).await?;

    phase.begin("an agent's clock 30 s behind");
    sleep(pace.lead).await;
    let a = 1;
    let env = tidegate_lab::daemons::faketime(-SKEW_SECS)?;
    let skew = phase.fault(
        &format!("w1's clock {:+} s", -SKEW_SECS),
        Target::AgentClock(a, -SKEW_SECS),
    );
    let f = phase.fault(
        &format!("restart w1 with its clock {:+} s", -SKEW_SECS),
        Target::Agent(a),
    );
    let agent = lab.agents[a].take().ok_or("agent w1 is not running")?;
    lab.agents[a] = Some(agent.restart_under(&lab.dir, &env).await);
    phase.heal(f);
    sleep(pace.hold).await;
    let f = phase.fault("restart w1 with the true clock", Target::Agent(a));
    let agent = lab.agents[a].take().ok_or("agent w1 is not running")?;
    lab.agents[a] = Some(agent.restart(&lab.dir).await);
    phase.heal(f);
    phase.heal(skew);
    sleep(pace.recover).await;
    phase.end(lab).await?;

    phase.begin("partition an agent, heal");
    sleep(pace.lead).await;
    let a = 2;
    let f = phase.fault("drop all traffic of w2's host", Target::Agent(a));
    lab.agent_hosts[a].partition().map_err(|e| e.to_string())?;
    sleep(pace.hold).await;
    lab.agent_hosts[a].heal().map_err(|e| e.to_string())?;
    phase.heal(f);
    sleep(pace.recover).await;
    phase.end(lab).await?;

    Ok(())
}

/// A compaction while an agent's etcd connections are cut: it must relist.
async fn compaction_under_a_cut_watch(
    lab: &mut Lab,
    s: &Arc<Shared>,
    phase: &mut Phases,
    pace: Pace,
) -> Res<()> {
    phase.begin("compaction while an agent's watch is cut");
    sleep(pace.lead).await;
    let a = 0;
    let relists_before = relists(&lab.worker_logs()[a]);
    let f = phase.fault("reset w0's etcd connections", Target::AgentEtcdLink(a));
    lab.agent_hosts[a]
        .cut_port(2379)
        .map_err(|e| e.to_string())?;
    // Let the agent notice (its lease keep-alive runs every 2 s), then
    // change what it owns and compact past all of it.
    sleep(2.5).await;
    for (id, _) in s.live(|k| k.worker == "w0").into_iter().take(2) {
        s.delete(&id).await;
    }
    s.spawn("web", "t0", None).await;
    sleep(0.5).await;
    let revision = compact_now(&lab.client).await?;
    sleep(0.5).await;
    lab.agent_hosts[a].heal().map_err(|e| e.to_string())?;
    phase.heal(f);
    sleep(pace.recover).await;
    let relisted = relists(&lab.worker_logs()[a]) > relists_before;
    s.history().faults[f].what = format!(
        "reset w0's etcd connections, compact at {revision}; w0 relisted: {}",
        if relisted { "yes" } else { "no" }
    );
    phase.end(lab).await?;
    Ok(())
}

/// Compacts etcd at its current revision (physically) and returns that
/// revision. Retried: the run's client may first meet a connection that an
/// earlier phase broke (a replaced or restarted member) and fail once with
/// a broken pipe while the members are fine.
async fn compact_now(client: &Client) -> Res<i64> {
    let mut last = String::new();
    for _ in 0..10 {
        let mut c = client.clone();
        let revision = match c.get(Keyspace::default().root_prefix(), None).await {
            Ok(r) => r.header().map_or(0, |h| h.revision()),
            Err(e) => {
                last = format!("reading the revision: {e}");
                sleep(0.3).await;
                continue;
            }
        };
        match c
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
        {
            Ok(_) => return Ok(revision),
            // An earlier try went through and only its answer was lost.
            Err(e) if e.to_string().contains("has been compacted") => return Ok(revision),
            Err(e) => last = format!("compaction at {revision}: {e}"),
        }
        sleep(0.3).await;
    }
    Err(last)
}

fn relists(log: &str) -> usize {
    log.matches("watch fell behind compaction").count()
}

async fn sleep(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

/// Marks phases and faults in the history and checks each phase's end.
struct Phases {
    s: Arc<Shared>,
    index: usize,
}

impl Phases {
    fn begin(&mut self, name: &str) {
        let now = self.s.clock.now();
        println!("chaos: [{:6.1} s] phase {}: {name}", now, self.index);
        self.s.history().phases.push(Phase {
            name: name.to_string(),
            from: now,
            to: f64::INFINITY,
        });
    }

    fn fault(&self, what: &str, target: Target) -> usize {
        let now = self.s.clock.now();
        println!("chaos: [{now:6.1} s]   fault: {what}");
        let mut h = self.s.history();
        h.faults.push(Fault {
            phase: self.index,
            what: what.to_string(),
            target,
            from: now,
            to: f64::INFINITY,
        });
        h.faults.len() - 1
    }

    /// Compares etcd's request rate during `fault` (and the recovery after
    /// it) with the baseline's: a retry storm is a violation.
    fn check_rate(&self, fault: usize) {
        self.s.history().rate_checked.push(fault);
    }

    fn heal(&self, fault: usize) {
        let now = self.s.clock.now();
        println!("chaos: [{now:6.1} s]   healed");
        self.s.history().faults[fault].to = now;
    }

    /// Pauses the API load, waits until Docker, etcd and every agent's
    /// route table agree (up to 30 s), records that, and resumes.
    async fn end(&mut self, lab: &Lab) -> Res<()> {
        self.s.paused.store(true, Ordering::Relaxed);
        let mut disagreements = Vec::new();
        let mut state = (0, 0);
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            match compare(lab, &self.s).await {
                Ok((d, revision, live)) => {
                    disagreements = d;
                    state = (revision, live);
                }
                // e.g. the run's own client tried a member that just restarted
                Err(e) => disagreements = vec![e],
            }
            if disagreements.is_empty() {
                break;
            }
        }
        let now = self.s.clock.now();
        {
            let mut h = self.s.history();
            h.settles.push(Settle {
                phase: self.index,
                at: now,
                disagreements: disagreements.clone(),
                revision: state.0,
                live_instances: state.1,
            });
            if let Some(p) = h.phases.last_mut() {
                p.to = now;
            }
        }
        println!(
            "chaos: [{now:6.1} s]   end state: revision {}, {} live instances, {}",
            state.0,
            state.1,
            if disagreements.is_empty() {
                "containers, records and route tables agree".to_string()
            } else {
                format!("DISAGREE: {}", disagreements.join("; "))
            }
        );
        self.s.paused.store(false, Ordering::Relaxed);
        self.index += 1;
        Ok(())
    }
}

/// What differs between etcd's live instances, the running containers,
/// and each agent's route table (size at the revision it reports).
async fn compare(lab: &Lab, s: &Shared) -> Res<(Vec<String>, i64, usize)> {
    let resp = lab
        .client
        .clone()
        .get(
            Keyspace::default().prefix(Kind::Instances),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(|e| format!("reading instances: {e}"))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    // (instance, service or "", worker) of each container a record wants,
    // and (instance, worker) of each network.
    let mut records: BTreeSet<(String, String, String)> = BTreeSet::new();
    let mut wanted_networks: BTreeSet<(String, String)> = BTreeSet::new();
    let mut live = 0;
    for r in resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<Value>(kv.value()).ok())
    {
        live += 1;
        let field = |f: &str| r[f].as_str().unwrap_or_default().to_string();
        match r["services"].as_object() {
            Some(services) => {
                for name in services.keys() {
                    records.insert((field("id"), name.clone(), field("worker")));
                }
                wanted_networks.insert((field("id"), field("worker")));
            }
            None => {
                records.insert((field("id"), String::new(), field("worker")));
            }
        }
    }
    let label = format!("label=tidegate.cluster={}", lab_cluster());
    let rows = docker(&[
        "ps",
        "--filter",
        &label,
        "--format",
        "{{.Label \"tidegate.instance\"}} {{.Label \"tidegate.service\"}} {{.Label \"tidegate.worker\"}}",
    ])
    .map_err(|e| format!("docker ps: {e}"))?;
    let containers: BTreeSet<(String, String, String)> = rows
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((
                f.next()?.to_string(),
                f.next()?.to_string(),
                f.next()?.to_string(),
            ))
        })
        .collect();
    let rows = docker(&[
        "network",
        "ls",
        "--filter",
        &label,
        "--format",
        "{{.Label \"tidegate.instance\"}} {{.Label \"tidegate.worker\"}}",
    ])
    .map_err(|e| format!("docker network ls: {e}"))?;
    let networks: BTreeSet<(String, String)> = rows
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(i, _)| !i.is_empty())
        .map(|(i, w)| (i.to_string(), w.to_string()))
        .collect();
    let mut out = Vec::new();
    let service = |s: &str| {
        if s.is_empty() {
            String::new()
        } else {
            format!(" service {s}")
        }
    };
    for (id, s, w) in records.difference(&containers) {
        out.push(format!(
            "record {id}{} on {w} has no running container",
            service(s)
        ));
    }
    for (id, s, w) in containers.difference(&records) {
        out.push(format!(
            "container of {id}{} runs on {w} without a live record",
            service(s)
        ));
    }
    for (id, w) in wanted_networks.difference(&networks) {
        out.push(format!("record {id} on {w} has no network"));
    }
    for (id, w) in networks.difference(&wanted_networks) {
        out.push(format!("network of {id} on {w} without a live record"));
    }
    for agent in lab.agents.iter().flatten() {
        let text = agent.metrics().await.unwrap_or_default();
        let (Some(rev), Some(routes)) = (
            sample(&text, "tidegate_agent_routes_revision"),
            sample(&text, "tidegate_agent_routes"),
        ) else {
            out.push(format!("{} does not answer /metrics", agent.worker));
            continue;
        };
        let want = hostnames_at(s, rev as i64);
        if routes as usize != want {
            out.push(format!(
                "{} routes {routes} hostnames at revision {rev}; etcd had {want} then",
                agent.worker
            ));
        }
    }
    Ok((out, revision, live))
}

/// How many HTTP hostnames the live instance records had at `revision`.
fn hostnames_at(s: &Shared, revision: i64) -> usize {
    let h = s.history();
    let mut live: BTreeMap<&str, bool> = BTreeMap::new();
    for e in h.events.iter().take_while(|e| e.revision <= revision) {
        let Some(("instances", id)) = history::split_key(&e.key) else {
            continue;
        };
        match &e.value {
            Some(v) => {
                let http = serde_json::from_slice::<Value>(v)
                    .is_ok_and(|r| r["http"].as_array().is_some_and(|a| !a.is_empty()));
                live.insert(id, http);
            }
            None => {
                live.remove(id);
            }
        }
    }
    live.values().filter(|http| **http).count()
}

fn write_history(s: &Shared, dir: &Path, report: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let h = s.history();
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("history.txt"))?);
    writeln!(f, "# start (unix) {:.3}", h.start_unix)?;
    for p in &h.phases {
        writeln!(f, "phase {:.3}..{:.3} {}", p.from, p.to, p.name)?;
    }
    for x in &h.faults {
        writeln!(
            f,
            "fault {:.3}..{:.3} {:?} {}",
            x.from, x.to, x.target, x.what
        )?;
    }
    for c in &h.calls {
        writeln!(
            f,
            "call {:.3} +{:.3} {} c{} {} {} {}",
            c.at,
            c.took,
            c.op.name(),
            c.controller,
            c.instance.as_deref().unwrap_or("-"),
            c.status,
            c.body
        )?;
    }
    for p in &h.probes {
        writeln!(
            f,
            "probe {:.3} +{:.3} w{} {} {} {:?}",
            p.at,
            p.took,
            p.agent,
            if p.tcp { "tcp" } else { "http" },
            p.instance,
            p.outcome
        )?;
    }
    for e in &h.events {
        let value = e
            .value
            .as_ref()
            .map(|v| String::from_utf8_lossy(v).into_owned());
        writeln!(
            f,
            "etcd {:.3} {} {} {}",
            e.at,
            e.revision,
            e.key,
            value.as_deref().unwrap_or("<deleted>")
        )?;
    }
    for st in &h.settles {
        writeln!(
            f,
            "settle phase {} at {:.3}: revision {}, {} live, {:?}",
            st.phase, st.at, st.revision, st.live_instances, st.disagreements
        )?;
    }
    std::fs::write(dir.join("report.md"), report)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pace = if args.iter().any(|a| a == "--short") {
        SHORT
    } else {
        FULL
    };
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("tidegate-chaos"));
    let _ = std::fs::remove_dir_all(&out);
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("chaos: cannot create {}: {e}", out.display());
        std::process::exit(2);
    }
    match chaos(&out, pace).await {
        Ok(clean) => std::process::exit(if clean { 0 } else { 1 }),
        Err(e) => {
            eprintln!(
                "chaos: the run could not complete: {e}\n(logs in {})",
                out.display()
            );
            std::process::exit(2);
        }
    }
}

/// Runs everything; `Ok(true)` when there were no violations and no
/// unexpected failures.
async fn chaos(out: &Path, pace: Pace) -> Res<bool> {
    let clock = Clock::new();
    let mut lab = Lab::start(out).await?;
    let s = Arc::new(Shared::new(
        clock,
        lab.controllers.iter().map(|c| c.url.clone()).collect(),
        lab.agent_hosts
            .iter()
            .map(|h| (std::net::SocketAddr::from((h.addr(), 8080)), h.addr()))
            .collect(),
    ));
    {
        let mut h = s.history();
        h.controller_ids = lab.controllers.iter().map(|c| c.id.clone()).collect();
        h.workers = (0..lab.agents.len()).map(|i| format!("w{i}")).collect();
    }
    let recorder = {
        let s = s.clone();
        let errors = s.clone();
        tokio::spawn(record_etcd(
            lab.client.clone(),
            clock,
            move |e| {
                learn(&mut s.known(), &e);
                s.history().events.push(e);
            },
            move |msg| errors.history().harness_errors.push(msg),
        ))
    };
    let sampler = {
        let daemons: Vec<_> = lab
            .controller_hosts
            .iter()
            .chain(&lab.agent_hosts)
            .map(|h| h.addr())
            .collect();
        for member in &lab.etcd_hosts {
            count_etcd_packets(member, &daemons)?;
        }
        // Counting starts now, before the baseline phase.
        s.history().etcd_requests.push((clock.now(), 0.0));
        let s = s.clone();
        let netns = lab
            .etcd_hosts
            .iter()
            .map(|h| h.netns().to_string())
            .collect();
        tokio::spawn(sample_etcd_requests(netns, clock, move |at, total| {
            s.history().etcd_requests.push((at, total))
        }))
    };
    let mut tasks = Vec::new();
    for seed in 0..3 {
        let s = s.clone();
        tasks.push(tokio::spawn(
            async move { load::client(&s, seed + 1).await },
        ));
    }
    for seed in 0..3 {
        let s = s.clone();
        tasks.push(tokio::spawn(
            async move { load::prober(&s, seed + 101).await },
        ));
    }
    let result = run(&mut lab, &s, pace).await;
    s.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    // Let the recorder see the last changes.
    sleep(1.0).await;
    recorder.abort();
    sampler.abort();
    result?;
    let report = {
        let h = s.history();
        let r = check::check(&h);
        let text = check::render(&h, &r);
        (text, r.violations.is_empty() && r.unexpected() == 0)
    };
    print!("{}", report.0);
    if let Err(e) = write_history(&s, out, &report.0) {
        eprintln!("chaos: could not write the history: {e}");
    }
    println!("chaos: history, report and logs in {}", out.display());
    // Count the spawns that were acknowledged, for the reader.
    let acked = s
        .history()
        .calls
        .iter()
        .filter(|c| c.op == Op::Spawn && c.status == 201)
        .count();
    println!("chaos: {acked} spawns acknowledged");
    Ok(report.1)
}
