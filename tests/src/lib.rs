//! End-to-end tests of tidegate against real components live in `tests/tests/`;
//! the harness they use is the `tidegate-lab` crate in `tests/lab/`.

pub use tidegate_lab as lab;
