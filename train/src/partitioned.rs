//! Partitioned (sharded) variables, as `tf.compat.v1.get_variable(..., partitioner=...)`: a large
//! variable split along its first axis into shards `name/part_i`, each an ordinary trainable
//! variable that the device scope (`replica_device_setter`) places on its own ps task and the
//! optimizers update on their own. Read as a whole through a `ConcatV2`, or by rows through
//! `embedding_lookup` with TensorFlow's `"mod"` and `"div"` partition strategies.
//!
//! Shard sizes follow TensorFlow: `rows / n` each, the first `rows % n` shards one row more.
//! `embedding_lookup` gathers from every shard colocated with it, masks the rows the shard does
//! not own and adds the shards' results; the gradient of each shard is densified on the shard's
//! own device (the one-hot gradient of `Gather`), so only the looked-up rows' gradients cross
//! the wire, not the shard.

use rill_graph::{DType, Error, Graph, Output, Result, Shape, Tensor, VariableInfo};

/// How many shards a variable gets (TensorFlow's partitioner functions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partitioner {
    /// `fixed_size_partitioner(num_shards)`: that many shards, at most one per row.
    FixedSize(usize),
    /// `min_max_variable_partitioner(max_partitions, min_slice_size)`: shards of at least
    /// `min_slice_size` bytes, at most `max_partitions` of them.
    MinMax { max_partitions: usize, min_slice_size: usize },
}

/// `fixed_size_partitioner(num_shards)`.
pub fn fixed_size_partitioner(num_shards: usize) -> Partitioner {
    Partitioner::FixedSize(num_shards)
}

/// `min_max_variable_partitioner(max_partitions, min_slice_size)`; TensorFlow's default
/// `min_slice_size` is 256 KiB.
pub fn min_max_variable_partitioner(max_partitions: usize, min_slice_size: usize) -> Partitioner {
    Partitioner::MinMax { max_partitions, min_slice_size }
}

impl Partitioner {
    /// The number of shards of a variable of `shape` and `dtype` (at least 1, at most one per
    /// row of the first axis).
    pub fn num_shards(&self, shape: &Shape, dtype: DType) -> Result<usize> {
        let rows = *shape.dims().first().ok_or_else(|| {
            Error::invalid_argument("a partitioned variable needs rank 1 or more (it is split along axis 0)")
        })?;
        let n = match *self {
            Partitioner::FixedSize(n) => {
                if n == 0 {
                    return Err(Error::invalid_argument("fixed_size_partitioner needs at least one shard"));
                }
                n
            }
            Partitioner::MinMax { max_partitions, min_slice_size } => {
                if max_partitions == 0 {
                    return Err(Error::invalid_argument(
                        "min_max_variable_partitioner needs max_partitions >= 1",
                    ));
                }
                let size = dtype.size().ok_or_else(|| {
                    Error::invalid_argument(format!("cannot partition a variable of {dtype} by bytes"))
                })?;
                // Bytes of one row; as many rows per shard as fill `min_slice_size`.
                let row_bytes = (shape.num_elements() / rows.max(1)).max(1) * size;
                let rows_per_shard = (min_slice_size / row_bytes).max(1);
                rows.div_ceil(rows_per_shard).min(max_partitions)
            }
        };
        Ok(n.min(rows).max(1))
    }
}

/// TensorFlow's `partition_strategy` of `embedding_lookup`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PartitionStrategy {
    /// Id `i` lives in shard `i % n`, at row `i / n`.
    #[default]
    Mod,
    /// Ids are split into contiguous ranges: shard `p` holds the rows its offset starts.
    Div,
}

/// A variable split along axis 0 into `shards`.
#[derive(Clone, Debug)]
pub struct PartitionedVariable {
    pub name: String,
    /// The full shape.
    pub shape: Shape,
    pub dtype: DType,
    /// The shards `name/part_i`, in order.
    pub shards: Vec<VariableInfo>,
    /// The first row of each shard in the full variable.
    pub offsets: Vec<usize>,
}

