//! Decoders: `DecodeCSV` (record_defaults and their dtypes, RFC 4180 quoting), `DecodeRaw`, and
//! `ParseExample` of dense features from serialized `tf.train.Example` records.

use crate::example::{Example, Feature};
use crate::op_def;
use rill_graph::kernel::{Kernel, KernelInit, OpKernel, OpKernelContext};
use rill_graph::{
    attrs, AttrsExt, DType, Error, Graph, InferCtx, Output, PartialShape, Result, Shape, Tensor, TensorInfo,
};

// ---- DecodeCSV ----

/// Options of `decode_csv`; `Default` gives TensorFlow's.
#[derive(Clone, Debug)]
pub struct CsvOptions {
    pub field_delim: u8,
    pub use_quote_delim: bool,
    pub na_value: String,
    /// Columns to keep (ascending); empty keeps all.
    pub select_cols: Vec<usize>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            field_delim: b',',
            use_quote_delim: true,
            na_value: String::new(),
            select_cols: Vec::new(),
        }
    }
}

/// Splits one CSV record into fields, TensorFlow's way (quoted fields with `""` escapes).
pub fn split_csv(rec: &[u8], opts: &CsvOptions, index: usize) -> Result<Vec<Vec<u8>>> {
    let bad = |what: &str| {
        Error::invalid_argument(format!("{what} in record {index}: '{}'", String::from_utf8_lossy(rec)))
    };
    let d = opts.field_delim;
    let mut fields = Vec::new();
    let mut i = 0;
    loop {
        let mut f = Vec::new();
        if opts.use_quote_delim && rec.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match rec.get(i) {
                    None => return Err(bad("Quoted field has to end with quote followed by delim or end")),
                    Some(b'"') if rec.get(i + 1) == Some(&b'"') => {
                        f.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        f.push(c);
                        i += 1;
                    }
                }
            }
            if i < rec.len() && rec[i] != d {
                return Err(bad("Quoted field has to end with quote followed by delim or end"));
            }
        } else {
            while i < rec.len() && rec[i] != d {
                if opts.use_quote_delim && rec[i] == b'"' || rec[i] == b'\n' || rec[i] == b'\r' {
                    return Err(bad("Unquoted fields cannot have quotes/CRLFs inside"));
                }
                f.push(rec[i]);
                i += 1;
            }
        }
        fields.push(f);
        if i >= rec.len() {
            return Ok(fields);
        }
        i += 1; // the delimiter
    }
}

fn csv_value(
    field: &[u8],
    default: &Tensor,
    dtype: DType,
    col: usize,
    rec: usize,
    na: &str,
) -> Result<Tensor> {
    if field.is_empty() || field == na.as_bytes() {
        if default.num_elements() == 0 {
            return Err(Error::invalid_argument(format!(
                "Field {col} is required but missing in record {rec}!"
            )));
        }
        return default.reshape(Shape::SCALAR);
    }
    let s = std::str::from_utf8(field).unwrap_or("").trim();
    let bad = || {
        Error::invalid_argument(format!(
            "Field {col} in record {rec} is not a valid {dtype}: {}",
            String::from_utf8_lossy(field)
        ))
    };
    Ok(match dtype {
        DType::I32 => Tensor::scalar(s.parse::<i32>().map_err(|_| bad())?),
        DType::I64 => Tensor::scalar(s.parse::<i64>().map_err(|_| bad())?),
        DType::F32 => Tensor::scalar(s.parse::<f32>().map_err(|_| bad())?),
        DType::F64 => Tensor::scalar(s.parse::<f64>().map_err(|_| bad())?),
        DType::String => Tensor::scalar_string(field.to_vec()),
        other => return Err(Error::invalid_argument(format!("DecodeCSV cannot produce {other}"))),
    })
}

const CSV_TYPES: &[DType] = &[DType::I32, DType::I64, DType::F32, DType::F64, DType::String];

pub(crate) fn infer_decode_csv(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_dtype(0, &[DType::String])?;
    let types = c.attrs.types("OUT_TYPE")?;
    if c.num_inputs() != types.len() + 1 {
        return Err(Error::invalid_argument(format!(
            "{} record_defaults for {} columns",
            c.num_inputs() - 1,
            types.len()
        )));
    }
    for (i, d) in types.iter().enumerate() {
        if !CSV_TYPES.contains(d) || c.dtype(i + 1) != *d {
            return Err(Error::invalid_argument(format!(
                "record_defaults[{i}] is {} but OUT_TYPE[{i}] is {d} (allowed: {CSV_TYPES:?})",
                c.dtype(i + 1)
            )));
        }
    }
    Ok(types.iter().map(|d| TensorInfo::new(*d, c.shape(0).clone())).collect())
}

