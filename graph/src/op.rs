//! Op definitions (`OpDef`: name, shape/dtype inference, reference inputs, statefulness) and the
//! `OpRegistry` a program assembles from each crate's `OPS` table.

use crate::{Attrs, AttrsExt, DType, Error, PartialShape, Result, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;

/// The static type of one output: dtype and (partial) shape; `is_ref` marks a variable reference.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: PartialShape,
    pub is_ref: bool,
}

impl TensorInfo {
    pub fn new(dtype: DType, shape: impl Into<PartialShape>) -> TensorInfo {
        TensorInfo { dtype, shape: shape.into(), is_ref: false }
    }
}

/// What an inference function sees of a node being built.
pub struct InferCtx<'a> {
    pub node: &'a str,
    pub op: &'a str,
    pub inputs: &'a [TensorInfo],
    pub attrs: &'a Attrs,
    /// The values of inputs produced by `Const` nodes (used for shapes, axes, permutations).
    pub consts: &'a [Option<Tensor>],
}

impl InferCtx<'_> {
    pub fn num_inputs(&self) -> usize {
        self.inputs.len()
    }

    pub fn expect_inputs(&self, n: usize) -> Result<()> {
        if self.inputs.len() != n {
            return Err(Error::invalid_argument(format!("expects {n} inputs, got {}", self.inputs.len())));
        }
        Ok(())
    }

    pub fn dtype(&self, i: usize) -> DType {
        self.inputs[i].dtype
    }

    pub fn shape(&self, i: usize) -> &PartialShape {
        &self.inputs[i].shape
    }

    /// Input `i` must have one of `allowed` dtypes.
    pub fn expect_dtype(&self, i: usize, allowed: &[DType]) -> Result<DType> {
        let d = self.inputs[i].dtype;
        if !allowed.contains(&d) {
            return Err(Error::invalid_argument(format!(
                "input {i} has dtype {d}, expected one of {allowed:?}"
            )));
        }
        Ok(d)
    }

    /// All inputs in `range` must share one dtype; returns it.
    pub fn same_dtype(&self, idx: &[usize]) -> Result<DType> {
        let d = self.inputs[idx[0]].dtype;
        for &i in idx {
            if self.inputs[i].dtype != d {
                return Err(Error::invalid_argument(format!(
                    "inputs must share a dtype: input {} is {d}, input {i} is {}",
                    idx[0], self.inputs[i].dtype
                )));
            }
        }
        Ok(d)
    }

    /// The rank of input `i` must be `r` when known.
    pub fn expect_rank(&self, i: usize, r: usize) -> Result<()> {
        match self.inputs[i].shape.rank() {
            Some(k) if k != r => Err(Error::invalid_argument(format!(
                "input {i} must have rank {r}, has shape {}",
                self.inputs[i].shape
            ))),
            _ => Ok(()),
        }
    }

    /// The constant value of input `i`, if it is produced by a `Const` node.
    pub fn const_value(&self, i: usize) -> Option<&Tensor> {
        self.consts.get(i).and_then(|c| c.as_ref())
    }

    /// The constant integer vector of input `i` (int32 or int64), if constant.
    pub fn const_ints(&self, i: usize) -> Option<Vec<i64>> {
        let t = self.const_value(i)?;
        match t.dtype() {
            DType::I32 => t.as_slice::<i32>().ok().map(|s| s.iter().map(|&x| x as i64).collect()),
            DType::I64 => t.to_vec::<i64>().ok(),
            _ => None,
        }
    }

    pub fn attr_dtype(&self, name: &str) -> Result<DType> {
        self.attrs.dtype(name)
    }
}

/// Signature of an inference function: input types in, output types out.
pub type InferFn = fn(&InferCtx<'_>) -> Result<Vec<TensorInfo>>;

/// The definition of an op, shared by the builder (inference), the placer (reference inputs) and
/// the session (validation of graphs that arrive as `GraphDef`s).
pub struct OpDef {
    pub name: &'static str,
    pub infer: InferFn,
    /// Inputs taken by reference (a variable's buffer, updated in place); their producer and this
    /// node are always placed on one device.
    pub ref_inputs: &'static [usize],
    /// Stateful ops own or touch resources: they get the container scope and are never merged.
    pub stateful: bool,
}

impl OpDef {
    pub fn is_ref_input(&self, i: usize) -> bool {
        self.ref_inputs.contains(&i)
    }
}

impl fmt::Debug for OpDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpDef({})", self.name)
    }
}

/// The ops a program knows, by name. Built explicitly in `main` from each crate's `OPS` table.
#[derive(Default, Clone)]
pub struct OpRegistry {
    ops: HashMap<&'static str, &'static OpDef>,
}

impl fmt::Debug for OpRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OpRegistry({} ops)", self.ops.len())
    }
}

impl OpRegistry {
    pub fn new() -> OpRegistry {
        OpRegistry::default()
    }

    /// Adds every op of a table; a name registered twice is a program bug and panics at start-up.
    pub fn add(&mut self, table: &'static [OpDef]) -> &mut Self {
        for op in table {
            let prev = self.ops.insert(op.name, op);
            assert!(prev.is_none_or(|p| std::ptr::eq(p, op)), "op {} registered twice", op.name);
        }
        self
    }

    pub fn get(&self, name: &str) -> Result<&'static OpDef> {
        self.ops.get(name).copied().ok_or_else(|| Error::not_found(format!("op '{name}' is not registered")))
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.ops.keys().copied()
    }
}
