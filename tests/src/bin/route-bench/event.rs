//! `event`: the start of an event as players make it. Teams arrive spread
//! over a few seconds, each spawns one challenge of a mix, waits for it as
//! a player's page would (retrying a refusal after its Retry-After, asking
//! about a queued place every second), plays a while, then deletes it so
//! the room goes to the next team.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long one team may take from its arrival to its instance serving.
const TEAM_DEADLINE: Duration = Duration::from_secs(600);
/// How often a player's page asks about a queued place.
const QUEUE_POLL: Duration = Duration::from_secs(1);
/// How often the committed resources of the workers are sampled.
const SAMPLE: Duration = Duration::from_millis(250);

/// The refusals counted over the run.
#[derive(Default)]
struct Counts {
    unavailable: AtomicUsize,
    too_many: AtomicUsize,
    queued: AtomicUsize,
}

/// One team's times, in ms from the start of the run.
struct Team {
    arrived: f64,
    admitted: f64,
    routable: f64,
}

struct Run<'a> {
    http: reqwest::Client,
    api: &'a str,
    token: &'a str,
    agent: &'a str,
    start: Instant,
    counts: Counts,
}

/// `event <api> <token> <teams> <arrive ms> <play ms> <challenges> <agent
/// entry>`: team `i` arrives at `i × arrive / teams` ms and spawns the
/// `i mod k`-th of the comma-separated challenges. Prints JSON: per team
/// its arrival, admission (the 201, or its queued place turned into an
/// instance) and first 200, the 503/429/202 counts, and each worker's
/// peak committed memory beside its allocatable.
pub(crate) async fn event(args: &[String]) -> Result<(), String> {
    let [api, token, teams, arrive, play, challenges, agent] = args else {
        return Err(
            "event <api> <token> <teams> <arrive ms> <play ms> <challenges> <agent entry>".into(),
        );
    };
    let number = |s: &str, what: &str| -> Result<u64, String> {
        s.parse()
            .map_err(|_| format!("{what} must be a number, not {s:?}"))
    };
    let teams = number(teams, "teams")?;
    let arrive = number(arrive, "arrive ms")?;
    let play = Duration::from_millis(number(play, "play ms")?);
    let challenges: Vec<&str> = challenges.split(',').filter(|c| !c.is_empty()).collect();
    if challenges.is_empty() {
        return Err("no challenge named".into());
    }
    let run = Arc::new(Run {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| e.to_string())?,
        api,
        token,
        agent,
        start: Instant::now(),
        counts: Counts::default(),
    });
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (http, url, token, done) = (
            run.http.clone(),
            format!("{api}/v1/workers"),
            token.clone(),
            done.clone(),
        );
        tokio::spawn(async move { peaks(&http, &url, &token, &done).await })
    };
    let one = |i: u64| {
        let run = run.clone();
        let challenge = challenges[(i % challenges.len() as u64) as usize];
        async move {
            let at = Duration::from_millis(arrive * i / teams.max(1));
            tokio::time::sleep_until((run.start + at).into()).await;
            run.team(i, challenge, play).await
        }
    };
    let results = futures::future::join_all((0..teams).map(one)).await;
    done.store(true, Ordering::Relaxed);
    let peaks = sampler.await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for r in results {
        out.push(r?);
    }
    let c = &run.counts;
    println!(
        "{}",
        json!({
            "arrived_ms": out.iter().map(|t| t.arrived).collect::<Vec<_>>(),
            "admitted_ms": out.iter().map(|t| t.admitted).collect::<Vec<_>>(),
            "routable_ms": out.iter().map(|t| t.routable).collect::<Vec<_>>(),
            "unavailable": c.unavailable.load(Ordering::Relaxed),
            "too_many": c.too_many.load(Ordering::Relaxed),
            "queued": c.queued.load(Ordering::Relaxed),
            "peaks": peaks,
        })
    );
    Ok(())
}

