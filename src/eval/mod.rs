//! `kvc eval`: what each KV policy costs in quality, measured against the dense cache on
//! the real model.
//!
//! Three tasks ([`fidelity`], [`passkey`], [`greedy`]) run over a grid of policies ×
//! budgets × prefill widths. Every cell compiles its own program (the policy and the
//! shapes are compiled in) and runs in a session that shares the loaded weights
//! ([`Session::with_program`]). Results go to one JSON file, written after every passkey
//! and greedy cell and after the fidelity cells' shared lockstep pass; a rerun with the
//! same file skips the cells it holds. `--plot` draws SVG charts and
//! `--results-md` writes the Markdown report (see `docs/results.md`).

pub mod corpus;
pub mod fidelity;
pub mod greedy;
pub mod passkey;
pub mod report;
pub mod svg;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use kvc_compiler::ir::Program;
use kvc_compiler::lower::WeightTypes;
use kvc_compiler::spec::{
    DTypeSpec, KvPolicy, KvStorage, ModelSpec, Overrides, one_chunk_prefill_len,
};
use kvc_runtime::exec::session::Session;
use kvc_runtime::load::tokenizer::Tokenizer;
use kvc_runtime::model::LoadedModel;
use serde::{Deserialize, Serialize};

use crate::ExecArgs;

/// Version of the results file.
pub const FORMAT: u32 = 1;

/// Command-line options of `kvc eval`.
#[derive(Args, Clone, Debug)]
pub struct EvalArgs {
    /// Model spec (`models/*.ron`).
    pub model: PathBuf,
    /// Tasks to run (comma-separated): fidelity, passkey, greedy.
    #[arg(long, value_delimiter = ',', default_values_t = [Task::Fidelity, Task::Passkey, Task::Greedy])]
    pub tasks: Vec<Task>,
    /// Policy families (comma-separated); each budget sets its parameters (see
    /// `docs/results.md`): dense, window, sink-window, h2o, tova, snapkv, random.
    #[arg(long, value_delimiter = ',', default_values_t = Family::ALL.map(|f| f.to_string()))]
    pub policies: Vec<String>,
    /// Budgets (comma-separated): a percentage of each task's sequence length (`25%`)
    /// or a token count (`256`).
    #[arg(long, value_delimiter = ',', default_values_t = ["12.5%".to_string(), "25%".to_string(), "50%".to_string()])]
    pub budgets: Vec<String>,
    /// Prefill widths (`T`, comma-separated) of the passkey and greedy tasks: a token
    /// count, or `auto` for one chunk per prompt (what `kvc run` picks for a budgeted
    /// policy). The first is also the fidelity task's (its prompt is one token).
    #[arg(long, value_delimiter = ',', default_values_t = ["64".to_string(), "auto".to_string()])]
    pub prefill_len: Vec<String>,
    /// Documents of the fidelity and greedy tasks (at most 4).
    #[arg(long, default_value_t = 4)]
    pub docs: usize,
    /// Tokens of each document the fidelity task scores.
    #[arg(long, default_value_t = 4096)]
    pub doc_tokens: u32,
    /// Passkey prompt lengths in tokens (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1024u32, 2048, 4096])]
    pub passkey_lengths: Vec<u32>,
    /// Depths of the passkey, percent of the filler before it (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [0u32, 25, 50, 75, 100])]
    pub passkey_depths: Vec<u32>,
    /// Prompt tokens (from each document) of the greedy-agreement task.
    #[arg(long, default_value_t = 1024)]
    pub greedy_prompt: u32,
    /// Tokens generated per row in the greedy-agreement task.
    #[arg(long, default_value_t = 64)]
    pub greedy_tokens: u32,
    /// Storage of the weight matrices: `native` (the file's blocks; the spec's default),
    /// `f32` or `f16`.
    #[arg(long, value_parser = DTypeSpec::parse)]
    pub weight_dtype: Option<DTypeSpec>,
    /// Storage of cached keys and values: `f32`, `f16` or `i8` (default: the spec's).
    #[arg(long, value_parser = KvStorage::parse)]
    pub kv_storage: Option<KvStorage>,
    /// Results file (JSON); an existing one is resumed: cells it holds are skipped.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Directory for SVG charts.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Write the Markdown report here (e.g. `docs/results.md`). Text that follows the
    /// line `<!-- written by hand below: kvc eval keeps it -->` in an existing report is
    /// kept.
    #[arg(long)]
    pub results_md: Option<PathBuf>,
    /// Fail unless the properties that must hold do (dense Δ = 0, a budget at least the
    /// sequence length gives dense results, sink-window beats window at the smallest
    /// budget, dense retrieves every passkey).
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

/// An evaluation task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Teacher-forced log-likelihood, KL and top-1 agreement against dense.
    Fidelity,
    /// Retrieval of a 5-digit key hidden in filler text.
    Passkey,
    /// Tokens until greedy decoding first differs from dense.
    Greedy,
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Task::Fidelity => "fidelity",
            Task::Passkey => "passkey",
            Task::Greedy => "greedy",
        })
    }
}

