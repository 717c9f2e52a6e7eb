//! Write a tidegate policy plugin in Rust.
//!
//! A policy is a type implementing [`Policy`]: say which hooks it
//! implements in [`Policy::HOOKS`] and write those; the others keep
//! tidegate's defaults (spawn allowed with the challenge's TTL, renewals
//! by the challenge's TTL, connections allowed, idle instances kept).
//! Then export it with [`export_policy!`]:
//!
//! ```ignore
//! use tidegate_policy_sdk::{Hooks, Policy, SpawnDecision, SpawnRequest, export_policy};
//!
//! struct OnePerTeam;
//!
//! impl Policy for OnePerTeam {
//!     const HOOKS: Hooks = Hooks::ADMIT_SPAWN;
//!
//!     fn admit_spawn(req: SpawnRequest) -> SpawnDecision {
//!         if req.team_live_all > 0 {
//!             return SpawnDecision::Deny("one instance per team at a time".into());
//!         }
//!         SpawnDecision::Allow(None)
//!     }
//! }
//!
//! export_policy!(OnePerTeam);
//! ```
//!
//! Build it as a `cdylib` for `wasm32-unknown-unknown` and wrap it into a
//! component (`wasm-tools component new`, or put the crate under
//! `plugins/examples/` and run `cargo xtask build-plugins`), then upload it:
//! `tidegate policy upload <challenge> plugin.wasm`.
//!
//! What a plugin can do: compute, log ([`log`]) and read the time
//! ([`now_ms`]). Nothing else: no files, network or environment. Each call
//! gets a fresh instance (no state survives between calls), at most 5 ms
//! and 32 MiB by default; a plugin that traps, runs over or allocates too
//! much gets the challenge's `policy_fallback` decision instead (deny
//! unless the challenge says `allow`).

#[doc(hidden)]
#[allow(clippy::too_many_arguments)] // generated lowering of the records
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_policy_world",
        default_bindings_module: "tidegate_policy_sdk::bindings",
    });
}

pub use bindings::tidegate::policy::log::Level;
pub use bindings::tidegate::policy::types::{
    Activity, Connection, Hooks, IdleDecision, InstanceInfo, Protocol, RenewDecision,
    SpawnDecision, SpawnRequest, Verdict,
};

/// The team name of the sample `admit-spawn` request tidegate sends once
/// at upload (a dry run): a plugin that traps on it is refused.
pub const DRY_RUN_TEAM: &str = "tidegate-dry-run";

/// A policy. Implement the hooks named in [`Policy::HOOKS`]; the bodies
/// of the others are never called (tidegate applies its defaults).
pub trait Policy {
    /// The hooks this policy implements.
    const HOOKS: Hooks;

    /// A team asks for an instance: allow (optionally with a TTL in
    /// seconds, capped at the challenge's maximum), deny with a reason the
    /// player sees, or queue (retry after N seconds).
    fn admit_spawn(_request: SpawnRequest) -> SpawnDecision {
        SpawnDecision::Allow(None)
    }

    /// A team asks to extend an instance: extend by N seconds (capped at
    /// the challenge's maximum lifetime and renewal count) or refuse.
    fn renew(_instance: InstanceInfo) -> RenewDecision {
        RenewDecision::Refuse("this policy does not decide renewals".into())
    }

    /// A connection reaches an agent for an instance: allow or reject.
    fn admit_connection(_connection: Connection) -> Verdict {
        Verdict::Allow
    }

    /// Periodically, for every live instance: keep it or expire it now.
    fn on_idle(_activity: Activity) -> IdleDecision {
        IdleDecision::Keep
    }
}

impl<T: Policy> bindings::Guest for T {
    fn hooks() -> Hooks {
        T::HOOKS
    }
    fn admit_spawn(request: SpawnRequest) -> SpawnDecision {
        <T as Policy>::admit_spawn(request)
    }
    fn renew(instance: InstanceInfo) -> RenewDecision {
        <T as Policy>::renew(instance)
    }
    fn admit_connection(connection: Connection) -> Verdict {
        <T as Policy>::admit_connection(connection)
    }
    fn on_idle(activity: Activity) -> IdleDecision {
        <T as Policy>::on_idle(activity)
    }
}

/// Exports a [`Policy`] type as the plugin's implementation of the world.
#[macro_export]
macro_rules! export_policy {
    ($policy:ident) => {
        $crate::bindings::__export_policy_world!($policy);
    };
}

/// A line in tidegate's log, tagged with the plugin's digest and hook.
pub fn log(level: Level, message: &str) {
    bindings::tidegate::policy::log::log(level, message);
}

/// Unix time in milliseconds, from the host.
pub fn now_ms() -> u64 {
    bindings::tidegate::policy::clock::now_ms()
}

/// Parses a decimal number at compile time (for `option_env!` settings);
/// `default` when absent or not a number.
pub const fn const_u64(value: Option<&str>, default: u64) -> u64 {
    let Some(s) = value else { return default };
    let bytes = s.as_bytes();
    if bytes.is_empty() {
        return default;
    }
    let mut n: u64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !b.is_ascii_digit() {
            return default;
        }
        n = n * 10 + (b - b'0') as u64;
        i += 1;
    }
    n
}
