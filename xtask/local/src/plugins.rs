//! Builds the policy plugins' guest workspace (`plugins/`) into components:
//! the one build `cargo xtask build-plugins`, the benchmarks and the tests run.

#[path = "../../../plugins/build_plugins.rs"]
mod build;

pub use build::{Built, TARGET, build};

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
