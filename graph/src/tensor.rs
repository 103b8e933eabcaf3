//! `Tensor`: a dtype, a shape and cheaply cloned storage (inline for tiny tensors, a 64-byte-aligned
//! shared host buffer, byte strings, or memory owned by an accelerator device).

use crate::{DType, Element, Error, Result, Shape};
use serde::{Deserialize, Serialize};
use std::any::Any;
use std::fmt;
use std::sync::Arc;

/// Alignment of every host tensor buffer, in bytes: one cache line and one AVX-512 vector.
pub const BUFFER_ALIGN: usize = 64;
/// Tensors of at most this many bytes are stored inside the `Tensor` value, with no allocation.
pub const INLINE_BYTES: usize = 16;

/// Takes back the bytes of dropped buffers for reuse (a device's caching allocator).
pub trait BufferRecycler: Send + Sync {
    fn recycle(&self, bytes: Vec<u8>);
}

/// Host memory a buffer borrows from an owner outside the allocator (a shared-memory segment this
/// process maps): the owner keeps the bytes valid while the buffer lives and takes them back when
/// the buffer drops. The bytes must start on a `BUFFER_ALIGN` boundary.
pub trait ExternalMemory: Send + Sync {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

/// A 64-byte-aligned host buffer of `len` bytes.
///
/// The bytes live in a `Vec<u8>`; the buffer starts at the first 64-byte boundary inside it.
/// Fresh buffers are allocated zeroed with byte alignment, so large ones come straight from the
/// allocator's zero pages (`calloc`) with no memset. A buffer made from a recycler's bytes goes
/// back to that recycler when dropped, so large tensors of a training loop reuse their memory
/// instead of faulting in fresh pages every step.
pub struct Buffer {
    bytes: Vec<u8>,
    offset: usize,
    len: usize,
    recycler: Option<Arc<dyn BufferRecycler>>,
    /// When set, the buffer's bytes are this memory's (and `bytes` is empty).
    external: Option<Box<dyn ExternalMemory>>,
}

fn align_offset(bytes: &[u8]) -> usize {
    let addr = bytes.as_ptr() as usize;
    (BUFFER_ALIGN - addr % BUFFER_ALIGN) % BUFFER_ALIGN
}

impl Buffer {
    /// A zeroed buffer.
    pub fn zeroed(len: usize) -> Buffer {
        let bytes = vec![0u8; len + BUFFER_ALIGN - 1];
        Buffer { offset: align_offset(&bytes), bytes, len, recycler: None, external: None }
    }

    /// A buffer over memory owned elsewhere (see [`ExternalMemory`]), without a copy; `None` when
    /// the memory does not start on a `BUFFER_ALIGN` boundary.
    pub fn from_external(mem: Box<dyn ExternalMemory>) -> Option<Buffer> {
        let (addr, len) = (mem.bytes().as_ptr() as usize, mem.bytes().len());
        (addr % BUFFER_ALIGN == 0).then(|| Buffer {
            len,
            bytes: Vec::new(),
            offset: 0,
            recycler: None,
            external: Some(mem),
        })
    }

    /// Bytes needed in a `Vec` to hold an aligned buffer of `len` bytes.
    pub fn capacity_for(len: usize) -> usize {
        len + BUFFER_ALIGN - 1
    }

    /// A buffer over reused bytes (contents unspecified) that returns them to `recycler` when
    /// dropped; `None` when `bytes` is too short for `len` aligned bytes.
    pub fn from_recycled(bytes: Vec<u8>, len: usize, recycler: Arc<dyn BufferRecycler>) -> Option<Buffer> {
        let offset = align_offset(&bytes);
        (offset + len <= bytes.len()).then_some(Buffer {
            bytes,
            offset,
            len,
            recycler: Some(recycler),
            external: None,
        })
    }

    pub fn from_bytes(bytes: &[u8]) -> Buffer {
        let mut b = Buffer::zeroed(bytes.len());
        b.as_bytes_mut().copy_from_slice(bytes);
        b
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        match &self.external {
            None => &self.bytes[self.offset..self.offset + self.len],
            Some(m) => m.bytes(),
        }
    }