/// A policy family; [`Family::policy`] sets its parameters from a budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// The full cache (the reference).
    Dense,
    /// The newest `budget` tokens.
    Window,
    /// 4 sinks + the newest `budget − 4`.
    SinkWindow,
    /// Heavy hitters with half the budget kept for the newest tokens.
    H2o,
    /// TOVA.
    Tova,
    /// SnapKV with an observation window of min(32, budget / 2, T) and pooling 7.
    SnapKv,
    /// Seeded random eviction.
    Random,
}

impl Family {
    /// Every family, the reference first.
    pub const ALL: [Family; 7] = [
        Family::Dense,
        Family::Window,
        Family::SinkWindow,
        Family::H2o,
        Family::Tova,
        Family::SnapKv,
        Family::Random,
    ];

    fn parse(s: &str) -> Result<Family> {
        Family::ALL
            .into_iter()
            .find(|f| f.to_string() == s.trim().to_ascii_lowercase())
            .with_context(|| {
                format!(
                    "--policies: unknown policy family {s:?}; expected one of {}",
                    Family::ALL.map(|f| f.to_string()).join(", ")
                )
            })
    }

    /// The policy at `budget` tokens with prefill width `t`.
    pub fn policy(self, budget: u32, t: u32) -> KvPolicy {
        match self {
            Family::Dense => KvPolicy::Dense,
            Family::Window => KvPolicy::Window { size: budget },
            Family::SinkWindow => KvPolicy::SinkWindow {
                sinks: 4.min(budget / 2),
                window: budget - 4.min(budget / 2),
            },
            Family::H2o => KvPolicy::H2o {
                budget,
                recent: budget / 2,
            },
            Family::Tova => KvPolicy::Tova { budget },
            Family::SnapKv => KvPolicy::SnapKv {
                budget,
                window: 32.min(budget / 2).min(t).max(1),
                pool: 7,
            },
            Family::Random => KvPolicy::Random { budget, seed: 0 },
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Dense => "dense",
            Family::Window => "window",
            Family::SinkWindow => "sink-window",
            Family::H2o => "h2o",
            Family::Tova => "tova",
            Family::SnapKv => "snapkv",
            Family::Random => "random",
        })
    }
}

/// A budget: a share of the sequence or a token count.
#[derive(Clone, Debug, PartialEq)]
pub enum Budget {
    /// Percent of the task's sequence length.
    Percent(f64),
    /// Tokens.
    Tokens(u32),
}

impl Budget {
    fn parse(s: &str) -> Result<Budget> {
        let t = s.trim();
        let bad = || {
            format!("--budgets: expected a percentage such as 25% or a token count, found {s:?}")
        };
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().with_context(bad)?;
            if !(v > 0.0 && v <= 100.0) {
                bail!("--budgets: a percentage must be in (0, 100], found {s:?}");
            }
            Ok(Budget::Percent(v))
        } else {
            let v: u32 = t.parse().with_context(bad)?;
            if v < 2 {
                bail!("--budgets: a budget must keep at least 2 tokens, found {s:?}");
            }
            Ok(Budget::Tokens(v))
        }
    }

    /// Tokens kept for a sequence of `len` tokens (at least 2).
    pub fn tokens(&self, len: u32) -> u32 {
        match *self {
            Budget::Percent(p) => ((len as f64 * p / 100.0).round() as u32).max(2),
            Budget::Tokens(n) => n,
        }
    }

    /// The form given on the command line (`25%`, `256`).
    pub fn label(&self) -> String {
        match *self {
            Budget::Percent(p) => format!("{p}%"),
            Budget::Tokens(n) => n.to_string(),
        }
    }
}

