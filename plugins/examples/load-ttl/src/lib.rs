//! Shorter instances while the cluster is busy: when at most a quarter of
//! the cluster's instance slots are free, new instances get `BUSY_TTL_SECS`
//! instead of the challenge's default TTL; when none is free, players are
//! asked to retry in a minute instead of getting an error.
//!
//! Build-time settings: `LOAD_TTL_BUSY_SECS` (default 300).

use tidegate_policy_sdk::{Hooks, Policy, SpawnDecision, SpawnRequest, const_u64, export_policy};

const BUSY_TTL_SECS: u64 = const_u64(option_env!("LOAD_TTL_BUSY_SECS"), 300);

struct LoadTtl;

impl Policy for LoadTtl {
    const HOOKS: Hooks = Hooks::ADMIT_SPAWN;

    fn admit_spawn(req: SpawnRequest) -> SpawnDecision {
        if req.cluster_capacity > 0 && req.cluster_free_slots == 0 {
            return SpawnDecision::Queue(60);
        }
        let busy = u64::from(req.cluster_free_slots) * 4 <= u64::from(req.cluster_capacity);
        if busy {
            SpawnDecision::Allow(Some(BUSY_TTL_SECS as u32))
        } else {
            SpawnDecision::Allow(None)
        }
    }
}

export_policy!(LoadTtl);
