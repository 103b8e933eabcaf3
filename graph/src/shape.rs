//! Tensor shapes: `Shape` (fully known, inline, `Copy`) and `PartialShape` (unknown rank or dims).

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest rank a tensor may have. Shapes live inline, so a tensor never allocates for its shape;
/// eight dimensions cover every model this runtime targets (TensorFlow's own limit is 254).
pub const MAX_RANK: usize = 8;

/// A fully known shape of rank at most `MAX_RANK`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    rank: u8,
    dims: [usize; MAX_RANK],
}

impl Shape {
    pub const SCALAR: Shape = Shape { rank: 0, dims: [0; MAX_RANK] };

    /// A shape from its dimensions; more than `MAX_RANK` dimensions is `InvalidArgument`.
    pub fn new(dims: &[usize]) -> Result<Shape> {
        if dims.len() > MAX_RANK {
            return Err(Error::invalid_argument(format!(
                "rank {} exceeds the maximum rank {MAX_RANK}",
                dims.len()
            )));
        }
        let mut s = Shape { rank: dims.len() as u8, dims: [0; MAX_RANK] };
        s.dims[..dims.len()].copy_from_slice(dims);
        Ok(s)
    }

    pub fn scalar() -> Shape {
        Shape::SCALAR
    }

    pub fn vector(n: usize) -> Shape {
        let mut s = Shape::SCALAR;
        s.rank = 1;
        s.dims[0] = n;
        s
    }

    pub fn matrix(r: usize, c: usize) -> Shape {
        let mut s = Shape::SCALAR;
        s.rank = 2;
        s.dims[0] = r;
        s.dims[1] = c;
        s
    }

    #[inline]
    pub fn rank(&self) -> usize {
        self.rank as usize
    }

    #[inline]
    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.rank as usize]
    }

    #[inline]
    pub fn dim(&self, i: usize) -> usize {
        self.dims()[i]
    }

    /// Number of elements (1 for a scalar).
    #[inline]
    pub fn num_elements(&self) -> usize {
        self.dims().iter().product()
    }

    /// Number of elements, or `InvalidArgument` when the product overflows.
    pub fn checked_num_elements(&self) -> Result<usize> {
        self.dims()
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| Error::invalid_argument(format!("shape {self} has too many elements")))
    }

    /// This shape with `d` appended (error past `MAX_RANK`).
    pub fn push(&self, d: usize) -> Result<Shape> {
        let mut v = self.dims().to_vec();
        v.push(d);
        Shape::new(&v)
    }

    /// This shape with `d` put in front.
    pub fn prepend(&self, d: usize) -> Result<Shape> {
        let mut v = vec![d];
        v.extend_from_slice(self.dims());
        Shape::new(&v)
    }

    /// The shape without its first dimension.
    pub fn tail(&self) -> Shape {
        Shape::new(&self.dims()[1.min(self.rank())..]).expect("shorter shape fits")
    }

    pub fn set_dim(&mut self, i: usize, d: usize) {
        assert!(i < self.rank(), "dimension index in range");
        self.dims[i] = d;
    }

    /// Row-major strides in elements.
    pub fn strides(&self) -> [usize; MAX_RANK] {
        let mut st = [0; MAX_RANK];
        let mut acc = 1;
        for i in (0..self.rank()).rev() {
            st[i] = acc;
            acc *= self.dims[i];
        }
        st
    }

    pub fn to_partial(&self) -> PartialShape {
        PartialShape::known(self.dims())
    }
}

impl Default for Shape {
    fn default() -> Self {
        Shape::SCALAR
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.dims().iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Shape {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.dims().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v: Vec<usize> = Vec::deserialize(d)?;
        Shape::new(&v).map_err(serde::de::Error::custom)
    }
}

impl From<[usize; 0]> for Shape {
    fn from(_: [usize; 0]) -> Shape {
        Shape::SCALAR
    }
}

macro_rules! shape_from_array {
    ($($n:literal)*) => {$(
        impl From<[usize; $n]> for Shape {
            fn from(a: [usize; $n]) -> Shape {
                Shape::new(&a).expect("array shapes are within MAX_RANK")
            }
        }
    )*};
}
shape_from_array!(1 2 3 4 5 6 7 8);

/// A shape known only in part: the rank may be unknown (`dims == None`), and each dim may be unknown.
#[derive(Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct PartialShape {
    pub dims: Option<Vec<Option<usize>>>,
}

