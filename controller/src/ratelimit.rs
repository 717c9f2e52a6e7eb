//! Token buckets for the platform's instance operations: one per team and
//! operation (spawn, renew, delete, flag check), and one for the platform
//! token overall.
//!
//! A bucket holds up to `burst` tokens and refills at `per_minute`; a call
//! takes one or is refused with how long until one is back. The spawn bucket
//! is also the cap on container creations per team: every spawn creates one
//! container, so a boot/destroy loop creates no more than its rate.
//!
//! Buckets live in this replica's memory: spawns and renewals are counted on
//! the scheduler (the only replica that makes them), deletes and flag checks
//! on the replica that serves them. A bucket that has refilled is forgotten,
//! so the map holds only teams that were active within the last refill time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tidegate_schema::TeamId;
use tidegate_schema::config::{Rate, RateLimits};

/// A rate-limited operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Spawn,
    Renew,
    Delete,
    Flag,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Spawn => "spawn",
            Op::Renew => "renew",
            Op::Delete => "delete",
            Op::Flag => "flag",
        }
    }
}

/// One bucket: tokens as of `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let per_sec = f64::from(rate.per_minute) / 60.0;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(f64::from(rate.burst));
        self.at = now;
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let per_sec = f64::from(rate.per_minute) / 60.0;
        Err(Duration::from_secs_f64((1.0 - self.tokens) / per_sec))
    }

    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, now);
        b.tokens >= f64::from(rate.burst)
    }
}

/// Who was refused, for the caller's 429.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// `None`: the platform token's overall bucket.
    pub team: Option<TeamId>,
    pub op: Op,
    /// Seconds until a retry can succeed (at least 1).
    pub retry_after_secs: u64,
}

