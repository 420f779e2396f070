//! `Dense`: the exact cache. Row `b`'s token at position `p` lives in slot `p`, so the
//! slot index is the position and nothing is ever evicted. The host refuses a request
//! whose prompt plus new tokens would not fit in `S` slots; the decode graph also marks
//! a row done when its position reaches `S`.
//!
//! State per layer `l`: `k.l` and `v.l`, `[B, kv_heads, S, head_dim]` (F32, or I8 with
//! scales: see `storage.rs`), keys stored after RoPE. Slots at or beyond a row's position hold stale or padding data and are
//! never visible to a query.

use super::{CacheShape, Chunk, storage};
use crate::ir::BuildError;
use crate::ir::{BinaryOp, GraphBuilder, Op, Scalar, StateDecl, ValueId};
use crate::spec::KvStorage;

/// State variables of layer `l`'s dense cache.
pub fn declare(l: u32, c: CacheShape, storage: KvStorage) -> Vec<StateDecl> {
    storage::declare(storage, l, c, "slot = position")
}

/// Visibility mask `[B, 1, T, S]`: query `t` of row `b` sees slot `s` iff
/// `s <= qpos[b, t]` (causal) and `s < pos_after[b]` (slot holds a real token of this
/// row: padding written by this chunk is excluded), and with a `span`, `qpos[b, t] - s <
/// span`. The same for every layer with the same span.
fn mask(
    g: &mut GraphBuilder<'_>,
    c: CacheShape,
    ch: &Chunk,
    span: Option<u32>,
) -> Result<ValueId, BuildError> {
    let t = g.ty(ch.qpos).shape[1];
    let slot = g.push(Op::Iota {
        shape: vec![1, 1, 1, c.slots],
        dim: 3,
    })?;
    let q = g.reshape(ch.qpos, &[c.batch, 1, t, 1])?;
    let causal = g.binary(BinaryOp::Le, slot, q)?;
    let end = g.reshape(ch.pos_after, &[c.batch, 1, 1, 1])?;
    let filled = g.binary(BinaryOp::Lt, slot, end)?;
    let mask = g.binary(BinaryOp::And, causal, filled)?;
    match span {
        None => Ok(mask),
        Some(w) => {
            let age = g.binary(BinaryOp::Sub, q, slot)?;
            let w = g.constant(Scalar::I32(w as i32), &[1, 1, 1, 1])?;
            let near = g.binary(BinaryOp::Lt, age, w)?;
            g.binary(BinaryOp::And, mask, near)
        }
    }
}

/// Writes the chunk's keys and values (`[B, kv_heads, T, D]`, token `t` at slot
/// `start + t` for `t < len`) into layer `l`'s caches, then attends over them.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    g: &mut GraphBuilder<'_>,
    c: CacheShape,
    l: u32,
    q: ValueId,
    k: ValueId,
    v: ValueId,
    ch: &Chunk,
    scale: f32,
    st: KvStorage,
    span: Option<u32>,
) -> Result<ValueId, BuildError> {
    let cache = storage::load(g, st, l)?;
    let new = storage::encode(g, st, k, v)?;
    let cache = storage::write(g, cache, new, ch.start, ch.len)?;
    storage::store(g, l, cache)?;
    let (k, v) = storage::read(g, cache)?;
    let mask = mask(g, c, ch, span)?;
    g.push(Op::Attention {
        q,
        k,
        v,
        mask,
        scale,
    })
}
