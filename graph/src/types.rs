//! Element types of tensors (`DType`) and the Rust types that hold them (`Element`).

use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The element type of a tensor. `Resource` tensors hold handles to resources (queues, readers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I32,
    I64,
    U8,
    Bool,
    String,
    Resource,
}

impl DType {
    pub const ALL: [DType; 10] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::U8,
        DType::Bool,
        DType::String,
        DType::Resource,
    ];
    pub const FLOATS: &'static [DType] = &[DType::F32, DType::F64, DType::F16, DType::BF16];
    pub const NUMBERS: &'static [DType] =
        &[DType::F32, DType::F64, DType::F16, DType::BF16, DType::I32, DType::I64, DType::U8];
    pub const INDICES: &'static [DType] = &[DType::I32, DType::I64];

    /// Bytes per element of a fixed-size type; `None` for strings and resource handles.
    pub fn size(self) -> Option<usize> {
        match self {
            DType::F64 | DType::I64 => Some(8),
            DType::F32 | DType::I32 => Some(4),
            DType::F16 | DType::BF16 => Some(2),
            DType::U8 | DType::Bool => Some(1),
            DType::String | DType::Resource => None,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    pub fn is_integer(self) -> bool {
        matches!(self, DType::I32 | DType::I64 | DType::U8)
    }

    pub fn is_numeric(self) -> bool {
        self.is_float() || self.is_integer()
    }

    /// TensorFlow's name of the type (`float32`, `int64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::Bool => "bool",
            DType::String => "string",
            DType::Resource => "resource",
        }
    }

    /// Parses TensorFlow's names and the short Rust-like ones (`f32`, `i64`).
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "float32" | "float" | "f32" => DType::F32,
            "float64" | "double" | "f64" => DType::F64,
            "float16" | "half" | "f16" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            "int32" | "i32" => DType::I32,
            "int64" | "i64" => DType::I64,
            "uint8" | "u8" => DType::U8,
            "bool" => DType::Bool,
            "string" => DType::String,
            "resource" => DType::Resource,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type that stores one element of a fixed-size `DType`, viewable in place through bytemuck.
pub trait Element: bytemuck::Pod + Send + Sync + fmt::Debug + PartialEq + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $d:ident, |$x:ident| $to:expr, |$y:ident| $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            #[inline]
            fn to_f64(self) -> f64 {
                let $x = self;
                $to
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                let $y = v;
                $from
            }
        }
    };
}

element!(f32, F32, |x| x as f64, |v| v as f32);
element!(f64, F64, |x| x, |v| v);
element!(f16, F16, |x| x.to_f64(), |v| f16::from_f64(v));
element!(bf16, BF16, |x| x.to_f64(), |v| bf16::from_f64(v));
element!(i32, I32, |x| x as f64, |v| v as i32);
element!(i64, I64, |x| x as f64, |v| v as i64);
element!(u8, U8, |x| x as f64, |v| v as u8);

/// Calls `$body` with `$T` bound to the Rust element type of a numeric `DType`, or evaluates
/// `$other` for the remaining types. One `match` for all dtype dispatch.
#[macro_export]
macro_rules! dispatch_numeric {
    ($dtype:expr, $T:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::F16 => {
                type $T = $crate::half::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $T = $crate::half::bf16;
                $body
            }
            $crate::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::DType::U8 => {
                type $T = u8;
                $body
            }
            _ => $other,
        }
    };
}

/// Like `dispatch_numeric!` for the floating-point types only.
#[macro_export]
macro_rules! dispatch_float {
    ($dtype:expr, $T:ident => $body:expr, _ => $other:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::F16 => {
                type $T = $crate::half::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $T = $crate::half::bf16;
                $body
            }
            _ => $other,
        }
    };
}
