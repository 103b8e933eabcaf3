//! Cast among f32, f64, f16, bf16, i32, i64, u8 and bool, with C++ `static_cast` semantics
//! (floats truncate toward zero, saturating here instead of undefined; nonzero is true).

use super::{map_into, unsupported};
use rill_graph::half::{bf16, f16};
use rill_graph::{
    AttrsExt, DType, IntraOpPool, Kernel, KernelInit, OpKernel, OpKernelContext, Result, Tensor,
};

/// An element that converts through the widest type of its kind, so every pair of types
/// converts with a single rounding.
trait CastElem: Copy + Send + Sync + bytemuck::Pod {
    const INTEGRAL: bool;
    fn to_i64(self) -> i64;
    fn to_f64(self) -> f64;
    fn from_i64(v: i64) -> Self;
    fn from_f64(v: f64) -> Self;
}

macro_rules! cast_prim {
    ($($t:ty: $integral:expr),*) => {$(
        impl CastElem for $t {
            const INTEGRAL: bool = $integral;
            #[inline(always)]
            fn to_i64(self) -> i64 {
                self as i64
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn from_i64(v: i64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    )*};
}
cast_prim!(f32: false, f64: false, i32: true, i64: true, u8: true);

macro_rules! cast_half {
    ($($t:ty),*) => {$(
        impl CastElem for $t {
            const INTEGRAL: bool = false;
            #[inline(always)]
            fn to_i64(self) -> i64 {
                self.to_f64() as i64
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                <$t>::to_f64(self)
            }
            #[inline(always)]
            fn from_i64(v: i64) -> Self {
                <$t>::from_f64(v as f64)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
        }
    )*};
}
cast_half!(f16, bf16);

/// Bool as stored: one byte, 0 or 1.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
struct Bool(u8);

impl CastElem for Bool {
    const INTEGRAL: bool = true;
    #[inline(always)]
    fn to_i64(self) -> i64 {
        (self.0 != 0) as i64
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        (self.0 != 0) as u8 as f64
    }
    #[inline(always)]
    fn from_i64(v: i64) -> Self {
        Bool((v != 0) as u8)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        // NaN is nonzero, so true, as in C++.
        Bool((v != 0.0) as u8)
    }
}

/// Calls `$body` with `$T` bound to the cast element type of `$dtype`.
macro_rules! cast_dispatch {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::I32 => {
                type $T = i32;
                $body
            }
            DType::I64 => {
                type $T = i64;
                $body
            }
            DType::U8 => {
                type $T = u8;
                $body
            }
            DType::Bool => {
                type $T = Bool;
                $body
            }
            d => Err(unsupported("Cast", d)),
        }
    };
}

fn cast_slice<S: CastElem, D: CastElem>(pool: &dyn IntraOpPool, src: &[S], dst: &mut [D]) {
    // Integers go through i64 so large int64 values are not rounded on the way.
    if S::INTEGRAL {
        map_into(pool, src, dst, |v| D::from_i64(v.to_i64()));
    } else {
        map_into(pool, src, dst, |v| D::from_f64(v.to_f64()));
    }
}

/// f32 to and from f16/bf16 with the `half` crate's slice conversions (F16C where the CPU has
/// it, one rounding to nearest even as the generic path): these casts carry half-precision
/// transfers between tasks. `false` for other pairs.
fn cast_f32_half(pool: &dyn IntraOpPool, x: &Tensor, out: &mut Tensor) -> Result<bool> {
    use rill_graph::half::slice::HalfFloatSliceExt;
    macro_rules! chunks {
        ($src:expr, $dst:expr, |$s:ident, $d:ident| $conv:expr) => {{
            let src = $src;
            super::for_chunks(pool, $dst, 1, |off, $d| {
                let $s = &src[off..off + $d.len()];
                $conv
            });
            Ok(true)
        }};
    }
    match (x.dtype(), out.dtype()) {
        (DType::F32, DType::F16) => {
            let src: &[f32] = bytemuck::cast_slice(x.as_bytes()?);
            chunks!(src, bytemuck::cast_slice_mut::<u8, f16>(out.as_bytes_mut()?), |s, d| d
                .convert_from_f32_slice(s))
        }
        (DType::F32, DType::BF16) => {
            let src: &[f32] = bytemuck::cast_slice(x.as_bytes()?);
            chunks!(src, bytemuck::cast_slice_mut::<u8, bf16>(out.as_bytes_mut()?), |s, d| d
                .convert_from_f32_slice(s))
        }
        (DType::F16, DType::F32) => {
            let src: &[f16] = bytemuck::cast_slice(x.as_bytes()?);
            chunks!(src, bytemuck::cast_slice_mut::<u8, f32>(out.as_bytes_mut()?), |s, d| s
                .convert_to_f32_slice(d))
        }
        (DType::BF16, DType::F32) => {
            let src: &[bf16] = bytemuck::cast_slice(x.as_bytes()?);
            chunks!(src, bytemuck::cast_slice_mut::<u8, f32>(out.as_bytes_mut()?), |s, d| s
                .convert_to_f32_slice(d))
        }
        _ => Ok(false),
    }
}

/// `x` converted to `to`.
pub(crate) fn cast(pool: &dyn IntraOpPool, x: &Tensor, to: DType) -> Result<Tensor> {
    if x.dtype() == to {
        return Ok(x.clone());
    }
    let mut out = Tensor::try_zeros(to, *x.shape())?;
    if cast_f32_half(pool, x, &mut out)? {
        return Ok(out);
    }
    cast_dispatch!(x.dtype(), S => {
        let src: &[S] = bytemuck::cast_slice(x.as_bytes()?);
        cast_dispatch!(to, D => {
            cast_slice::<S, D>(pool, src, bytemuck::cast_slice_mut(out.as_bytes_mut()?));
            Ok(())
        })
    })?;
    Ok(out)
}

struct CastK {
    to: DType,
}

pub fn create_cast(init: &KernelInit<'_>) -> Result<Kernel> {
    Ok(Kernel::sized(CastK { to: init.attrs().dtype("DstT")? }, init))
}

impl OpKernel for CastK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let out = cast(ctx.intra_op(), ctx.input(0)?, self.to)?;
        ctx.set_output(0, out);
        Ok(())
    }
}