struct DecodeCsvK {
    types: Vec<DType>,
    opts: CsvOptions,
}

impl OpKernel for DecodeCsvK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let records = ctx.input(0)?.clone();
        let defaults: Vec<Tensor> =
            (1..=self.types.len()).map(|i| ctx.input(i).cloned()).collect::<Result<_>>()?;
        for (i, d) in defaults.iter().enumerate() {
            if d.num_elements() > 1 {
                return Err(Error::invalid_argument(format!(
                    "record_defaults[{i}] must have 0 or 1 elements"
                )));
            }
        }
        let n = self.types.len();
        let mut cols: Vec<Vec<Tensor>> = vec![Vec::with_capacity(records.num_elements()); n];
        for (r, rec) in records.strings()?.iter().enumerate() {
            let mut fields = split_csv(rec, &self.opts, r)?;
            if !self.opts.select_cols.is_empty() {
                let picked: Option<Vec<Vec<u8>>> =
                    self.opts.select_cols.iter().map(|&k| fields.get(k).cloned()).collect();
                fields = picked.ok_or_else(|| {
                    Error::invalid_argument(format!(
                        "record {r} has {} fields, fewer than select_cols needs",
                        fields.len()
                    ))
                })?;
            }
            if fields.len() != n {
                return Err(Error::invalid_argument(format!(
                    "Expect {n} fields but have {} in record {r}",
                    fields.len()
                )));
            }
            for (c, f) in fields.iter().enumerate() {
                cols[c].push(csv_value(f, &defaults[c], self.types[c], c, r, &self.opts.na_value)?);
            }
        }
        for (c, col) in cols.into_iter().enumerate() {
            let t = if col.is_empty() {
                Tensor::try_zeros(self.types[c], *records.shape())?
            } else {
                Tensor::stack(&col)?.reshape(*records.shape())?
            };
            ctx.set_output(c, t);
        }
        Ok(())
    }
}

pub(crate) fn create_decode_csv(init: &KernelInit<'_>) -> Result<Kernel> {
    let a = init.attrs();
    let delim = a.str_or("field_delim", ",").as_bytes();
    if delim.len() != 1 {
        return Err(Error::invalid_argument("field_delim must be one byte"));
    }
    let opts = CsvOptions {
        field_delim: delim[0],
        use_quote_delim: a.bool_or("use_quote_delim", true),
        na_value: a.str_or("na_value", "").to_string(),
        select_cols: a
            .ints("select_cols")
            .map(|v| v.iter().map(|&x| x.max(0) as usize).collect())
            .unwrap_or_default(),
    };
    Ok(Kernel::expensive(DecodeCsvK { types: a.types("OUT_TYPE")?.to_vec(), opts }))
}

/// `tf.io.decode_csv(records, record_defaults)`: one output per column, shaped like `records`.
/// A default with no elements makes its column required.
pub fn decode_csv(g: &Graph, records: Output, record_defaults: &[Tensor], opts: &CsvOptions) -> Vec<Output> {
    let defaults: Vec<Output> = record_defaults.iter().map(|t| g.constant(t.clone())).collect();
    let types: Vec<DType> = record_defaults.iter().map(|t| t.dtype()).collect();
    let inputs: Vec<Output> = std::iter::once(records).chain(defaults).collect();
    let a = attrs! {
        "OUT_TYPE" => types,
        "field_delim" => String::from_utf8_lossy(&[opts.field_delim]).into_owned(),
        "use_quote_delim" => opts.use_quote_delim,
        "na_value" => opts.na_value.clone(),
        "select_cols" => opts.select_cols.iter().map(|&c| c as i64).collect::<Vec<i64>>(),
    };
    let id = g.add_node(op_def("DecodeCSV"), "", &inputs, a);
    (0..g.num_outputs(id) as u32).map(|i| Output::new(id, i)).collect()
}

// ---- DecodeRaw ----

pub(crate) fn infer_decode_raw(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_inputs(1)?;
    c.expect_dtype(0, &[DType::String])?;
    let d = c.attrs.dtype("out_type")?;
    if d.size().is_none() {
        return Err(Error::invalid_argument(format!("DecodeRaw cannot produce {d}")));
    }
    let shape = match &c.shape(0).dims {
        Some(dims) => PartialShape::from_dims(&[&dims[..], &[None]].concat()),
        None => PartialShape::unknown(),
    };
    Ok(vec![TensorInfo::new(d, shape)])
}