/// A prefill width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// `T` tokens (at most the cache length).
    Fixed(u32),
    /// One chunk per prompt ([`one_chunk_prefill_len`]), as `kvc run` compiles budgeted
    /// policies.
    Auto,
}

impl Width {
    fn parse(s: &str) -> Result<Width> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(Width::Auto);
        }
        match t.parse::<u32>() {
            Ok(n) if n > 0 => Ok(Width::Fixed(n)),
            _ => {
                bail!("--prefill-len: expected `auto` or a width of at least 1 token, found {s:?}")
            }
        }
    }

    /// `64`, `auto`.
    pub fn label(self) -> String {
        match self {
            Width::Fixed(t) => t.to_string(),
            Width::Auto => "auto".into(),
        }
    }

    /// The width for prompts of at most `prompt` tokens in a cache of `cache_len`.
    pub fn resolve(self, prompt: usize, cache_len: u32) -> u32 {
        match self {
            Width::Fixed(t) => t.min(cache_len.max(1)),
            Width::Auto => one_chunk_prefill_len(prompt, cache_len),
        }
    }
}

/// The width label of a stored cell (`width`; files that lack it hold fixed widths).
pub fn width_label(stored: &str, prefill_len: u32) -> String {
    if stored.is_empty() {
        prefill_len.to_string()
    } else {
        stored.to_string()
    }
}

/// What identifies a stored cell of any task; flattened into each task's cell, so the
/// results file keeps these as top-level keys of the cell.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CellId {
    /// Policy family.
    pub policy: String,
    /// The compiled policy (`--kv` form).
    pub kv: String,
    /// Budget as given (`-` for dense).
    pub budget: String,
    /// Budget in tokens (`None` for dense).
    pub budget_tokens: Option<u32>,
    /// Prefill width as asked (`64`, `auto`; empty in files that predate it).
    #[serde(default)]
    pub width: String,
    /// Prefill width compiled.
    pub prefill_len: u32,
}

/// One cell of the grid: a policy family at a budget (none for dense) and a prefill width.
#[derive(Clone, Debug)]
pub struct Cell {
    /// The family.
    pub family: Family,
    /// The budget (`None` for dense).
    pub budget: Option<Budget>,
    /// Prefill width.
    pub width: Width,
}

impl Cell {
    /// The policy for a sequence of `len` tokens prefilled `t` wide.
    pub fn policy(&self, len: u32, t: u32) -> KvPolicy {
        match &self.budget {
            None => KvPolicy::Dense,
            Some(b) => self.family.policy(b.tokens(len), t),
        }
    }

    /// The identity of this cell for a sequence of `len` tokens prefilled `t` wide.
    pub fn id(&self, len: u32, t: u32) -> CellId {
        CellId {
            policy: self.family.to_string(),
            kv: self.policy(len, t).to_string(),
            budget: self.budget_label(),
            budget_tokens: self.budget.as_ref().map(|b| b.tokens(len)),
            width: self.width.label(),
            prefill_len: t,
        }
    }

    /// Whether a stored cell is this one for a sequence of `len` tokens.
    pub fn is(&self, stored: &CellId, len: u32) -> bool {
        stored.policy == self.family.to_string()
            && stored.budget == self.budget_label()
            && stored.budget_tokens == self.budget.as_ref().map(|b| b.tokens(len))
            && width_label(&stored.width, stored.prefill_len) == self.width.label()
    }

    /// The budget's label, `-` for dense.
    pub fn budget_label(&self) -> String {
        self.budget.as_ref().map_or("-".into(), Budget::label)
    }
}

/// What every cell of a results file shares: a file of other settings cannot be resumed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// Model name (spec).
    pub model: String,
    /// Weight storage (`native`, `f32`, `f16`).
    pub weight_dtype: String,
    /// KV storage.
    pub kv_storage: String,
    /// Documents: name and SHA-256 of each text.
    pub docs: Vec<(String, String)>,
    /// Tokens scored per document.
    pub doc_tokens: u32,
    /// Greedy task: prompt tokens and generated tokens.
    pub greedy: (u32, u32),
}

