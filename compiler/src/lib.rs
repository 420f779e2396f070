//! kvc's compiler: a model spec becomes a verified [`ir::Program`] with two fixed-shape
//! graphs, a padded prefill `[B, T]` and a one-token decode `[B, 1]`.
//!
//! Pipeline: [`spec`] → [`lower`] → [`verify`] → [`passes`] (verified after each) →
//! artifact. This crate has no tensor library dependency; the runtime executes the result.

pub mod artifact;
pub mod blocks;
pub mod family;
pub mod files;
pub mod fuzzing;
pub mod ir;
pub mod kv;
pub mod lower;
pub mod memory;
pub mod passes;
pub mod spec;
pub mod verify;

use std::path::Path;

pub use memory::MemoryPlan;
pub use spec::{ModelSpec, Overrides, SpecError};

/// Anything that can stop a compilation.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The spec did not parse or validate.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// Lowering built an ill-typed node (a compiler bug or an unsupported configuration).
    #[error("lowering failed: {0}")]
    Build(#[from] ir::BuildError),
    /// The verifier rejected the program.
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
}

/// Lowers, verifies and optimizes a validated spec. With `weight_dtype: Native` every
/// weight matrix is f32 (no file was read); see [`compile_with`].
pub fn compile(spec: &ModelSpec) -> Result<ir::Program, CompileError> {
    compile_with(spec, &lower::WeightTypes::new())
}

/// Like [`compile`], given the storage type the weights file has for each parameter (by
/// checkpoint name): with `weight_dtype: Native` each weight matrix takes its file type.
pub fn compile_with(
    spec: &ModelSpec,
    types: &lower::WeightTypes,
) -> Result<ir::Program, CompileError> {
    let mut program = lower::lower(spec, types)?;
    verify::verify(&program, "after lowering")?;
    passes::run_pipeline(&mut program)?;
    Ok(program)
}

/// Reads a spec file, applies overrides and compiles it.
pub fn compile_file(path: &Path, overrides: &Overrides) -> Result<ir::Program, CompileError> {
    let spec = ModelSpec::load(path)?.with_overrides(overrides, &path.display().to_string())?;
    compile(&spec)
}