impl PartialShape {
    pub fn unknown() -> PartialShape {
        PartialShape { dims: None }
    }

    pub fn scalar() -> PartialShape {
        PartialShape { dims: Some(vec![]) }
    }

    pub fn known(dims: &[usize]) -> PartialShape {
        PartialShape { dims: Some(dims.iter().map(|&d| Some(d)).collect()) }
    }

    pub fn unknown_rank(rank: usize) -> PartialShape {
        PartialShape { dims: Some(vec![None; rank]) }
    }

    pub fn from_dims(dims: &[Option<usize>]) -> PartialShape {
        PartialShape { dims: Some(dims.to_vec()) }
    }

    pub fn rank(&self) -> Option<usize> {
        self.dims.as_ref().map(|d| d.len())
    }

    /// Dimension `i`, `None` when it or the rank is unknown.
    pub fn dim(&self, i: usize) -> Option<usize> {
        self.dims.as_ref().and_then(|d| d.get(i).copied().flatten())
    }

    pub fn is_fully_known(&self) -> bool {
        self.dims.as_ref().is_some_and(|d| d.iter().all(|x| x.is_some()))
    }

    /// The full shape when every dimension is known.
    pub fn to_shape(&self) -> Option<Shape> {
        let d = self.dims.as_ref()?;
        let v: Option<Vec<usize>> = d.iter().copied().collect();
        Shape::new(&v?).ok()
    }

    pub fn num_elements(&self) -> Option<usize> {
        self.to_shape().map(|s| s.num_elements())
    }

    /// Whether a concrete shape fits this partial one.
    pub fn is_compatible_with(&self, s: &Shape) -> bool {
        match &self.dims {
            None => true,
            Some(d) => d.len() == s.rank() && d.iter().zip(s.dims()).all(|(a, b)| a.is_none_or(|a| a == *b)),
        }
    }

    /// The most specific shape compatible with both, or `InvalidArgument` if they conflict.
    pub fn merge(&self, other: &PartialShape) -> Result<PartialShape> {
        match (&self.dims, &other.dims) {
            (None, _) => Ok(other.clone()),
            (_, None) => Ok(self.clone()),
            (Some(a), Some(b)) => {
                if a.len() != b.len() {
                    return Err(Error::invalid_argument(format!(
                        "shapes {self} and {other} have different ranks"
                    )));
                }
                let mut out = Vec::with_capacity(a.len());
                for (x, y) in a.iter().zip(b) {
                    out.push(match (x, y) {
                        (Some(x), Some(y)) if x != y => {
                            return Err(Error::invalid_argument(format!(
                                "shapes {self} and {other} are incompatible"
                            )))
                        }
                        (Some(x), _) => Some(*x),
                        (None, y) => *y,
                    });
                }
                Ok(PartialShape { dims: Some(out) })
            }
        }
    }

    /// Whether two partial shapes could describe the same tensor.
    pub fn compatible(&self, other: &PartialShape) -> bool {
        self.merge(other).is_ok()
    }
}

impl fmt::Display for PartialShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.dims {
            None => write!(f, "<unknown>"),
            Some(d) => {
                write!(f, "[")?;
                for (i, x) in d.iter().enumerate() {
                    if i > 0 {
                        write!(f, ",")?;
                    }
                    match x {
                        Some(x) => write!(f, "{x}")?,
                        None => write!(f, "?")?,
                    }
                }
                write!(f, "]")
            }
        }
    }
}

impl fmt::Debug for PartialShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<Shape> for PartialShape {
    fn from(s: Shape) -> PartialShape {
        s.to_partial()
    }
}

impl From<&[usize]> for PartialShape {
    fn from(s: &[usize]) -> PartialShape {
        PartialShape::known(s)
    }
}

impl<const N: usize> From<[usize; N]> for PartialShape {
    fn from(s: [usize; N]) -> PartialShape {
        PartialShape::known(&s)
    }
}

impl<const N: usize> From<[Option<usize>; N]> for PartialShape {
    fn from(s: [Option<usize>; N]) -> PartialShape {
        PartialShape::from_dims(&s)
    }
}

impl From<Vec<Option<usize>>> for PartialShape {
    fn from(s: Vec<Option<usize>>) -> PartialShape {
        PartialShape { dims: Some(s) }
    }
}