impl Setup {
    /// What differs from `file` (the settings a results file was made with), as
    /// `field: this run vs file`.
    fn differences(&self, file: &Setup) -> Vec<String> {
        let mut d = vec![];
        let mut cmp = |field: &str, a: String, b: String| {
            if a != b {
                d.push(format!("{field}: {a} here vs {b} in the file"));
            }
        };
        cmp("model", self.model.clone(), file.model.clone());
        cmp(
            "weights",
            self.weight_dtype.clone(),
            file.weight_dtype.clone(),
        );
        cmp(
            "KV storage",
            self.kv_storage.clone(),
            file.kv_storage.clone(),
        );
        let names = |s: &Setup| {
            s.docs
                .iter()
                .map(|x| x.0.clone())
                .collect::<Vec<_>>()
                .join(",")
        };
        cmp("documents", names(self), names(file));
        cmp(
            "document tokens",
            self.doc_tokens.to_string(),
            file.doc_tokens.to_string(),
        );
        cmp(
            "greedy prompt/tokens",
            format!("{:?}", self.greedy),
            format!("{:?}", file.greedy),
        );
        if d.is_empty() && self != file {
            d.push("document checksums".into());
        }
        d
    }
}

/// How and where one invocation ran.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunInfo {
    /// When it started (UTC, from `date`).
    pub started: String,
    /// Commit of the working directory (`git rev-parse`), or `unknown`.
    pub commit: String,
    /// CPU model name.
    pub cpu: String,
    /// SIMD flags of the CPU that the kernels use.
    pub cpu_flags: Vec<String>,
    /// Worker threads.
    pub threads: usize,
    /// Backend.
    pub backend: String,
    /// Cells computed by this invocation.
    pub cells: usize,
    /// Wall time of this invocation in seconds.
    pub seconds: f64,
}

/// Everything measured; the file `--json` writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Results {
    /// [`FORMAT`].
    pub format: u32,
    /// Settings shared by every cell.
    pub setup: Setup,
    /// The invocations that filled the file.
    pub runs: Vec<RunInfo>,
    /// Fidelity cells.
    pub fidelity: Vec<fidelity::FidelityCell>,
    /// Passkey cells.
    pub passkey: Vec<passkey::PasskeyCell>,
    /// Greedy-agreement cells.
    pub greedy: Vec<greedy::GreedyCell>,
}

impl Results {
    /// Writes the file whole (a temporary file renamed into place); numbers read back
    /// bit for bit (serde_json's `float_roundtrip`), so a resumed file keeps its values.
    fn save(&self, path: Option<&Path>) -> Result<()> {
        let Some(path) = path else { return Ok(()) };
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("--json {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("--json {}", path.display()))
    }
}

/// The loaded model and how to make sessions of other shapes and policies over it.
pub struct Harness {
    spec: ModelSpec,
    types: WeightTypes,
    base: Session,
    /// The tokenizer.
    pub tok: Tokenizer,
    /// KV storage of every cell (the spec's, or f32 where f16 does not run).
    kv_storage: KvStorage,
}

impl Harness {
    /// A session of `batch` rows, prefill width `t`, rows ending at `cache_len`, with
    /// `kv`, sharing the loaded weights.
    pub fn session(&self, batch: u32, t: u32, cache_len: u32, kv: KvPolicy) -> Result<Session> {
        let program = self.program(batch, t, cache_len, kv)?;
        Ok(self.base.with_program(program)?)
    }

    fn program(&self, batch: u32, t: u32, cache_len: u32, kv: KvPolicy) -> Result<Program> {
        let o = Overrides {
            batch: Some(batch),
            prefill_len: Some(t.min(cache_len)),
            cache_len: Some(cache_len),
            kv: Some(kv),
            kv_storage: Some(self.kv_storage),
            ..Overrides::default()
        };
        let spec = self
            .spec
            .clone()
            .with_overrides(&o, &self.spec.name)
            .with_context(|| format!("policy {kv}, batch {batch}, prefill width {t}"))?;
        kvc_compiler::compile_with(&spec, &self.types)
            .with_context(|| format!("compiling {kv}, batch {batch}, prefill width {t}"))
    }