/// The shard sizes of `rows` rows in `n` shards: `rows / n`, the first `rows % n` one more.
pub fn shard_rows(rows: usize, n: usize) -> Vec<usize> {
    let (base, extra) = (rows / n.max(1), rows % n.max(1));
    (0..n).map(|i| base + usize::from(i < extra)).collect()
}

/// Creates a partitioned variable of `shape`: shard `i` is the variable `name/part_i`, initialised
/// by `init(g, shard_shape, first_row)` (which must give that shape and `dtype`). Each shard is
/// created under the enclosing scopes, so a `replica_device_setter` spreads them over the ps tasks.
pub fn partitioned_variable(
    g: &Graph,
    name: &str,
    shape: impl Into<Shape>,
    dtype: DType,
    partitioner: Partitioner,
    mut init: impl FnMut(&Graph, Shape, usize) -> Output,
) -> Result<PartitionedVariable> {
    g.status()?;
    let shape: Shape = shape.into();
    let n = partitioner.num_shards(&shape, dtype)?;
    let dims = shape.dims().to_vec();
    let mut shards = Vec::with_capacity(n);
    let mut offsets = Vec::with_capacity(n);
    let mut offset = 0;
    for (i, rows) in shard_rows(dims[0], n).into_iter().enumerate() {
        let mut sd = dims.clone();
        sd[0] = rows;
        let sshape = Shape::new(&sd)?;
        let value = init(g, sshape, offset);
        if g.dtype(value) != dtype {
            return Err(Error::invalid_argument(format!(
                "partitioned variable '{name}': the initial value of part {i} is {}, not {dtype}",
                g.dtype(value)
            )));
        }
        let var = g.variable(&format!("{name}/part_{i}"), value);
        g.status()?;
        let info = g.variable_of(var).ok_or_else(|| {
            Error::internal(format!("partitioned variable '{name}': part {i} is not registered"))
        })?;
        if info.shape.to_shape().is_some_and(|s| s != sshape) {
            return Err(Error::invalid_argument(format!(
                "partitioned variable '{name}': part {i} should have shape {sshape:?}, not {:?}",
                info.shape
            )));
        }
        shards.push(info);
        offsets.push(offset);
        offset += rows;
    }
    Ok(PartitionedVariable { name: name.to_string(), shape, dtype, shards, offsets })
}

/// An initializer for `partitioned_variable` that gives each shard its rows of `full` (a host
/// tensor of the full shape), as constants: the same values as an unpartitioned variable.
pub fn rows_of(full: Tensor) -> impl FnMut(&Graph, Shape, usize) -> Output {
    move |g: &Graph, shape: Shape, first: usize| {
        let rows = shape.dims().first().copied().unwrap_or(0);
        match full.slice_rows(first, first + rows) {
            Ok(t) => g.constant(t),
            // A bad slice fails the graph; `partitioned_variable` reports it.
            Err(e) => {
                g.fail(e);
                g.constant(Tensor::scalar(0f32))
            }
        }
    }
}

impl PartitionedVariable {
    /// The shards' variable outputs.
    pub fn parts(&self) -> Vec<Output> {
        self.shards.iter().map(|s| s.var).collect()
    }

    /// The whole variable: the shards concatenated along axis 0 under the enclosing device scope
    /// (TensorFlow's `as_tensor`); gradients flow back to each shard as its slice.
    pub fn as_tensor(&self, g: &Graph) -> Output {
        self.as_tensor_with(g, |v| v)
    }

    /// `as_tensor` with each shard read through `read` (e.g. `read_half`).
    pub fn as_tensor_with(&self, g: &Graph, mut read: impl FnMut(Output) -> Output) -> Output {
        let parts: Vec<Output> = self.shards.iter().map(|s| read(s.var)).collect();
        if parts.len() == 1 {
            return g.identity(parts[0]);
        }
        g.concat(&parts, 0)
    }

