//! GPU memory management as pure logic on addresses: a best-fit allocator with coalescing of free
//! neighbours over the regions reserved from the driver, and the policy that decides how much to
//! reserve (`per_process_gpu_memory_fraction` up front, or `allow_growth` in growing chunks).
//! No driver call happens here, so all of it is tested on the CPU.

use rill_graph::{Error, GpuOptions, Result};
use std::collections::{BTreeMap, BTreeSet};

/// Every block starts and ends on this boundary: what cuBLAS and vector loads want, and what
/// `cuMemAlloc` itself guarantees.
pub const ALIGN_BYTES: u64 = 256;
/// The first chunk reserved under `allow_growth`; later chunks double.
pub const GROWTH_CHUNK_MIN_BYTES: u64 = 2 << 20;
/// Share of free memory used when neither a fraction nor growth is set (TensorFlow's default is to
/// take nearly all of it; the rest is left to the driver, cuBLAS workspaces and other libraries).
pub const DEFAULT_FREE_FRACTION: f64 = 0.9;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Block {
    len: u64,
    free: bool,
    region: usize,
}

/// Best-fit allocation over disjoint regions. A block never spans two regions, because two
/// `cuMemAlloc` regions that happen to be adjacent are still separate allocations.
#[derive(Debug, Default)]
pub struct BestFit {
    /// `(base, len)` of each region.
    regions: Vec<(u64, u64)>,
    /// Every block, free or not, by address.
    blocks: BTreeMap<u64, Block>,
    /// Free blocks by `(len, addr)`: the first at or above a size is the best fit.
    free: BTreeSet<(u64, u64)>,
    in_use_bytes: u64,
}

/// Counters for errors and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    pub reserved_bytes: u64,
    pub in_use_bytes: u64,
    pub largest_free_bytes: u64,
    pub free_blocks: usize,
}

/// `n` rounded up to `ALIGN_BYTES` (0 takes one unit, so every tensor has an address).
pub fn round_up(n: u64) -> u64 {
    n.max(1).div_ceil(ALIGN_BYTES) * ALIGN_BYTES
}

impl BestFit {
    pub fn new() -> BestFit {
        BestFit::default()
    }

    /// Adds reserved memory `[base, base + len)`; `len` must be a multiple of `ALIGN_BYTES`.
    pub fn add_region(&mut self, base: u64, len: u64) {
        assert!(len > 0 && len.is_multiple_of(ALIGN_BYTES), "region length {len} not aligned");
        let region = self.regions.len();
        self.regions.push((base, len));
        self.blocks.insert(base, Block { len, free: true, region });
        self.free.insert((len, base));
    }

    /// The address of a block of at least `bytes`, or `None` when no free block is big enough.
    pub fn alloc(&mut self, bytes: u64) -> Option<u64> {
        let want = round_up(bytes);
        let &(len, addr) = self.free.range((want, 0)..).next()?;
        self.free.remove(&(len, addr));
        let region = self.blocks[&addr].region;
        self.blocks.insert(addr, Block { len: want, free: false, region });
        if len > want {
            let rest = addr + want;
            self.blocks.insert(rest, Block { len: len - want, free: true, region });
            self.free.insert((len - want, rest));
        }
        self.in_use_bytes += want;
        Some(addr)
    }

    /// Frees the block at `addr` and merges it with free neighbours of the same region. Returns the
    /// bytes released; freeing an unknown or already-free address is our bug and panics.
    pub fn free(&mut self, addr: u64) -> u64 {
        let b = *self.blocks.get(&addr).unwrap_or_else(|| panic!("free of unknown address {addr:#x}"));
        assert!(!b.free, "double free of {addr:#x}");
        self.in_use_bytes -= b.len;
        let (mut start, mut len) = (addr, b.len);
        self.blocks.remove(&addr);
        if let Some((&prev, &p)) = self.blocks.range(..addr).next_back() {
            if p.free && p.region == b.region && prev + p.len == addr {
                self.free.remove(&(p.len, prev));
                self.blocks.remove(&prev);
                start = prev;
                len += p.len;
            }
        }
        let after = addr + b.len;
        if let Some(&n) = self.blocks.get(&after) {
            if n.free && n.region == b.region {
                self.free.remove(&(n.len, after));
                self.blocks.remove(&after);
                len += n.len;
            }
        }
        self.blocks.insert(start, Block { len, free: true, region: b.region });
        self.free.insert((len, start));
        b.len
    }