    /// Token count of `text` (no special tokens).
    pub fn count(&self, text: &str) -> Result<usize> {
        Ok(self.tok.encode_prompt(text, false)?.len())
    }
}

/// Runs `kvc eval`.
pub fn eval(args: EvalArgs) -> Result<()> {
    let t0 = Instant::now();
    let families: Vec<Family> = args
        .policies
        .iter()
        .map(|s| Family::parse(s))
        .collect::<Result<_>>()?;
    let budgets: Vec<Budget> = args
        .budgets
        .iter()
        .map(|s| Budget::parse(s))
        .collect::<Result<_>>()?;
    let widths: Vec<Width> = args
        .prefill_len
        .iter()
        .map(|s| Width::parse(s))
        .collect::<Result<_>>()?;
    if widths.is_empty() {
        bail!("--prefill-len: expected at least one width");
    }
    if args.docs == 0 || args.docs > corpus::TEXTS.len() {
        bail!(
            "--docs: expected 1 to {} documents, found {}",
            corpus::TEXTS.len(),
            args.docs
        );
    }
    if args.doc_tokens < 2 || args.greedy_prompt == 0 || args.greedy_tokens == 0 {
        bail!("--doc-tokens must be at least 2, --greedy-prompt and --greedy-tokens at least 1");
    }
    if let Some(d) = args.passkey_depths.iter().find(|&&d| d > 100) {
        bail!("--passkey-depths: a depth is a percentage (0 to 100), found {d}");
    }
    // Outputs before the work: an evaluation runs for hours.
    if let Some(path) = &args.json {
        crate::output::check_file("--json", path)?;
    }
    if let Some(path) = &args.results_md {
        crate::output::check_file("--results-md", path)?;
        if path.exists() {
            kvc_compiler::files::check_regular(path, MAX_REPORT_BYTES)
                .with_context(|| format!("--results-md {}", path.display()))?;
        }
    }
    if let Some(dir) = &args.plot {
        crate::output::check_dir("--plot", dir)?;
    }

    let spec = ModelSpec::load(&args.model)?.with_overrides(
        &Overrides {
            weight_dtype: args.weight_dtype,
            ..Overrides::default()
        },
        &args.model.display().to_string(),
    )?;
    // The smallest program of the model carries the weights every cell shares.
    let mut o = Overrides {
        batch: Some(1),
        prefill_len: Some(1),
        cache_len: Some(1),
        kv: Some(KvPolicy::Dense),
        kv_storage: args.kv_storage,
        ..Overrides::default()
    };
    crate::pipeline::store_kv_where_it_runs(&spec, &mut o, args.exec.backend);
    let kv_storage = o.kv_storage.unwrap_or(spec.compile.kv_storage);
    let texts = &corpus::TEXTS[..args.docs];
    let setup = Setup {
        model: spec.name.clone(),
        weight_dtype: format!("{:?}", spec.compile.weight_dtype).to_lowercase(),
        kv_storage: kv_storage.name().to_string(),
        docs: texts
            .iter()
            .map(|t| (t.name.to_string(), t.sha256.to_string()))
            .collect(),
        doc_tokens: args.doc_tokens,
        greedy: (args.greedy_prompt, args.greedy_tokens),
    };
    let mut results = match args.json.as_deref().filter(|p| p.exists()) {
        Some(path) => {
            let text = kvc_compiler::files::read_string_bounded(path, MAX_RESULTS_BYTES)
                .with_context(|| format!("--json {}", path.display()))?;
            let r: Results = serde_json::from_str(&text).with_context(|| {
                format!("--json {}: not a kvc eval results file", path.display())
            })?;
            if r.format != FORMAT {
                bail!(
                    "--json {}: results format {}, this kvc writes {FORMAT}; choose another \
                     file to start afresh",
                    path.display(),
                    r.format
                );
            }
            let differ = setup.differences(&r.setup);
            if !differ.is_empty() {
                bail!(
                    "--json {} holds results of other settings ({}); choose another file to \
                     start afresh",
                    path.display(),
                    differ.join(", ")
                );
            }
            eprintln!(
                "resuming {}: {} fidelity, {} passkey and {} greedy cells done",
                path.display(),
                r.fidelity.len(),
                r.passkey.len(),
                r.greedy.len()
            );
            r
        }
        None => Results {
            format: FORMAT,
            setup,
            runs: vec![],
            fidelity: vec![],
            passkey: vec![],
            greedy: vec![],
        },
    };

    // Every size against the model's positions, before a prompt is built.
    let positions = spec.arch.dims().max_position_embeddings;
    let runs = |t: Task| args.tasks.contains(&t);
    if runs(Task::Passkey)
        && let Some(&l) = args
            .passkey_lengths
            .iter()
            .find(|&&l| l.saturating_add(passkey::MAX_ANSWER_TOKENS) > positions)
    {
        bail!(
            "--passkey-lengths: {l} tokens and the answer ({} more) do not fit {}'s {positions} \
             positions (max_position_embeddings)",
            passkey::MAX_ANSWER_TOKENS,
            spec.name
        );
    }
    if runs(Task::Fidelity) && args.doc_tokens > positions {
        bail!(
            "--doc-tokens: {} tokens do not fit {}'s {positions} positions \
             (max_position_embeddings)",
            args.doc_tokens,
            spec.name
        );
    }
    if runs(Task::Greedy) && args.greedy_prompt.saturating_add(args.greedy_tokens) > positions {
        bail!(
            "--greedy-prompt {} plus --greedy-tokens {} do not fit {}'s {positions} positions \
             (max_position_embeddings)",
            args.greedy_prompt,
            args.greedy_tokens,
            spec.name
        );
    }
    let small = kvc_runtime::model::compile_spec_file(
        &args.model,
        Overrides {
            weight_dtype: args.weight_dtype,
            ..o
        },
        args.exec.backend,
        |_, _| {},
        &mut crate::pipeline::progress(),
    )?;
    let types = small.types;
    let loaded = LoadedModel::load_with(
        small.program,
        &small.base,
        args.exec.backend,
        args.exec.options(),
        &mut crate::pipeline::progress(),
    )?;
    let tok = loaded
        .tokenizer
        .context("this model has no tokenizer (random weights): kvc eval needs one")?;
    let h = Harness {
        spec: spec.clone(),
        types,
        base: loaded.session,
        tok,
        kv_storage,
    };

    if runs(Task::Passkey) {
        passkey::check_lengths(&h, &args.passkey_lengths, &args.passkey_depths)?;
    }

    let mut run = RunInfo {
        started: now(),
        commit: crate::machine::commit(Some(12)),
        cpu: crate::machine::cpu_model().unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        cpu_flags: cpu_flags(),
        threads: rayon_threads(),
        backend: format!("{:?}", args.exec.backend).to_lowercase(),
        cells: 0,
        seconds: 0.0,
    };
    let cells = |widths: &[Width]| -> Vec<Cell> {
        let mut v = vec![];
        for &t in widths {
            for &f in &families {
                if f == Family::Dense {
                    v.push(Cell {
                        family: f,
                        budget: None,
                        width: t,
                    });
                } else {
                    for b in &budgets {
                        v.push(Cell {
                            family: f,
                            budget: Some(b.clone()),
                            width: t,
                        });
                    }
                }
            }
        }
        v
    };
    let json = args.json.as_deref();
    for task in &args.tasks {
        match task {
            Task::Fidelity => {
                let docs: Vec<Vec<u32>> = texts
                    .iter()
                    .zip(corpus::read(texts)?)
                    .map(|(t, text)| {
                        let ids = h.tok.encode_prompt(&text, false)?;
                        if ids.len() < args.doc_tokens as usize {
                            bail!(
                                "text {} has {} tokens, fewer than --doc-tokens {}",
                                t.name,
                                ids.len(),
                                args.doc_tokens
                            );
                        }
                        Ok(ids[..args.doc_tokens as usize].to_vec())
                    })
                    .collect::<Result<_>>()?;
                let todo = cells(&widths[..1]);
                let names: Vec<&str> = texts.iter().map(|t| t.name).collect();
                run.cells += fidelity::run(&h, &names, &docs, &todo, &mut results, &mut |r| {
                    r.save(json)
                })?;
            }
            Task::Passkey => {
                let todo = cells(&widths);
                run.cells += passkey::run(
                    &h,
                    &args.passkey_lengths,
                    &args.passkey_depths,
                    &todo,
                    &mut results,
                    &mut |r| r.save(json),
                )?;
            }
            Task::Greedy => {
                let prompts: Vec<Vec<u32>> = corpus::read(texts)?
                    .iter()
                    .map(|text| {
                        let ids = h.tok.encode_prompt(text, false)?;
                        let n = (args.greedy_prompt as usize).min(ids.len());
                        Ok(ids[..n].to_vec())
                    })
                    .collect::<Result<_>>()?;
                let todo = cells(&widths);
                run.cells += greedy::run(
                    &h,
                    &prompts,
                    args.greedy_tokens,
                    &todo,
                    &mut results,
                    &mut |r| r.save(json),
                )?;
            }
        }
    }
    run.seconds = t0.elapsed().as_secs_f64();
    let computed = run.cells;
    // A rerun that found every cell done adds nothing to the record.
    if computed > 0 {
        results.runs.push(run);
    }
    results.save(json)?;
    eprintln!(
        "eval: {computed} cells computed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if let Some(dir) = &args.plot {
        for (name, svg) in report::charts(&results) {
            let path = dir.join(name);
            std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    let md = report::markdown(&results, args.plot.as_deref(), args.results_md.as_deref());
    match &args.results_md {
        Some(path) => {
            let old = if path.exists() {
                Some(read_report(path)?)
            } else {
                None
            };
            let md = report::keep_hand_written(md, old.as_deref());
            std::fs::write(path, &md).with_context(|| format!("--results-md {}", path.display()))?
        }
        None => crate::emit(format_args!("{md}"))?,
    }
    if args.check {
        let failed = report::check(&results);
        if !failed.is_empty() {
            bail!(
                "{} propert{} failed: {}",
                failed.len(),
                if failed.len() == 1 { "y" } else { "ies" },
                failed.join("; ")
            );
        }
        eprintln!("eval --check: every property holds");
    }
    Ok(())
}

/// Largest `--json` results file read back (a full grid is a few MiB).
const MAX_RESULTS_BYTES: u64 = 256 << 20;

/// Largest `--results-md` report read back for its hand-written part.
const MAX_REPORT_BYTES: u64 = 16 << 20;

/// An existing `--results-md` report, whose hand-written part a rewrite keeps.
fn read_report(path: &Path) -> Result<String> {
    kvc_compiler::files::read_string_bounded(path, MAX_REPORT_BYTES)
        .with_context(|| format!("--results-md {}", path.display()))
}

/// Progress over `total` units of one task: a bar on a terminal, a line per finished cell
/// otherwise.
pub fn bar(total: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Reports a finished cell: above the bar on a terminal, as a line elsewhere.
pub fn finished(pb: &indicatif::ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

fn now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map_or_else(|| "unknown".into(), |s| s.trim().to_string())
}

fn cpu_flags() -> Vec<String> {
    let wanted = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
    ];
    let flags = crate::machine::cpuinfo_field("flags").unwrap_or_default();
    let have: Vec<&str> = flags.split_whitespace().collect();
    wanted
        .iter()
        .filter(|w| have.contains(w))
        .map(|w| w.to_string())
        .collect()
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Log-sum-exp of `logits` in f64, computed stably (shifted by the maximum).
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + logits
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// Log-probabilities of `logits` (f64, computed stably).
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&x| x as f64 - lse).collect()
}

/// Index of the largest value (the first on ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Mean (0 for no values) and half-width of the 95% interval (Student's t; `None` for
/// fewer than two values) of `xs`.
pub fn mean_ci95(xs: &[f64]) -> (f64, Option<f64>) {
    let n = xs.len();
    if n == 0 {
        return (0.0, None);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, None);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // Two-sided 97.5% quantiles of Student's t for 1..=10 degrees of freedom, then ≈ 2.
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    let t = T.get(n - 2).copied().unwrap_or(2.0);
    (mean, Some(t * (var / n as f64).sqrt()))
}
