//! Options shared by several commands: where the graphs run, the compiled shapes, and
//! sampling; and the parsers of their values.

use clap::Args;
use kvc_compiler::Overrides;
use kvc_compiler::spec::{DTypeSpec, KvPolicy, KvStorage};
use kvc_runtime::Backend;
use kvc_runtime::exec::KernelSet;
use kvc_runtime::exec::session::SessionOptions;

/// Where and how the graphs run.
#[derive(Args, Clone, Copy, Debug)]
pub(crate) struct ExecArgs {
    /// Backend: `flex` (CPU), or `wgpu` / `cuda` in builds with those cargo features.
    #[arg(long, value_parser = parse_backend, default_value = "flex")]
    pub(crate) backend: Backend,
    /// Kernel set: `cpu` (kvc's CPU kernels; Flex only, its default) or `portable` (Burn
    /// ops; the default elsewhere).
    #[arg(long, value_parser = parse_kernels)]
    pub(crate) kernels: Option<KernelSet>,
    /// Most memory the compiled shapes may need, e.g. `8GiB`, `512MiB` or bytes (default:
    /// what the system reports available, on the CPU backend).
    #[arg(long, value_parser = parse_size)]
    pub(crate) max_memory: Option<u64>,
    /// Compute every padding position of a prefill and the rows a decode step leaves
    /// alone (by default the CPU kernels skip them: a prefill costs its real tokens, a
    /// decode step its rows that are not done). Results are the same; for measuring.
    #[arg(long)]
    pub(crate) compute_padding: bool,
    /// Record the decode step once per batch and replay it: `on` or `off` (default: on
    /// where the backend replays hardware graphs, CUDA; elsewhere `on` re-runs the step).
    #[arg(long, value_parser = parse_on_off)]
    pub(crate) capture: Option<bool>,
}

pub(crate) fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("expected on or off, found {other:?}")),
    }
}

/// A size in bytes: a number with an optional `KiB`, `MiB`, `GiB` or `TiB` (or `K`, `M`,
/// `G`, `T`) suffix.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        "t" | "tib" | "tb" => 1 << 40,
        _ => {
            return Err(format!(
                "expected a size such as 8GiB or 512MiB, found {s:?}"
            ));
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("expected a size such as 8GiB or 512MiB, found {s:?}"))?;
    let bytes = n * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < 2f64.powi(63)) {
        return Err(format!(
            "expected a size between 1 B and 8 EiB, found {s:?}"
        ));
    }
    Ok(bytes as u64)
}

pub(crate) fn parse_backend(s: &str) -> Result<Backend, String> {
    match s {
        "flex" => Ok(Backend::Flex),
        #[cfg(feature = "wgpu")]
        "wgpu" => Ok(Backend::Wgpu),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Backend::Cuda),
        // Reached only for a backend this build lacks (a guard, so no arm is unreachable).
        other if ["wgpu", "cuda"].contains(&other) => Err(format!(
            "this build has no {s} backend (build kvc with `--features {s}`)"
        )),
        other => Err(format!("expected flex, wgpu or cuda, found {other:?}")),
    }
}

pub(crate) fn parse_schedule(s: &str) -> Result<kvc_runtime::engine::Schedule, String> {
    use kvc_runtime::engine::Schedule;
    match s {
        "refill" => Ok(Schedule::Refill),
        "batch" => Ok(Schedule::WholeBatch),
        other => Err(format!("expected refill or batch, found {other:?}")),
    }
}

pub(crate) fn parse_kernels(s: &str) -> Result<KernelSet, String> {
    match s {
        "cpu" => Ok(KernelSet::Cpu),
        "portable" => Ok(KernelSet::Portable),
        other => Err(format!("expected cpu or portable, found {other:?}")),
    }
}

impl ExecArgs {
    pub(crate) fn options(self) -> SessionOptions {
        let mut o = SessionOptions::for_backend(self.backend);
        if let Some(k) = self.kernels {
            o.kernels = k;
        }
        o.max_memory = self.max_memory;
        o.skip_padding = !self.compute_padding;
        if let Some(capture) = self.capture {
            o.capture = capture;
        }
        o
    }
}

/// Overrides of the spec's compile section.
#[derive(Args, Clone, Copy, Default)]
pub(crate) struct ShapeArgs {
    /// Rows per batch (`B`).
    #[arg(long)]
    pub(crate) batch: Option<u32>,
    /// Prefill width (`T`).
    #[arg(long)]
    pub(crate) prefill_len: Option<u32>,
    /// Longest row (prompt + new tokens); with the dense cache also its slots per row.
    /// Budgeted `--kv` policies default it to the model's max_position_embeddings.
    #[arg(long)]
    pub(crate) cache_len: Option<u32>,
    /// KV cache policy: dense, window:SIZE, sink-window:SINKS:WINDOW, h2o:BUDGET:RECENT,
    /// tova:BUDGET, snapkv:BUDGET:WINDOW:POOL, random:BUDGET[:SEED].
    #[arg(long, value_parser = KvPolicy::parse)]
    pub(crate) kv: Option<KvPolicy>,
    /// Storage of cached keys and values: `f32` (exact), `f16` (half the bytes, llama.cpp's
    /// default) or `i8` (per-token scales, about 4× smaller). Default: the spec's.
    #[arg(long, value_parser = KvStorage::parse)]
    pub(crate) kv_storage: Option<KvStorage>,
    /// Storage of the weight matrices: `native` (the weights file's own blocks, read as
    /// they are by the CPU kernels; the default), `f32` (dequantized) or `f16`.
    #[arg(long, value_parser = DTypeSpec::parse)]
    pub(crate) weight_dtype: Option<DTypeSpec>,
    #[arg(skip)]
    pub(crate) sampler: Option<kvc_compiler::spec::Sampler>,
}

impl ShapeArgs {
    pub(crate) fn overrides(self) -> Overrides {
        Overrides {
            batch: self.batch,
            prefill_len: self.prefill_len,
            cache_len: self.cache_len,
            sampler: self.sampler,
            weight_dtype: self.weight_dtype,
            kv: self.kv,
            kv_storage: self.kv_storage,
        }
    }
}

/// Sampling settings (temperature 0 = greedy).
#[derive(Args, Clone, Copy)]
pub(crate) struct SamplingArgs {
    /// Softmax temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches P (1 = all).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
}
