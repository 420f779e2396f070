//! `Window(size)`: keep the `size` most recent tokens of each row. The negative control
//! of the quality harness: it forgets the prompt's start, which attention sinks show
//! models rely on (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
//! Sinks", §3.1).
//!
//! Rule: every live slot has the same priority, so the `(priority, position)` ranking
//! keeps the newest tokens. State: the slot table only. Cost per decode step: one mask
//! and one k = 1 selection over `N` slots per layer and KV head.

use super::slots::{Rule, View};
use crate::ir::{BuildError, GraphBuilder, Scalar, ValueId};

/// The rolling window.
pub(super) struct Window;

impl Rule for Window {
    fn priority(
        &self,
        g: &mut GraphBuilder<'_>,
        _: &View<'_>,
        _: Option<ValueId>,
    ) -> Result<ValueId, BuildError> {
        g.constant(Scalar::F32(0.0), &[1, 1, 1])
    }
}
