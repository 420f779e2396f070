//! Entry points of the fuzz targets in `fuzz/` (spec text and artifacts on arbitrary
//! bytes), shared with the test that replays their regression corpus. Each must return
//! (with or without an error) on any input: a panic, hang or unbounded allocation is a
//! finding.

use crate::memory::MemoryPlan;
use crate::spec::ModelSpec;

/// Parses `bytes` as spec text; a valid spec small enough to compile in milliseconds is
/// compiled, printed and planned.
pub fn spec(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(spec) = ModelSpec::parse(text, "fuzz.ron") else {
        return;
    };
    let d = spec.arch.dims();
    let c = &spec.compile;
    let small = d.num_layers <= 4
        && d.hidden_size <= 512
        && d.intermediate_size <= 2048
        && d.vocab_size <= 4096
        && d.num_heads * d.head_dim <= 1024
        && c.batch <= 8
        && c.cache_len <= 1024;
    if small && let Ok(p) = crate::compile(&spec) {
        let _ = p.to_string();
        let _ = MemoryPlan::of(&p).to_string();
    }
}

/// Reads `bytes` as an artifact's `program.json` ([`crate::artifact::parse`]).
pub fn artifact(bytes: &[u8]) {
    let _ = crate::artifact::parse(bytes);
}
