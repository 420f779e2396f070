//! The slot table shared by every budgeted policy.
//!
//! A budgeted cache keeps at most `S` (the budget) tokens per row and KV head in `N = S +
//! T` physical slots (`T` = prefill width). Layer `l` holds:
//! - `k.l`, `v.l` `[B, Hkv, N, D]`: keys (after RoPE, at their original position) and
//!   values, stored as `storage.rs` says (F32, or I8 with per-slot scales);
//! - `slot_pos.l` `[B, Hkv, N]` I32: the position of the token in each slot, −1 = free;
//! - `score.l` `[B, Hkv, N]` F32 (H2O, TOVA, SnapKV): the policy's score per slot.
//!
//! Invariant between graph runs: live slots are among `0..S` and slots `S..N` are free
//! (position −1, score 0). Each run then:
//! 1. writes the `len` new tokens of each row into slots `S..S + len` (positions
//!    `start..start + len`; padding never enters);
//! 2. attends over all `N` slots: query at position `p` sees the live slots at
//!    positions `<= p` (and, in a sliding-window layer of span `w`, `> p - w`), so every
//!    query sees the cache before eviction plus the causal part of its own chunk;
//! 3. asks the `Rule` for the new scores and a priority per slot, ranks the slots by
//!    `(priority, position)` descending (free slots last), and keeps the first `S`:
//!    - prefill sorts the `N` slots by rank (`top_k` + `gather` of keys, values, positions
//!      and scores; one pass over the cache per chunk) and frees everything past `S`;
//!    - decode (one new token, in slot `S`) picks the lowest-ranked slot among `0..=S`
//!      (`top_k` with k = 1 on the negated keys), moves the new token into it with
//!      `kv_write` and frees slot `S`. An idle row changes nothing. When the new token
//!      ranks lowest it is the one dropped.
//!
//! Decisions are per row and per KV head; the scores of a KV head are the attention of
//! its query heads averaged (`attention_probs` with the attention's operands, then
//! `attention_mass`; the pass `share_attention_probs` then computes the attention itself
//! from those probabilities). Every shape is fixed by `B, T, N`.

use super::{CacheShape, Chunk, Phase, cache_role, pos_name, score_name, storage};
use crate::ir::{
    BinaryOp, BuildError, CachePart, DType, GraphBuilder, Op, Scalar, StateDecl, Type, ValueId,
};
use crate::spec::KvStorage;

/// Priority of a slot a policy must keep (the newest tokens, sinks).
pub(super) const PROTECT: f32 = 1.0e9;
/// Priority of a free slot: below every live one.
const EMPTY: f32 = -1.0e9;
/// In decode, slots past the scratch slot are never candidates for eviction.
const NOT_A_CANDIDATE: f32 = 2.0e9;

/// State of layer `l`'s budgeted cache; `scored` adds `score.l`.
pub fn declare(l: u32, c: CacheShape, storage: KvStorage, scored: bool) -> Vec<StateDecl> {
    let table = [c.batch, c.kv_heads, c.slots];
    let mut out = storage::declare(storage, l, c, &format!("one token per slot_pos.{l} entry"));
    out.push(StateDecl {
        name: pos_name(l),
        ty: Type::new(DType::I32, table),
        init: Scalar::I32(-1),
        doc: format!("layer {l} position of each slot's token; -1 = free"),
        role: cache_role(l, CachePart::SlotPositions),
    });
    if scored {
        out.push(StateDecl {
            name: score_name(l),
            ty: Type::new(DType::F32, table),
            init: Scalar::F32(0.0),
            doc: format!("layer {l} eviction score of each slot"),
            role: cache_role(l, CachePart::Scores),
        });
    }
    out
}

/// One layer's inputs to the cache.
pub(super) struct Layer {
    /// Cache geometry (`slots` = `N`).
    pub c: CacheShape,
    /// Tokens kept per row and KV head (`S`).
    pub budget: u32,
    /// Layer index.
    pub l: u32,
    /// Queries `[B, Hq, T, D]`.
    pub q: ValueId,
    /// New keys `[B, Hkv, T, D]`.
    pub k: ValueId,
    /// New values `[B, Hkv, T, D]`.
    pub v: ValueId,
    /// Attention scale.
    pub scale: f32,
    /// How keys and values are stored.
    pub storage: KvStorage,
    /// The model's attention span for this layer, if it has one (sliding window).
    pub span: Option<u32>,
}

/// What a policy sees after the new tokens entered the table.
pub(super) struct View<'a> {
    /// The layer.
    pub layer: &'a Layer,
    /// The chunk.
    pub chunk: &'a Chunk,
    /// Keys of every slot, new ones included, `[B, Hkv, N, D]`.
    pub keys: ValueId,
    /// Visibility `[B, Hkv, T, N]`.
    pub mask: ValueId,
    /// Position of each slot's token, −1 = free, `[B, Hkv, N]`.
    pub pos: ValueId,
}

/// Which queries of the chunk an attention score counts.
#[derive(Clone, Copy, Debug)]
pub(super) enum Queries {
    /// Every real query.
    All,
    /// The row's last real query.
    Last,
    /// The row's last `n` real queries.
    LastN(u32),
}

