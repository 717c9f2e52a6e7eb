//! The policy plugins as tests and benchmarks use them: the guest workspace
//! (plugins/) built once per test run into `<target>/plugins-test`, with
//! short build-time settings (an idle-reaper that reaps after seconds).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use tidegate_local::plugins::{Built, TARGET, build, with_memories};

/// Build-time settings of the test build (see each example's docs).
pub const TEST_SETTINGS: &[(&str, &str)] = &[
    ("IDLE_REAPER_SECS", "6"),
    ("TEAM_LIMIT_MAX", "2"),
    ("ALLOWLIST_TEAMS", "red,blue,organizers"),
    ("LOAD_TTL_BUSY_SECS", "300"),
];

/// The repository's plugins/ folder.
pub fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins")
}

/// The cargo target dir of the running test executable (`target/`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .find(|d| d.join("debug").is_dir() || d.join("release").is_dir())
        .filter(|d| exe.starts_with(d.join("debug")) || exe.starts_with(d.join("release")))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| std::env::temp_dir().join("tidegate-plugins"))
}

/// Every plugin of the test build, by crate name; built on first use
/// (cargo's lock serialises test binaries building at once).
pub fn test_plugins() -> &'static BTreeMap<String, Built> {
    static BUILT: OnceLock<BTreeMap<String, Built>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let built = build(
            &plugins_dir(),
            &target_dir().join("plugins-test"),
            TEST_SETTINGS,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        built.into_iter().map(|b| (b.name.clone(), b)).collect()
    })
}

/// The component bytes of plugin `name` (test build).
pub fn component(name: &str) -> Vec<u8> {
    let b = test_plugins()
        .get(name)
        .unwrap_or_else(|| panic!("no plugin {name:?} under plugins/examples or plugins/fixtures"));
    std::fs::read(&b.component).unwrap_or_else(|e| panic!("{}: {e}", b.component.display()))
}

/// The core module `name` was made from (not a component).
pub fn core_module(name: &str) -> Vec<u8> {
    let b = test_plugins()
        .get(name)
        .unwrap_or_else(|| panic!("no plugin {name:?}"));
    std::fs::read(&b.core).unwrap_or_else(|e| panic!("{}: {e}", b.core.display()))
}
