//! What a recorded measurement says about where it ran: the checked-out commit and the CPU.

use std::process::Command;

/// The checked-out commit abbreviated to `digits` hex digits (git's default abbreviation
/// without), or `unknown` outside a git work tree.
pub(crate) fn commit(digits: Option<usize>) -> String {
    let short = digits.map_or_else(|| "--short".to_string(), |n| format!("--short={n}"));
    Command::new("git")
        .args(["rev-parse", &short, "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The value of the first `/proc/cpuinfo` line starting with `name`.
pub(crate) fn cpuinfo_field(name: &str) -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The CPU's model name, where `/proc/cpuinfo` gives one.
pub(crate) fn cpu_model() -> Option<String> {
    cpuinfo_field("model name")
}
