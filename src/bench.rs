//! `kvc bench`: prefill and decode throughput, decode step-time distribution, peak RSS and
//! warm-up cost, one configuration per child process so each peak RSS is its own.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kvc_compiler::spec::{DTypeSpec, KvPolicy, KvStorage};
use kvc_compiler::{MemoryPlan, Overrides};
use kvc_runtime::Backend;
use kvc_runtime::exec::session::{Refill, Request, Sampling, SessionOptions};
use kvc_runtime::model::LoadedModel;
use serde::{Deserialize, Serialize};

/// One measured configuration.
#[derive(Serialize, Deserialize)]
pub struct BenchResult {
    /// Rows per batch.
    pub batch: u32,
    /// Prompt tokens per row.
    pub context: u32,
    /// Prefill width the graphs were compiled for.
    pub prefill_len: u32,
    /// KV policy.
    pub kv: String,
    /// Storage dtype of the weight matrices.
    pub weights: String,
    /// Storage of cached keys and values.
    #[serde(default)]
    pub kv_storage: String,
    /// Backend and kernel set (e.g. `flex/cpu`; `+capture` where the decode step is
    /// recorded once and replayed).
    #[serde(default)]
    pub kernels: String,
    /// Decode steps timed.
    pub steps: usize,
    /// Prompt tokens per second over the whole batch (all chunks).
    pub prefill_tok_s: f64,
    /// Decode tokens per second of one row.
    pub decode_tok_s_row: f64,
    /// Tokens of the timed refill of row 0 (`--refill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill_tokens: Option<u32>,
    /// Milliseconds of that refill, best of 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill_ms: Option<f64>,
    /// Decode tokens per second over all rows.
    pub decode_tok_s_aggregate: f64,
    /// Decode step times in milliseconds.
    pub step_ms: Percentiles,
    /// p99 / p50 of the step time.
    pub p99_over_p50: f64,
    /// Resident pages of the executable and its shared libraries at the end (bytes): the
    /// part of `peak_rss` that is program code, which no model plan covers.
    #[serde(default)]
    pub rss_code: u64,
    /// Resident set size after the first 10% of the decode steps (bytes).
    pub rss_early: u64,
    /// Resident set size at the end (after the decode steps and any `--refill`).
    pub rss_end: u64,
    /// Peak resident set size of the process (bytes).
    pub peak_rss: u64,
    /// The compiler's memory plan for this configuration.
    pub plan: MemoryPlan,
    /// Seconds to compile the program.
    pub compile_s: f64,
    /// Seconds to load and bind the weights.
    pub load_s: f64,
}

/// Step-time percentiles.
#[derive(Serialize, Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest step.
    pub max: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// `VmRSS` and `VmHWM` of this process in bytes (Linux); zeros elsewhere.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resident bytes of the mappings of the executable and of shared libraries (from
/// `/proc/self/smaps`; 0 where it cannot be read).
fn code_rss() -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let exe = std::env::current_exe().unwrap_or_default();
    let exe = exe.to_string_lossy();
    let mut code = false;
    let mut total = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: address range, permissions, offset, device, inode, path.
            let path = fields.nth(4).unwrap_or_default();
            code = !path.is_empty() && (path == exe || path.contains(".so"));
        } else if code && first == "Rss:" {
            total += fields
                .next()
                .and_then(|kb| kb.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024;
        }
    }
    total
}

/// One configuration to measure.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// Rows.
    pub batch: u32,
    /// Prompt tokens per row.
    pub context: u32,
    /// KV policy.
    pub kv: KvPolicy,
    /// Decode steps timed.
    pub steps: usize,
    /// Prefill width; default min(context, 512).
    pub prefill_len: Option<u32>,
    /// Tokens of a refill of row 0 to time after the decode steps.
    pub refill: Option<u32>,
    /// Weight storage override.
    pub weight_dtype: Option<DTypeSpec>,
    /// KV storage override.
    pub kv_storage: Option<KvStorage>,
    /// Backend.
    pub backend: Backend,
    /// Kernel set and capture.
    pub options: SessionOptions,
}

