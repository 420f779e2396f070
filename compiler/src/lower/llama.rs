//! The Llama family (Touvron et al. 2023): pre-norm decoder blocks with RMSNorm, rotary
//! position embeddings, grouped-query attention and a SwiGLU MLP. Parameter names follow
//! Hugging Face checkpoints (`model.layers.{i}.self_attn.q_proj.weight`, ...).

use super::{decode_control, names, pick_token, prefill_control, prefill_inputs};
use crate::ir::{
    BinaryOp, BuildError, CompiledConfig, DType, FORMAT, FORMAT_VERSION, GraphBuilder, Op,
    ParamDecl, Program, Scalar, Type, ValueId,
};
use crate::kv::{self, CacheShape, Chunk, Phase};
use crate::spec::{DTypeSpec, KvPolicy, KvStorage, LlamaConfig, ModelSpec};

fn layer(i: u32, name: &str) -> String {
    format!("model.layers.{i}.{name}.weight")
}

const EMBED: &str = "model.embed_tokens.weight";
const FINAL_NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";

/// The parameter table in checkpoint order; matrices in `wdt`, norm gains in F32.
fn params(c: &LlamaConfig, wdt: DType) -> Vec<ParamDecl> {
    let (h, q, kv) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
    );
    let f = c.intermediate_size;
    let p = |name: String, shape: &[u32]| {
        let dtype = if shape.len() == 1 { DType::F32 } else { wdt };
        ParamDecl {
            name,
            ty: Type::new(dtype, shape),
        }
    };
    let mut out = vec![p(EMBED.into(), &[c.vocab_size, h])];
    for i in 0..c.num_layers {
        out.push(p(layer(i, "input_layernorm"), &[h]));
        out.push(p(layer(i, "self_attn.q_proj"), &[q, h]));
        out.push(p(layer(i, "self_attn.k_proj"), &[kv, h]));
        out.push(p(layer(i, "self_attn.v_proj"), &[kv, h]));
        out.push(p(layer(i, "self_attn.o_proj"), &[h, q]));
        out.push(p(layer(i, "post_attention_layernorm"), &[h]));
        out.push(p(layer(i, "mlp.gate_proj"), &[f, h]));
        out.push(p(layer(i, "mlp.up_proj"), &[f, h]));
        out.push(p(layer(i, "mlp.down_proj"), &[h, f]));
    }
    out.push(p(FINAL_NORM.into(), &[h]));
    if !c.tie_word_embeddings {
        out.push(p(LM_HEAD.into(), &[c.vocab_size, h]));
    }
    out
}

/// Per-graph values every block reads.
struct Ctx {
    /// What this graph appends to each row.
    chunk: Chunk,
    /// The KV policy.
    policy: KvPolicy,
    /// How keys and values are stored.
    storage: KvStorage,
    /// Its cache geometry.
    cache: CacheShape,
}

/// One decoder block: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
fn block(
    g: &mut GraphBuilder<'_>,
    c: &LlamaConfig,
    i: u32,
    x: ValueId,
    ctx: &Ctx,
) -> Result<ValueId, BuildError> {
    let (b, t) = (g.ty(x).shape[0], g.ty(x).shape[1]);
    let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);

    // Self-attention.
    let w = g.param(&layer(i, "input_layernorm"))?;
    let h = g.push(Op::RmsNorm {
        x,
        w,
        eps: c.rms_norm_eps,
    })?;
    let heads = |g: &mut GraphBuilder<'_>, proj: &str, n: u32, rope: bool| {
        let w = g.param(&layer(i, proj))?;
        let y = g.push(Op::Linear { x: h, w })?;
        let mut y = g.reshape(y, &[b, t, n, d])?;
        if rope {
            y = g.push(Op::Rope {
                x: y,
                pos: ctx.chunk.qpos,
                theta: c.rope_theta,
            })?;
        }
        g.permute(y, &[0, 2, 1, 3])
    };
    let q = heads(g, "self_attn.q_proj", hq, true)?;
    let k = heads(g, "self_attn.k_proj", hkv, true)?;
    let v = heads(g, "self_attn.v_proj", hkv, false)?;
    let scale = 1.0 / (d as f32).sqrt();
    let a = kv::attend(
        g,
        ctx.policy,
        ctx.storage,
        ctx.cache,
        i,
        q,
        k,
        v,
        &ctx.chunk,
        scale,
    )?;
    let a = g.permute(a, &[0, 2, 1, 3])?;
    let a = g.reshape(a, &[b, t, hq * d])?;
    let w = g.param(&layer(i, "self_attn.o_proj"))?;
    let a = g.push(Op::Linear { x: a, w })?;
    let x = g.binary(BinaryOp::Add, x, a)?;

    // SwiGLU MLP.
    let w = g.param(&layer(i, "post_attention_layernorm"))?;
    let h = g.push(Op::RmsNorm {
        x,
        w,
        eps: c.rms_norm_eps,
    })?;
    let w = g.param(&layer(i, "mlp.gate_proj"))?;
    let gate = g.push(Op::Linear { x: h, w })?;
    let gate = g.push(Op::Silu { x: gate })?;
    let w = g.param(&layer(i, "mlp.up_proj"))?;
    let up = g.push(Op::Linear { x: h, w })?;
    let m = g.binary(BinaryOp::Mul, gate, up)?;
    let w = g.param(&layer(i, "mlp.down_proj"))?;
    let m = g.push(Op::Linear { x: m, w })?;
    g.binary(BinaryOp::Add, x, m)
}

