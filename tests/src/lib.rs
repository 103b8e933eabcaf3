//! Shared helpers for rill's cross-crate integration tests and benchmark programs.
