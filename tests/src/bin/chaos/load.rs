//! The steady load: API clients spawning, renewing and deleting for several
//! teams, and probes sending HTTP and TCP traffic to live (and to recently
//! deleted) instances through every agent. Everything lands in the history.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tidegate_lab::daemons::PLATFORM;
use tidegate_lab::images::DEMO_HTTP_BODY;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::history::{Call, Clock, History, Known, Op, Outcome, Probe};

/// Teams of the load; each keeps at most one instance per challenge.
pub(crate) const TEAMS: [&str; 8] = ["t0", "t1", "t2", "t3", "t4", "t5", "t6", "t7"];
/// How long a probe waits for its answer: past two SYN retransmits (1 s,
/// then 2 s). The lab's agents live in network namespaces, so their
/// traffic to each other and to containers crosses the host's FORWARD
/// chain, which Docker rearranges (deleting and re-inserting its
/// DOCKER-USER jump) whenever it makes or removes a network; a SYN in that
/// moment is dropped. With an instance network per two-service instance
/// in the load, that happens several times a second (1.5 s lost one TCP
/// probe of 7,488 in a CI run, outside any fault). Production agents run
/// in the host's namespace, where this path is not forwarded.
const PROBE_TIMEOUT: Duration = Duration::from_millis(3500);
/// The challenges of the load: an HTTP one, a TCP one, an HTTP one of
/// two services, and an HTTP one served from a warm pool (its flag in a
/// file). With the pool they need more than the agents' slots when every
/// team holds one of each: some spawns wait in the queue (202).
pub(crate) const CHALLENGES: [&str; 4] = ["web", "echo", "pair", "warm"];

/// State shared by the load, the probes, the recorder and the phases.
pub(crate) struct Shared {
    pub(crate) clock: Clock,
    pub(crate) history: Mutex<History>,
    pub(crate) known: Mutex<BTreeMap<String, Known>>,
    /// Controllers' API URLs by index.
    pub(crate) controllers: Vec<String>,
    /// Agents' HTTP entry points and TCP addresses by index.
    pub(crate) agents: Vec<(SocketAddr, Ipv4Addr)>,
    /// Which controller the load asks first (the last one that answered).
    pub(crate) hint: AtomicUsize,
    /// Set while a phase's end state is checked: API clients idle.
    pub(crate) paused: AtomicBool,
    pub(crate) stop: AtomicBool,
    /// Instances the load asked to delete (not spawned or renewed again).
    pub(crate) deleting: Mutex<BTreeSet<String>>,
    http: reqwest::Client,
}

/// A small deterministic generator (xorshift), one per task.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }

    pub(crate) fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

impl Shared {
    pub(crate) fn new(
        clock: Clock,
        controllers: Vec<String>,
        agents: Vec<(SocketAddr, Ipv4Addr)>,
    ) -> Self {
        Self {
            clock,
            history: Mutex::new(History {
                start_unix: clock.start_unix,
                ..History::default()
            }),
            known: Mutex::new(BTreeMap::new()),
            controllers,
            agents,
            hint: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            deleting: Mutex::new(BTreeSet::new()),
            // A connection per probe: a pinned connection reused for
            // another Host would still reach its first instance.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }

    pub(crate) fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn known(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Known>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deleting(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.deleting.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn send(
        &self,
        to: usize,
        method: &Method,
        path: &str,
        body: &Option<Value>,
        timeout: Duration,
    ) -> (u16, Value, Option<String>) {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.controllers[to]))
            .bearer_auth(PLATFORM)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                // A standby's forwarded answer names who made it.
                let by = r
                    .headers()
                    .get("x-tidegate-scheduler")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                let text = r.text().await.unwrap_or_default();
                (
                    status,
                    serde_json::from_str(&text).unwrap_or(Value::String(text)),
                    by,
                )
            }
            Err(e) => (599, Value::String(e.to_string()), None),
        }
    }

    /// One API operation. Asks the hinted controller (or only `pinned`;
    /// a standby forwards to the leader), and tries the other controller
    /// once when the first gives no answer. Every attempt is recorded (an
    /// attempt without an answer may still have taken effect); returns the
    /// last.
    pub(crate) async fn call(
        &self,
        op: Op,
        path: &str,
        body: Option<Value>,
        instance: Option<String>,
        pinned: Option<usize>,
    ) -> Call {
        let method = match op {
            Op::Spawn | Op::Renew => Method::POST,
            Op::Delete => Method::DELETE,
        };
        let mut to = pinned.unwrap_or_else(|| self.hint.load(Ordering::Relaxed));
        let mut last = None;
        for _ in 0..3 {
            // A request pinned to one controller (e.g. a paused one) waits
            // for it; the load gives up after 5 s and tries the other.
            let timeout = Duration::from_secs(if pinned.is_some() { 60 } else { 5 });
            let at = self.clock.now();
            let answer = self.send(to, &method, path, &body, timeout).await;
            // The controller that made the answer: the one asked, or the
            // scheduler it forwarded to.
            let by = answer.2.as_ref().and_then(|id| {
                let h = self.history();
                h.controller_ids.iter().position(|c| c == id)
            });
            let call = Call {
                at,
                took: self.clock.now() - at,
                op,
                controller: by.unwrap_or(to),
                instance: instance
                    .clone()
                    .or_else(|| answer.1["id"].as_str().map(String::from)),
                status: answer.0,
                body: answer.1.clone(),
            };
            self.history().calls.push(call.clone());
            last = Some(call);
            if pinned.is_some() {
                break;
            }
            let next = if answer.0 == 599 {
                Some((to + 1) % self.controllers.len())
            } else {
                None
            };
            match next {
                Some(n) if n != to => to = n,
                _ => break,
            }
        }
        let call = last.unwrap_or(Call {
            at: self.clock.now(),
            took: 0.0,
            op,
            controller: to,
            instance,
            status: 599,
            body: Value::Null,
        });
        if pinned.is_none() && call.status != 599 {
            self.hint.store(call.controller, Ordering::Relaxed);
        }
        call
    }