/// Measures one configuration in this process.
pub fn bench_one(model: &Path, cfg: &Config) -> Result<BenchResult> {
    let Config {
        batch,
        context,
        kv,
        steps,
        prefill_len,
        refill,
        weight_dtype,
        kv_storage,
        backend,
        options,
    } = *cfg;
    let t0 = Instant::now();
    let width = prefill_len.unwrap_or(512);
    let o = Overrides {
        batch: Some(batch),
        prefill_len: Some(width.min(context)),
        cache_len: Some(context + steps as u32 + 1),
        weight_dtype,
        kv_storage,
        kv: Some(kv),
        ..Overrides::default()
    };
    // Rows must not stop early: a benchmark decodes exactly `steps` tokens per row.
    let c = crate::pipeline::compile_file(model, o, backend, |spec, _| spec.stop_tokens.clear())?;
    let (program, base) = (c.program, c.base);
    // What the session will hold (interleaved weights at their size where it keeps them).
    let plan = kvc_runtime::exec::session::resident_plan(&program, &options);
    let compile_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    // Token ids in, token ids out: the tokenizer's tables are not part of what is measured.
    let mut m = LoadedModel::load_without_tokenizer(program, &base, backend, options, &mut |_| {})?;
    let load_s = t1.elapsed().as_secs_f64();
    let vocab = m.session.program().config.vocab_size;
    // A deterministic prompt per row (token ids spread over the vocabulary).
    let reqs: Vec<Request> = (0..batch)
        .map(|r| Request {
            prompt: (0..context)
                .map(|i| (i * 7919 + r * 104_729 + 13) % vocab)
                .collect(),
            max_new_tokens: steps + 1,
            sampling: Sampling::default(),
        })
        .collect();
    // The first prefill touches every weight page of the mapped file for the first time;
    // it is run once untimed (what a warm server sees, and what the llama.cpp side of
    // bench/compare_llamacpp.sh measures with its best of two).
    m.session.prefill(&reqs, false)?;
    m.session.reset();
    m.session.report_profile("untimed first prefill");
    let t2 = Instant::now();
    m.session.prefill(&reqs, false)?;
    let prefill_s = t2.elapsed().as_secs_f64();
    m.session.report_profile("timed prefill");
    let mut times = Vec::with_capacity(steps);
    let mut rss_early = 0;
    for i in 0..steps {
        let t = Instant::now();
        let out = m.session.step()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if out.done.iter().any(|&d| d) && i + 1 < steps {
            bail!("a row finished after {} of {steps} steps", i + 1);
        }
        if i == steps / 10 {
            rss_early = rss().0;
        }
    }
    m.session.report_profile("decode steps");
    // A serving slot's refill: row 0 gets a new prompt while the other rows keep theirs
    // (every row has finished here; the kernels skip the rows not refilled, unless
    // --compute-padding).
    let refill_ms = match refill {
        None => None,
        Some(l) => {
            let request = Request {
                prompt: (0..l).map(|i| (i * 7919 + 31) % vocab).collect(),
                max_new_tokens: 1,
                sampling: Sampling::default(),
            };
            let mut best = f64::INFINITY;
            for seed in 0..3 {
                let t = Instant::now();
                m.session.refill(&[Refill {
                    row: 0,
                    request: &request,
                    seed,
                }])?;
                best = best.min(t.elapsed().as_secs_f64() * 1e3);
            }
            m.session.report_profile("3 refills");
            Some(best)
        }
    };
    let total_s: f64 = times.iter().sum::<f64>() / 1e3;
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let step_ms = Percentiles {
        p50: percentile(&sorted, 0.5),
        p90: percentile(&sorted, 0.9),
        p99: percentile(&sorted, 0.99),
        max: *sorted.last().context("no steps")?,
    };
    let (rss_end, peak_rss) = rss();
    Ok(BenchResult {
        batch,
        context,
        prefill_len: width.min(context),
        kv: m.session.program().config.kv.to_string(),
        weights: m.session.program().config.weight_dtype.to_string(),
        kv_storage: m.session.program().config.kv_storage.name().to_string(),
        kernels: format!(
            "{}/{}{}",
            backend.name(),
            options.kernels.name(),
            if options.capture { "+capture" } else { "" }
        ),
        steps,
        prefill_tok_s: (batch * context) as f64 / prefill_s,
        decode_tok_s_row: steps as f64 / total_s,
        refill_tokens: refill,
        refill_ms,
        decode_tok_s_aggregate: (steps * batch as usize) as f64 / total_s,
        p99_over_p50: step_ms.p99 / step_ms.p50,
        step_ms,
        rss_code: code_rss(),
        rss_early,
        rss_end,
        peak_rss,
        plan,
        compile_s,
        load_s,
    })
}

