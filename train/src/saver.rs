//! Checkpoints: `Saver` writes variables to `<prefix>-<step>.safetensors` files (the safetensors
//! layout, header written and parsed by hand with every length checked), keeps a `checkpoint`
//! index of the latest files, and restores through `Assign` ops built once per saver.

use rill_graph::{
    DType, Error, Graph, Output, PartialShape, Result, RunOptions, Session, Shape, Tensor, VariableInfo,
};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Largest header accepted, as in the safetensors reference implementation.
pub const HEADER_SIZE_MAX: u64 = 100 << 20;
/// Deepest JSON nesting accepted in a header (the format needs three levels).
const JSON_DEPTH_MAX: usize = 8;
/// Name of the index file listing the checkpoints of a directory.
pub const INDEX_FILE: &str = "checkpoint";

/// Options of a `Saver`.
#[derive(Clone, Debug)]
pub struct SaverOptions {
    /// Checkpoints kept; older ones are deleted. 0 keeps all.
    pub max_to_keep: usize,
}

impl Default for SaverOptions {
    fn default() -> Self {
        SaverOptions { max_to_keep: 5 }
    }
}

struct SavedVar {
    name: String,
    dtype: DType,
    shape: PartialShape,
    read: Output,
    feed: Output,
}

/// Saves and restores a fixed set of variables.
pub struct Saver {
    vars: Vec<SavedVar>,
    restore_op: Output,
    opts: SaverOptions,
    /// Checkpoints this saver wrote, oldest first.
    kept: Vec<PathBuf>,
}

impl std::fmt::Debug for Saver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Saver({} variables, {} kept)", self.vars.len(), self.kept.len())
    }
}

impl Saver {
    /// A saver of `vars` (all global variables when `None`). Builds, under `save/`, one read per
    /// variable and one placeholder and `Assign` per variable colocated with it; a session
    /// must see these nodes (create it afterwards, or `extend` it).
    pub fn new(g: &Graph, vars: Option<&[VariableInfo]>, opts: SaverOptions) -> Result<Saver> {
        g.status()?;
        let vars: Vec<VariableInfo> = match vars {
            Some(v) => v.to_vec(),
            None => g.global_variables(),
        };
        let mut seen = std::collections::HashSet::new();
        for v in &vars {
            if !seen.insert(v.name.as_str()) {
                return Err(Error::invalid_argument(format!("variable '{}' is listed twice", v.name)));
            }
        }
        let (saved, assigns) = g.with_name_scope("save", |g| {
            let mut saved = Vec::with_capacity(vars.len());
            let mut assigns = Vec::with_capacity(vars.len());
            for v in &vars {
                let (read, feed, assign) = g.colocate_with(v.var, |g| {
                    let read = g.identity(v.var);
                    let feed = g.placeholder("restore_value", v.dtype, v.shape.clone());
                    (read, feed, g.assign(v.var, feed))
                });
                saved.push(SavedVar {
                    name: v.name.clone(),
                    dtype: v.dtype,
                    shape: v.shape.clone(),
                    read,
                    feed,
                });
                assigns.push(assign);
            }
            (saved, assigns)
        });
        let restore_op = g.with_name_scope("save", |g| g.group("restore_all", &assigns));
        g.status()?;
        Ok(Saver { vars: saved, restore_op, opts, kept: Vec::new() })
    }

    /// Names of the saved variables.
    pub fn variable_names(&self) -> Vec<&str> {
        self.vars.iter().map(|v| v.name.as_str()).collect()
    }

