//! The committed PTX (generated from `cuda/*.cu` by `cuda/build_ptx.sh`) as a const table indexed
//! by `PtxModule`, and the parameter list of every kernel, which launches are checked against.

use crate::driver::Param;

/// One PTX module per CUDA source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PtxModule {
    Unary,
    Binary,
    Reduce,
    Softmax,
    Matmul,
    Optim,
}

impl PtxModule {
    pub const ALL: [PtxModule; 6] = [
        PtxModule::Unary,
        PtxModule::Binary,
        PtxModule::Reduce,
        PtxModule::Softmax,
        PtxModule::Matmul,
        PtxModule::Optim,
    ];

    pub fn ptx(self) -> &'static str {
        PTX[self as usize]
    }

    pub fn name(self) -> &'static str {
        match self {
            PtxModule::Unary => "unary",
            PtxModule::Binary => "binary",
            PtxModule::Reduce => "reduce",
            PtxModule::Softmax => "softmax",
            PtxModule::Matmul => "matmul",
            PtxModule::Optim => "optim",
        }
    }
}

const PTX: [&str; 6] = [
    include_str!("../ptx/unary.ptx"),
    include_str!("../ptx/binary.ptx"),
    include_str!("../ptx/reduce.ptx"),
    include_str!("../ptx/softmax.ptx"),
    include_str!("../ptx/matmul.ptx"),
    include_str!("../ptx/optim.ptx"),
];

use Param::{Words25 as W, U32 as I, U64 as P};

/// Kernel-name prefixes (the part before the dtype suffix), their module and parameters, in the
/// order of the `extern "C"` declarations in `cuda/*.cu`.
pub const KERNELS: &[(&str, PtxModule, &[Param])] = &[
    ("unary", PtxModule::Unary, &[I, P, P, P]),
    ("cast", PtxModule::Unary, &[P, P, P]),
    ("binary", PtxModule::Binary, &[I, P, W, P, P, P]),
    ("bias_add", PtxModule::Binary, &[P, P, P, P, P]),
    ("reduce", PtxModule::Reduce, &[I, P, P, P, P, P]),
    ("softmax", PtxModule::Softmax, &[I, P, P, P, P]),
    ("xent", PtxModule::Softmax, &[P, P, P, P, P, P]),
    ("sparse_xent", PtxModule::Softmax, &[P, P, P, P, P, P]),
    ("matmul", PtxModule::Matmul, &[P, P, P, I, I, P, P, P]),
    ("apply_gd", PtxModule::Optim, &[P, P, P, P]),
    ("apply_momentum", PtxModule::Optim, &[P, P, P, P, P, P, I]),
    ("apply_adam", PtxModule::Optim, &[P, P, P, P, P, P, P, P, P, P, P, I]),
];

/// The module and parameters of a full kernel name such as `binary_f16` or `sparse_xent_f32_i64`:
/// the longest table prefix followed by `_`.
pub fn kernel_spec(name: &str) -> Option<(PtxModule, &'static [Param])> {
    KERNELS
        .iter()
        .filter(|(p, _, _)| name.strip_prefix(p).is_some_and(|rest| rest.starts_with('_')))
        .max_by_key(|(p, _, _)| p.len())
        .map(|&(_, m, params)| (m, params))
}