    #[inline]
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.external {
            None => &mut self.bytes[self.offset..self.offset + self.len],
            Some(m) => m.bytes_mut(),
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(r) = self.recycler.take() {
            r.recycle(std::mem::take(&mut self.bytes));
        }
    }
}

impl Clone for Buffer {
    /// A copy realigned in its own allocation (a plain `Vec` clone could land off the boundary).
    fn clone(&self) -> Buffer {
        Buffer::from_bytes(self.as_bytes())
    }
}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Buffer({} bytes)", self.len)
    }
}

/// Memory owned by an accelerator device. Host code cannot read it; the owning device copies it.
pub trait DeviceMemory: Send + Sync + fmt::Debug {
    /// Full name of the device that owns the memory.
    fn device(&self) -> &str;
    fn len_bytes(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
}

#[derive(Clone)]
enum Data {
    /// The element bytes (the first `len` of them) stored in the value itself.
    Inline {
        len: u8,
        words: [u64; INLINE_BYTES / 8],
    },
    Host(Arc<Buffer>),
    Strings(Arc<Vec<Vec<u8>>>),
    Device(Arc<dyn DeviceMemory>),
}

/// An n-dimensional array. Cloning is cheap: the storage is shared, and writes copy on demand.
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Shape,
    data: Data,
}

fn byte_len(dtype: DType, shape: &Shape) -> Result<usize> {
    let n = shape.checked_num_elements()?;
    let size =
        dtype.size().ok_or_else(|| Error::invalid_argument(format!("{dtype} has no fixed element size")))?;
    n.checked_mul(size).ok_or_else(|| Error::invalid_argument(format!("shape {shape} too large")))
}

impl Tensor {
    /// A zero-filled tensor of a fixed-size dtype (strings: empty strings).
    pub fn zeros(dtype: DType, shape: impl Into<Shape>) -> Tensor {
        let shape = shape.into();
        match dtype {
            DType::String | DType::Resource => {
                Tensor { dtype, shape, data: Data::Strings(Arc::new(vec![Vec::new(); shape.num_elements()])) }
            }
            _ => {
                let len = byte_len(dtype, &shape).expect("zeros: shape fits in memory");
                if len <= INLINE_BYTES {
                    return Tensor {
                        dtype,
                        shape,
                        data: Data::Inline { len: len as u8, words: [0; INLINE_BYTES / 8] },
                    };
                }
                Tensor::from_buffer(dtype, shape, Buffer::zeroed(len)).expect("sizes match")
            }
        }
    }

    /// Like `zeros` but an error, not a panic, when the size overflows.
    pub fn try_zeros(dtype: DType, shape: Shape) -> Result<Tensor> {
        if dtype.size().is_some() {
            byte_len(dtype, &shape)?;
        }
        Ok(Tensor::zeros(dtype, shape))
    }

    /// A tensor over an existing buffer; the buffer's length must match dtype and shape exactly.
    pub fn from_buffer(dtype: DType, shape: Shape, buf: Buffer) -> Result<Tensor> {
        let len = byte_len(dtype, &shape)?;
        if buf.len() != len {
            return Err(Error::invalid_argument(format!(
                "buffer of {} bytes does not hold a {dtype} tensor of shape {shape} ({len} bytes)",
                buf.len()
            )));
        }
        if len <= INLINE_BYTES {
            return Ok(Tensor::inline(dtype, shape, buf.as_bytes()));
        }
        Ok(Tensor { dtype, shape, data: Data::Host(Arc::new(buf)) })
    }

    fn inline(dtype: DType, shape: Shape, bytes: &[u8]) -> Tensor {
        let mut words = [0u64; INLINE_BYTES / 8];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Tensor { dtype, shape, data: Data::Inline { len: bytes.len() as u8, words } }
    }