impl View<'_> {
    /// Attention each slot receives from the chosen queries, averaged over the query
    /// heads of its KV group, `[B, Hkv, N]`. Free slots and padding receive nothing.
    pub fn mass(&self, g: &mut GraphBuilder<'_>, which: Queries) -> Result<ValueId, BuildError> {
        let b = self.layer.c.batch;
        let t = g.ty(self.chunk.qpos).shape[1];
        let idx = g.push(Op::Iota {
            shape: vec![1, t],
            dim: 1,
        })?;
        let len = g.reshape(self.chunk.len, &[b, 1])?;
        let real = g.binary(BinaryOp::Lt, idx, len)?;
        let chosen = match which {
            Queries::All => real,
            Queries::Last => {
                let one = g.constant(Scalar::I32(1), &[1, 1])?;
                let last = g.binary(BinaryOp::Sub, len, one)?;
                g.binary(BinaryOp::Eq, idx, last)?
            }
            Queries::LastN(n) => {
                let n = g.constant(Scalar::I32(n as i32), &[1, 1])?;
                let from = g.binary(BinaryOp::Sub, len, n)?;
                let late = g.binary(BinaryOp::Le, from, idx)?;
                g.binary(BinaryOp::And, late, real)?
            }
        };
        let one = g.constant(Scalar::F32(1.0), &[1, 1])?;
        let zero = g.constant(Scalar::F32(0.0), &[1, 1])?;
        let weight = g.select(chosen, one, zero)?;
        // The same q, k, mask and scale as the layer's attention: the pass
        // `share_attention_probs` makes that attention read these probabilities.
        let probs = g.push(Op::AttentionProbs {
            q: self.layer.q,
            k: self.keys,
            mask: self.mask,
            scale: self.layer.scale,
        })?;
        g.push(Op::AttentionMass {
            probs,
            weight,
            kv_heads: self.layer.c.kv_heads,
        })
    }

    /// The layer's scores before this chunk, `[B, Hkv, N]` (0 in the new slots).
    pub fn old_score(&self, g: &mut GraphBuilder<'_>) -> Result<ValueId, BuildError> {
        self.chunk
            .old_state(g, &score_name(self.layer.l), Scalar::F32(0.0))
    }

    /// `PROTECT` where the slot holds one of the row's `n` newest tokens, else `other`.
    pub fn protect_newest(
        &self,
        g: &mut GraphBuilder<'_>,
        n: u32,
        other: ValueId,
    ) -> Result<ValueId, BuildError> {
        let b = self.layer.c.batch;
        let end = g.reshape(self.chunk.pos_after, &[b, 1, 1])?;
        let n = g.constant(Scalar::I32(n as i32), &[1, 1, 1])?;
        let from = g.binary(BinaryOp::Sub, end, n)?;
        let recent = g.binary(BinaryOp::Le, from, self.pos)?;
        let keep = g.constant(Scalar::F32(PROTECT), &[1, 1, 1])?;
        g.select(recent, keep, other)
    }
}

/// How a budgeted policy ranks slots.
pub(super) trait Rule {
    /// The new `score.l` (`[B, Hkv, N]`), for policies that keep one (none by default).
    fn score(
        &self,
        _g: &mut GraphBuilder<'_>,
        _view: &View<'_>,
    ) -> Result<Option<ValueId>, BuildError> {
        Ok(None)
    }

    /// Priority of each slot (`[B, Hkv, N]` or broadcastable to it); higher is kept,
    /// equal priorities keep the newer token. Only live slots' values matter.
    fn priority(
        &self,
        g: &mut GraphBuilder<'_>,
        view: &View<'_>,
        score: Option<ValueId>,
    ) -> Result<ValueId, BuildError>;
}

