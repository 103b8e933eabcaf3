//! `cargo xtask`: the project's task runner, in plain Rust with the standard library.
fn main() {}
