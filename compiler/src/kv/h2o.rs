//! `H2o(budget, recent)`: Heavy-Hitter Oracle (Zhang et al. 2023, "H2O: Heavy-Hitter
//! Oracle for Efficient Generative Inference of Large Language Models").
//!
//! Rule: each slot's score is the attention it has received, summed over every query
//! since the token entered (prefill: all real prompt queries of the chunk, causal; decode:
//! each step's query), averaged over the query heads of its KV group. The `recent` newest
//! tokens of the row are protected; among the others the lowest score is evicted. Scores
//! start after prefill as the column sums of the prompt's attention.
//!
//! With `normalise`, the priority is instead the score per query that has seen the token
//! (`score / (pos_after − pos)`): the sum favours old tokens, seen by more queries, and
//! with few protected tokens that bias evicts what was just read. SnapKV's decode uses it
//! (32 protected tokens); H2O keeps the paper's sum, which `kvc eval` measured slightly
//! better with half the budget protected (`docs/kv-policies.md`).
//! State: the slot table and `score.l` `[B, Hkv, N]` F32. Cost per decode step: the
//! attention's probabilities `[B, Hq, 1, N]` are kept (the pass `share_attention_probs`
//! splits the attention into `attention_probs` + `attention_values`) and summed per KV
//! group (`attention_mass`), plus the selection; `q·kᵀ` and the softmax run once.

use super::slots::{Queries, Rule, View};
use crate::ir::{BinaryOp, BuildError, DType, GraphBuilder, Scalar, ValueId};

/// Heavy hitters plus recent tokens.
pub(super) struct H2o {
    /// Newest tokens never evicted.
    pub recent: u32,
    /// Rank by the mean attention per query that saw the token, not the sum.
    pub normalise: bool,
}

impl Rule for H2o {
    fn score(
        &self,
        g: &mut GraphBuilder<'_>,
        view: &View<'_>,
    ) -> Result<Option<ValueId>, BuildError> {
        let mass = view.mass(g, Queries::All)?;
        let old = view.old_score(g)?;
        Ok(Some(g.binary(BinaryOp::Add, old, mass)?))
    }

    fn priority(
        &self,
        g: &mut GraphBuilder<'_>,
        view: &View<'_>,
        score: Option<ValueId>,
    ) -> Result<ValueId, BuildError> {
        let score = score.expect("H2O keeps a score");
        if !self.normalise {
            return view.protect_newest(g, self.recent, score);
        }
        // Queries that have seen each live slot's token: its own and every later one.
        let b = view.layer.c.batch;
        let end = g.reshape(view.chunk.pos_after, &[b, 1, 1])?;
        let seen = g.binary(BinaryOp::Sub, end, view.pos)?;
        let one = g.constant(Scalar::I32(1), &[1, 1, 1])?;
        let seen = g.binary(BinaryOp::Max, seen, one)?;
        let seen = g.cast(seen, DType::F32)?;
        let mean = g.binary(BinaryOp::Div, score, seen)?;
        view.protect_newest(g, self.recent, mean)
    }
}
