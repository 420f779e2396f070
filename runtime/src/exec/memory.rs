//! Memory before allocation: the plan a session will hold, checked against what the
//! machine (or `--max-memory`) allows, so sizes the spec accepts end in an error instead of
//! an aborted allocation.

use kvc_compiler::ir::Program;

use super::session::SessionOptions;
use crate::blocks::QuantLayout;
use crate::{Backend, RuntimeError};

/// The memory plan of `program` as a session with `options` holds it: the compiled plan
/// ([`kvc_compiler::MemoryPlan::of`]) with block matrices at their interleaved size where
/// [`SessionOptions::weight_layout`] interleaves them (at most a third above the file's
/// size; see [`crate::exec::kernels::cpu::quant::interleave`]).
pub fn resident_plan(program: &Program, options: &SessionOptions) -> kvc_compiler::MemoryPlan {
    let mut plan = kvc_compiler::MemoryPlan::of(program);
    let layout = options.weight_layout(program);
    if layout != QuantLayout::File {
        for p in &program.params {
            let Some(ty) = crate::load::weights::ggml_block_type(p.ty.dtype) else {
                continue;
            };
            let [n, k] = p.ty.shape[..] else { continue };
            if let Some(len) = options
                .kernels
                .prepared_bytes(ty, k as usize, n as usize, layout)
            {
                plan.weights = plan.weights - p.ty.size_bytes() + len as u64;
            }
        }
    }
    plan
}

/// Refuses a program whose memory plan ([`MemoryPlan::total`](kvc_compiler::MemoryPlan::total)) exceeds `options.max_memory`
/// or, without one, on the CPU backend, the memory the system has available: sizes that
/// pass the spec's checks end in this error instead of an aborted allocation. With
/// `weights_loaded` the weights are already resident (and no longer counted as
/// available), so only the rest of the plan is compared with what is available.
pub fn check_memory(
    program: &Program,
    backend: Backend,
    options: &SessionOptions,
    weights_loaded: bool,
) -> Result<(), RuntimeError> {
    let plan = resident_plan(program, options);
    let total = plan.total();
    let (needed, limit, what) = match options.max_memory {
        Some(l) => (total, l, "is the --max-memory limit"),
        None if backend == Backend::Flex => match available_memory() {
            Some(a) if weights_loaded => (
                total - plan.weights,
                a,
                "are available beside the loaded weights",
            ),
            Some(a) => (total, a, "are available"),
            None => return Ok(()),
        },
        None => return Ok(()),
    };
    if needed <= limit {
        return Ok(());
    }
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
    let weights = match needed == total {
        true => format!("weights {}, ", gib(plan.weights)),
        false => String::new(),
    };
    Err(RuntimeError::Memory(format!(
        "the compiled shapes need {} ({weights}KV cache {}, activations and control {}), \
         but {} {what}; use a smaller --batch or --cache-len, a budgeted --kv, \
         --kv-storage f16 or i8, or raise --max-memory",
        gib(needed),
        gib(plan.kv_cache),
        gib(total - plan.weights - plan.kv_cache),
        gib(limit),
    )))
}

/// The memory this process can still use, in bytes: the system's `MemAvailable`, lowered
/// to what is left under the cgroup's `memory.max` when one is set. `None` where neither
/// can be read (not Linux).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    let mut available = kb.saturating_mul(1024);
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current")) {
        available = available.min(max.saturating_sub(current));
    }
    Some(available)
}