    /// A tensor holding a copy of `bytes` (native-endian element bytes).
    pub fn from_bytes(dtype: DType, shape: Shape, bytes: &[u8]) -> Result<Tensor> {
        let len = byte_len(dtype, &shape)?;
        if bytes.len() != len {
            return Err(Error::invalid_argument(format!(
                "{} bytes do not hold a {dtype} tensor of shape {shape} ({len} bytes)",
                bytes.len()
            )));
        }
        if len <= INLINE_BYTES {
            return Ok(Tensor::inline(dtype, shape, bytes));
        }
        Ok(Tensor { dtype, shape, data: Data::Host(Arc::new(Buffer::from_bytes(bytes))) })
    }

    /// A tensor holding a copy of `values`; their count must match the shape.
    pub fn new<T: Element>(shape: impl Into<Shape>, values: &[T]) -> Result<Tensor> {
        let shape = shape.into();
        if shape.num_elements() != values.len() {
            return Err(Error::invalid_argument(format!(
                "{} values do not fill shape {shape}",
                values.len()
            )));
        }
        Tensor::from_bytes(T::DTYPE, shape, bytemuck::cast_slice(values))
    }

    #[inline]
    pub fn scalar<T: Element>(v: T) -> Tensor {
        // The size is known per `T`, so this compiles to a couple of moves, not a memcpy call.
        let mut b = [0u8; INLINE_BYTES];
        b[..std::mem::size_of::<T>()].copy_from_slice(bytemuck::bytes_of(&v));
        let len = std::mem::size_of::<T>() as u8;
        Tensor { dtype: T::DTYPE, shape: Shape::SCALAR, data: Data::Inline { len, words: bytemuck::cast(b) } }
    }

    pub fn vector<T: Element>(values: &[T]) -> Tensor {
        Tensor::new(Shape::vector(values.len()), values).expect("a vector fits its own length")
    }

    pub fn from_bools(shape: impl Into<Shape>, values: &[bool]) -> Result<Tensor> {
        let bytes: Vec<u8> = values.iter().map(|&b| b as u8).collect();
        let shape = shape.into();
        if shape.num_elements() != bytes.len() {
            return Err(Error::invalid_argument(format!(
                "{} values do not fill shape {shape}",
                values.len()
            )));
        }
        Tensor::from_bytes(DType::Bool, shape, &bytes)
    }

    pub fn scalar_bool(v: bool) -> Tensor {
        Tensor::inline(DType::Bool, Shape::SCALAR, &[v as u8])
    }

    pub fn from_strings(shape: impl Into<Shape>, values: Vec<Vec<u8>>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.num_elements() != values.len() {
            return Err(Error::invalid_argument(format!(
                "{} strings do not fill shape {shape}",
                values.len()
            )));
        }
        Ok(Tensor { dtype: DType::String, shape, data: Data::Strings(Arc::new(values)) })
    }

    pub fn scalar_string(s: impl Into<Vec<u8>>) -> Tensor {
        Tensor { dtype: DType::String, shape: Shape::SCALAR, data: Data::Strings(Arc::new(vec![s.into()])) }
    }

    /// A scalar resource handle naming a resource by container and shared name.
    pub fn resource_handle(container: &str, name: &str) -> Tensor {
        let mut v = container.as_bytes().to_vec();
        v.push(0);
        v.extend_from_slice(name.as_bytes());
        Tensor { dtype: DType::Resource, shape: Shape::SCALAR, data: Data::Strings(Arc::new(vec![v])) }
    }

    /// The `(container, shared_name)` of a scalar resource handle.
    pub fn as_resource_handle(&self) -> Result<(String, String)> {
        if self.dtype != DType::Resource || self.shape.rank() != 0 {
            return Err(Error::invalid_argument(format!(
                "expected a scalar resource handle, got {} {}",
                self.dtype, self.shape
            )));
        }
        let v = &self.raw_strings()[0];
        let cut = v.iter().position(|&b| b == 0).unwrap_or(v.len());
        let c = String::from_utf8_lossy(&v[..cut]).into_owned();
        let n = String::from_utf8_lossy(v.get(cut + 1..).unwrap_or(&[])).into_owned();
        Ok((c, n))
    }

    /// A tensor living in a device's memory.
    pub fn from_device_memory(dtype: DType, shape: Shape, mem: Arc<dyn DeviceMemory>) -> Tensor {
        Tensor { dtype, shape, data: Data::Device(mem) }
    }

