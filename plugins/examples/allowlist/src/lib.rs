//! Only the teams listed may spawn this challenge or connect to its
//! instances (e.g. a finals-only challenge). Everyone else is told why.
//!
//! The list is set at build time, comma-separated:
//! `ALLOWLIST_TEAMS=red,blue cargo xtask build-plugins`
//! (default: `red,blue,organizers`).

use tidegate_policy_sdk::{
    Connection, Hooks, Level, Policy, SpawnDecision, SpawnRequest, Verdict, export_policy, log,
};

const TEAMS: &str = match option_env!("ALLOWLIST_TEAMS") {
    Some(t) => t,
    None => "red,blue,organizers",
};

fn listed(team: &str) -> bool {
    TEAMS.split(',').any(|t| t.trim() == team)
}

struct Allowlist;

impl Policy for Allowlist {
    const HOOKS: Hooks = Hooks::ADMIT_SPAWN.union(Hooks::ADMIT_CONNECTION);

    fn admit_spawn(req: SpawnRequest) -> SpawnDecision {
        if listed(&req.team) {
            return SpawnDecision::Allow(None);
        }
        log(Level::Info, &format!("spawn by unlisted team {}", req.team));
        SpawnDecision::Deny(format!(
            "team {} is not on the allowlist of challenge {}",
            req.team, req.challenge
        ))
    }

    /// Also at the edge, so an instance spawned before the list was set
    /// stops being reachable for teams not on it.
    fn admit_connection(conn: Connection) -> Verdict {
        if listed(&conn.team) {
            Verdict::Allow
        } else {
            Verdict::Reject(format!(
                "team {} is not on the allowlist of challenge {}",
                conn.team, conn.challenge
            ))
        }
    }
}

export_policy!(Allowlist);
