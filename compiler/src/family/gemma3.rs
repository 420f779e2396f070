//! The Gemma 3 family (Gemma Team 2025, "Gemma 3 Technical Report"):
//! - token embeddings scaled by `√hidden_size`;
//! - a "sandwich" block: RMSNorm before *and* after attention and before *and* after
//!   the MLP, `h = x + norm(attn(norm(x)))`, `out = h + norm(mlp(norm(h)))`;
//! - RMSNorm over each query and key head (`q_norm`, `k_norm`) before RoPE, and queries
//!   scaled by `query_pre_attn_scalar^-1/2`;
//! - a GELU-gated MLP, `down(gelu_tanh(gate x) · up x)`;
//! - local sliding-window layers (their own RoPE base) interleaved with global ones:
//!   every `sliding_window_pattern`-th layer is global. The skeleton gives each local
//!   layer a `Window(sliding_window)` cache whatever the global policy.
//!
//! The LM head is the token embedding. Norm gains multiply the normalised value
//! directly: they are the checkpoint's `1 + weight` (as GGUF files store them).

use crate::ir::{BinaryOp, BuildError, DType, GraphBuilder, Op, ParamDecl, Scalar, ValueId};
use crate::lower::decoder::{Ctx, Family, layer_param as layer, param};
use serde::{Deserialize, Serialize};

use super::Gguf;

const EMBED: &str = "model.embed_tokens.weight";
const FINAL_NORM: &str = "model.norm.weight";

/// Hyper-parameters of a Gemma 3 decoder (names follow Hugging Face `config.json`; the LM
/// head is always the token embedding).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gemma3Config {
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: u32,
    /// Model width.
    pub hidden_size: u32,
    /// Number of decoder blocks.
    pub num_layers: u32,
    /// Query heads per layer.
    pub num_heads: u32,
    /// Key/value heads per layer; divides `num_heads`.
    pub num_kv_heads: u32,
    /// Width of one attention head (may differ from `hidden_size / num_heads`).
    pub head_dim: u32,
    /// Inner width of the GELU-gated MLP.
    pub intermediate_size: u32,
    /// RoPE base frequency of the global layers.
    pub rope_theta: f32,
    /// RoPE base frequency of the sliding-window layers.
    pub rope_local_base_freq: f32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Tokens a sliding-window layer sees: the query's own and the `sliding_window - 1`
    /// before it.
    pub sliding_window: u32,
    /// Every `sliding_window_pattern`-th layer is global (layer `l` with
    /// `(l + 1) % pattern == 0`); the others use the sliding window.
    pub sliding_window_pattern: u32,
    /// Queries are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: f32,
    /// Longest position the model was trained for.
    pub max_position_embeddings: u32,
}

impl Gemma3Config {
    /// Whether layer `l` attends to every earlier token (not a sliding-window layer).
    pub fn is_global(&self, l: u32) -> bool {
        (l + 1).is_multiple_of(self.sliding_window_pattern)
    }
}

/// How GGUF files hold a Gemma 3 checkpoint: GGUF's `ffn_norm` is the pre-MLP norm here
/// (Llama's post-attention one), and the sandwich and Q/K norms have their own names.
pub const GGUF: Gguf = Gguf {
    arch: "gemma3",
    layer_tensors: &[
        ("attn_q_norm.weight", "self_attn.q_norm.weight"),
        ("attn_k_norm.weight", "self_attn.k_norm.weight"),
        (
            "post_attention_norm.weight",
            "post_attention_layernorm.weight",
        ),
        ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
        ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
    ],
    permuted_qk: false,
};

/// The Gemma 3 decoder.
pub(crate) struct Gemma3<'a> {
    /// Hyper-parameters.
    pub c: &'a Gemma3Config,
}

impl Gemma3<'_> {
    fn norm(
        &self,
        g: &mut GraphBuilder<'_>,
        x: ValueId,
        name: &str,
    ) -> Result<ValueId, BuildError> {
        let w = g.param(name)?;
        g.push(Op::RmsNorm {
            x,
            w,
            eps: self.c.rms_norm_eps,
        })
    }
}

