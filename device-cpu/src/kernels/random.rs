//! Seeded random ops: RandomUniform, RandomStandardNormal, TruncatedNormal.
//!
//! A counter-based generator: element `i` of a run is a hash of (key, counter + i, draw), so the
//! values do not depend on how the work is split over threads. Each kernel instance reserves its
//! counter range with one atomic add per run, so a seeded op repeats its sequence in a new
//! session and yields fresh values on every run, as TensorFlow's do.

use super::{for_chunks, int_vector, shape_from_ints, unsupported};
use rill_graph::half::{bf16, f16};
use rill_graph::{
    AttrsExt, DType, Element, IntraOpPool, Kernel, KernelInit, OpKernel, OpKernelContext, Result, Tensor,
};
use std::sync::atomic::{AtomicU64, Ordering};

/// SplitMix64's finaliser: a bijective mix with full avalanche.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 random bits for draw `draw` of element `index` under `key`.
#[inline(always)]
fn bits(key: u64, index: u64, draw: u64) -> u64 {
    mix(key ^ mix(index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ draw.wrapping_mul(0xd1b5_4a32_d192_ed03)))
}

/// A uniform value in [0, 1) with `mantissa` random bits: exactly representable in the output
/// type, so rounding can never produce 1.
#[inline(always)]
fn unit(b: u64, mantissa: u32) -> f64 {
    (b >> (64 - mantissa)) as f64 * (-(mantissa as f64)).exp2()
}

/// A uniform value in (0, 1], safe to take the log of.
#[inline(always)]
fn unit_open(b: u64) -> f64 {
    ((b >> 11) + 1) as f64 * (-53f64).exp2()
}

/// A standard normal value by Box–Muller from two draws.
#[inline(always)]
fn normal(key: u64, index: u64, draw: u64) -> f64 {
    let u1 = unit_open(bits(key, index, 2 * draw));
    let u2 = unit(bits(key, index, 2 * draw + 1), 53);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Redraws beyond two standard deviations, as TensorFlow's TruncatedNormal does.
#[inline(always)]
fn truncated_normal(key: u64, index: u64) -> f64 {
    // Each draw is accepted with probability 0.954; 64 rejections in a row has probability
    // around 1e-86, and the fallback keeps the value in range regardless.
    for draw in 0..64 {
        let v = normal(key, index, draw);
        if v.abs() <= 2.0 {
            return v;
        }
    }
    0.0
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dist {
    Uniform,
    Normal,
    TruncatedNormal,
}

struct RandomK {
    dist: Dist,
    dtype: DType,
    key: u64,
    counter: AtomicU64,
}

pub fn create_random(init: &KernelInit<'_>) -> Result<Kernel> {
    let a = init.attrs();
    let dist = match init.node.op.as_str() {
        "RandomUniform" => Dist::Uniform,
        "RandomStandardNormal" => Dist::Normal,
        _ => Dist::TruncatedNormal,
    };
    let (seed, seed2) = (a.int_or("seed", 0), a.int_or("seed2", 0));
    // TensorFlow: both seeds zero means "nondeterministic".
    let key = if seed == 0 && seed2 == 0 {
        rill_graph::random_u64()
    } else {
        mix(mix(seed as u64) ^ (seed2 as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    };
    let k = RandomK { dist, dtype: a.dtype("dtype")?, key, counter: AtomicU64::new(0) };
    Ok(Kernel::sized(k, init))
}

/// Random bits of the significand for uniform values of each float type.
fn mantissa_bits(d: DType) -> u32 {
    match d {
        DType::F64 => 53,
        DType::F16 => 11,
        DType::BF16 => 8,
        _ => 24,
    }
}

fn fill<T: Element>(
    pool: &dyn IntraOpPool,
    out: &mut Tensor,
    dist: Dist,
    key: u64,
    start: u64,
) -> Result<()> {
    let mantissa = mantissa_bits(T::DTYPE);
    for_chunks(pool, out.as_mut_slice::<T>()?, 1, |off, o| {
        for (i, d) in o.iter_mut().enumerate() {
            let index = start.wrapping_add((off + i) as u64);
            *d = T::from_f64(match dist {
                Dist::Uniform => unit(bits(key, index, 0), mantissa),
                Dist::Normal => normal(key, index, 0),
                Dist::TruncatedNormal => truncated_normal(key, index),
            });
        }
    });
    Ok(())
}

impl OpKernel for RandomK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let shape = shape_from_ints(&int_vector(ctx.input(0)?, "shape")?, "shape")?;
        let n = shape.num_elements() as u64;
        let start = self.counter.fetch_add(n, Ordering::Relaxed);
        let mut out = Tensor::try_zeros(self.dtype, shape)?;
        let pool = ctx.intra_op();
        match self.dtype {
            DType::F32 => fill::<f32>(pool, &mut out, self.dist, self.key, start)?,
            DType::F64 => fill::<f64>(pool, &mut out, self.dist, self.key, start)?,
            DType::F16 => fill::<f16>(pool, &mut out, self.dist, self.key, start)?,
            DType::BF16 => fill::<bf16>(pool, &mut out, self.dist, self.key, start)?,
            d => return Err(unsupported(&ctx.node.op, d)),
        }
        ctx.set_output(0, out);
        Ok(())
    }
}