/// Appends the chunk to layer `l`'s budgeted cache, attends, and evicts by `rule`.
pub(super) fn attend(
    g: &mut GraphBuilder<'_>,
    rule: &dyn Rule,
    layer: &Layer,
    ch: &Chunk,
) -> Result<ValueId, BuildError> {
    let Layer { c, budget, l, .. } = *layer;
    let (b, h, n) = (c.batch, c.kv_heads, c.slots);
    let t = g.ty(ch.qpos).shape[1];
    let i32c = |g: &mut GraphBuilder<'_>, v: i32| g.constant(Scalar::I32(v), &[1, 1, 1]);
    let f32c = |g: &mut GraphBuilder<'_>, v: f32| g.constant(Scalar::F32(v), &[1, 1, 1]);

    // 1. New tokens enter slots S..S+len.
    let first = g.constant(Scalar::I32(budget as i32), &[b])?;
    let cache = storage::load(g, layer.storage, l)?;
    let encoded = storage::encode(g, layer.storage, layer.k, layer.v)?;
    let cache = storage::write(g, cache, encoded, first, ch.len)?;
    let (kc, vc) = storage::read(g, cache)?;
    let slot = g.push(Op::Iota {
        shape: vec![1, 1, n],
        dim: 2,
    })?;
    let s = i32c(g, budget as i32)?;
    let rel = g.binary(BinaryOp::Sub, slot, s)?;
    let zero = i32c(g, 0)?;
    let len3 = g.reshape(ch.len, &[b, 1, 1])?;
    let start3 = g.reshape(ch.start, &[b, 1, 1])?;
    let after_s = g.binary(BinaryOp::Le, zero, rel)?;
    let before_end = g.binary(BinaryOp::Lt, rel, len3)?;
    let fresh = g.binary(BinaryOp::And, after_s, before_end)?;
    let fresh_pos = g.binary(BinaryOp::Add, start3, rel)?;
    let old_pos = ch.old_state(g, &pos_name(l), Scalar::I32(-1))?;
    let pos = g.select(fresh, fresh_pos, old_pos)?;

    // 2. Attention over every live slot at or before the query's position.
    let pos4 = g.reshape(pos, &[b, h, 1, n])?;
    let q4 = g.reshape(ch.qpos, &[b, 1, t, 1])?;
    let zero4 = g.constant(Scalar::I32(0), &[1, 1, 1, 1])?;
    let live4 = g.binary(BinaryOp::Le, zero4, pos4)?;
    let causal = g.binary(BinaryOp::Le, pos4, q4)?;
    let mut mask = g.binary(BinaryOp::And, live4, causal)?;
    if let Some(w) = layer.span {
        let age = g.binary(BinaryOp::Sub, q4, pos4)?;
        let w = g.constant(Scalar::I32(w as i32), &[1, 1, 1, 1])?;
        let near = g.binary(BinaryOp::Lt, age, w)?;
        mask = g.binary(BinaryOp::And, mask, near)?;
    }
    let out = g.push(Op::Attention {
        q: layer.q,
        k: kc,
        v: vc,
        mask,
        scale: layer.scale,
    })?;

    // 3. Scores and priorities.
    let view = View {
        layer,
        chunk: ch,
        keys: kc,
        mask,
        pos,
    };
    let score = rule.score(g, &view)?;
    let prio = rule.priority(g, &view, score)?;
    let live = g.binary(BinaryOp::Le, zero, pos)?;
    let empty = f32c(g, EMPTY)?;
    let prio = g.select(live, prio, empty)?;

    // 4. Eviction.
    let minus_one = i32c(g, -1)?;
    let zero_f = f32c(g, 0.0)?;
    let (cache, pos, score) = match ch.phase {
        Phase::Prefill => {
            // Rows without new tokens keep their slots in place (identity order) and
            // their scores: a prefill that refills other rows leaves them bit for bit.
            let has = ch.has_tokens(g, 3)?;
            let ranked = g.push(Op::TopK {
                x: prio,
                tiebreak: pos,
                k: n,
            })?;
            let order = g.select(has, ranked, slot)?;
            let kept = g.binary(BinaryOp::Lt, slot, s)?;
            let cache = storage::gather(g, cache, order)?;
            let pos = g.push(Op::Gather {
                x: pos,
                index: order,
            })?;
            let pos = g.select(kept, pos, minus_one)?;
            let score = match score {
                Some(sc) => {
                    let ranked = g.push(Op::Gather {
                        x: sc,
                        index: order,
                    })?;
                    let ranked = g.select(kept, ranked, zero_f)?;
                    let old = view.old_score(g)?;
                    Some(g.select(has, ranked, old)?)
                }
                None => None,
            };
            (cache, pos, score)
        }
        Phase::Decode => {
            let beyond = g.binary(BinaryOp::Lt, s, slot)?;
            let never = f32c(g, NOT_A_CANDIDATE)?;
            let x = g.select(beyond, never, prio)?;
            let neg_x = g.binary(BinaryOp::Sub, zero_f, x)?;
            let neg_pos = g.binary(BinaryOp::Sub, zero, pos)?;
            let victim = g.push(Op::TopK {
                x: neg_x,
                tiebreak: neg_pos,
                k: 1,
            })?;
            let target = g.reshape(victim, &[b, h])?;
            let cache = storage::write(g, cache, encoded, target, ch.len)?;
            let active = g.binary(BinaryOp::Lt, zero, len3)?;
            let hit = g.binary(BinaryOp::Eq, slot, victim)?;
            let moved = g.binary(BinaryOp::And, hit, active)?;
            let scratch = g.binary(BinaryOp::Eq, slot, s)?;
            let pos = g.select(moved, start3, pos)?;
            let pos = g.select(scratch, minus_one, pos)?;
            let score = match score {
                Some(sc) => {
                    let at = g.constant(Scalar::I32(budget as i32), &[b, h, 1])?;
                    let new_score = g.push(Op::Gather { x: sc, index: at })?;
                    let sc = g.select(moved, new_score, sc)?;
                    Some(g.select(scratch, zero_f, sc)?)
                }
                None => None,
            };
            (cache, pos, score)
        }
    };
    storage::store(g, l, cache)?;
    g.update(&pos_name(l), pos)?;
    if let Some(sc) = score {
        g.update(&score_name(l), sc)?;
    }
    Ok(out)
}
