// Builds the guest workspace (plugins/: SDK, examples, test fixtures) for
// wasm32-unknown-unknown and wraps each cdylib into a component with
// wit-component (what `wasm-tools component new` runs), so the components
// import nothing but the world's `log` and `clock` — no WASI. Included by
// `tidegate_local::plugins`, which `cargo xtask build-plugins`, the
// benchmarks and the tests all use.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The guest target.
pub const TARGET: &str = "wasm32-unknown-unknown";

/// One built plugin.
#[derive(Debug, Clone)]
pub struct Built {
    /// The crate name, e.g. `team-limit`.
    pub name: String,
    /// `examples` or `fixtures`.
    pub group: String,
    /// The component.
    pub component: PathBuf,
    /// The core module it was made from.
    pub core: PathBuf,
}

/// Builds every plugin under `plugins_dir` into `target_dir`, with `env`
/// (build-time settings such as `IDLE_REAPER_SECS`), and writes the
/// components to `target_dir/components/<name>.wasm`.
pub fn build(
    plugins_dir: &Path,
    target_dir: &Path,
    env: &[(&str, &str)],
) -> Result<Vec<Built>, String> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--release", "--locked", "--target", TARGET])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(plugins_dir);
    // An outer cargo (build script, test runner) leaks its settings; start clean.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaked = (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTFLAGS")
            || key == "RUSTDOCFLAGS";
        if leaked {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run cargo for the plugins: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the plugins failed ({status}); they need the {TARGET} target, which `cargo xtask setup` installs"
        ));
    }
    let out = target_dir.join("components");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut built = Vec::new();
    for group in ["examples", "fixtures"] {
        let dir = plugins_dir.join(group);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("Cargo.toml").is_file())
            .filter_map(|e| e.file_name().to_str().map(String::from))
            .collect();
        names.sort();
        for name in names {
            let core = target_dir
                .join(TARGET)
                .join("release")
                .join(format!("{}.wasm", name.replace('-', "_")));
            let module = std::fs::read(&core).map_err(|e| format!("{}: {e}", core.display()))?;
            let component = wit_component::ComponentEncoder::default()
                .module(&module)
                .and_then(|e| e.validate(true).encode())
                .map_err(|e| format!("making a component of {name}: {e:#}"))?;
            let path = out.join(format!("{name}.wasm"));
            // Rewrite only on change, so the file's time means something.
            if std::fs::read(&path).ok().as_deref() != Some(&component[..]) {
                std::fs::write(&path, &component)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
            }
            built.push(Built {
                name,
                group: group.to_string(),
                component: path,
                core,
            });
        }
    }
    Ok(built)
}
