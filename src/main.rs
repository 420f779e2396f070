//! `kvc`: compile a model spec into fixed-shape prefill/decode graphs, inspect them, and
//! run or score prompts with the runtime.

mod args;
mod bench;
mod compile;
mod eval;
mod machine;
mod output;
mod pipeline;
mod run;
mod score;
mod serve;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use kvc_compiler::spec::{DTypeSpec, KvPolicy, KvStorage};

use crate::args::{ExecArgs, SamplingArgs, ShapeArgs, parse_schedule, parse_size};

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
        /// Directory written by `kvc compile` (or, with `--plan`, a model spec).
        dir: PathBuf,
        /// Print the execution plans instead of the graphs: each step's kernel, the
        /// arguments it moves, and how state updates return (loads the weights).
        #[arg(long)]
        plan: bool,
        #[command(flatten)]
        exec: ExecArgs,
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
        /// Also time a refill of row 0 with a prompt of this many tokens (at most the
        /// context) after the decode steps, best of 3: what a serving slot's refill costs
        /// at this batch size and prefill width.
        #[arg(long)]
        refill: Option<u32>,
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
        /// Prefill every prompt whole, even when a free row's cache holds its beginning
        /// (by default such a prompt goes to that row and prefills only the rest; dense
        /// caches only). For measuring what reuse gains.
        #[arg(long)]
        no_prompt_reuse: bool,
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
        } => compile::compile(&model, output, shapes),
        Command::Inspect { dir, plan, exec } => match plan {
            true => compile::inspect_plan(&dir, exec),
            false => compile::inspect(&dir),
        },
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
                prompts.push(run::read_prompt(path)?);
            }
            run::run(
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
            no_prompt_reuse,
            limits,
            shapes,
            exec,
        } => {
            let admission = (schedule, !no_prompt_reuse);
            let engine = pipeline::load_engine(&model, shapes, queue, admission, exec)?;
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
        } => score::score(&model, &text, special, top_k, shapes, exec),
        Command::Bench {
            model,
            batch,
            context,
            kv,
            steps,
            prefill_len,
            refill,
            weight_dtype,
            kv_storage,
            json,
            one,
            exec,
        } => {
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            if let Some(l) = refill {
                let shortest = context.iter().copied().min().unwrap_or(0);
                if l == 0 || l > shortest {
                    bail!(
                        "--refill {l}: a refill prompt needs 1 to {shortest} tokens (the shortest --context)"
                    );
                }
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
                    refill,
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
                                refill,
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