    /// Writes every variable to `<prefix>-<step>.safetensors` (or `<prefix>.safetensors`)
    /// atomically, updates the directory's `checkpoint` index and deletes checkpoints beyond
    /// `max_to_keep`. Returns the file's path.
    pub fn save(
        &mut self,
        sess: &dyn Session,
        path_prefix: &Path,
        global_step: Option<i64>,
    ) -> Result<PathBuf> {
        let reads: Vec<Output> = self.vars.iter().map(|v| v.read).collect();
        let values = sess.run(&[], &reads, &[], &RunOptions::default())?;
        let mut entries: Vec<(&str, &Tensor)> =
            self.vars.iter().map(|v| v.name.as_str()).zip(values.iter()).collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        let mut meta = vec![("format", "rill".to_string())];
        if let Some(s) = global_step {
            meta.push(("global_step", s.to_string()));
        }
        let bytes = encode(&entries, &meta)?;
        let file_name = match (path_prefix.file_name(), global_step) {
            (Some(f), Some(s)) => format!("{}-{s}.safetensors", f.to_string_lossy()),
            (Some(f), None) => format!("{}.safetensors", f.to_string_lossy()),
            (None, _) => {
                return Err(Error::invalid_argument(format!(
                    "checkpoint prefix {} has no file name",
                    path_prefix.display()
                )))
            }
        };
        let dir = match path_prefix.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        let path = dir.join(&file_name);
        write_atomically(&path, &bytes)?;
        self.kept.retain(|p| p != &path);
        self.kept.push(path.clone());
        if self.opts.max_to_keep > 0 {
            while self.kept.len() > self.opts.max_to_keep {
                let old = self.kept.remove(0);
                match fs::remove_file(&old) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error("delete", &old, e)),
                }
            }
        }
        write_index(&dir, &self.kept)?;
        Ok(path)
    }

    /// Restores every variable from the checkpoint at `path`: a missing name is `NotFound`, a
    /// dtype or shape that differs is `InvalidArgument`, each naming the variable.
    pub fn restore(&self, sess: &dyn Session, path: &Path) -> Result<()> {
        let ckpt = read_checkpoint(path)?;
        let mut feeds = Vec::with_capacity(self.vars.len());
        for v in &self.vars {
            let t = ckpt.get(&v.name).ok_or_else(|| {
                Error::not_found(format!("checkpoint {} has no variable '{}'", path.display(), v.name))
            })?;
            if t.dtype() != v.dtype {
                return Err(Error::invalid_argument(format!(
                    "variable '{}' is {} but checkpoint {} holds {}",
                    v.name,
                    v.dtype,
                    path.display(),
                    t.dtype()
                )));
            }
            if !v.shape.is_compatible_with(t.shape()) {
                return Err(Error::invalid_argument(format!(
                    "variable '{}' has shape {} but checkpoint {} holds shape {}",
                    v.name,
                    v.shape,
                    path.display(),
                    t.shape()
                )));
            }
            feeds.push((v.feed, t.clone()));
        }
        sess.run(&feeds, &[], &[self.restore_op], &RunOptions::default())?;
        Ok(())
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    let msg = format!("cannot {what} {}: {e}", path.display());
    match e.kind() {
        std::io::ErrorKind::NotFound => Error::not_found(msg),
        std::io::ErrorKind::PermissionDenied => Error::permission_denied(msg),
        _ => Error::unavailable(msg),
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it over `path` and syncs
/// the directory, so readers see the old file or the new one, never part of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}-{:x}", std::process::id(), rill_graph::random_u64()));
    let r = (|| {
        let mut f = File::create(&tmp).map_err(|e| io_error("create", &tmp, e))?;
        f.write_all(bytes).map_err(|e| io_error("write", &tmp, e))?;
        f.sync_all().map_err(|e| io_error("sync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| io_error("rename into", path, e))
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
        return r;
    }
    // The rename is durable once the directory entry is; some platforms cannot open a
    // directory for syncing, which leaves the rename as durable as the OS makes it.
    if let Ok(d) = File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) {
        let _ = d.sync_all();
    }
    Ok(())
}

// ---- the checkpoint index ----

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn unquote(s: &str) -> Option<String> {
    let inner = s.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next()? {
                'n' => out.push('\n'),
                c => out.push(c),
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// Paths in the index are relative to its directory when they live there.
fn index_entry(dir: &Path, p: &Path) -> String {
    match p.strip_prefix(dir) {
        Ok(rel) => quote(&rel.to_string_lossy()),
        Err(_) => quote(&p.to_string_lossy()),
    }
}

fn write_index(dir: &Path, kept: &[PathBuf]) -> Result<()> {
    let Some(latest) = kept.last() else { return Ok(()) };
    let mut text = format!("model_checkpoint_path: {}\n", index_entry(dir, latest));
    for p in kept {
        text.push_str(&format!("all_model_checkpoint_paths: {}\n", index_entry(dir, p)));
    }
    write_atomically(&dir.join(INDEX_FILE), text.as_bytes())
}

/// The latest checkpoint recorded in `dir`'s `checkpoint` index; `None` when there is no index
/// or the file it names is gone.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    let text = match fs::read_to_string(&index) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read", &index, e)),
    };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("model_checkpoint_path:") {
            let p = unquote(v.trim())
                .ok_or_else(|| Error::data_loss(format!("{}: malformed line {line:?}", index.display())))?;
            let p = PathBuf::from(p);
            let p = if p.is_absolute() { p } else { dir.join(p) };
            return Ok(p.exists().then_some(p));
        }
    }
    Ok(None)
}

// ---- the safetensors layout ----

fn dtype_code(d: DType) -> Result<&'static str> {
    Ok(match d {
        DType::F32 => "F32",
        DType::F64 => "F64",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        DType::I32 => "I32",
        DType::I64 => "I64",
        DType::U8 => "U8",
        DType::Bool => "BOOL",
        d => return Err(Error::unimplemented(format!("cannot save {d} tensors"))),
    })
}

fn dtype_of_code(s: &str) -> Option<DType> {
    Some(match s {
        "F32" => DType::F32,
        "F64" => DType::F64,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I32" => DType::I32,
        "I64" => DType::I64,
        "U8" => DType::U8,
        "BOOL" => DType::Bool,
        _ => return None,
    })
}

/// Element bytes in little-endian order (the file's order) from host order, or back.
fn swap_to_le(bytes: &mut [u8], elem: usize) {
    if cfg!(target_endian = "big") && elem > 1 {
        for c in bytes.chunks_exact_mut(elem) {
            c.reverse();
        }
    }
}

/// The whole file: header length, JSON header (padded with spaces to 8 bytes), data.
fn encode(entries: &[(&str, &Tensor)], meta: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut header = String::from("{");
    let mut offset = 0usize;
    header.push_str("\"__metadata__\":{");
    for (i, (k, v)) in meta.iter().enumerate() {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&json_string(k));
        header.push(':');
        header.push_str(&json_string(v));
    }
    header.push('}');
    for (name, t) in entries {
        let len = t.byte_size();
        let dims: Vec<String> = t.shape().dims().iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            ",{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            json_string(name),
            dtype_code(t.dtype())?,
            dims.join(","),
            offset,
            offset + len
        ));
        offset += len;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for (_, t) in entries {
        let start = out.len();
        out.extend_from_slice(t.as_bytes()?);
        swap_to_le(&mut out[start..], t.dtype().size().unwrap_or(1));
    }
    Ok(out)
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Reads every tensor of a checkpoint file, checking the header against the file's size.
pub fn read_checkpoint(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let mut f = File::open(path).map_err(|e| io_error("open", path, e))?;
    let file_len = f.metadata().map_err(|e| io_error("stat", path, e))?.len();
    let bad = |msg: String| Error::data_loss(format!("checkpoint {}: {msg}", path.display()));
    if file_len < 8 {
        return Err(bad(format!("{file_len} bytes is too short for a header")));
    }
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8).map_err(|e| io_error("read", path, e))?;
    let header_len = u64::from_le_bytes(len8);
    if header_len > HEADER_SIZE_MAX || header_len > file_len - 8 {
        return Err(bad(format!("header length {header_len} does not fit the file ({file_len} bytes)")));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| io_error("read", path, e))?;
    let mut data = Vec::with_capacity((file_len - 8 - header_len) as usize);
    f.read_to_end(&mut data).map_err(|e| io_error("read", path, e))?;
    decode(&header, &data).map_err(|e| bad(e.msg))
}

