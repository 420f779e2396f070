//! `SinkWindow(sinks, window)`: StreamingLLM (Xiao et al. 2023, "Efficient Streaming
//! Language Models with Attention Sinks"). The first `sinks` tokens of each row (positions
//! `0..sinks`: real tokens only, since padding never enters the cache) stay forever as
//! attention sinks; the remaining `window` slots roll over the newest tokens.
//!
//! Rule: priority 1 for a sink, 0 otherwise; equal priorities keep the newer token.
//! Budget `sinks + window`. State: the slot table only. Keys keep the RoPE of their
//! original position (the paper re-rotates by cache index; we do not). Cost per decode
//! step: as `Window`.

use super::slots::{Rule, View};
use crate::ir::{BinaryOp, BuildError, GraphBuilder, Scalar, ValueId};

/// Sinks plus a rolling window.
pub(super) struct SinkWindow {
    /// Tokens kept from the start of each row.
    pub sinks: u32,
}

impl Rule for SinkWindow {
    fn priority(
        &self,
        g: &mut GraphBuilder<'_>,
        view: &View<'_>,
        _: Option<ValueId>,
    ) -> Result<ValueId, BuildError> {
        let sinks = g.constant(Scalar::I32(self.sinks as i32), &[1, 1, 1])?;
        let is_sink = g.binary(BinaryOp::Lt, view.pos, sinks)?;
        let one = g.constant(Scalar::F32(1.0), &[1, 1, 1])?;
        let zero = g.constant(Scalar::F32(0.0), &[1, 1, 1])?;
        g.select(is_sink, one, zero)
    }
}
