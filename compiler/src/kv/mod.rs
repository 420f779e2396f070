//! KV cache policies: how each one declares its state, which slots a query may see, and
//! how new keys and values enter the cache. One file per policy.
//!
//! `Dense` (in `dense.rs`) keeps every token at slot = position. The budgeted policies
//! share the slot-table machinery of `slots.rs` and differ only in how they score and
//! rank slots (`window.rs`, `sink_window.rs`, `h2o.rs`, `tova.rs`, `snapkv.rs`,
//! `random.rs`).

pub mod dense;
mod h2o;
mod random;
mod sink_window;
pub mod slots;
mod snapkv;
pub mod storage;
mod tova;
mod window;

use crate::ir::{BuildError, CachePart, GraphBuilder, StateDecl, StateRole, ValueId};
use crate::spec::{KvPolicy, KvStorage};

/// Cache geometry shared by both graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheShape {
    /// Rows (`B`).
    pub batch: u32,
    /// KV heads per layer.
    pub kv_heads: u32,
    /// Physical slots per row and KV head (`N`): `S` for `Dense`, budget + prefill width
    /// for a budgeted policy.
    pub slots: u32,
    /// Head width.
    pub head_dim: u32,
}

/// Which graph is being built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A chunk of up to `T` prompt tokens per row.
    Prefill,
    /// One token per active row.
    Decode,
}

/// What a graph appends to every row: the same description serves both graphs.
#[derive(Clone, Copy, Debug)]
pub struct Chunk {
    /// Prefill or decode.
    pub phase: Phase,
    /// Position of each query, `[B, T]` I32 (padding continues past the row's end).
    pub qpos: ValueId,
    /// Position of the row's first new token, `[B]` I32.
    pub start: ValueId,
    /// New tokens per row, `[B]` I32 (0 for an idle row).
    pub len: ValueId,
    /// Tokens of the row after this chunk (`start + len`), `[B]` I32.
    pub pos_after: ValueId,
    /// Prefill only: rows that start a new sequence with this chunk, `[B]` Bool. Such a
    /// row's `start` is 0 and its policy state reads as initial (a free slot table, zero
    /// scores); its old keys and values stay in place, invisible behind the table or the
    /// positions. `None` in decode.
    pub restart: Option<ValueId>,
}

impl Chunk {
    /// The layer's state variable `name` as this chunk sees it before appending: `init`
    /// in rows that restart, the stored value elsewhere. `[B, ..]` with `B` leading.
    pub fn old_state(
        &self,
        g: &mut GraphBuilder<'_>,
        name: &str,
        init: crate::ir::Scalar,
    ) -> Result<ValueId, BuildError> {
        let old = g.state(name)?;
        let Some(restart) = self.restart else {
            return Ok(old);
        };
        let shape = g.ty(old).shape.clone();
        let mut rows = vec![1; shape.len()];
        rows[0] = shape[0];
        let restart = g.reshape(restart, &rows)?;
        let init = g.constant(init, &vec![1; shape.len()])?;
        g.select(restart, init, old)
    }

    /// Rows that append at least one token, shaped `[B, 1, .., 1]` (rank `rank`).
    pub fn has_tokens(&self, g: &mut GraphBuilder<'_>, rank: usize) -> Result<ValueId, BuildError> {
        let b = g.ty(self.len).shape[0];
        let mut rows = vec![1; rank];
        rows[0] = b;
        let len = g.reshape(self.len, &rows)?;
        let zero = g.constant(crate::ir::Scalar::I32(0), &vec![1; rank])?;
        g.binary(crate::ir::BinaryOp::Lt, zero, len)
    }
}

/// Name of layer `l`'s key cache.
pub fn k_name(l: u32) -> String {
    format!("k.{l}")
}

/// Name of layer `l`'s value cache.
pub fn v_name(l: u32) -> String {
    format!("v.{l}")
}

/// Name of layer `l`'s slot table (budgeted policies).
pub fn pos_name(l: u32) -> String {
    format!("slot_pos.{l}")
}

/// Name of layer `l`'s per-slot score (H2O, TOVA, SnapKV).
pub fn score_name(l: u32) -> String {
    format!("score.{l}")
}

/// The role of layer `l`'s cache part `part`.
pub fn cache_role(l: u32, part: CachePart) -> StateRole {
    StateRole::Cache { layer: l, part }
}

/// How one layer caches and sees keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerKv {
    /// Which tokens keep their keys and values.
    pub policy: KvPolicy,
    /// The model's attention span for this layer (a sliding-window layer): a query at
    /// position `i` sees only keys at positions `j` with `i - j < span`.
    pub span: Option<u32>,
    /// Cache geometry (its `slots` follow from the policy).
    pub shape: CacheShape,
}

/// The state variables of layer `l`'s cache.
pub fn declare(layer: &LayerKv, storage: KvStorage, l: u32) -> Vec<StateDecl> {
    let c = layer.shape;
    match layer.policy {
        KvPolicy::Dense => dense::declare(l, c, storage),
        KvPolicy::Window { .. } | KvPolicy::SinkWindow { .. } | KvPolicy::Random { .. } => {
            slots::declare(l, c, storage, false)
        }
        KvPolicy::H2o { .. } | KvPolicy::Tova { .. } | KvPolicy::SnapKv { .. } => {
            slots::declare(l, c, storage, true)
        }
    }
}

/// Attention of layer `l` through its cache: appends this chunk's keys `k` and values
/// `v` (`[B, kv_heads, T, D]`, after RoPE), attends with queries `q` (`[B, heads, T,
/// D]`) and applies the policy's eviction. Returns the attention output `[B, heads, T,
/// D]` and updates the layer's state.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    g: &mut GraphBuilder<'_>,
    layer: &LayerKv,
    storage: KvStorage,
    l: u32,
    q: ValueId,
    k: ValueId,
    v: ValueId,
    chunk: &Chunk,
    scale: f32,
) -> Result<ValueId, BuildError> {
    let (policy, c, span) = (layer.policy, layer.shape, layer.span);
    let Some(budget) = policy.budget() else {
        return dense::attend(g, c, l, q, k, v, chunk, scale, storage, span);
    };
    let rule: Box<dyn slots::Rule> = match policy {
        KvPolicy::Dense => unreachable!("Dense has no budget"),
        KvPolicy::Window { .. } => Box::new(window::Window),
        KvPolicy::SinkWindow { sinks, .. } => Box::new(sink_window::SinkWindow { sinks }),
        KvPolicy::H2o { recent, .. } => Box::new(h2o::H2o {
            recent,
            normalise: false,
        }),
        KvPolicy::Tova { .. } => Box::new(tova::Tova),
        KvPolicy::SnapKv { window, pool, .. } => Box::new(snapkv::SnapKv { window, pool }),
        KvPolicy::Random { seed, .. } => Box::new(random::Random { seed }),
    };
    let layer = slots::Layer {
        c,
        budget,
        l,
        q,
        k,
        v,
        scale,
        storage,
        span,
    };
    slots::attend(g, rule.as_ref(), &layer, chunk)
}
