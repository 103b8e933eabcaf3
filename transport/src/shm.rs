//! Same-host shared memory for tensor bytes, behind [`TensorTransport`].
//!
//! The receiver owns a pool of segments, each a `memfd` (anonymous: it cannot outlive the processes
//! that hold it, so nothing leaks on a crash) of a 4 KiB header and one data region whose size is a
//! power of two. To receive, it leases a segment and names it in the request (`ShmDest`: its pid,
//! the memfd's descriptor number, the segment's random token and sizes). The sender opens
//! `/proc/<pid>/fd/<fd>`, checks the file size and the token in the header (so it never writes into
//! a file that is not that segment), maps it once and keeps the mapping, and copies the tensor
//! straight into the region: one copy, and the region becomes the receiver's tensor buffer as is.
//! When that buffer drops, the segment goes back to the pool, so later transfers write into pages
//! that are already mapped on both sides (no page faults). A lease whose transfer got no answer is
//! never reused (the sender might still write): its segment is destroyed.
//!
//! Only peers that showed the same kernel boot id and pid namespace in the handshake use it, and
//! only when both enabled it; any error falls back to the frame body over TCP.
//!
//! Trust: a peer on the same host that passed the handshake may write into the segments it was
//! named, at any time; this is the same trust an RDMA peer with a registered buffer gets.

#![allow(unsafe_code)]

use crate::data_path::{Dest, Landing, TensorTransport};
use crate::handshake::PeerInfo;
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use rill_graph::{Buffer, Error, ExternalMemory, Result, BUFFER_ALIGN};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes before a segment's data region: magic and token, padded to a page so the region is
/// page-aligned (and so `BUFFER_ALIGN`-aligned).
pub const SEGMENT_HEADER_SIZE: usize = 4096;
const SEGMENT_MAGIC: [u8; 8] = *b"RILLSHM1";
/// Smallest data region: smaller tensors travel inline in control messages anyway.
pub const SEGMENT_CAPACITY_MIN: u64 = 64 << 10;
/// Largest data region; larger tensors go over TCP.
pub const SEGMENT_CAPACITY_MAX: u64 = 16 << 30;
/// Bytes of segments one process holds for receiving, leased and idle together.
pub const SHM_POOL_SIZE_MAX: u64 = 8 << 30;
/// Bytes of idle segments kept for reuse; more are destroyed when they come back.
pub const SHM_POOL_IDLE_SIZE_MAX: u64 = 2 << 30;
/// Segments one process holds for receiving (each keeps a descriptor open), leased and idle.
pub const SHM_SEGMENTS_MAX: usize = 512;
/// Peers' segments kept mapped by a sender (the least recently used is unmapped first).
pub const PEER_SEGMENTS_MAPPED_MAX: usize = 512;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn shm_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::unavailable(format!("shared memory: {what}: {e}"))
}

/// What makes two processes able to share memory this way: the same running kernel (boot id) and
/// the same pid namespace (so a pid and `/proc/<pid>` name the same process on both sides).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub boot_id: String,
    pub pid_ns: String,
}

impl HostInfo {
    /// This process's host identity; `None` where `/proc` does not tell it (no shared memory then).
    pub fn local() -> Option<HostInfo> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?.trim().to_string();
        let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?.to_string_lossy().into_owned();
        (!boot_id.is_empty() && !pid_ns.is_empty()).then_some(HostInfo { boot_id, pid_ns })
    }
}

/// A receiver's region, as named to the sender. Every field is checked by the sender before use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmDest {
    pub pid: u32,
    pub fd: i32,
    /// Random per segment; also written in the segment's header.
    pub token: u64,
    pub segment_len: u64,
    pub offset: u64,
    pub len: u64,
}

/// A shared mapping of a whole file, unmapped when dropped.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory with no thread affinity; who writes which bytes when is
// decided by the transfer protocol (one lease, one writer, then one owner), not by the type.
unsafe impl Send for Mapping {}
// SAFETY: shared references only read (`bytes`) or copy into a range checked to lie inside.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, len: usize) -> Result<Mapping> {
        let n = NonZeroUsize::new(len).ok_or_else(|| shm_error("mapping", "empty segment"))?;
        // SAFETY: a fresh shared mapping of a file we hold open, at an address the kernel picks;
        // no Rust object refers to that range until this `Mapping` hands out slices of it.
        let p = unsafe {
            mmap(None, n, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, file, 0)
        }
        .map_err(|e| shm_error("mmap", e))?;
        Ok(Mapping { ptr: p.cast(), len })
    }

    /// Copies `src` to `offset`, after checking that the range lies inside the mapping.
    fn write(&self, offset: usize, src: &[u8]) -> Result<()> {
        if offset.checked_add(src.len()).is_none_or(|end| end > self.len) {
            return Err(shm_error("write", format!("{}+{} outside {} bytes", offset, src.len(), self.len)));
        }
        // SAFETY: the range is inside the mapping (checked above) and `src` is ordinary memory
        // of this process, so the two cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len()) };
        Ok(())
    }

    fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.len, "a segment's range is checked when leased");
        // SAFETY: inside the mapping (asserted), which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset), len) }
    }

    fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.len, "a segment's range is checked when leased");
        // SAFETY: inside the mapping (asserted); `&mut self` makes this the only slice of it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(offset), len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `new` and every slice of it borrowed from `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// One receiving segment: the memfd (kept open so the sender can open it through /proc) and our
