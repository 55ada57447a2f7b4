//! Resident memory of this process or a child, from `/proc/<pid>/status`
//! (Linux).

use serde::Serialize;

/// A field of a `/proc/.../status` text in KiB (`VmHWM`, `VmRSS`).
fn field_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A field of `/proc/self/status` in KiB.
fn status_kib(field: &str) -> Option<u64> {
    field_kib(&std::fs::read_to_string("/proc/self/status").ok()?, field)
}

/// Resident memory of one process, bytes.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ProcMemory {
    /// Peak resident set size over the process's life (`VmHWM`).
    pub peak: u64,
    /// Current resident set size (`VmRSS`).
    pub rss: u64,
}

/// The memory of process `pid` (a child of ours), `None` if it is gone.
pub fn of_pid(pid: u32) -> Option<ProcMemory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcMemory {
        peak: field_kib(&status, "VmHWM:")? * 1024,
        rss: field_kib(&status, "VmRSS:")? * 1024,
    })
}

/// Peak resident set size so far (`VmHWM`), in bytes.
pub fn peak_rss() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size (`VmRSS`), in bytes.
pub fn rss() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

/// Resets the peak (`VmHWM`) to the current RSS (writes 5 to
/// `/proc/self/clear_refs`); `false` if the kernel refused.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
