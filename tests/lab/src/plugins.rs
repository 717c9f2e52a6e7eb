//! The policy plugins as tests and benchmarks use them: the guest workspace
//! (plugins/) built once per test run into `<target>/plugins-test`, with
//! short build-time settings (an idle-reaper that reaps after seconds).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use tidegate_local::plugins::{Built, TARGET, build};

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

/// `component` with `memories` more core modules of one linear memory
/// (one page) each, all instantiated at the top level: a component that
/// conforms to the world but holds many memories, as an attacker could
/// write by hand.
pub fn with_memories(component: &[u8], memories: u32) -> Vec<u8> {
    fn leb(mut n: u32, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    fn read_leb(bytes: &[u8], at: &mut usize) -> u32 {
        let (mut n, mut shift) = (0u32, 0);
        loop {
            let byte = bytes[*at];
            *at += 1;
            n |= u32::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return n;
            }
            shift += 7;
        }
    }
    fn section(id: u8, content: &[u8], out: &mut Vec<u8>) {
        out.push(id);
        leb(content.len() as u32, out);
        out.extend_from_slice(content);
    }
    const CORE_MODULE: u8 = 1;
    const CORE_INSTANCE: u8 = 2;
    const MEMORY: u8 = 5;
    assert_eq!(&component[..8], b"\0asm\x0d\0\x01\0", "not a component");
    // The new modules' first index: after every core module defined at the
    // top level (the plugins' components neither import nor alias modules).
    let (mut modules, mut at) = (0, 8);
    while at < component.len() {
        let id = component[at];
        at += 1;
        let size = read_leb(component, &mut at) as usize;
        modules += u32::from(id == CORE_MODULE);
        at += size;
    }
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    section(MEMORY, &[0x01, 0x00, 0x01], &mut module); // one memory, min 1 page
    let mut out = component.to_vec();
    for i in 0..memories {
        section(CORE_MODULE, &module, &mut out);
        let mut instance = vec![0x01, 0x00]; // one instance: instantiate
        leb(modules + i, &mut instance);
        instance.push(0x00); // with no arguments
        section(CORE_INSTANCE, &instance, &mut out);
    }
    out
}
