//! Builds the eBPF programs (ebpf/programs) and puts the object in OUT_DIR
//! for `include_bytes_aligned!`.

#[path = "../ebpf/build_ebpf.rs"]
mod build_ebpf;

use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let ebpf_dir = manifest.join("../ebpf");
    for input in build_ebpf::inputs(&ebpf_dir) {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    println!("cargo:rerun-if-changed=../ebpf/build_ebpf.rs");
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: share one eBPF
    // build per target dir (its own lock, so no deadlock with this cargo).
    let target = out.ancestors().nth(4).unwrap_or(Path::new("target"));
    match build_ebpf::build(&ebpf_dir, &target.join("ebpf")) {
        Ok(object) => {
            std::fs::copy(&object, out.join("tidegate-ebpf")).expect("copy the eBPF object");
        }
        Err(e) => panic!("{e}"),
    }
}
