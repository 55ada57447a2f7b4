//! Benchmark support (skeleton).