/// Decodes a header and its data section into tensors. Offsets must lie inside `data`, match
/// each tensor's byte size and not overlap.
pub fn decode(header: &[u8], data: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let text = std::str::from_utf8(header).map_err(|_| Error::data_loss("header is not UTF-8"))?;
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    let root = p.value(0)?;
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(Error::data_loss(format!("trailing bytes after the header at {}", p.i)));
    }
    let Json::Obj(fields) = root else { return Err(Error::data_loss("header is not an object")) };
    let mut spans: Vec<(usize, usize, String)> = Vec::new();
    let mut out = BTreeMap::new();
    for (name, v) in fields {
        if name == "__metadata__" {
            continue;
        }
        let bad = |m: &str| Error::data_loss(format!("tensor '{name}': {m}"));
        let Json::Obj(info) = v else { return Err(bad("entry is not an object")) };
        let get = |k: &str| info.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let dtype = match get("dtype") {
            Some(Json::Str(s)) => dtype_of_code(s).ok_or_else(|| bad(&format!("unknown dtype {s:?}")))?,
            _ => return Err(bad("missing dtype")),
        };
        let dims: Vec<usize> = match get("shape") {
            Some(Json::Arr(a)) => a
                .iter()
                .map(|d| match d {
                    Json::Num(n) => usize::try_from(*n).map_err(|_| bad("dimension too large")),
                    _ => Err(bad("dimension is not a number")),
                })
                .collect::<Result<_>>()?,
            _ => return Err(bad("missing shape")),
        };
        let (begin, end) = match get("data_offsets") {
            Some(Json::Arr(a)) => match a.as_slice() {
                [Json::Num(b), Json::Num(e)] => (*b, *e),
                _ => return Err(bad("data_offsets is not two numbers")),
            },
            _ => return Err(bad("missing data_offsets")),
        };
        let shape = Shape::new(&dims).map_err(|e| bad(&e.msg))?;
        let want = shape
            .checked_num_elements()
            .ok()
            .and_then(|n| n.checked_mul(dtype.size().unwrap_or(1)))
            .ok_or_else(|| bad("shape too large"))?;
        if begin > end || end > data.len() as u64 || (end - begin) != want as u64 {
            return Err(bad(&format!(
                "offsets [{begin}, {end}) do not hold {want} bytes inside {} bytes of data",
                data.len()
            )));
        }
        let (b, e) = (begin as usize, end as usize);
        spans.push((b, e, name.clone()));
        let mut bytes = data[b..e].to_vec();
        swap_to_le(&mut bytes, dtype.size().unwrap_or(1));
        let t = Tensor::from_bytes(dtype, shape, &bytes).map_err(|e| bad(&e.msg))?;
        if out.insert(name.clone(), t).is_some() {
            return Err(bad("listed twice"));
        }
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::data_loss(format!("tensors '{}' and '{}' overlap", w[0].2, w[1].2)));
        }
    }
    Ok(out)
}

