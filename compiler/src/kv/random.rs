//! `Random(budget, seed)`: seeded random eviction, the lower bound of the quality
//! harness.
//!
//! Rule: at every run each live slot draws a fresh priority `hash(seed', position,
//! pos_after · Hkv + head)` in `[0, 1)` (`seed'` mixes the seed with the layer), so the
//! evicted slot is uniform among the candidates and independent across layers, heads and
//! steps, yet reproducible. The new token may be the one dropped. State: the slot table
//! only. Cost per decode step: one hash per slot plus the selection.

use super::slots::{Rule, View};
use crate::ir::{BinaryOp, BuildError, GraphBuilder, Op, Scalar, ValueId};

/// Seeded random eviction.
pub(super) struct Random {
    /// Stream seed.
    pub seed: u32,
}

impl Rule for Random {
    fn priority(
        &self,
        g: &mut GraphBuilder<'_>,
        view: &View<'_>,
        _: Option<ValueId>,
    ) -> Result<ValueId, BuildError> {
        let c = view.layer.c;
        let end = g.reshape(view.chunk.pos_after, &[c.batch, 1, 1])?;
        let heads = g.constant(Scalar::I32(c.kv_heads as i32), &[1, 1, 1])?;
        let head = g.push(Op::Iota {
            shape: vec![1, c.kv_heads, 1],
            dim: 1,
        })?;
        let step = g.binary(BinaryOp::Mul, end, heads)?;
        let counter = g.binary(BinaryOp::Add, step, head)?;
        let seed = self.seed ^ (view.layer.l.wrapping_mul(0x9E37_79B9));
        g.push(Op::Hash {
            a: view.pos,
            b: counter,
            seed,
        })
    }
}