/// mapping of it.
struct Segment {
    file: File,
    map: Mapping,
    token: u64,
    capacity: u64,
}

impl Segment {
    fn create(capacity: u64) -> Result<Segment> {
        let fd = memfd_create(c"rill-shm", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| shm_error("memfd_create", e))?;
        let file = File::from(fd);
        let len = SEGMENT_HEADER_SIZE as u64 + capacity;
        file.set_len(len).map_err(|e| shm_error("sizing a segment", e))?;
        let map = Mapping::new(&file, len as usize)?;
        let token = rill_graph::random_u64() | 1;
        map.write(0, &SEGMENT_MAGIC)?;
        map.write(SEGMENT_MAGIC.len(), &token.to_le_bytes())?;
        Ok(Segment { file, map, token, capacity })
    }

    fn size(&self) -> u64 {
        SEGMENT_HEADER_SIZE as u64 + self.capacity
    }

    fn dest(&self) -> ShmDest {
        ShmDest {
            pid: std::process::id(),
            fd: self.file.as_raw_fd(),
            token: self.token,
            segment_len: self.size(),
            offset: SEGMENT_HEADER_SIZE as u64,
            len: self.capacity,
        }
    }

    /// Frees the memory now, even while a peer still maps it (truncation drops the pages).
    fn destroy(self) {
        let Segment { file, map, .. } = self;
        drop(map);
        let _ = file.set_len(0);
    }
}

/// The power-of-two data region that holds `len` bytes.
fn capacity_for(len: u64) -> Option<u64> {
    let cap = len.max(SEGMENT_CAPACITY_MIN).checked_next_power_of_two()?;
    (cap <= SEGMENT_CAPACITY_MAX).then_some(cap)
}

#[derive(Default)]
struct PoolState {
    free: HashMap<u64, Vec<Segment>>,
    idle_bytes: u64,
    leased_bytes: u64,
    /// Segments in existence, leased and idle.
    segments: usize,
    closed: bool,
}

/// The receiving side's segments: leased ones are named in requests or back tensors; idle ones
/// wait for reuse.
#[derive(Default)]
struct Pool {
    state: Mutex<PoolState>,
    landed: AtomicU64,
}

impl Pool {
    fn lease(self: &Arc<Self>, len: u64) -> Result<Lease> {
        let cap = capacity_for(len).ok_or_else(|| shm_error("lease", format!("{len} bytes is too large")))?;
        let size = SEGMENT_HEADER_SIZE as u64 + cap;
        let mut doomed = Vec::new();
        {
            let mut st = lock(&self.state);
            if st.closed {
                return Err(shm_error("lease", "the pool is shut down"));
            }
            if let Some(seg) = st.free.get_mut(&cap).and_then(Vec::pop) {
                st.idle_bytes -= size;
                st.leased_bytes += size;
                return Ok(Lease { seg: Some(seg), pool: self.clone() });
            }
            // Make room by dropping idle segments of other sizes.
            let full = |st: &PoolState| {
                st.idle_bytes + st.leased_bytes + size > SHM_POOL_SIZE_MAX || st.segments >= SHM_SEGMENTS_MAX
            };
            while full(&st) && st.idle_bytes > 0 {
                let Some(seg) = st.free.values_mut().find_map(Vec::pop) else { break };
                st.idle_bytes -= seg.size();
                st.segments -= 1;
                doomed.push(seg);
            }
            if full(&st) {
                return Err(shm_error(
                    "lease",
                    format!("the pool holds {} segments of {} bytes", st.segments, st.leased_bytes),
                ));
            }
            st.leased_bytes += size;
            st.segments += 1;
        }
        doomed.into_iter().for_each(Segment::destroy);
        match Segment::create(cap) {
            Ok(seg) => Ok(Lease { seg: Some(seg), pool: self.clone() }),
            Err(e) => {
                let mut st = lock(&self.state);
                st.leased_bytes -= size;
                st.segments -= 1;
                Err(e)
            }
        }
    }

