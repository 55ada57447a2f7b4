//! Output: one JSON document on stdout with `--json` (for scripts), or
//! plain text for a person. Every command builds one serializable value
//! and hands it here with its text rendering, so the two never disagree on
//! what is reported.

use std::fmt::Write as _;

use ms2m_core::Position;
use serde::Serialize;

/// Writes one line to `out` (formatting into a `String` cannot fail).
macro_rules! line {
    ($out:expr, $($arg:tt)*) => {{
        let _ = writeln!($out, $($arg)*);
    }};
}
pub(crate) use line;

/// Prints `value` as pretty JSON, or the text `human` writes.
pub fn print<T: Serialize + ?Sized>(json: bool, value: &T, human: impl FnOnce(&mut String)) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("CLI outputs serialize to JSON")
        );
    } else {
        let mut out = String::new();
        human(&mut out);
        print!("{out}");
    }
}

/// `topic/partition@offset, …`
pub fn position(p: &Position) -> String {
    if p.is_empty() {
        return "(empty)".into();
    }
    let parts: Vec<String> = p
        .iter()
        .map(|(tp, o)| format!("{}/{}@{o}", tp.topic, tp.partition))
        .collect();
    parts.join(", ")
}

/// Now, in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC, e.g.
/// `2026-12-01T17:47:57.668Z`.
pub fn time(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// A byte count with a binary unit.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Bytes as text when they are UTF-8, else as hex.
pub fn text_or_hex(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => b.iter().fold(String::from("0x"), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_sizes_read_as_a_person_writes_them() {
        assert_eq!(time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(1_764_590_400_123), "2025-12-01T12:00:00.123Z");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(text_or_hex(&[0xff, 0x01]), "0xff01");
    }
}
