//! `Dense`: the exact cache. Row `b`'s token at position `p` lives in slot `p`, so the
//! slot index is the position and nothing is ever evicted. The host refuses a request
//! whose prompt plus new tokens would not fit in `S` slots; the decode graph also marks
//! a row done when its position reaches `S`.
//!
//! State per layer `l`: `k.l` and `v.l`, `[B, kv_heads, S, head_dim]` F32, keys stored
//! after RoPE. Slots at or beyond a row's position hold stale or padding data and are
//! never visible to a query.

use crate::ir::BuildError;
use crate::ir::{BinaryOp, DType, GraphBuilder, Op, Scalar, StateDecl, Type, ValueId};

/// Cache geometry shared by both graphs.
#[derive(Clone, Copy, Debug)]
pub struct CacheShape {
    /// Rows (`B`).
    pub batch: u32,
    /// KV heads per layer.
    pub kv_heads: u32,
    /// Slots per row (`S`).
    pub slots: u32,
    /// Head width.
    pub head_dim: u32,
}

/// Name of layer `l`'s key cache.
pub fn k_name(l: u32) -> String {
    format!("k.{l}")
}

/// Name of layer `l`'s value cache.
pub fn v_name(l: u32) -> String {
    format!("v.{l}")
}

/// State variables of the dense cache for `layers` layers.
pub fn declare(layers: u32, c: CacheShape) -> Vec<StateDecl> {
    let ty = Type::new(DType::F32, [c.batch, c.kv_heads, c.slots, c.head_dim]);
    (0..layers)
        .flat_map(|l| {
            [
                StateDecl {
                    name: k_name(l),
                    ty: ty.clone(),
                    init: Scalar::F32(0.0),
                    doc: format!("layer {l} keys after RoPE; slot = position"),
                },
                StateDecl {
                    name: v_name(l),
                    ty: ty.clone(),
                    init: Scalar::F32(0.0),
                    doc: format!("layer {l} values; slot = position"),
                },
            ]
        })
        .collect()
}

/// Visibility mask `[B, T, S]`: query `t` of row `b` (at position `qpos[b, t]`) sees slot
/// `s` iff `s <= qpos[b, t]` (causal) and `s < start[b] + len[b]` (slot holds a real
/// token of this row: padding written by this chunk is excluded).
pub fn mask(
    g: &mut GraphBuilder<'_>,
    c: CacheShape,
    qpos: ValueId,
    start: ValueId,
    len: ValueId,
) -> Result<ValueId, BuildError> {
    let t = g.ty(qpos).shape[1];
    let slot = g.push(Op::Iota {
        shape: vec![1, 1, c.slots],
        dim: 2,
    })?;
    let q = g.reshape(qpos, &[c.batch, t, 1])?;
    let causal = g.binary(BinaryOp::Le, slot, q)?;
    let end = g.binary(BinaryOp::Add, start, len)?;
    let end = g.reshape(end, &[c.batch, 1, 1])?;
    let filled = g.binary(BinaryOp::Lt, slot, end)?;
    g.binary(BinaryOp::And, causal, filled)
}

/// Writes this chunk's keys and values (`[B, kv_heads, T, D]`, token `t` at slot
/// `start + t` for `t < len`) into layer `l`'s caches; returns the updated caches.
pub fn write(
    g: &mut GraphBuilder<'_>,
    l: u32,
    k: ValueId,
    v: ValueId,
    start: ValueId,
    len: ValueId,
) -> Result<(ValueId, ValueId), BuildError> {
    let kc = g.state(&k_name(l))?;
    let kc = g.push(Op::KvWrite {
        cache: kc,
        new: k,
        start,
        len,
    })?;
    g.update(&k_name(l), kc)?;
    let vc = g.state(&v_name(l))?;
    let vc = g.push(Op::KvWrite {
        cache: vc,
        new: v,
        start,
        len,
    })?;
    g.update(&v_name(l), vc)?;
    Ok((kc, vc))
}