    /// A segment whose bytes nobody uses any more (and no peer will write): kept for reuse.
    fn recycle(&self, seg: Segment) {
        let mut st = lock(&self.state);
        st.leased_bytes -= seg.size();
        if st.closed || st.idle_bytes + seg.size() > SHM_POOL_IDLE_SIZE_MAX {
            st.segments -= 1;
            drop(st);
            return seg.destroy();
        }
        st.idle_bytes += seg.size();
        st.free.entry(seg.capacity).or_default().push(seg);
    }

    /// A segment a peer might still write into: never handed out again.
    fn discard(&self, seg: Segment) {
        {
            let mut st = lock(&self.state);
            st.leased_bytes -= seg.size();
            st.segments -= 1;
        }
        seg.destroy();
    }

    fn shutdown(&self) {
        let idle: Vec<Segment> = {
            let mut st = lock(&self.state);
            st.closed = true;
            st.idle_bytes = 0;
            let idle: Vec<Segment> = st.free.drain().flat_map(|(_, v)| v).collect();
            st.segments -= idle.len();
            idle
        };
        idle.into_iter().for_each(Segment::destroy);
    }
}

/// A leased segment, named in one request.
pub struct Lease {
    seg: Option<Segment>,
    pool: Arc<Pool>,
}

impl Landing for Lease {
    fn dest(&self) -> Dest {
        Dest::Shm(self.seg.as_ref().expect("a lease holds its segment until it ends").dest())
    }

    fn land(mut self: Box<Self>, len: u64) -> Result<Buffer> {
        let seg = self.seg.take().expect("a lease holds its segment until it ends");
        if len > seg.capacity {
            let e = Error::invalid_argument(format!(
                "the sender says it wrote {len} bytes into a region of {} bytes",
                seg.capacity
            ));
            self.pool.discard(seg);
            return Err(e);
        }
        self.pool.landed.fetch_add(len, Ordering::Relaxed);
        let mem = Landed { seg: Some(seg), len: len as usize, pool: self.pool.clone() };
        Buffer::from_external(Box::new(mem))
            .ok_or_else(|| Error::internal("a segment's data region is not aligned"))
    }

    fn release(mut self: Box<Self>) {
        if let Some(seg) = self.seg.take() {
            self.pool.recycle(seg);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(seg) = self.seg.take() {
            self.pool.discard(seg);
        }
    }
}

/// The bytes a sender wrote, as a tensor buffer; the segment returns to the pool when it drops.
struct Landed {
    seg: Option<Segment>,
    len: usize,
    pool: Arc<Pool>,
}

impl ExternalMemory for Landed {
    fn bytes(&self) -> &[u8] {
        self.seg.as_ref().expect("held until drop").map.bytes(SEGMENT_HEADER_SIZE, self.len)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.seg.as_mut().expect("held until drop").map.bytes_mut(SEGMENT_HEADER_SIZE, self.len)
    }
}

impl Drop for Landed {
    fn drop(&mut self) {
        if let Some(seg) = self.seg.take() {
            self.pool.recycle(seg);
        }
    }
}

/// A peer's segment as this (sending) process maps it.
struct Remote {
    file: File,
    map: Mapping,
    segment_len: u64,
    last_used: AtomicU64,
}

/// Shared memory with same-host peers: a receiving pool and the sending side's mappings.
pub struct Shm {
    pool: Arc<Pool>,
    remotes: Mutex<(HashMap<(u32, u64), Arc<Remote>>, u64)>,
    written: AtomicU64,
    warned: AtomicBool,
}

impl std::fmt::Debug for Shm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Shm({:?})", self.bytes_transferred())
    }
}

impl Default for Shm {
    fn default() -> Self {
        Shm::new()
    }
}

