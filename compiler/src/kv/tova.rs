//! `Tova(budget)`: Token Omission Via Attention (Oren et al. 2024, "Transformers are
//! Multi-State RNNs").
//!
//! Rule: a slot's score is the attention the row's current query gives it (prefill: the
//! chunk's last real query; decode: the step's query), averaged over the query heads of
//! its KV group; the lowest-scored slot is dropped, which may be the new token itself.
//! Nothing is protected. State: the slot table and `score.l` `[B, Hkv, N]` F32 (the last
//! query's attention). Cost per decode step: as H2O.

use super::slots::{Queries, Rule, View};
use crate::ir::{BuildError, GraphBuilder, ValueId};

/// Lowest current attention out.
pub(super) struct Tova;

impl Rule for Tova {
    fn score(
        &self,
        g: &mut GraphBuilder<'_>,
        view: &View<'_>,
    ) -> Result<Option<ValueId>, BuildError> {
        Ok(Some(view.mass(g, Queries::Last)?))
    }

    fn priority(
        &self,
        _: &mut GraphBuilder<'_>,
        _: &View<'_>,
        score: Option<ValueId>,
    ) -> Result<ValueId, BuildError> {
        Ok(score.expect("TOVA keeps a score"))
    }
}