    pub(crate) async fn spawn(&self, challenge: &str, team: &str, pinned: Option<usize>) -> Call {
        let body = json!({"challenge": challenge, "team": team});
        self.call(Op::Spawn, "/v1/instances", Some(body), None, pinned)
            .await
    }

    pub(crate) async fn delete(&self, id: &str) -> Call {
        self.deleting().insert(id.to_string());
        self.call(
            Op::Delete,
            &format!("/v1/instances/{id}"),
            None,
            Some(id.into()),
            None,
        )
        .await
    }

    /// Live instances (not ended, not being deleted) matching `filter`.
    pub(crate) fn live(&self, filter: impl Fn(&Known) -> bool) -> Vec<(String, Known)> {
        let deleting = self.deleting().clone();
        self.known()
            .iter()
            // Pooled instances are no team's: nothing to renew or probe.
            .filter(|(id, k)| {
                k.ended.is_none() && !k.team.is_empty() && !deleting.contains(*id) && filter(k)
            })
            .map(|(id, k)| (id.clone(), k.clone()))
            .collect()
    }
}

/// Renews every live instance, one request each about every 1.2 s (a
/// renewal extends by whole seconds), until `stop`; how many it asked.
pub(crate) async fn renew_all(s: Arc<Shared>, stop: Arc<AtomicBool>) -> usize {
    let mut asked = 0;
    while !stop.load(Ordering::Relaxed) {
        let round: Vec<_> = s
            .live(|_| true)
            .into_iter()
            .map(|(id, _)| {
                let s = s.clone();
                tokio::spawn(async move {
                    let path = format!("/v1/instances/{id}/renew");
                    s.call(Op::Renew, &path, None, Some(id), None).await;
                })
            })
            .collect();
        asked += round.len();
        for r in round {
            let _ = r.await;
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    asked
}

/// One API client: picks a team, then spawns (if the team has a free
/// challenge), renews or deletes one of its instances.
pub(crate) async fn client(s: &Shared, seed: u64) {
    let mut rng = Rng::new(seed);
    while !s.stop.load(Ordering::Relaxed) {
        if s.paused.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let team = TEAMS[rng.below(TEAMS.len())];
        let mine = s.live(|k| k.team == team);
        let free: Vec<&str> = CHALLENGES
            .iter()
            .copied()
            .filter(|c| !mine.iter().any(|(_, k)| k.challenge == *c))
            .collect();
        if !free.is_empty() && (mine.is_empty() || rng.chance(50)) {
            s.spawn(free[rng.below(free.len())], team, None).await;
        } else if let Some((id, _)) = mine.get(rng.below(mine.len())) {
            if rng.chance(60) {
                let path = format!("/v1/instances/{id}/renew");
                s.call(Op::Renew, &path, None, Some(id.clone()), None).await;
            } else {
                s.delete(id).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(150 + rng.below(200) as u64)).await;
    }
}

/// One prober: every 50 ms, an HTTP or TCP request through a random agent
/// to a live instance that serves (70 %) or, over HTTP, to an instance
/// deleted in the last 40 s (30 %), which must not be routed.
pub(crate) async fn prober(s: &Shared, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut n = 0u64;
    while !s.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = s.clock.now();
        let unix = s.clock.start_unix + now;
        let target = if rng.chance(70) {
            let live = s.live(|k| {
                k.running_since.is_some_and(|t| t + 1.0 <= now) && k.expires_at as f64 > unix + 4.0
            });
            live.get(rng.below(live.len())).cloned()
        } else {
            let ended: Vec<(String, Known)> = s
                .known()
                .iter()
                .filter(|(_, k)| k.hostname.is_some() && k.ended.is_some_and(|t| now - t < 40.0))
                .map(|(id, k)| (id.clone(), k.clone()))
                .collect();
            ended.get(rng.below(ended.len())).cloned()
        };
        let Some((id, known)) = target else { continue };
        let agent = rng.below(s.agents.len());
        let (entry, tcp_ip) = s.agents[agent];
        n += 1;
        let at = s.clock.now();
        let (tcp, outcome) = match (&known.hostname, known.port) {
            (Some(host), _) => (false, http_probe(&s.http, entry, host).await),
            (None, Some(port)) => (true, tcp_probe(SocketAddr::from((tcp_ip, port)), n).await),
            (None, None) => continue,
        };
        let probe = Probe {
            at,
            took: s.clock.now() - at,
            agent,
            instance: id,
            tcp,
            outcome,
        };
        s.history().probes.push(probe);
    }
}

async fn http_probe(http: &reqwest::Client, entry: SocketAddr, host: &str) -> Outcome {
    let resp = http
        .get(format!("http://{entry}/"))
        .header("host", host)
        .timeout(PROBE_TIMEOUT)
        .send()
        .await;
    match resp {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            match status {
                200 if body.contains(DEMO_HTTP_BODY) => Outcome::Served,
                404 => Outcome::NotRouted,
                other => Outcome::Routed(other),
            }
        }
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

async fn tcp_probe(addr: SocketAddr, n: u64) -> Outcome {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let line = format!("probe-{n}\n");
        stream.write_all(line.as_bytes()).await?;
        let mut back = String::new();
        BufReader::new(&mut stream).read_line(&mut back).await?;
        Ok::<_, std::io::Error>(back == line)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok(true)) => Outcome::Served,
        Ok(Ok(false)) => Outcome::Failed("wrong echo".into()),
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(_) => Outcome::Failed("timed out".into()),
    }
}
