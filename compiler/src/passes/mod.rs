//! Graph passes, run in [`PIPELINE`] order, each followed by the verifier.
//! A pass may assume a valid program and must leave one.

mod cse;
mod dce;
mod share_probs;

use crate::ir::Program;
use crate::verify::{VerifyError, verify};

/// A named program-to-program rewrite.
pub struct Pass {
    /// Name shown in errors and `--print-after`-style tooling.
    pub name: &'static str,
    /// Rewrites one graph in place.
    pub run: fn(&mut crate::ir::Graph),
}

/// The ordered pass pipeline.
pub const PIPELINE: &[Pass] = &[
    Pass {
        name: "cse",
        run: cse::run,
    },
    Pass {
        name: "share_attention_probs",
        run: share_probs::run,
    },
    Pass {
        name: "dce",
        run: dce::run,
    },
];

/// Runs every pass on both graphs, verifying the program after each.
pub fn run_pipeline(p: &mut Program) -> Result<(), VerifyError> {
    for pass in PIPELINE {
        (pass.run)(&mut p.prefill);
        (pass.run)(&mut p.decode);
        verify(p, &format!("after pass {}", pass.name))?;
    }
    Ok(())
}
