//! The prefill/decode skeleton every family shares: inputs and positions, the cache of
//! each layer, the stack of blocks, the last hidden state per row, sampling and the
//! control epilogue. A family supplies its parameter table, embedding, block and head
//! ([`Family`]); everything that makes the two graphs fixed-shape lives here once.

use super::{decode_control, names, pick_token, prefill_control, prefill_inputs};
use crate::ir::{
    BinaryOp, BuildError, CompiledConfig, DType, FORMAT, FORMAT_VERSION, GraphBuilder, Op,
    ParamDecl, Program, Scalar, ValueId,
};
use crate::kv::{self, CacheShape, Chunk, LayerKv, Phase};
use crate::spec::{DTypeSpec, KvPolicy, KvStorage, ModelSpec};

/// What a family file provides to the skeleton.
pub(crate) trait Family {
    /// The parameter table in checkpoint order; matrices in `wdt`, vectors in F32.
    fn params(&self, wdt: DType) -> Vec<ParamDecl>;
    /// Token ids `[B, T]` → hidden states `[B, T, H]`.
    fn embed(&self, g: &mut GraphBuilder<'_>, ids: ValueId) -> Result<ValueId, BuildError>;
    /// Decoder block `i` on hidden states `[B, T, H]`; attention goes through
    /// [`Ctx::attend`].
    fn block(
        &self,
        g: &mut GraphBuilder<'_>,
        i: u32,
        x: ValueId,
        ctx: &Ctx,
    ) -> Result<ValueId, BuildError>;
    /// Final norm and LM head: `[B, H]` → logits `[B, V]`.
    fn head(&self, g: &mut GraphBuilder<'_>, h: ValueId) -> Result<ValueId, BuildError>;
}

/// Per-graph values every block reads.
pub(crate) struct Ctx {
    /// What this graph appends to each row.
    pub chunk: Chunk,
    /// How keys and values are stored.
    pub storage: KvStorage,
    /// Each layer's cache.
    pub layers: Vec<LayerKv>,
}

impl Ctx {
    /// Attention of layer `l` through its cache: q `[B, Hq, T, D]`, k and v `[B, Hkv, T,
    /// D]` (keys after RoPE) → `[B, Hq, T, D]`.
    pub fn attend(
        &self,
        g: &mut GraphBuilder<'_>,
        l: u32,
        q: ValueId,
        k: ValueId,
        v: ValueId,
        scale: f32,
    ) -> Result<ValueId, BuildError> {
        let layer = &self.layers[l as usize];
        kv::attend(g, layer, self.storage, l, q, k, v, &self.chunk, scale)
    }
}

/// The cache of every layer: the compile section's policy, except that a layer with an
/// attention span (a sliding-window layer) keeps a `Window(span)` cache whatever the
/// policy, or a dense one when no row can grow past the span (then the span never hides
/// a token and the dense cache is the smaller one).
fn layer_caches(spec: &ModelSpec) -> Vec<LayerKv> {
    let cc = &spec.compile;
    let d = spec.arch.dims();
    (0..d.num_layers)
        .map(|l| {
            let (policy, span) = match spec.arch.attention_span(l) {
                Some(w) if cc.cache_len > w => (KvPolicy::Window { size: w }, Some(w)),
                Some(_) => (KvPolicy::Dense, None),
                None => (cc.kv, None),
            };
            LayerKv {
                policy,
                span,
                shape: CacheShape {
                    batch: cc.batch,
                    kv_heads: d.num_kv_heads,
                    slots: policy.slots(cc.cache_len, cc.prefill_len),
                    head_dim: d.head_dim,
                },
            }
        })
        .collect()
}

/// Lowers `spec` with the family `f` into the prefill and decode graphs.
pub(crate) fn lower(
    spec: &ModelSpec,
    types: &super::WeightTypes,
    f: &dyn Family,
) -> Result<Program, BuildError> {
    let cc = &spec.compile;
    let dims = spec.arch.dims();
    // `context`: the longest row.
    let (bsz, width, context) = (cc.batch, cc.prefill_len, cc.cache_len);
    let wdt = match cc.weight_dtype {
        DTypeSpec::F32 | DTypeSpec::Native => DType::F32,
        DTypeSpec::F16 => DType::F16,
    };
    let mut params = f.params(wdt);
    if cc.weight_dtype == DTypeSpec::Native {
        for p in params.iter_mut().filter(|p| p.ty.shape.len() == 2) {
            if let Some(&dt) = types.get(&p.name)
                && (matches!(dt, DType::F32 | DType::F16) || dt.is_quantized())
            {
                p.ty.dtype = dt;
            }
        }
    }
    let layers = layer_caches(spec);
    let mut state: Vec<_> = layers
        .iter()
        .zip(0..)
        .flat_map(|(layer, l)| kv::declare(layer, cc.kv_storage, l))
        .collect();
    state.extend(super::control_state(bsz, context, cc.sampler));
    let stops = &spec.stop_tokens;

    // Prefill: append `len[b]` prompt tokens at `pos[b]` (at 0 where `restart[b]`); logits
    // of the last real token. Rows with `len = 0` are left as they are.
    let mut g = GraphBuilder::new("prefill", prefill_inputs(bsz, width), &params, &state);
    let tokens = g.input("tokens")?;
    let len = g.input("len")?;
    let limit = g.input("limit")?;
    let restart = g.input("restart")?;
    // A restarting row (a new prompt in a slot) begins at position 0.
    let start = g.state(names::POS)?;
    let origin = g.constant(Scalar::I32(0), &[bsz])?;
    let start = g.select(restart, origin, start)?;
    let offs = g.push(Op::Iota {
        shape: vec![1, width],
        dim: 1,
    })?;
    let start2 = g.reshape(start, &[bsz, 1])?;
    let qpos = g.binary(BinaryOp::Add, start2, offs)?;
    let pos_after = g.binary(BinaryOp::Add, start, len)?;
    let ctx = Ctx {
        chunk: Chunk {
            phase: Phase::Prefill,
            qpos,
            start,
            len,
            pos_after,
            restart: Some(restart),
        },
        storage: cc.kv_storage,
        layers: layers.clone(),
    };
    let mut x = f.embed(&mut g, tokens)?;
    for i in 0..dims.num_layers {
        x = f.block(&mut g, i, x, &ctx)?;
    }
    let one = g.constant(Scalar::I32(1), &[bsz])?;
    let last = g.binary(BinaryOp::Sub, len, one)?;
    let h = g.push(Op::TakeRow { x, index: last })?;
    let logits = f.head(&mut g, h)?;
    let next = pick_token(&mut g, cc.sampler, logits, pos_after)?;
    let token = prefill_control(&mut g, pos_after, len, limit, next, context, stops)?;
    g.output("logits", logits);
    g.output("token", token);
    let prefill = g.finish();

    // Decode: every row that is not done feeds its last token at its own position.
    let mut g = GraphBuilder::new("decode", vec![], &params, &state);
    let done = g.state(names::DONE)?;
    let active = g.push(Op::Not { x: done })?;
    let step = g.cast(active, DType::I32)?;
    let pos = g.state(names::POS)?;
    let qpos = g.reshape(pos, &[bsz, 1])?;
    let pos_after = g.binary(BinaryOp::Add, pos, step)?;
    let ctx = Ctx {
        chunk: Chunk {
            phase: Phase::Decode,
            qpos,
            start: pos,
            len: step,
            pos_after,
            restart: None,
        },
        storage: cc.kv_storage,
        layers: layers.clone(),
    };
    let token = g.state(names::TOKEN)?;
    let ids = g.reshape(token, &[bsz, 1])?;
    let mut x = f.embed(&mut g, ids)?;
    for i in 0..dims.num_layers {
        x = f.block(&mut g, i, x, &ctx)?;
    }
    let h = g.reshape(x, &[bsz, dims.hidden_size])?;
    let logits = f.head(&mut g, h)?;
    let next = pick_token(&mut g, cc.sampler, logits, pos_after)?;
    let (token, done) = decode_control(&mut g, active, pos_after, next, context, stops)?;
    g.output("logits", logits);
    g.output("token", token);
    g.output("done", done);
    let decode = g.finish();

    Ok(Program {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        spec: spec.clone(),
        config: CompiledConfig {
            batch: bsz,
            prefill_len: width,
            cache_len: context,
            vocab_size: dims.vocab_size,
            kv: cc.kv,
            layer_kv: layers.iter().map(|l| l.policy).collect(),
            sampler: cc.sampler,
            weight_dtype: cc.weight_dtype,
            kv_storage: cc.kv_storage,
            stop_tokens: stops.clone(),
        },
        params,
        state,
        prefill,
        decode,
    })
}

/// `{prefix}{i}.{name}.weight`-style helpers shared by the families' parameter tables.
pub(crate) fn layer_param(i: u32, name: &str) -> String {
    format!("model.layers.{i}.{name}.weight")
}

/// Bias of a layer's projection: `model.layers.{i}.{name}.bias`.
pub(crate) fn layer_bias(i: u32, name: &str) -> String {
    format!("model.layers.{i}.{name}.bias")
}

/// A parameter declaration: rank-1 tensors (norm gains, biases) in F32, matrices in `wdt`.
pub(crate) fn param(name: String, shape: &[u32], wdt: DType) -> ParamDecl {
    let dtype = if shape.len() == 1 { DType::F32 } else { wdt };
    ParamDecl {
        name,
        ty: crate::ir::Type::new(dtype, shape),
    }
}