    #[inline]
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    #[inline]
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    #[inline]
    pub fn num_elements(&self) -> usize {
        self.shape.num_elements()
    }

    /// Bytes held by the elements (strings: the sum of their lengths).
    pub fn byte_size(&self) -> usize {
        match &self.data {
            Data::Strings(s) => s.iter().map(|x| x.len()).sum(),
            Data::Device(m) => m.len_bytes(),
            _ => self.num_elements() * self.dtype.size().unwrap_or(0),
        }
    }

    pub fn is_host(&self) -> bool {
        !matches!(self.data, Data::Device(_))
    }

    /// The device memory, when the tensor lives on a device.
    pub fn device_memory(&self) -> Option<&Arc<dyn DeviceMemory>> {
        match &self.data {
            Data::Device(m) => Some(m),
            _ => None,
        }
    }

    /// The element bytes of a fixed-size host tensor.
    #[inline]
    pub fn as_bytes(&self) -> Result<&[u8]> {
        match &self.data {
            Data::Inline { len, words } => Ok(&bytemuck::cast_slice(words)[..*len as usize]),
            Data::Host(b) => Ok(b.as_bytes()),
            _ => Err(self.no_flat_bytes()),
        }
    }

    #[cold]
    fn no_flat_bytes(&self) -> Error {
        match &self.data {
            Data::Device(m) => {
                Error::invalid_argument(format!("tensor lives on {}; copy it to the host first", m.device()))
            }
            _ => Error::invalid_argument(format!("a {} tensor has no flat bytes", self.dtype)),
        }
    }

    /// Mutable element bytes; copies the storage first when it is shared (copy-on-write).
    pub fn as_bytes_mut(&mut self) -> Result<&mut [u8]> {
        if matches!(self.data, Data::Strings(_) | Data::Device(_)) {
            return Err(self.no_flat_bytes());
        }
        match &mut self.data {
            Data::Inline { len, words } => Ok(&mut bytemuck::cast_slice_mut(words)[..*len as usize]),
            Data::Host(b) => Ok(Arc::make_mut(b).as_bytes_mut()),
            _ => Err(Error::internal("unreachable storage kind")),
        }
    }

    /// Whether writing would copy: the host buffer is shared with another tensor.
    pub fn is_shared(&self) -> bool {
        match &self.data {
            Data::Host(b) => Arc::strong_count(b) > 1,
            Data::Strings(s) => Arc::strong_count(s) > 1,
            Data::Device(m) => Arc::strong_count(m) > 1,
            Data::Inline { .. } => false,
        }
    }

    #[inline]
    fn check_dtype<T: Element>(&self) -> Result<()> {
        if self.dtype != T::DTYPE {
            return Err(Error::invalid_argument(format!(
                "tensor has dtype {}, not {}",
                self.dtype,
                T::DTYPE
            )));
        }
        Ok(())
    }