    pub fn stats(&self) -> Stats {
        Stats {
            reserved_bytes: self.regions.iter().map(|r| r.1).sum(),
            in_use_bytes: self.in_use_bytes,
            largest_free_bytes: self.free.iter().next_back().map_or(0, |f| f.0),
            free_blocks: self.free.len(),
        }
    }

    /// Checks the structure: blocks tile each region exactly, no two free neighbours are left
    /// unmerged, the free index matches the blocks, and the in-use count adds up.
    pub fn invariants(&self) {
        let mut in_use = 0;
        for (i, &(base, len)) in self.regions.iter().enumerate() {
            let mut at = base;
            let mut prev_free = false;
            for (&addr, b) in self.blocks.range(base..base + len) {
                assert_eq!(addr, at, "gap or overlap in region {i}");
                assert_eq!(b.region, i);
                assert!(!(prev_free && b.free), "unmerged free neighbours at {addr:#x}");
                assert_eq!(self.free.contains(&(b.len, addr)), b.free);
                if !b.free {
                    in_use += b.len;
                }
                prev_free = b.free;
                at += b.len;
            }
            assert_eq!(at, base + len, "region {i} not covered");
        }
        assert_eq!(in_use, self.in_use_bytes);
        assert_eq!(self.free.len(), self.blocks.values().filter(|b| b.free).count());
    }
}

/// How much to reserve and when, from the session's `GpuOptions` and the GPU's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Most bytes this process may reserve on the GPU.
    pub limit_bytes: u64,
    /// Bytes reserved when the device is created.
    pub initial_bytes: u64,
    /// Whether more is reserved on demand, up to the limit.
    pub grow: bool,
}

impl Plan {
    /// TensorFlow's rules: a fraction caps the memory at `fraction × total`; growth starts with
    /// nothing and reserves on demand; without growth everything is reserved up front. With no
    /// fraction the cap is `DEFAULT_FREE_FRACTION` of the memory free now.
    pub fn new(opts: &GpuOptions, total_bytes: u64, free_bytes: u64) -> Result<Plan> {
        let f = opts.per_process_gpu_memory_fraction;
        if !(0.0..=1.0).contains(&f) {
            return Err(Error::invalid_argument(format!(
                "per_process_gpu_memory_fraction must be in [0, 1], got {f}"
            )));
        }
        let cap = if f > 0.0 { total_bytes as f64 * f } else { free_bytes as f64 * DEFAULT_FREE_FRACTION };
        let limit_bytes = (cap as u64) / ALIGN_BYTES * ALIGN_BYTES;
        let initial_bytes = if opts.allow_growth { 0 } else { limit_bytes };
        Ok(Plan { limit_bytes, initial_bytes, grow: opts.allow_growth })
    }

    /// Size of the next chunk to reserve when `request_bytes` does not fit, given `reserved_bytes`
    /// so far; `None` when the limit forbids it. Chunks double so a growing model needs few of
    /// them, and never go past the limit.
    pub fn next_chunk(&self, reserved_bytes: u64, request_bytes: u64) -> Option<u64> {
        let want = round_up(request_bytes);
        let room = self.limit_bytes.saturating_sub(reserved_bytes);
        if !self.grow || want > room {
            return None;
        }
        let doubling = reserved_bytes.max(GROWTH_CHUNK_MIN_BYTES);
        Some(want.max(doubling).min(room))
    }
}

/// The `ResourceExhausted` error for an allocation that cannot be satisfied. Kernels add the node
/// name in front (`OpKernelContext::error`).
pub fn oom_error(device: &str, request_bytes: u64, plan: &Plan, stats: &Stats) -> Error {
    Error::resource_exhausted(format!(
        "OOM when allocating {request_bytes} bytes on {device}: {} bytes in use, {} reserved, limit {} \
         bytes, largest free block {} bytes (raise per_process_gpu_memory_fraction or reduce the batch)",
        stats.in_use_bytes, stats.reserved_bytes, plan.limit_bytes, stats.largest_free_bytes
    ))
}
