use super::*;

#[test]
fn junk_and_core_modules_are_named() {
    let host = Host::new(Limits::default()).unwrap();
    assert!(matches!(host.load(b"hello world"), Err(LoadError::NotWasm)));
    assert!(matches!(host.load(b""), Err(LoadError::NotWasm)));
    let core = wat::parse_str("(module)").unwrap();
    assert!(matches!(host.load(&core), Err(LoadError::CoreModule)));
    let big = vec![0u8; MAX_COMPONENT_BYTES + 1];
    assert!(matches!(host.load(&big), Err(LoadError::TooBig(_))));
}

#[test]
fn a_component_of_another_world_is_refused() {
    let host = Host::new(Limits::default()).unwrap();
    // A valid component exporting nothing the world asks for.
    let other = wat::parse_str("(component)").unwrap();
    let err = host.load(&other).unwrap_err();
    assert!(matches!(err, LoadError::WrongWorld(_)), "{err}");
    assert!(err.to_string().contains("no export"), "{err}");
    // One importing something the host does not give (e.g. WASI).
    let wasi =
        wat::parse_str(r#"(component (import "wasi:cli/environment@0.2.0" (instance (export "get-arguments" (func)))))"#).unwrap();
    let err = host.load(&wasi).unwrap_err();
    assert!(err.to_string().contains("wasi:cli/environment"), "{err}");
}

#[test]
fn digests_parse_and_print() {
    let d = Digest::of(b"abc");
    assert_eq!(
        d.as_str(),
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(Digest::parse(d.as_str()).unwrap(), d);
    assert_eq!(d.short(), "ba7816bf8f01");
    assert!(Digest::parse("sha256:BA7816").is_err());
    assert!(Digest::parse("md5:x").is_err());
}

#[test]
fn the_dir_store_verifies_what_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::new(dir.path()).unwrap();
    let d = store.put(b"component bytes").unwrap();
    assert_eq!(store.get(&d).unwrap(), b"component bytes");
    // Idempotent.
    assert_eq!(store.put(b"component bytes").unwrap(), d);
    let missing = Digest::of(b"other");
    assert!(matches!(store.get(&missing), Err(StoreError::Missing(_))));
    // Damage the file: reading it is an error naming both digests.
    let file = dir
        .path()
        .join(format!("{}.wasm", d.as_str().replace(':', "-")));
    std::fs::write(&file, b"tampered").unwrap();
    let err = store.get(&d).unwrap_err();
    assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
}
