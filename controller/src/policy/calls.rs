//! Latency and failures of the controller's plugin calls, per hook:
//! `tidegate_controller_plugin_call_seconds{hook}` and
//! `tidegate_controller_plugin_failures_total{hook}`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tidegate_plugin_host::CallError;

/// Bucket bounds (seconds) of plugin call latency.
const CALL_BUCKETS: [f64; 9] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];

/// The hooks the controller calls.
const HOOKS: [&str; 3] = ["admit-spawn", "renew", "on-idle"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabel {
    hook: &'static str,
}

/// Latency and failures of plugin calls, per hook.
#[derive(Debug)]
pub struct PluginCalls {
    latency: Family<HookLabel, Histogram>,
    failures: Family<HookLabel, Counter>,
}

impl Default for PluginCalls {
    fn default() -> Self {
        let calls = Self {
            latency: Family::new_with_constructor(|| Histogram::new(CALL_BUCKETS)),
            failures: Family::default(),
        };
        // Every hook's series exist from the start, at 0.
        for hook in HOOKS {
            drop(calls.latency.get_or_create(&HookLabel { hook }));
            drop(calls.failures.get_or_create(&HookLabel { hook }));
        }
        calls
    }
}

impl PluginCalls {
    /// Registers both families (in the controller's prefix registry).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "plugin_call_seconds",
            "Time of policy plugin calls, by hook",
            self.latency.clone(),
        );
        registry.register(
            "plugin_failures",
            "Plugin calls that trapped, hit the deadline or the memory limit, by hook",
            self.failures.clone(),
        );
    }

    /// Runs one hook call (`None`: the plugin does not implement it) and
    /// records its time and whether it failed (trap, deadline, memory).
    pub fn timed<T>(
        &self,
        hook: &'static str,
        call: impl FnOnce() -> Option<Result<T, CallError>>,
    ) -> Option<Result<T, CallError>> {
        let label = HookLabel { hook };
        let started = std::time::Instant::now();
        let answer = call();
        if let Some(a) = &answer {
            self.latency
                .get_or_create(&label)
                .observe(started.elapsed().as_secs_f64());
            if a.is_err() {
                self.failures.get_or_create(&label).inc();
            }
        }
        answer
    }
}
