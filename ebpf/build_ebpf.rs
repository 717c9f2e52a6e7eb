// Builds tidegate's eBPF object (ebpf/programs) with nightly, `-Z
// build-std=core`, the bpfel target and bpf-linker. Shared by the agent's
// build script and `cargo xtask build-ebpf` (both `#[path]`-include it), so
// the two always build the same thing into the same place.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The toolchain the programs build with (installed by `cargo xtask setup`).
pub(crate) const TOOLCHAIN: &str = "nightly";
/// The eBPF target.
pub(crate) const TARGET: &str = "bpfel-unknown-none";

/// Files whose change means the object must be rebuilt.
#[allow(dead_code)] // the build script's (xtask always asks cargo)
pub(crate) fn inputs(ebpf_dir: &Path) -> Vec<PathBuf> {
    [
        "programs/src",
        "programs/Cargo.toml",
        "programs/Cargo.lock",
        "common/src",
        "common/Cargo.toml",
    ]
    .iter()
    .map(|p| ebpf_dir.join(p))
    .collect()
}

/// Builds `ebpf_dir/programs` into `target_dir`; returns the object's path.
pub(crate) fn build(ebpf_dir: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--release", "--locked"])
        .args(["-Z", "build-std=core", "--target", TARGET])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(ebpf_dir.join("programs"));
    // An outer cargo (build script, clippy, nextest) leaks its settings:
    // wrappers, flags, the toolchain, the jobserver. Start clean.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaked = (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTFLAGS")
            || key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTDOCFLAGS";
        if leaked {
            cmd.env_remove(key);
        }
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    let status = cmd.status().map_err(|e| {
        format!("cannot run rustup ({e}): the eBPF programs need rustup's {TOOLCHAIN} toolchain; run `cargo xtask setup`")
    })?;
    if !status.success() {
        return Err(format!(
            "building the eBPF programs failed ({status}); they need the {TOOLCHAIN} toolchain with rust-src and bpf-linker, which `cargo xtask setup` installs"
        ));
    }
    let object = target_dir
        .join(TARGET)
        .join("release")
        .join("tidegate-ebpf");
    if !object.is_file() {
        return Err(format!("the eBPF build wrote no {}", object.display()));
    }
    Ok(object)
}