    /// The rows `ids` of the whole variable, TensorFlow's `embedding_lookup(shards, ids,
    /// partition_strategy)`.
    pub fn embedding_lookup(&self, g: &Graph, ids: Output, strategy: PartitionStrategy) -> Result<Output> {
        let rows: Vec<usize> = self.shards.iter().map(shard_dim0).collect::<Result<_>>()?;
        lookup(g, &self.parts(), &rows, ids, strategy)
    }
}

fn shard_dim0(s: &VariableInfo) -> Result<usize> {
    s.shape
        .to_shape()
        .and_then(|sh| sh.dims().first().copied())
        .ok_or_else(|| Error::invalid_argument(format!("shard '{}' has no static first dimension", s.name)))
}

/// `embedding_lookup` over shards given as variables (or any tensors of static shape), in order.
pub fn embedding_lookup(
    g: &Graph,
    params: &[Output],
    ids: Output,
    strategy: PartitionStrategy,
) -> Result<Output> {
    let rows: Vec<usize> = params
        .iter()
        .map(|&p| {
            g.shape(p).dim(0).ok_or_else(|| {
                Error::invalid_argument(format!(
                    "embedding_lookup: '{}' has no static first dimension",
                    g.node_name(p.node)
                ))
            })
        })
        .collect::<Result<_>>()?;
    lookup(g, params, &rows, ids, strategy)
}

fn lookup(
    g: &Graph,
    params: &[Output],
    rows: &[usize],
    ids: Output,
    strategy: PartitionStrategy,
) -> Result<Output> {
    g.status()?;
    let n = params.len();
    if n == 0 {
        return Err(Error::invalid_argument("embedding_lookup needs at least one shard"));
    }
    let idt = g.dtype(ids);
    if !matches!(idt, DType::I32 | DType::I64) {
        return Err(Error::invalid_argument(format!(
            "embedding_lookup: ids must be int32 or int64, not {idt}"
        )));
    }
    if n == 1 {
        let out = g.colocate_with(params[0], |g| g.gather(params[0], ids));
        g.status()?;
        return Ok(out);
    }
    let int = |v: usize| match idt {
        DType::I64 => g.scalar(v as i64),
        _ => g.scalar(v as i32),
    };
    let extra_dims =
        params.iter().map(|&p| g.shape(p).rank()).next().flatten().unwrap_or(1).saturating_sub(1);
    let out_dtype = g.dtype(params[0]);
    let mut parts = Vec::with_capacity(n);
    let mut offset = 0usize;
    for (p, (&param, &r)) in params.iter().zip(rows).enumerate() {
        if r == 0 {
            continue;
        }
        // Which ids this shard owns, and their rows in it.
        let (owned, local) = match strategy {
            PartitionStrategy::Mod => {
                let nn = int(n);
                let q = g.div(ids, nn);
                let rem = g.sub(ids, g.mul(q, nn));
                (g.equal(rem, int(p)), q)
            }
            PartitionStrategy::Div => {
                let ge = g.cast(g.less(ids, int(offset)), DType::F32);
                let lt = g.cast(g.less(ids, int(offset + r)), DType::F32);
                // offset <= id < offset + r  ⇔  lt - ge == 1
                (g.equal(g.sub(lt, ge), g.scalar(1f32)), g.sub(ids, int(offset)))
            }
        };
        // Rows it does not own read its row 0 and are zeroed below.
        let local = g.mul(local, g.cast(owned, idt));
        let rows_p = g.colocate_with(param, |g| g.gather(param, local));
        let mut mask = g.cast(owned, out_dtype);
        for _ in 0..extra_dims {
            mask = g.expand_dims(mask, -1);
        }
        parts.push(g.mul(rows_p, mask));
        offset += r;
    }
    let out = if parts.len() == 1 { parts[0] } else { g.add_n(&parts) };
    g.status()?;
    Ok(out)
}