/// The JSON values a safetensors header uses.
#[derive(Debug)]
enum Json {
    Obj(Vec<(String, Json)>),
    Arr(Vec<Json>),
    Str(String),
    Num(u64),
    /// `true`, `false`, `null` and non-integral numbers: accepted, never needed.
    Other,
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> Error {
        Error::data_loss(format!("header: {what} at byte {}", self.i))
    }

    fn skip_ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\n' | b'\r' | b'\t') {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        if self.peek() != Some(c) {
            return Err(self.err(&format!("expected '{}'", c as char)));
        }
        self.i += 1;
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Json> {
        if depth > JSON_DEPTH_MAX {
            return Err(self.err("nesting too deep"));
        }
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(fields));
                }
                loop {
                    let k = self.string()?;
                    self.expect(b':')?;
                    fields.push((k, self.value(depth + 1)?));
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(fields));
                        }
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(items));
                        }
                        _ => return Err(self.err("expected ',' or ']'")),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b'0'..=b'9') => self.number(),
            Some(b'-') => {
                self.i += 1;
                self.number().map(|_| Json::Other)
            }
            Some(b't') => self.word("true"),
            Some(b'f') => self.word("false"),
            Some(b'n') => self.word("null"),
            _ => Err(self.err("expected a value")),
        }
    }

    fn word(&mut self, w: &str) -> Result<Json> {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(Json::Other)
        } else {
            Err(self.err("expected a value"))
        }
    }

    fn number(&mut self) -> Result<Json> {
        let start = self.i;
        let mut n: Option<u64> = Some(0);
        while let Some(&c) = self.s.get(self.i) {
            if !c.is_ascii_digit() {
                break;
            }
            n = n.and_then(|n| n.checked_mul(10)).and_then(|n| n.checked_add(u64::from(c - b'0')));
            self.i += 1;
        }
        if self.i == start {
            return Err(self.err("expected digits"));
        }
        let mut integral = true;
        while let Some(&c) = self.s.get(self.i) {
            if !matches!(c, b'.' | b'e' | b'E' | b'+' | b'-' | b'0'..=b'9') {
                break;
            }
            integral = false;
            self.i += 1;
        }
        match (integral, n) {
            (true, Some(n)) => Ok(Json::Num(n)),
            (true, None) => Err(self.err("number too large")),
            (false, _) => Ok(Json::Other),
        }
    }

    fn string(&mut self) -> Result<String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.i) else { return Err(self.err("unterminated string")) };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.i) else { return Err(self.err("unterminated escape")) };
                    self.i += 1;
                    match e {
                        b'"' | b'\\' | b'/' => out.push(e),
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex =
                                self.s.get(self.i..self.i + 4).ok_or_else(|| self.err("short \\u escape"))?;
                            let code = std::str::from_utf8(hex)
                                .ok()
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or_else(|| self.err("bad \\u escape"))?;
                            self.i += 4;
                            // Surrogate pairs never occur in names we write; they decode as U+FFFD.
                            let ch = char::from_u32(code).unwrap_or('\u{fffd}');
                            let mut buf = [0u8; 4];
                            out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                        }
                        _ => return Err(self.err("bad escape")),
                    }
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| self.err("string is not UTF-8"))
    }
}