    /// The elements as a typed slice; the dtype must match `T`.
    #[inline]
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_dtype::<T>()?;
        Ok(bytemuck::cast_slice(self.as_bytes()?))
    }

    /// The elements as a mutable typed slice (copy-on-write when shared).
    #[inline]
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_dtype::<T>()?;
        Ok(bytemuck::cast_slice_mut(self.as_bytes_mut()?))
    }

    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        Ok(self.as_slice::<T>()?.to_vec())
    }

    /// The value of a scalar of element type `T` stored inline, without any checks beyond that
    /// (the fast path of tiny kernels); `None` for anything else.
    #[inline]
    pub fn inline_scalar<T: Element>(&self) -> Option<T> {
        match &self.data {
            Data::Inline { words, .. } if self.dtype == T::DTYPE && self.shape.rank() == 0 => {
                let bytes: &[u8] = bytemuck::cast_slice(words);
                Some(bytemuck::pod_read_unaligned(&bytes[..std::mem::size_of::<T>()]))
            }
            _ => None,
        }
    }

    /// The single value of a one-element tensor.
    pub fn scalar_value<T: Element>(&self) -> Result<T> {
        let s = self.as_slice::<T>()?;
        if s.len() != 1 {
            return Err(Error::invalid_argument(format!(
                "expected one element, tensor has shape {}",
                self.shape
            )));
        }
        Ok(s[0])
    }

    /// Bool elements as bytes 0/1.
    pub fn bool_bytes(&self) -> Result<&[u8]> {
        if self.dtype != DType::Bool {
            return Err(Error::invalid_argument(format!("tensor has dtype {}, not bool", self.dtype)));
        }
        self.as_bytes()
    }

    pub fn bool_values(&self) -> Result<Vec<bool>> {
        Ok(self.bool_bytes()?.iter().map(|&b| b != 0).collect())
    }

    fn raw_strings(&self) -> &[Vec<u8>] {
        match &self.data {
            Data::Strings(s) => s,
            _ => &[],
        }
    }

    /// The byte strings of a string tensor.
    pub fn strings(&self) -> Result<&[Vec<u8>]> {
        if self.dtype != DType::String {
            return Err(Error::invalid_argument(format!("tensor has dtype {}, not string", self.dtype)));
        }
        Ok(self.raw_strings())
    }

    /// Mutable strings (copy-on-write when shared).
    pub fn strings_mut(&mut self) -> Result<&mut Vec<Vec<u8>>> {
        match &mut self.data {
            Data::Strings(s) if self.dtype == DType::String => Ok(Arc::make_mut(s)),
            _ => Err(Error::invalid_argument(format!("tensor has dtype {}, not string", self.dtype))),
        }
    }

    /// The same elements under another shape with as many elements; shares storage.
    pub fn reshape(&self, shape: Shape) -> Result<Tensor> {
        if shape.num_elements() != self.num_elements() {
            return Err(Error::invalid_argument(format!(
                "cannot reshape a tensor of shape {} ({} elements) to {shape}",
                self.shape,
                self.num_elements()
            )));
        }
        Ok(Tensor { dtype: self.dtype, shape, data: self.data.clone() })
    }

    /// Rows `start..end` along the first dimension, as a new tensor.
    pub fn slice_rows(&self, start: usize, end: usize) -> Result<Tensor> {
        let r = self.shape.rank();
        if r == 0 || start > end || end > self.shape.dim(0) {
            return Err(Error::invalid_argument(format!(
                "rows {start}..{end} out of range for shape {}",
                self.shape
            )));
        }
        let mut shape = self.shape;
        shape.set_dim(0, end - start);
        let row = self.shape.tail().num_elements();
        if let Data::Strings(s) = &self.data {
            return Ok(Tensor {
                dtype: self.dtype,
                shape,
                data: Data::Strings(Arc::new(s[start * row..end * row].to_vec())),
            });
        }
        let es = self.dtype.size().unwrap_or(0);
        let bytes = self.as_bytes()?;
        Tensor::from_bytes(self.dtype, shape, &bytes[start * row * es..end * row * es])
    }

    /// Stacks tensors of one dtype and shape along a new first dimension.
    pub fn stack(parts: &[Tensor]) -> Result<Tensor> {
        let first = parts.first().ok_or_else(|| Error::invalid_argument("stack of no tensors"))?;
        for p in parts {
            if p.dtype != first.dtype || p.shape != first.shape {
                return Err(Error::invalid_argument(format!(
                    "cannot stack {} {} with {} {}",
                    p.dtype, p.shape, first.dtype, first.shape
                )));
            }
        }
        Tensor::concat_rows(parts, first.shape.prepend(parts.len())?)
    }

    /// Concatenates tensors along their first dimension into `shape` (whose element count must match).
    pub fn concat_rows(parts: &[Tensor], shape: Shape) -> Result<Tensor> {
        let dtype = parts.first().map(|p| p.dtype).unwrap_or(DType::F32);
        if matches!(dtype, DType::String | DType::Resource) {
            let mut v = Vec::with_capacity(shape.num_elements());
            for p in parts {
                v.extend_from_slice(p.raw_strings());
            }
            return Tensor::from_strings(shape, v).map(|mut t| {
                t.dtype = dtype;
                t
            });
        }
        let mut buf = Buffer::zeroed(byte_len(dtype, &shape)?);
        let out = buf.as_bytes_mut();
        let mut at = 0;
        for p in parts {
            let b = p.as_bytes()?;
            if p.dtype != dtype || at + b.len() > out.len() {
                return Err(Error::invalid_argument("concat parts do not fit the result"));
            }
            out[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        if at != out.len() {
            return Err(Error::invalid_argument("concat parts do not fill the result"));
        }
        Tensor::from_buffer(dtype, shape, buf)
    }

    /// Element `i` of a numeric tensor as f64 (for tests and diagnostics).
    pub fn get_f64(&self, i: usize) -> Result<f64> {
        crate::dispatch_numeric!(self.dtype, T => Ok(self.as_slice::<T>()?[i].to_f64()),
        _ => match self.dtype {
            DType::Bool => Ok(self.bool_bytes()?[i] as f64),
            d => Err(Error::invalid_argument(format!("{d} is not numeric"))),
        })
    }

    /// All elements of a numeric or bool tensor as f64.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        (0..self.num_elements()).map(|i| self.get_f64(i)).collect()
    }
}

