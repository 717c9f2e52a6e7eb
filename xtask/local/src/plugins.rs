//! Builds the policy plugins' guest workspace (`plugins/`) into components:
//! the one build `cargo xtask build-plugins`, the benchmarks and the tests run.

#[path = "../../../plugins/build_plugins.rs"]
mod build;

pub use build::{Built, TARGET, build};
