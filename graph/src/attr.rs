//! Node attributes: typed values attached to a node (dtypes, shapes, ints, tensors, ...).

use crate::{DType, Error, PartialShape, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AttrValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Type(DType),
    Shape(PartialShape),
    Tensor(Tensor),
    Ints(Vec<i64>),
    Floats(Vec<f64>),
    Types(Vec<DType>),
    Shapes(Vec<PartialShape>),
    Strs(Vec<String>),
}

/// A node's attributes, ordered by name so the serde form is deterministic.
pub type Attrs = BTreeMap<String, AttrValue>;

/// Typed lookups on a node's attributes; each error names the attribute.
pub trait AttrsExt {
    fn get_attr(&self, name: &str) -> Result<&AttrValue>;
    fn int(&self, name: &str) -> Result<i64>;
    fn float(&self, name: &str) -> Result<f64>;
    fn bool(&self, name: &str) -> Result<bool>;
    fn str(&self, name: &str) -> Result<&str>;
    fn dtype(&self, name: &str) -> Result<DType>;
    fn shape(&self, name: &str) -> Result<&PartialShape>;
    fn tensor(&self, name: &str) -> Result<&Tensor>;
    fn ints(&self, name: &str) -> Result<&[i64]>;
    fn types(&self, name: &str) -> Result<&[DType]>;
    fn shapes(&self, name: &str) -> Result<&[PartialShape]>;
    fn strs(&self, name: &str) -> Result<&[String]>;
    fn int_or(&self, name: &str, default: i64) -> i64;
    fn float_or(&self, name: &str, default: f64) -> f64;
    fn bool_or(&self, name: &str, default: bool) -> bool;
    fn str_or<'a>(&'a self, name: &str, default: &'a str) -> &'a str;
}

fn wrong(name: &str, want: &str, got: &AttrValue) -> Error {
    Error::invalid_argument(format!("attr '{name}' should be {want}, is {got:?}"))
}

macro_rules! getter {
    ($fn:ident, $ret:ty, $variant:ident, $want:literal, |$v:ident| $conv:expr) => {
        fn $fn(&self, name: &str) -> Result<$ret> {
            match self.get_attr(name)? {
                AttrValue::$variant($v) => Ok($conv),
                other => Err(wrong(name, $want, other)),
            }
        }
    };
}

impl AttrsExt for Attrs {
    fn get_attr(&self, name: &str) -> Result<&AttrValue> {
        self.get(name).ok_or_else(|| Error::invalid_argument(format!("missing attr '{name}'")))
    }
    getter!(int, i64, Int, "an int", |v| *v);
    getter!(float, f64, Float, "a float", |v| *v);
    getter!(bool, bool, Bool, "a bool", |v| *v);
    getter!(str, &str, Str, "a string", |v| v.as_str());
    getter!(dtype, DType, Type, "a dtype", |v| *v);
    getter!(shape, &PartialShape, Shape, "a shape", |v| v);
    getter!(tensor, &Tensor, Tensor, "a tensor", |v| v);
    getter!(ints, &[i64], Ints, "a list of ints", |v| v.as_slice());
    getter!(types, &[DType], Types, "a list of dtypes", |v| v.as_slice());
    getter!(shapes, &[PartialShape], Shapes, "a list of shapes", |v| v.as_slice());
    getter!(strs, &[String], Strs, "a list of strings", |v| v.as_slice());
    fn int_or(&self, name: &str, default: i64) -> i64 {
        self.int(name).unwrap_or(default)
    }
    fn float_or(&self, name: &str, default: f64) -> f64 {
        self.float(name).unwrap_or(default)
    }
    fn bool_or(&self, name: &str, default: bool) -> bool {
        self.bool(name).unwrap_or(default)
    }
    fn str_or<'a>(&'a self, name: &str, default: &'a str) -> &'a str {
        self.str(name).unwrap_or(default)
    }
}

macro_rules! from_attr {
    ($($t:ty => |$v:ident| $e:expr),* $(,)?) => {$(
        impl From<$t> for AttrValue {
            fn from($v: $t) -> AttrValue {
                $e
            }
        }
    )*};
}

from_attr! {
    i64 => |v| AttrValue::Int(v),
    i32 => |v| AttrValue::Int(v as i64),
    usize => |v| AttrValue::Int(v as i64),
    f64 => |v| AttrValue::Float(v),
    f32 => |v| AttrValue::Float(v as f64),
    bool => |v| AttrValue::Bool(v),
    String => |v| AttrValue::Str(v),
    &str => |v| AttrValue::Str(v.to_string()),
    DType => |v| AttrValue::Type(v),
    PartialShape => |v| AttrValue::Shape(v),
    Tensor => |v| AttrValue::Tensor(v),
    Vec<i64> => |v| AttrValue::Ints(v),
    Vec<DType> => |v| AttrValue::Types(v),
    Vec<PartialShape> => |v| AttrValue::Shapes(v),
    Vec<String> => |v| AttrValue::Strs(v),
}