impl PartialEq for Tensor {
    fn eq(&self, other: &Tensor) -> bool {
        if self.dtype != other.dtype || self.shape != other.shape {
            return false;
        }
        match (&self.data, &other.data) {
            (Data::Strings(a), Data::Strings(b)) => a == b,
            (Data::Device(a), Data::Device(b)) => Arc::ptr_eq(a, b),
            _ => match (self.as_bytes(), other.as_bytes()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            },
        }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor<{}{}>", self.dtype, self.shape)?;
        const SHOWN: usize = 8;
        match &self.data {
            Data::Device(m) => write!(f, "(on {})", m.device()),
            Data::Strings(s) => {
                let shown: Vec<_> =
                    s.iter().take(SHOWN).map(|x| String::from_utf8_lossy(x).into_owned()).collect();
                write!(f, "{shown:?}")
            }
            _ => {
                let n = self.num_elements();
                let v: Vec<f64> = (0..n.min(SHOWN)).map(|i| self.get_f64(i).unwrap_or(f64::NAN)).collect();
                write!(f, "{v:?}{}", if n > SHOWN { "..." } else { "" })
            }
        }
    }
}

/// The serde form: dtype, dims, and either the raw element bytes or the strings. The element
/// bytes go through `serialize_bytes` (one copy; postcard writes the same bytes as for a
/// sequence of `u8`, so the wire format is that of a `Vec<u8>`).
#[derive(Serialize)]
struct TensorRepr<'a> {
    dtype: DType,
    shape: Shape,
    bytes: RawBytes<'a>,
    strings: &'a [Vec<u8>],
}

#[derive(Deserialize)]
struct TensorReprIn<'a> {
    dtype: DType,
    shape: Shape,
    #[serde(borrow)]
    bytes: RawBytes<'a>,
    strings: Vec<Vec<u8>>,
}

/// Element bytes, borrowed from the input where the format allows.
struct RawBytes<'a>(std::borrow::Cow<'a, [u8]>);