struct DecodeRawK {
    dtype: DType,
    little_endian: bool,
}

impl OpKernel for DecodeRawK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let input = ctx.input(0)?;
        let strs = input.strings()?;
        let es = self.dtype.size().unwrap_or(1);
        let len = strs.first().map_or(0, |s| s.len());
        if strs.iter().any(|s| s.len() != len) {
            return Err(Error::invalid_argument("DecodeRaw requires input strings to all be the same size"));
        }
        if len % es != 0 {
            return Err(Error::invalid_argument(format!(
                "Input to DecodeRaw has length {len} that is not a multiple of {es}, the size of {}",
                self.dtype
            )));
        }
        let mut bytes = Vec::with_capacity(len * strs.len());
        for s in strs {
            bytes.extend_from_slice(s);
        }
        if self.little_endian != cfg!(target_endian = "little") && es > 1 {
            bytes.chunks_exact_mut(es).for_each(|c| c.reverse());
        }
        let shape = input.shape().push(len / es)?;
        ctx.set_output(0, Tensor::from_bytes(self.dtype, shape, &bytes)?);
        Ok(())
    }
}

pub(crate) fn create_decode_raw(init: &KernelInit<'_>) -> Result<Kernel> {
    let a = init.attrs();
    Ok(Kernel::expensive(DecodeRawK {
        dtype: a.dtype("out_type")?,
        little_endian: a.bool_or("little_endian", true),
    }))
}

/// `tf.io.decode_raw(bytes, out_type)`: each string's bytes reinterpreted as elements.
pub fn decode_raw(g: &Graph, bytes: Output, out_type: DType, little_endian: bool) -> Output {
    g.op(
        op_def("DecodeRaw"),
        "",
        &[bytes],
        attrs! { "out_type" => out_type, "little_endian" => little_endian },
    )
}

// ---- ParseExample ----

/// One dense feature to parse: key, dtype (float32, int64 or string), shape, and a default
/// (`None`: required).
#[derive(Clone, Debug)]
pub struct DenseFeature {
    pub key: String,
    pub dtype: DType,
    pub shape: Shape,
    pub default: Option<Tensor>,
}

impl DenseFeature {
    pub fn required(key: &str, dtype: DType, shape: impl Into<Shape>) -> DenseFeature {
        DenseFeature { key: key.to_string(), dtype, shape: shape.into(), default: None }
    }

    pub fn with_default(key: &str, default: Tensor) -> DenseFeature {
        DenseFeature {
            key: key.to_string(),
            dtype: default.dtype(),
            shape: *default.shape(),
            default: Some(default),
        }
    }
}

const EXAMPLE_TYPES: &[DType] = &[DType::F32, DType::I64, DType::String];

pub(crate) fn infer_parse_example(c: &InferCtx) -> Result<Vec<TensorInfo>> {
    c.expect_dtype(0, &[DType::String])?;
    let types = c.attrs.types("Tdense")?;
    let shapes = c.attrs.shapes("dense_shapes")?;
    let keys = c.attrs.strs("dense_keys")?;
    if types.len() != shapes.len() || types.len() != keys.len() || c.num_inputs() != types.len() + 1 {
        return Err(Error::invalid_argument(
            "dense_keys, Tdense, dense_shapes and dense_defaults must match in length",
        ));
    }
    let lead: Vec<Option<usize>> = match c.shape(0).rank() {
        Some(0) => vec![],
        Some(1) => vec![c.shape(0).dim(0)],
        _ => return Err(Error::invalid_argument("serialized must be a scalar or a vector")),
    };
    let mut out = Vec::new();
    for (i, (d, s)) in types.iter().zip(shapes).enumerate() {
        if !EXAMPLE_TYPES.contains(d) || c.dtype(i + 1) != *d {
            return Err(Error::invalid_argument(format!(
                "dense feature {} must be float32, int64 or string",
                keys[i]
            )));
        }
        let dims =
            s.dims.clone().ok_or_else(|| Error::invalid_argument("dense_shapes must be fully defined"))?;
        out.push(TensorInfo::new(*d, PartialShape::from_dims(&[&lead[..], &dims[..]].concat())));
    }
    Ok(out)
}

struct ParseExampleK {
    keys: Vec<String>,
    types: Vec<DType>,
    shapes: Vec<Shape>,
}

