//! Harnesses of the fuzz targets (see `harness.rs`).
pub mod harness;