impl Run<'_> {
    fn ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1000.0
    }

    /// One team: spawn until admitted, wait until it serves, play, delete.
    async fn team(&self, i: u64, challenge: &str, play: Duration) -> Result<Team, String> {
        let team = format!("event-{i}");
        let arrived = self.ms();
        let deadline = Instant::now() + TEAM_DEADLINE;
        let (id, host) = self.admitted(&team, challenge, deadline).await?;
        let admitted = self.ms();
        super::served(&self.http, self.agent, &host, deadline)
            .await
            .map_err(|got| format!("{team}: {host} not served in time (last {got})"))?;
        let routable = self.ms();
        tokio::time::sleep(play).await;
        let gone = self
            .http
            .delete(format!("{}/v1/instances/{id}", self.api))
            .bearer_auth(self.token)
            .send()
            .await
            .map_err(|e| format!("{team}: deleting {id}: {e}"))?;
        if !gone.status().is_success() {
            return Err(format!("{team}: deleting {id} answered {}", gone.status()));
        }
        Ok(Team {
            arrived,
            admitted,
            routable,
        })
    }

    /// Spawns until an instance is the team's (a refusal is retried after
    /// its Retry-After; a queued place is asked about until admitted): its
    /// id and first hostname.
    async fn admitted(
        &self,
        team: &str,
        challenge: &str,
        deadline: Instant,
    ) -> Result<(String, String), String> {
        let body = json!({"challenge": challenge, "team": team}).to_string();
        loop {
            if Instant::now() > deadline {
                return Err(format!("{team}: not admitted in time"));
            }
            let resp = self
                .http
                .post(format!("{}/v1/instances", self.api))
                .bearer_auth(self.token)
                .body(body.clone())
                .send()
                .await;
            // A lost answer (a timeout on a loaded machine) is retried like
            // a refusal: one team's hiccup must not throw the run away.
            let Ok(resp) = resp else {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            let status = resp.status().as_u16();
            let retry = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1);
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            match status {
                201 => return instance(team, &v),
                202 => {
                    self.counts.queued.fetch_add(1, Ordering::Relaxed);
                    let id = v["id"].as_str().ok_or("a 202 without an id")?;
                    return self.queued(team, id, deadline).await;
                }
                503 => self.counts.unavailable.fetch_add(1, Ordering::Relaxed),
                429 => self.counts.too_many.fetch_add(1, Ordering::Relaxed),
                _ => return Err(format!("{team}: spawning answered {status}: {v}")),
            };
            tokio::time::sleep(Duration::from_secs(retry.clamp(1, 30))).await;
        }
    }

    /// Asks about a queued place every second until it is an instance.
    async fn queued(
        &self,
        team: &str,
        id: &str,
        deadline: Instant,
    ) -> Result<(String, String), String> {
        loop {
            tokio::time::sleep(QUEUE_POLL).await;
            if Instant::now() > deadline {
                return Err(format!("{team}: place {id} not admitted in time"));
            }
            let Ok(resp) = self
                .http
                .get(format!("{}/v1/instances/{id}", self.api))
                .bearer_auth(self.token)
                .send()
                .await
            else {
                continue;
            };
            let status = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            match status {
                200 if v["status"] != "queued" => return instance(team, &v),
                200 | 503 => {}
                _ => {
                    return Err(format!(
                        "{team}: asking about place {id} answered {status}: {v}"
                    ));
                }
            }
        }
    }
}

/// An instance answer's id and first hostname.
fn instance(team: &str, v: &Value) -> Result<(String, String), String> {
    let id = v["id"].as_str();
    let host = v["http"][0]["hostname"].as_str();
    match (id, host) {
        (Some(id), Some(host)) => Ok((id.to_string(), host.to_string())),
        _ => Err(format!(
            "{team}: an instance answer without id or hostname: {v}"
        )),
    }
}

/// Each worker's highest committed memory over the run, beside its
/// allocatable: `{worker: [peak MiB, allocatable MiB]}`.
async fn peaks(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    done: &AtomicBool,
) -> BTreeMap<String, (u64, u64)> {
    let mut peaks: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    while !done.load(Ordering::Relaxed) {
        if let Ok(r) = http.get(url).bearer_auth(token).send().await
            && let Ok(v) = r.json::<Value>().await
        {
            for w in v["workers"].as_array().into_iter().flatten() {
                let Some(id) = w["id"].as_str() else { continue };
                let committed = w["committed"]["memory_mib"].as_u64().unwrap_or(0);
                let allocatable = w["allocatable"]["memory_mib"].as_u64().unwrap_or(0);
                let e = peaks.entry(id.to_string()).or_default();
                *e = (e.0.max(committed), allocatable);
            }
        }
        tokio::time::sleep(SAMPLE).await;
    }
    peaks
}
