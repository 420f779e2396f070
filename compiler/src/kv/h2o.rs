//! `H2o(budget, recent)`: Heavy-Hitter Oracle (Zhang et al. 2023, "H2O: Heavy-Hitter
//! Oracle for Efficient Generative Inference of Large Language Models").
//!
//! Rule: each slot's score is the attention it has received, summed over every query
//! since the token entered (prefill: all real prompt queries of the chunk, causal; decode:
//! each step's query), averaged over the query heads of its KV group. The `recent` newest
//! tokens of the row are protected; among the others the lowest score is evicted.
//! Scores start after prefill as the column sums of the prompt's attention.
//! State: the slot table and `score.l` `[B, Hkv, N]` F32. Cost per decode step: the
//! attention's probabilities `[B, Hq, 1, N]` are kept (the pass `share_attention_probs`
//! splits the attention into `attention_probs` + `attention_values`) and summed per KV
//! group (`attention_mass`), plus the selection; `q·kᵀ` and the softmax run once.

use super::slots::{Queries, Rule, View};
use crate::ir::{BinaryOp, BuildError, GraphBuilder, ValueId};

/// Heavy hitters plus recent tokens.
pub(super) struct H2o {
    /// Newest tokens never evicted.
    pub recent: u32,
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
        view.protect_newest(g, self.recent, score)
    }
}
