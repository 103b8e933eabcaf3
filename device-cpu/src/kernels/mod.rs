//! The CPU kernels for the graph crate's ops.

use rill_graph::KernelDef;

/// Every CPU kernel of this crate.
pub const KERNELS: &[KernelDef] = &[];