/// Runs every configuration in its own child process and prints a table.
pub fn bench_all(model: &Path, configs: &[Config], json: Option<&Path>) -> Result<()> {
    if let Some(path) = json {
        crate::output::check_file("--json", path)?;
    }
    let exe = std::env::current_exe()?;
    let mut results = Vec::new();
    println!(
        "{:>5} {:>7} {:>16} {:>11} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>9}",
        "batch",
        "context",
        "kv",
        "prefill/s",
        "dec/s row",
        "dec/s all",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "p99/50",
        "peak MiB",
        "plan MiB"
    );
    let steps = configs.first().map_or(0, |c| c.steps);
    for cfg in configs {
        {
            let (b, c) = (cfg.batch, cfg.context);
            let mut cmd = Command::new(&exe);
            cmd.args(["bench", "--one"]).arg(model);
            cmd.args([
                "--batch",
                &b.to_string(),
                "--context",
                &c.to_string(),
                "--kv",
                &cfg.kv.to_string(),
                "--steps",
                &cfg.steps.to_string(),
            ]);
            if let Some(t) = cfg.prefill_len {
                cmd.args(["--prefill-len", &t.to_string()]);
            }
            if let Some(l) = cfg.refill {
                cmd.args(["--refill", &l.to_string()]);
            }
            if let Some(d) = cfg.weight_dtype {
                cmd.args(["--weight-dtype", &d.to_string()]);
            }
            if let Some(s) = cfg.kv_storage {
                cmd.args(["--kv-storage", s.name()]);
            }
            if let Some(m) = cfg.options.max_memory {
                cmd.args(["--max-memory", &m.to_string()]);
            }
            if !cfg.options.skip_padding {
                cmd.arg("--compute-padding");
            }
            cmd.args([
                "--backend",
                cfg.backend.name(),
                "--kernels",
                cfg.options.kernels.name(),
                "--capture",
                if cfg.options.capture { "on" } else { "off" },
            ]);
            let out = cmd.output().context("starting a benchmark child process")?;
            if !out.status.success() {
                // The child's own error line, without its `error: ` (this one adds it).
                let stderr = String::from_utf8_lossy(&out.stderr);
                let why = stderr
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("error: "))
                    .unwrap_or(stderr.trim());
                bail!("batch {b} context {c} kv {}: {why}", cfg.kv);
            }
            let r: BenchResult =
                serde_json::from_slice(&out.stdout).context("reading a child's result")?;
            println!(
                "{:>5} {:>7} {:>16} {:>11.1} {:>10.1} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7.3} {:>9.0} {:>9.0}",
                r.batch,
                r.context,
                r.kv,
                r.prefill_tok_s,
                r.decode_tok_s_row,
                r.decode_tok_s_aggregate,
                r.step_ms.p50,
                r.step_ms.p90,
                r.step_ms.p99,
                r.step_ms.max,
                r.p99_over_p50,
                r.peak_rss as f64 / 1048576.0,
                r.plan.total() as f64 / 1048576.0
            );
            if let (Some(l), Some(ms)) = (r.refill_tokens, r.refill_ms) {
                let how = match cfg.options.skip_padding {
                    true => "padding skipped",
                    false => "padding computed",
                };
                println!(
                    "{:>13} refill of row 0 with {l} tokens: {ms:.1} ms ({how})",
                    ""
                );
            }
            results.push(r);
        }
    }
    if let Some(path) = json {
        let doc = serde_json::json!({
            "model": model.display().to_string(),
            "machine": machine(),
            "commit": crate::machine::commit(None),
            "steps": steps,
            "results": results,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("--json {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// CPU model and core count, for the record.
fn machine() -> serde_json::Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = crate::machine::cpu_model().unwrap_or_else(|| "unknown".into());
    serde_json::json!({ "cpu": cpu, "threads": cores })
}