impl Serialize for RawBytes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawBytes<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = RawBytes<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("tensor bytes")
            }
            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> std::result::Result<Self::Value, E> {
                Ok(RawBytes(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_bytes<E>(self, v: &[u8]) -> std::result::Result<Self::Value, E> {
                Ok(RawBytes(std::borrow::Cow::Owned(v.to_vec())))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> std::result::Result<Self::Value, E> {
                Ok(RawBytes(std::borrow::Cow::Owned(v)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                // Formats without a bytes type; the length hint is not trusted for allocation.
                let mut v = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(RawBytes(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_bytes(V(std::marker::PhantomData))
    }
}

impl Serialize for Tensor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        let (bytes, strings): (&[u8], &[Vec<u8>]) = match &self.data {
            Data::Strings(v) => (&[], v.as_slice()),
            Data::Device(m) => return Err(S::Error::custom(format!("tensor lives on {}", m.device()))),
            _ => (self.as_bytes().map_err(S::Error::custom)?, &[]),
        };
        let bytes = RawBytes(std::borrow::Cow::Borrowed(bytes));
        TensorRepr { dtype: self.dtype, shape: self.shape, bytes, strings }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Tensor {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let r = TensorReprIn::deserialize(d)?;
        match r.dtype {
            DType::String | DType::Resource => {
                if r.strings.len() != r.shape.num_elements() {
                    return Err(D::Error::custom("string count does not match the shape"));
                }
                Ok(Tensor { dtype: r.dtype, shape: r.shape, data: Data::Strings(Arc::new(r.strings)) })
            }
            dt => Tensor::from_bytes(dt, r.shape, &r.bytes.0).map_err(D::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Memory lent by an owner that counts how often it got its memory back.
    struct Lent(Buffer, Arc<AtomicUsize>);

    impl ExternalMemory for Lent {
        fn bytes(&self) -> &[u8] {
            self.0.as_bytes()
        }
        fn bytes_mut(&mut self) -> &mut [u8] {
            self.0.as_bytes_mut()
        }
    }

    impl Drop for Lent {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn the_serde_form_keeps_the_bytes_of_a_byte_vector() {
        #[derive(Serialize)]
        struct AsVec {
            dtype: DType,
            shape: Shape,
            bytes: Vec<u8>,
            strings: Vec<Vec<u8>>,
        }
        let t = Tensor::new([3usize], &[1f32, -2.0, 3.5]).unwrap();
        let as_vec = AsVec {
            dtype: t.dtype(),
            shape: t.shape,
            bytes: t.as_bytes().unwrap().to_vec(),
            strings: vec![],
        };
        let enc = postcard::to_allocvec(&t).unwrap();
        assert_eq!(enc, postcard::to_allocvec(&as_vec).unwrap());
        let back: Tensor = postcard::from_bytes(&enc).unwrap();
        assert_eq!(back.as_slice::<f32>().unwrap(), &[1.0, -2.0, 3.5]);
        let s = Tensor::from_strings(Shape::vector(2), vec![b"ab".to_vec(), vec![]]).unwrap();
        let back: Tensor = postcard::from_bytes(&postcard::to_allocvec(&s).unwrap()).unwrap();
        assert_eq!(back.strings().unwrap(), s.strings().unwrap());
        // Bytes that do not fill the shape are refused.
        let short = AsVec { bytes: vec![0; 11], ..as_vec };
        assert!(postcard::from_bytes::<Tensor>(&postcard::to_allocvec(&short).unwrap()).is_err());
    }

    #[test]
    fn external_memory_is_used_in_place_and_returned_on_drop() {
        let back = Arc::new(AtomicUsize::new(0));
        // Larger than `INLINE_BYTES`, so the tensor keeps the buffer.
        let data: Vec<u8> = (0..64).collect();
        let mut buf =
            Buffer::from_external(Box::new(Lent(Buffer::from_bytes(&data), back.clone()))).expect("aligned");
        assert_eq!(buf.as_bytes(), &data[..]);
        buf.as_bytes_mut()[0] = 99;
        // A clone is a plain copy; the original still uses the lent memory.
        let copy = buf.clone();
        assert_eq!(copy.as_bytes()[..2], [99, 1]);
        let t = Tensor::from_buffer(DType::U8, Shape::vector(64), buf).unwrap();
        assert_eq!(t.as_bytes().unwrap()[..2], [99, 1]);
        assert_eq!(back.load(Ordering::Relaxed), 0);
        drop(t);
        assert_eq!(back.load(Ordering::Relaxed), 1);
        drop(copy);
        assert_eq!(back.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn misaligned_external_memory_is_refused() {
        struct Off(Buffer);
        impl ExternalMemory for Off {
            fn bytes(&self) -> &[u8] {
                &self.0.as_bytes()[1..]
            }
            fn bytes_mut(&mut self) -> &mut [u8] {
                &mut self.0.as_bytes_mut()[1..]
            }
        }
        assert!(Buffer::from_external(Box::new(Off(Buffer::zeroed(8)))).is_none());
    }
}