impl Shm {
    pub fn new() -> Shm {
        Shm {
            pool: Arc::new(Pool::default()),
            remotes: Mutex::new((HashMap::new(), 0)),
            written: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// A receiving region for `len` bytes (tests and the `TensorTransport` offer).
    pub fn lease(&self, len: u64) -> Result<Lease> {
        self.pool.lease(len)
    }

    /// `(leased, idle)` bytes of the receiving pool.
    pub fn pool_bytes(&self) -> (u64, u64) {
        let st = lock(&self.pool.state);
        (st.leased_bytes, st.idle_bytes)
    }

    /// Segments of the receiving pool, leased and idle.
    pub fn pool_segments(&self) -> usize {
        lock(&self.pool.state).segments
    }

    /// The mapping of a peer's segment, opened, checked and cached on first use.
    fn remote(&self, d: &ShmDest) -> Result<Arc<Remote>> {
        let key = (d.pid, d.token);
        {
            let mut g = lock(&self.remotes);
            g.1 += 1;
            let now = g.1;
            if let Some(r) = g.0.get(&key) {
                if r.segment_len != d.segment_len {
                    return Err(shm_error("a peer segment", "named again with another size"));
                }
                r.last_used.store(now, Ordering::Relaxed);
                return Ok(r.clone());
            }
        }
        let len = usize::try_from(d.segment_len)
            .ok()
            .filter(|&l| l > SEGMENT_HEADER_SIZE)
            .ok_or_else(|| shm_error("opening a peer segment", format!("bad size {}", d.segment_len)))?;
        let path = format!("/proc/{}/fd/{}", d.pid, d.fd);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| shm_error(&format!("opening {path}"), e))?;
        let actual = file.metadata().map_err(|e| shm_error("fstat", e))?.len();
        if actual != d.segment_len {
            return Err(shm_error(&path, format!("is {actual} bytes, the peer said {}", d.segment_len)));
        }
        let map = Mapping::new(&file, len)?;
        let head = map.bytes(0, SEGMENT_MAGIC.len() + 8);
        if head[..8] != SEGMENT_MAGIC || head[8..16] != d.token.to_le_bytes() {
            return Err(shm_error(&path, "is not the segment the peer named (magic or token differ)"));
        }
        let mut g = lock(&self.remotes);
        if g.0.len() >= PEER_SEGMENTS_MAPPED_MAX {
            let oldest = g.0.iter().min_by_key(|(_, r)| r.last_used.load(Ordering::Relaxed)).map(|(&k, _)| k);
            if let Some(k) = oldest {
                g.0.remove(&k);
            }
        }
        g.1 += 1;
        let r = Arc::new(Remote { file, map, segment_len: d.segment_len, last_used: AtomicU64::new(g.1) });
        g.0.insert(key, r.clone());
        Ok(r)
    }

    fn try_write(&self, d: &ShmDest, bytes: &[u8]) -> Result<()> {
        let n = bytes.len() as u64;
        let end = d.offset.checked_add(d.len);
        let fits = d.offset >= SEGMENT_HEADER_SIZE as u64
            && d.offset.is_multiple_of(BUFFER_ALIGN as u64)
            && end.is_some_and(|e| e <= d.segment_len)
            && n <= d.len;
        if !fits {
            return Err(Error::invalid_argument(format!(
                "shared memory: {n} bytes do not fit region {}+{} of a {}-byte segment",
                d.offset, d.len, d.segment_len
            )));
        }
        let r = self.remote(d)?;
        // A segment the peer truncated would fault on write: check its size first.
        let actual = r.file.metadata().map_err(|e| shm_error("fstat", e))?.len();
        if actual != d.segment_len {
            lock(&self.remotes).0.remove(&(d.pid, d.token));
            return Err(shm_error("write", "the peer's segment changed size"));
        }
        r.map.write(d.offset as usize, bytes)?;
        self.written.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

impl TensorTransport for Shm {
    fn offer(&self, peer: &PeerInfo, len: u64) -> Option<Box<dyn Landing>> {
        if !peer.same_host {
            return None;
        }
        match self.pool.lease(len) {
            Ok(l) => Some(Box::new(l)),
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    eprintln!("rill-transport: receiving over TCP instead: {e}");
                }
                None
            }
        }
    }

    fn write(&self, peer: &PeerInfo, dest: &Dest, bytes: &[u8]) -> Result<()> {
        let Dest::Shm(d) = dest;
        if !peer.same_host {
            return Err(Error::failed_precondition(format!("{} is not on this host", peer.name())));
        }
        self.try_write(d, bytes).inspect_err(|e| {
            if !self.warned.swap(true, Ordering::Relaxed) {
                eprintln!("rill-transport: sending to {} over TCP instead: {e}", peer.name());
            }
        })
    }

    fn bytes_transferred(&self) -> (u64, u64) {
        (self.written.load(Ordering::Relaxed), self.pool.landed.load(Ordering::Relaxed))
    }

    fn shutdown(&self) {
        self.pool.shutdown();
        lock(&self.remotes).0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_peer() -> PeerInfo {
        PeerInfo { job: "ps".into(), task: 0, incarnation: 1, authenticated: false, same_host: true }
    }

    fn shm_dest(l: &dyn Landing) -> ShmDest {
        let Dest::Shm(d) = l.dest();
        d
    }

    #[test]
    fn bytes_land_in_the_named_region_and_the_segment_is_reused() {
        // One process plays both sides: the sender opens the receiver's memfd through /proc.
        let (rx, tx) = (Shm::new(), Shm::new());
        let peer = local_peer();
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let landing = rx.offer(&peer, data.len() as u64).expect("a region");
        let d = shm_dest(landing.as_ref());
        assert_eq!(d.len, 512 << 10, "rounded up to a power of two");
        tx.write(&peer, &landing.dest(), &data).unwrap();
        let buf = landing.land(data.len() as u64).unwrap();
        assert_eq!(buf.as_bytes(), &data[..]);
        assert_eq!(tx.bytes_transferred().0, data.len() as u64);
        assert_eq!(rx.bytes_transferred().1, data.len() as u64);
        assert_eq!(rx.pool_bytes().0, d.segment_len);
        drop(buf);
        assert_eq!(rx.pool_bytes(), (0, d.segment_len), "back in the pool when the buffer drops");
        // The next transfer of that size reuses the segment, and the sender its mapping.
        let again = rx.offer(&peer, 400_000).unwrap();
        assert_eq!(shm_dest(again.as_ref()).token, d.token);
        tx.write(&peer, &again.dest(), &data[..1000]).unwrap();
        assert_eq!(lock(&tx.remotes).0.len(), 1);
        again.release();
        assert_eq!(rx.pool_bytes(), (0, d.segment_len));
    }

    #[test]
    fn declared_sizes_are_checked_before_memory_is_touched() {
        let (rx, tx) = (Shm::new(), Shm::new());
        let peer = local_peer();
        let landing = rx.offer(&peer, 100_000).unwrap();
        let d = shm_dest(landing.as_ref());
        let bad = [
            ShmDest { offset: 0, ..d },             // over the header
            ShmDest { offset: d.offset + 1, ..d },  // misaligned
            ShmDest { len: d.len + 64, ..d },       // past the segment
            ShmDest { offset: u64::MAX - 63, ..d }, // overflowing
            ShmDest { len: 10, ..d },               // the bytes do not fit
            ShmDest { token: d.token ^ 2, ..d },    // another segment
            ShmDest { segment_len: d.segment_len * 2, len: d.segment_len, ..d }, // wrong file size
            ShmDest { fd: -1, ..d },                // no such descriptor
        ];
        for b in bad {
            let e = tx.write(&peer, &Dest::Shm(b), &[7u8; 100]).unwrap_err();
            assert!(e.msg.contains("shared memory"), "{b:?}: {e}");
        }
        assert_eq!(tx.bytes_transferred().0, 0);
        // A peer on another host is never written to.
        let far = PeerInfo { same_host: false, ..peer.clone() };
        assert!(tx.write(&far, &landing.dest(), &[1]).is_err());
        assert!(rx.offer(&far, 100).is_none());
        // The receiver checks the sender's claim against the region it leased.
        let e = landing.land(d.len + 1).unwrap_err();
        assert_eq!(e.code, rill_graph::Code::InvalidArgument);
        assert_eq!(rx.pool_bytes(), (0, 0), "a region with a bad answer is destroyed, not reused");
    }

    #[test]
    fn the_number_of_segments_is_bounded() {
        let rx = Shm::new();
        let peer = local_peer();
        let held: Vec<Box<dyn Landing>> =
            (0..SHM_SEGMENTS_MAX).map(|_| rx.offer(&peer, 1000).expect("within the bound")).collect();
        assert!(rx.offer(&peer, 1000).is_none(), "one segment too many");
        held.into_iter().for_each(|l| l.release());
        assert_eq!(rx.pool_segments(), SHM_SEGMENTS_MAX);
        // Idle segments of another size make room.
        assert!(rx.offer(&peer, 1 << 20).is_some());
    }

    #[test]
    fn an_unanswered_lease_is_never_reused_and_shutdown_frees_idle_segments() {
        let rx = Shm::new();
        let peer = local_peer();
        let first = rx.offer(&peer, 70_000).unwrap();
        let token = shm_dest(first.as_ref()).token;
        drop(first);
        assert_eq!(rx.pool_bytes(), (0, 0));
        let second = rx.offer(&peer, 70_000).unwrap();
        assert_ne!(shm_dest(second.as_ref()).token, token);
        second.release();
        assert!(rx.pool_bytes().1 > 0);
        assert_eq!(rx.pool_segments(), 1);
        rx.shutdown();
        assert_eq!(rx.pool_bytes(), (0, 0));
        assert_eq!(rx.pool_segments(), 0);
        assert!(rx.offer(&peer, 70_000).is_none(), "a shut-down pool leases nothing");
    }
}