impl ParseExampleK {
    fn values(&self, i: usize, f: Option<&Feature>, default: &Tensor, rec: usize) -> Result<Tensor> {
        let (key, dtype, shape) = (&self.keys[i], self.types[i], self.shapes[i]);
        let Some(f) = f else {
            if default.num_elements() == 0 && shape.num_elements() > 0 {
                return Err(Error::invalid_argument(format!(
                    "Name: <unknown>, Feature: {key} (data type: {dtype}) is required but could not be found (record {rec})"
                )));
            }
            return Ok(default.clone());
        };
        if f.len() != shape.num_elements() {
            return Err(Error::invalid_argument(format!(
                "Key: {key}, Index: {rec}. Number of {} values != expected. Values size: {} but output shape: {shape}",
                f.kind(),
                f.len()
            )));
        }
        match (f, dtype) {
            (Feature::Float(v), DType::F32) => Tensor::new(shape, v),
            (Feature::Int64(v), DType::I64) => Tensor::new(shape, v),
            (Feature::Bytes(v), DType::String) => Tensor::from_strings(shape, v.clone()),
            _ => Err(Error::invalid_argument(format!(
                "Key: {key}, Index: {rec}. Data types don't match. Expected type: {dtype}, feature is {}",
                f.kind()
            ))),
        }
    }
}

impl OpKernel for ParseExampleK {
    fn compute(&self, ctx: &mut OpKernelContext<'_>) -> Result<()> {
        let serialized = ctx.input(0)?.clone();
        let n = self.keys.len();
        let mut defaults = Vec::with_capacity(n);
        for i in 0..n {
            let d = ctx.input(i + 1)?.clone();
            if d.num_elements() != 0 && d.shape() != &self.shapes[i] {
                return Err(Error::invalid_argument(format!(
                    "default for {} has shape {}, expected {}",
                    self.keys[i],
                    d.shape(),
                    self.shapes[i]
                )));
            }
            defaults.push(d);
        }
        let mut cols: Vec<Vec<Tensor>> = vec![Vec::new(); n];
        for (r, rec) in serialized.strings()?.iter().enumerate() {
            let ex = Example::decode(rec).map_err(|e| e.context(format!("record {r}")))?;
            for i in 0..n {
                cols[i].push(self.values(i, ex.features.get(&self.keys[i]), &defaults[i], r)?);
            }
        }
        for (i, col) in cols.into_iter().enumerate() {
            let t = if serialized.shape().rank() == 0 {
                col.into_iter().next().ok_or_else(|| Error::internal("no record"))?
            } else if col.is_empty() {
                Tensor::try_zeros(self.types[i], self.shapes[i].prepend(0)?)?
            } else {
                Tensor::stack(&col)?
            };
            ctx.set_output(i, t);
        }
        Ok(())
    }
}

pub(crate) fn create_parse_example(init: &KernelInit<'_>) -> Result<Kernel> {
    let a = init.attrs();
    let shapes = a
        .shapes("dense_shapes")?
        .iter()
        .map(|s| s.to_shape().ok_or_else(|| Error::invalid_argument("dense_shapes must be fully defined")))
        .collect::<Result<_>>()?;
    Ok(Kernel::expensive(ParseExampleK {
        keys: a.strs("dense_keys")?.to_vec(),
        types: a.types("Tdense")?.to_vec(),
        shapes,
    }))
}

/// `tf.io.parse_example(serialized, features)` for dense features: one output per feature,
/// shaped `[batch] + shape` (or `shape` for a scalar `serialized`).
pub fn parse_example(g: &Graph, serialized: Output, features: &[DenseFeature]) -> Vec<Output> {
    let defaults: Vec<Output> = features
        .iter()
        .map(|f| g.constant(f.default.clone().unwrap_or_else(|| Tensor::zeros(f.dtype, Shape::vector(0)))))
        .collect();
    let inputs: Vec<Output> = std::iter::once(serialized).chain(defaults).collect();
    let a = attrs! {
        "dense_keys" => features.iter().map(|f| f.key.clone()).collect::<Vec<String>>(),
        "Tdense" => features.iter().map(|f| f.dtype).collect::<Vec<DType>>(),
        "dense_shapes" => features.iter().map(|f| f.shape.to_partial()).collect::<Vec<PartialShape>>(),
    };
    let id = g.add_node(op_def("ParseExample"), "", &inputs, a);
    (0..g.num_outputs(id) as u32).map(|i| Output::new(id, i)).collect()
}
