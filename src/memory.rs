//! The process's peak memory, for `train`'s `peak_memory_gb`: the resident set on the CPU
//! (Linux: `VmHWM`, reset per step through `/proc/self/clear_refs`), device memory in use on a
//! GPU (the driver's used = total − free, sampled at the end of the step: device-wide, as
//! `nvidia-smi` reports it). And the heap's live bytes and their peak, counted by the global
//! allocator, for the memory plan's per-token measurement: the resident set keeps what the
//! allocator frees but holds on to, so a second pass would measure nothing.
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

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(l);
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let q = System.realloc(p, l, new_size);
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
