//! The process's peak memory, for `train`'s `peak_memory_gb`: the resident set on the CPU
//! (Linux: `VmHWM`, reset per step through `/proc/self/clear_refs`), device memory in use on a
//! GPU (the driver's used = total − free, sampled at the end of the step: device-wide, as
//! `nvidia-smi` reports it). And the heap's live bytes and their peak, counted by the global
//! allocator, for the memory plan's per-token measurement: the resident set keeps what the
//! allocator frees but holds on to, so a second pass would measure nothing. The global
//! allocator also maps blocks of 4 MiB and more itself, on huge pages, and keeps freed ones for
//! reuse (`Pool`): a training step's buffers were costing more in page faults than in GEMMs.
use candle_core::Device;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// The system allocator, counting live bytes and their high-water mark (two relaxed atomics
/// per call: nothing next to the tensor work each allocation serves).
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

/// Blocks of at least this size are mapped by the allocator itself (see [`map_large`]).
const LARGE: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// A large block as its own anonymous mapping, 2 MiB-aligned and advised as transparent huge
/// pages (where the kernel offers them only on request, as here). Tensor buffers are this
/// size, fresh each op: with 4 KiB pages a step spent more time in page faults (one per 4 KiB,
/// each zeroing and locking) than in its GEMMs; a huge page is one fault per 2 MiB. The mapping
/// is zero, so zeroed requests cost nothing more.
/// `len`: a multiple of 2 MiB (the pool's size classes).
#[cfg(target_os = "linux")]
unsafe fn map_large(len: usize) -> *mut u8 {
    let total = len + HUGE_PAGE;
    let p = libc::mmap(std::ptr::null_mut(), total, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0);
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    // Trim the mapping to the aligned part.
    let (start, end) = (p as usize, p as usize + total);
    let aligned = round_up(start, HUGE_PAGE);
    if aligned > start {
        libc::munmap(start as *mut libc::c_void, aligned - start);
    }
    if end > aligned + len {
        libc::munmap((aligned + len) as *mut libc::c_void, end - aligned - len);
    }
    libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    aligned as *mut u8
}

#[cfg(target_os = "linux")]
unsafe fn unmap_large(p: *mut u8, size: usize) {
    libc::munmap(p as *mut libc::c_void, size);
}

#[cfg(not(target_os = "linux"))]
unsafe fn map_large(size: usize) -> *mut u8 {
    System.alloc_zeroed(Layout::from_size_align_unchecked(size, HUGE_PAGE))
}

#[cfg(not(target_os = "linux"))]
unsafe fn unmap_large(p: *mut u8, size: usize) {
    System.dealloc(p, Layout::from_size_align_unchecked(size, HUGE_PAGE))
}

/// Freed large blocks kept for the next request of the same 2 MiB-rounded size, as PyTorch's
/// caching allocator keeps device blocks. A training step allocates the same buffers every
/// step (weight-sized gradients and casts, the head's blocks); mapping each afresh costs a
/// fault and a kernel zeroing per page, and on a VM whose freed memory goes back to the host
/// (free page reporting) a host fault as well. Bounded by [`Pool::limit`]; a block that does
/// not fit is unmapped.
struct Pool {
    slots: [(usize, usize); POOL_SLOTS],
    cached: usize,
}

const POOL_SLOTS: usize = 512;

static POOL_CAP: AtomicUsize = AtomicUsize::new(usize::MAX);

/// At most `bytes` of freed blocks kept for reuse (train's room under --max-memory); what the
/// pool holds beyond it is released now.
pub fn limit_pool(bytes: u64) {
    POOL_CAP.store(bytes as usize, Relaxed);
    loop {
        let over = {
            let mut p = pool();
            if p.cached <= Pool::limit() {
                break;
            }
            let slot = p.slots.iter_mut().find(|s| s.1 != 0).map(std::mem::take);
            if let Some((_, size)) = slot {
                p.cached -= size;
            }
            slot
        };
        if let Some((ptr, size)) = over {
            // SAFETY: a pooled block is a whole mapping of this size that nothing uses.
            unsafe { unmap_large(ptr as *mut u8, size) };
        }
    }
}

static POOL: std::sync::Mutex<Pool> = std::sync::Mutex::new(Pool { slots: [(0, 0); POOL_SLOTS], cached: 0 });

impl Pool {
    /// Bytes the pool may hold: half of what is live, at least 1 GiB (a training step's
    /// buffers, the gradients among them, are about that beside the weights and moments), and
    /// no more than [`limit_pool`] allows.
    fn limit() -> usize {
        (LIVE.load(Relaxed) / 2).max(1 << 30).min(POOL_CAP.load(Relaxed))
    }

