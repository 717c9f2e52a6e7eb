//! Expire instances nobody has used for `IDLE_SECS`: no HTTP request and
//! no TCP traffic (and no TCP connection open) for that long, counted from
//! creation for an instance never used. Frees slots that players forgot.
//!
//! Build-time setting: `IDLE_REAPER_SECS` (default 900 = 15 minutes).

use tidegate_policy_sdk::{
    Activity, Hooks, IdleDecision, Level, Policy, const_u64, export_policy, log,
};

const IDLE_SECS: u64 = const_u64(option_env!("IDLE_REAPER_SECS"), 900);

struct IdleReaper;

impl Policy for IdleReaper {
    const HOOKS: Hooks = Hooks::ON_IDLE;

    fn on_idle(a: Activity) -> IdleDecision {
        if a.open_connections > 0 {
            return IdleDecision::Keep;
        }
        let since = a.last_activity_ms.max(a.created_ms);
        let idle_ms = a.now_ms.saturating_sub(since);
        if idle_ms >= IDLE_SECS * 1000 {
            log(
                Level::Info,
                &format!(
                    "instance {} idle for {} s: expiring",
                    a.instance,
                    idle_ms / 1000
                ),
            );
            return IdleDecision::Expire;
        }
        IdleDecision::Keep
    }
}

export_policy!(IdleReaper);