impl Family for Gemma3<'_> {
    fn params(&self, wdt: DType) -> Vec<ParamDecl> {
        let c = self.c;
        let (h, q, kv, d) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.head_dim,
        );
        let f = c.intermediate_size;
        let p = |name: String, shape: &[u32]| param(name, shape, wdt);
        let mut out = vec![p(EMBED.into(), &[c.vocab_size, h])];
        for i in 0..c.num_layers {
            out.push(p(layer(i, "input_layernorm"), &[h]));
            out.push(p(layer(i, "self_attn.q_proj"), &[q, h]));
            out.push(p(layer(i, "self_attn.k_proj"), &[kv, h]));
            out.push(p(layer(i, "self_attn.v_proj"), &[kv, h]));
            out.push(p(layer(i, "self_attn.o_proj"), &[h, q]));
            out.push(p(layer(i, "self_attn.q_norm"), &[d]));
            out.push(p(layer(i, "self_attn.k_norm"), &[d]));
            out.push(p(layer(i, "post_attention_layernorm"), &[h]));
            out.push(p(layer(i, "pre_feedforward_layernorm"), &[h]));
            out.push(p(layer(i, "mlp.gate_proj"), &[f, h]));
            out.push(p(layer(i, "mlp.up_proj"), &[f, h]));
            out.push(p(layer(i, "mlp.down_proj"), &[h, f]));
            out.push(p(layer(i, "post_feedforward_layernorm"), &[h]));
        }
        out.push(p(FINAL_NORM.into(), &[h]));
        out
    }

    /// `embed(ids) · √hidden_size`.
    fn embed(&self, g: &mut GraphBuilder<'_>, ids: ValueId) -> Result<ValueId, BuildError> {
        let table = g.param(EMBED)?;
        let x = g.push(Op::Embed { table, ids })?;
        let scale = (self.c.hidden_size as f32).sqrt();
        let scale = g.constant(Scalar::F32(scale), &[1, 1, 1])?;
        g.binary(BinaryOp::Mul, x, scale)
    }

    /// `h = x + norm(attn(norm(x)))`, then `h + norm(mlp(norm(h)))`.
    fn block(
        &self,
        g: &mut GraphBuilder<'_>,
        i: u32,
        x: ValueId,
        ctx: &Ctx,
    ) -> Result<ValueId, BuildError> {
        let c = self.c;
        let (b, t) = (g.ty(x).shape[0], g.ty(x).shape[1]);
        let (hq, hkv, d) = (c.num_heads, c.num_kv_heads, c.head_dim);
        let theta = if c.is_global(i) {
            c.rope_theta
        } else {
            c.rope_local_base_freq
        };

        // Self-attention.
        let h = self.norm(g, x, &layer(i, "input_layernorm"))?;
        let heads = |g: &mut GraphBuilder<'_>, proj: &str, n: u32, qk_norm: Option<&str>| {
            let w = g.param(&layer(i, proj))?;
            let y = g.push(Op::Linear { x: h, w })?;
            let mut y = g.reshape(y, &[b, t, n, d])?;
            if let Some(norm) = qk_norm {
                y = self.norm(g, y, &layer(i, norm))?;
                y = g.push(Op::Rope {
                    x: y,
                    pos: ctx.chunk.qpos,
                    theta,
                })?;
            }
            g.permute(y, &[0, 2, 1, 3])
        };
        let q = heads(g, "self_attn.q_proj", hq, Some("self_attn.q_norm"))?;
        let k = heads(g, "self_attn.k_proj", hkv, Some("self_attn.k_norm"))?;
        let v = heads(g, "self_attn.v_proj", hkv, None)?;
        let scale = 1.0 / c.query_pre_attn_scalar.sqrt();
        let a = ctx.attend(g, i, q, k, v, scale)?;
        let a = g.permute(a, &[0, 2, 1, 3])?;
        let a = g.reshape(a, &[b, t, hq * d])?;
        let w = g.param(&layer(i, "self_attn.o_proj"))?;
        let a = g.push(Op::Linear { x: a, w })?;
        let a = self.norm(g, a, &layer(i, "post_attention_layernorm"))?;
        let x = g.binary(BinaryOp::Add, x, a)?;

        // GELU-gated MLP.
        let h = self.norm(g, x, &layer(i, "pre_feedforward_layernorm"))?;
        let w = g.param(&layer(i, "mlp.gate_proj"))?;
        let gate = g.push(Op::Linear { x: h, w })?;
        let gate = g.push(Op::Gelu { x: gate })?;
        let w = g.param(&layer(i, "mlp.up_proj"))?;
        let up = g.push(Op::Linear { x: h, w })?;
        let m = g.binary(BinaryOp::Mul, gate, up)?;
        let w = g.param(&layer(i, "mlp.down_proj"))?;
        let m = g.push(Op::Linear { x: m, w })?;
        let m = self.norm(g, m, &layer(i, "post_feedforward_layernorm"))?;
        g.binary(BinaryOp::Add, x, m)
    }

    fn head(&self, g: &mut GraphBuilder<'_>, h: ValueId) -> Result<ValueId, BuildError> {
        let h = self.norm(g, h, FINAL_NORM)?;
        let w = g.param(EMBED)?;
        g.push(Op::Linear { x: h, w })
    }
}