    fn take(&mut self, size: usize) -> Option<*mut u8> {
        let slot = self.slots.iter_mut().find(|s| s.1 == size)?;
        let p = std::mem::take(slot).0;
        self.cached -= size;
        Some(p as *mut u8)
    }

    /// Keeps the block, or hands it back when the pool is full.
    fn keep(&mut self, p: *mut u8, size: usize) -> bool {
        if self.cached + size > Self::limit() {
            return false;
        }
        match self.slots.iter_mut().find(|s| s.1 == 0) {
            Some(slot) => {
                *slot = (p as usize, size);
                self.cached += size;
                true
            }
            None => false,
        }
    }
}

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A large block: from the pool, else a fresh mapping. `zeroed`: a pooled block is cleared.
unsafe fn large(size: usize, zeroed: bool) -> *mut u8 {
    let size = round_up(size, HUGE_PAGE);
    let pooled = pool().take(size);
    match pooled {
        Some(p) => {
            if zeroed {
                std::ptr::write_bytes(p, 0, size);
            }
            p
        }
        None => map_large(size),
    }
}

unsafe fn free_large(p: *mut u8, size: usize) {
    let size = round_up(size, HUGE_PAGE);
    let kept = pool().keep(p, size);
    if !kept {
        unmap_large(p, size);
    }
}

// SAFETY: small blocks are forwarded unchanged to the system allocator; large ones are whole
// mappings of their own, aligned to 2 MiB (beyond any alignment a Layout asks), unmapped by size.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = if l.size() >= LARGE { large(l.size(), false) } else { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = if l.size() >= LARGE { large(l.size(), true) } else { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if l.size() >= LARGE {
            free_large(p, l.size());
        } else {
            System.dealloc(p, l);
        }
        LIVE.fetch_sub(l.size(), Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let q = if l.size() < LARGE && new_size < LARGE {
            System.realloc(p, l, new_size)
        } else {
            let q = if new_size >= LARGE { large(new_size, false) } else { System.alloc(Layout::from_size_align_unchecked(new_size, l.align())) };
            if !q.is_null() {
                std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                if l.size() >= LARGE {
                    free_large(p, l.size());
                } else {
                    System.dealloc(p, l);
                }
            }
            q
        };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Relaxed);
            grew(new_size);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Heap bytes live now.
pub fn heap_live() -> u64 {
    LIVE.load(Relaxed) as u64
}

/// Starts a new heap high-water mark at what is live now.
pub fn heap_reset_peak() {
    PEAK.store(LIVE.load(Relaxed), Relaxed);
}

/// The most heap bytes live at once since `heap_reset_peak`.
pub fn heap_peak() -> u64 {
    PEAK.load(Relaxed) as u64
}

/// Starts a new peak-memory window (the CPU's high-water mark resets; a no-op elsewhere).
pub fn reset_peak() {
    // Writing 5 resets VmHWM to the current RSS (Linux ≥ 4.0); where it fails, the peak stays the
    // process's lifetime maximum, which is still an upper bound.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// File-backed resident pages (the program, mapped data files), bytes.
pub fn rss_file_bytes() -> u64 {
    status_kb("RssFile:") * 1024
}

fn status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// Peak memory since the last `reset_peak`, bytes: host RSS high-water mark, or on a GPU the
/// device memory in use now.
pub fn peak_bytes(device: &Device) -> u64 {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = device {
        if let Ok((free, total)) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info() {
            return (total - free) as u64;
        }
    }
    let _ = device;
    status_kb("VmHWM:").max(status_kb("VmRSS:")) * 1024
}

#[cfg(test)]
mod tests {
    /// A freed large block comes back for the next request of its size class, cleared when the
    /// request is for zeros; contents survive a realloc across the large-block threshold.
    #[test]
    fn large_blocks_are_reused_cleared_and_moved_whole() {
        // A size class (334 MiB) no other test allocates, so parallel tests do not take its block.
        let n = (333 << 20) + 123;
        let mut a = vec![7u8; n];
        a[n - 1] = 9;
        let at = a.as_ptr() as usize;
        drop(a);
        let b = vec![0u8; n];
        assert_eq!(b.as_ptr() as usize, at, "the pooled block is reused");
        assert!(b.iter().all(|&x| x == 0), "a zeroed request from the pool is cleared");
        drop(b);
        let mut c: Vec<u32> = (0..1000u32).collect();
        c.resize(3 << 20, 5); // 12 MiB: crosses into a large block
        assert!(c[..1000].iter().enumerate().all(|(i, &x)| x == i as u32) && c[(3 << 20) - 1] == 5);
        c.truncate(10);
        c.shrink_to_fit(); // back below the threshold
        assert_eq!(c, (0..10u32).collect::<Vec<_>>());
    }
}
