//! `kvc run`: generate from prompts (plain or chat), streamed or as JSON.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use kvc_runtime::exec::session::{Request, Sampling};
use kvc_runtime::load::tokenizer::{ChatMessage, Role};

use crate::args::{ExecArgs, SamplingArgs, ShapeArgs};
use crate::emit;
use crate::pipeline::{load, program_for};

/// Largest prompt file read (bytes): far more text than any context holds.
const MAX_PROMPT_FILE: u64 = 64 << 20;

/// The text of a prompt file, or of standard input for `-`, as UTF-8.
pub(crate) fn read_prompt(path: &Path) -> Result<String> {
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

#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
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
