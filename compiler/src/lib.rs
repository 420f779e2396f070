//! kvc's compiler: a model spec becomes a verified [`ir::Program`] with two fixed-shape
//! graphs, a padded prefill `[B, T]` and a one-token decode `[B, 1]`.
//!
//! Pipeline: [`spec`] → [`lower`] → [`verify`] → [`passes`] (verified after each) →
//! artifact. This crate has no tensor library dependency; the runtime executes the result.

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

/// Lowers, verifies and optimizes a validated spec.
pub fn compile(spec: &ModelSpec) -> Result<ir::Program, CompileError> {
    let mut program = lower::lower(spec)?;
    verify::verify(&program, "after lowering")?;
    passes::run_pipeline(&mut program)?;
    Ok(program)
}

/// Reads a spec file, applies overrides and compiles it.
pub fn compile_file(path: &Path, overrides: &Overrides) -> Result<ir::Program, CompileError> {
    let spec = ModelSpec::load(path)?.with_overrides(overrides, &path.display().to_string())?;
    compile(&spec)
}