/// Final norm and LM head over one hidden state per row: `[B, H]` → logits `[B, V]`.
fn head(g: &mut GraphBuilder<'_>, c: &LlamaConfig, h: ValueId) -> Result<ValueId, BuildError> {
    let w = g.param(FINAL_NORM)?;
    let h = g.push(Op::RmsNorm {
        x: h,
        w,
        eps: c.rms_norm_eps,
    })?;
    let w = g.param(if c.tie_word_embeddings {
        EMBED
    } else {
        LM_HEAD
    })?;
    g.push(Op::Linear { x: h, w })
}

/// Lowers a Llama spec into the prefill and decode graphs.
pub(super) fn lower(spec: &ModelSpec, c: &LlamaConfig) -> Result<Program, BuildError> {
    let cc = &spec.compile;
    // `context`: the longest row; `slots`: physical cache slots per row and KV head.
    let (bsz, width, context) = (cc.batch, cc.prefill_len, cc.cache_len);
    let cache = CacheShape {
        batch: bsz,
        kv_heads: c.num_kv_heads,
        slots: cc.kv.slots(context, width),
        head_dim: c.head_dim,
    };
    let wdt = match cc.weight_dtype {
        DTypeSpec::F32 => DType::F32,
        DTypeSpec::F16 => DType::F16,
    };
    let params = params(c, wdt);
    let mut state = kv::declare(cc.kv, cc.kv_storage, c.num_layers, cache);
    state.extend(super::control_state(bsz, context, cc.sampler));
    let stops = &spec.stop_tokens;

    // Prefill: append `len[b]` prompt tokens at `pos[b]`; logits of the last real token.
    let mut g = GraphBuilder::new("prefill", prefill_inputs(bsz, width), &params, &state);
    let tokens = g.input("tokens")?;
    let len = g.input("len")?;
    let limit = g.input("limit")?;
    let start = g.state(names::POS)?;
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
        },
        policy: cc.kv,
        storage: cc.kv_storage,
        cache,
    };
    let table = g.param(EMBED)?;
    let mut x = g.push(Op::Embed { table, ids: tokens })?;
    for i in 0..c.num_layers {
        x = block(&mut g, c, i, x, &ctx)?;
    }
    let one = g.constant(Scalar::I32(1), &[bsz])?;
    let last = g.binary(BinaryOp::Sub, len, one)?;
    let h = g.push(Op::TakeRow { x, index: last })?;
    let logits = head(&mut g, c, h)?;
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
        },
        policy: cc.kv,
        storage: cc.kv_storage,
        cache,
    };
    let token = g.state(names::TOKEN)?;
    let ids = g.reshape(token, &[bsz, 1])?;
    let table = g.param(EMBED)?;
    let mut x = g.push(Op::Embed { table, ids })?;
    for i in 0..c.num_layers {
        x = block(&mut g, c, i, x, &ctx)?;
    }
    let h = g.reshape(x, &[bsz, c.hidden_size])?;
    let logits = head(&mut g, c, h)?;
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
            vocab_size: c.vocab_size,
            kv: cc.kv,
            sampler: cc.sampler,
            weight_dtype: wdt,
            kv_storage: cc.kv_storage,
            stop_tokens: stops.clone(),
        },
        params,
        state,
        prefill,
        decode,
    })
}
