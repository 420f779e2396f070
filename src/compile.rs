//! `kvc compile` (a spec to an artifact directory) and `kvc inspect` (an artifact's graphs
//! in text form).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kvc_compiler::ir::Program;
use kvc_compiler::{MemoryPlan, artifact};
use kvc_runtime::Backend;

use crate::args::{ExecArgs, ShapeArgs};
use crate::emit;
use crate::pipeline::compile_file;

pub(crate) fn compile(model: &Path, output: Option<PathBuf>, shapes: ShapeArgs) -> Result<()> {
    // The artifact runs wherever it is loaded: compiled as for the CPU.
    let program = compile_file(model, shapes.overrides(), Backend::Flex, |_, _| {})?.program;
    let dir = output.unwrap_or_else(|| PathBuf::from("out").join(&program.spec.name));
    artifact::write(&program, &dir)?;
    emit(format_args!("{}\n", program.signature(&program.prefill)))?;
    emit(format_args!("{}\n", program.signature(&program.decode)))?;
    emit(format_args!("{}\n", MemoryPlan::of(&program)))?;
    emit(format_args!("wrote {}\n", dir.display()))?;
    Ok(())
}

/// Reads an artifact directory, trusting nothing in it (see `kvc_compiler::artifact`).
pub(crate) fn read_artifact(dir: &Path) -> Result<Program> {
    artifact::read(dir).with_context(|| format!("artifact {}", dir.display()))
}

pub(crate) fn inspect(dir: &Path) -> Result<()> {
    let p = read_artifact(dir)?;
    emit(format_args!("{p}\n{}\n", MemoryPlan::of(&p)))
}

/// `kvc inspect --plan`: the execution plans of a spec (compiled with its own shapes) or an
/// artifact, as the chosen backend and kernel set build them.
pub(crate) fn inspect_plan(model: &Path, exec: ExecArgs) -> Result<()> {
    let m = crate::pipeline::load(model, ShapeArgs::default(), 1, exec)?;
    emit(format_args!("{}", m.session.plan_text()))
}
