//! The process's peak memory, for `train`'s `peak_memory_gb`: the resident set on the CPU
//! (Linux: `VmHWM`, reset per step through `/proc/self/clear_refs`), device memory in use on a
//! GPU (the driver's used = total − free, sampled at the end of the step: device-wide, as
//! `nvidia-smi` reports it).
use candle_core::Device;

/// Starts a new peak-memory window (the CPU's high-water mark resets; a no-op elsewhere).
pub fn reset_peak() {
    // Writing 5 resets VmHWM to the current RSS (Linux ≥ 4.0); where it fails, the peak stays the
    // process's lifetime maximum, which is still an upper bound.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Current resident set (VmRSS) of this process, bytes.
pub fn rss_bytes() -> u64 {
    status_kb("VmRSS:") * 1024
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