/// How many buckets may be kept before full ones are swept.
const SWEEP_ABOVE: usize = 4096;
/// Full buckets are swept at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Every bucket of this replica.
#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    teams: Mutex<HashMap<(Op, TeamId), Bucket>>,
    platform: Mutex<Option<Bucket>>,
    swept: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            teams: Mutex::default(),
            platform: Mutex::default(),
            swept: Mutex::default(),
        }
    }

    fn rate(&self, op: Op) -> Rate {
        match op {
            Op::Spawn => self.limits.spawn,
            Op::Renew => self.limits.renew,
            Op::Delete => self.limits.delete,
            Op::Flag => self.limits.flag,
        }
    }

    /// Takes one token of `op` from `team`'s bucket and then from the
    /// platform's. The team's comes first, so that one team past its own
    /// rate (a player looping through the platform) does not drain the
    /// bucket every team shares; a refusal by the platform's bucket does
    /// not refund the team's (the call was made).
    pub fn check(&self, op: Op, team: &TeamId) -> Result<(), Limited> {
        self.check_at(op, team, Instant::now())
    }

    fn check_at(&self, op: Op, team: &TeamId, now: Instant) -> Result<(), Limited> {
        let limited = |team: Option<&TeamId>, wait: Duration| Limited {
            team: team.cloned(),
            op,
            retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
        };
        let rate = self.rate(op);
        if rate.enabled() {
            let mut teams = self.teams.lock().unwrap_or_else(|e| e.into_inner());
            if teams.len() > SWEEP_ABOVE {
                let mut last = self.swept.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY) {
                    teams.retain(|(o, _), b| !b.is_full(self.rate(*o), now));
                    *last = Some(now);
                }
            }
            teams
                .entry((op, team.clone()))
                .or_insert_with(|| Bucket::full(rate, now))
                .take(rate, now)
                .map_err(|w| limited(Some(team), w))?;
        }
        let overall = self.limits.platform;
        if overall.enabled() {
            let mut b = self.platform.lock().unwrap_or_else(|e| e.into_inner());
            b.get_or_insert_with(|| Bucket::full(overall, now))
                .take(overall, now)
                .map_err(|w| limited(None, w))?;
        }
        Ok(())
    }

    /// How many buckets are kept (for tests and the sweep).
    pub fn buckets(&self) -> usize {
        self.teams.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn team(s: &str) -> TeamId {
        serde_json::from_str(&format!("{s:?}")).unwrap()
    }

    fn limits(spawn: Rate) -> RateLimits {
        RateLimits {
            spawn,
            platform: Rate::OFF,
            ..RateLimits::default()
        }
    }

    #[test]
    fn one_team_past_its_rate_does_not_drain_the_platform_bucket() {
        let rl = RateLimiter::new(RateLimits {
            renew: Rate {
                per_minute: 60,
                burst: 2,
            },
            platform: Rate {
                per_minute: 60,
                burst: 10,
            },
            ..RateLimits::default()
        });
        let t0 = Instant::now();
        // A looping player: 2 renewals pass, the next 100 are its team's refusals.
        for i in 0..102 {
            let got = rl.check_at(Op::Renew, &team("looper"), t0);
            assert_eq!(got.is_ok(), i < 2, "call {i}: {got:?}");
            if let Err(l) = got {
                assert_eq!(l.team, Some(team("looper")));
            }
        }
        // The platform's bucket lost only those 2: 8 other teams still pass.
        for n in 0..8 {
            rl.check_at(Op::Renew, &team(&format!("t{n}")), t0).unwrap();
        }
        assert_eq!(
            rl.check_at(Op::Renew, &team("t9"), t0).unwrap_err().team,
            None
        );
    }

    #[test]
    fn a_bucket_empties_after_its_burst_and_refills_at_its_rate() {
        let rate = Rate {
            per_minute: 60,
            burst: 3,
        };
        let rl = RateLimiter::new(limits(rate));
        let t0 = Instant::now();
        let a = team("a");
        for _ in 0..3 {
            assert_eq!(rl.check_at(Op::Spawn, &a, t0), Ok(()));
        }
        let refused = rl.check_at(Op::Spawn, &a, t0).unwrap_err();
        assert_eq!(refused.team, Some(a.clone()));
        assert_eq!(refused.retry_after_secs, 1);
        // Another team, and another operation of the same team, are untouched.
        assert_eq!(rl.check_at(Op::Spawn, &team("b"), t0), Ok(()));
        assert_eq!(rl.check_at(Op::Renew, &a, t0), Ok(()));
        // One token a second comes back.
        let t1 = t0 + Duration::from_millis(1001);
        assert_eq!(rl.check_at(Op::Spawn, &a, t1), Ok(()));
        assert!(rl.check_at(Op::Spawn, &a, t1).is_err());
    }

    #[test]
    fn retry_after_counts_the_wait_for_one_token() {
        let rate = Rate {
            per_minute: 6,
            burst: 1,
        };
        let rl = RateLimiter::new(limits(rate));
        let t0 = Instant::now();
        let a = team("a");
        rl.check_at(Op::Spawn, &a, t0).unwrap();
        assert_eq!(
            rl.check_at(Op::Spawn, &a, t0).unwrap_err().retry_after_secs,
            10
        );
        let later = t0 + Duration::from_secs(4);
        assert_eq!(
            rl.check_at(Op::Spawn, &a, later)
                .unwrap_err()
                .retry_after_secs,
            6
        );
    }

    #[test]
    fn the_platform_bucket_caps_every_team_together() {
        let rl = RateLimiter::new(RateLimits {
            platform: Rate {
                per_minute: 60,
                burst: 2,
            },
            ..RateLimits::default()
        });
        let t0 = Instant::now();
        rl.check_at(Op::Flag, &team("a"), t0).unwrap();
        rl.check_at(Op::Flag, &team("b"), t0).unwrap();
        let refused = rl.check_at(Op::Flag, &team("c"), t0).unwrap_err();
        assert_eq!(refused.team, None);
    }

    #[test]
    fn a_rate_of_zero_turns_a_bucket_off() {
        let rl = RateLimiter::new(limits(Rate::OFF));
        let t0 = Instant::now();
        for _ in 0..10_000 {
            rl.check_at(Op::Spawn, &team("a"), t0).unwrap();
        }
        assert_eq!(rl.buckets(), 0);
    }

    #[test]
    fn full_buckets_are_forgotten_when_many_teams_came_by() {
        let rate = Rate {
            per_minute: 60,
            burst: 1,
        };
        let rl = RateLimiter::new(limits(rate));
        let t0 = Instant::now();
        for i in 0..=SWEEP_ABOVE {
            rl.check_at(Op::Spawn, &team(&format!("t{i}")), t0).unwrap();
        }
        // A second later every bucket has refilled: the next call sweeps them.
        let t1 = t0 + Duration::from_secs(2);
        rl.check_at(Op::Spawn, &team("new"), t1).unwrap();
        assert_eq!(rl.buckets(), 1);
    }
}
