//! At most `MAX_LIVE` live instances per team, over every challenge that
//! uses this policy's count (`team-live-all` counts all of the team's
//! instances). The challenge's own `per_team_max` still applies per
//! challenge; this caps the team's total footprint.
//!
//! Set the limit at build time: `TEAM_LIMIT_MAX=3 cargo xtask build-plugins`
//! (default 2).

use tidegate_policy_sdk::{Hooks, Policy, SpawnDecision, SpawnRequest, const_u64, export_policy};

const MAX_LIVE: u64 = const_u64(option_env!("TEAM_LIMIT_MAX"), 2);

struct TeamLimit;

impl Policy for TeamLimit {
    const HOOKS: Hooks = Hooks::ADMIT_SPAWN;

    fn admit_spawn(req: SpawnRequest) -> SpawnDecision {
        if u64::from(req.team_live_all) >= MAX_LIVE {
            return SpawnDecision::Deny(format!(
                "team {} already runs {} instances (the limit is {MAX_LIVE}); stop one first",
                req.team, req.team_live_all
            ));
        }
        SpawnDecision::Allow(None)
    }
}

export_policy!(TeamLimit);
