//! The Llama family (Touvron et al. 2023): pre-norm decoder blocks with RMSNorm, rotary
//! position embeddings, grouped-query attention and a SwiGLU MLP. Parameter names follow
//! Hugging Face checkpoints (`model.layers.{i}.self_attn.q_proj.weight`, ...).
//!
//! Qwen2 (`qwen2.rs`) is this block with biases on the query, key and value projections.

use crate::ir::{BinaryOp, BuildError, DType, GraphBuilder, Op, ParamDecl, ValueId};
use crate::lower::decoder::{Ctx, Family, layer_bias, layer_param as layer, param};
use serde::{Deserialize, Serialize};

use super::Gguf;

/// Hyper-parameters of a Llama- or Qwen2-family decoder (names follow Hugging Face
/// `config.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of the embedding table).
    pub vocab_size: u32,
    /// Model width.
    pub hidden_size: u32,
    /// Number of decoder blocks.
    pub num_layers: u32,
    /// Query heads per layer.
    pub num_heads: u32,
    /// Key/value heads per layer (grouped-query attention); divides `num_heads`.
    pub num_kv_heads: u32,
    /// Width of one attention head.
    pub head_dim: u32,
    /// Inner width of the SwiGLU MLP.
    pub intermediate_size: u32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Whether the LM head reuses the token embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest position the model was trained for.
    pub max_position_embeddings: u32,
}

/// How GGUF files hold a Llama checkpoint: llama.cpp's converter permutes the Q and K
/// rows for adjacent-pair RoPE (undone at load), and names `post_attention_layernorm`
/// `ffn_norm`.
pub const GGUF: Gguf = Gguf {
    arch: "llama",
    layer_tensors: &[("ffn_norm.weight", "post_attention_layernorm.weight")],
    permuted_qk: true,
};

pub(crate) const EMBED: &str = "model.embed_tokens.weight";
pub(crate) const FINAL_NORM: &str = "model.norm.weight";
pub(crate) const LM_HEAD: &str = "lm_head.weight";

/// A Llama-family decoder; `qkv_bias` adds Qwen2's projection biases.
pub(crate) struct Llama<'a> {
    /// Hyper-parameters.
    pub c: &'a LlamaConfig,
    /// Whether the query, key and value projections have biases.
    pub qkv_bias: bool,
}

impl Family for Llama<'_> {
    fn params(&self, wdt: DType) -> Vec<ParamDecl> {
        let c = self.c;
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let f = c.intermediate_size;
        let p = |name: String, shape: &[u32]| param(name, shape, wdt);
        let mut out = vec![p(EMBED.into(), &[c.vocab_size, h])];
        for i in 0..c.num_layers {
            out.push(p(layer(i, "input_layernorm"), &[h]));
            out.push(p(layer(i, "self_attn.q_proj"), &[q, h]));
            if self.qkv_bias {
                out.push(p(layer_bias(i, "self_attn.q_proj"), &[q]));
            }
            out.push(p(layer(i, "self_attn.k_proj"), &[kv, h]));
            if self.qkv_bias {
                out.push(p(layer_bias(i, "self_attn.k_proj"), &[kv]));
            }
            out.push(p(layer(i, "self_attn.v_proj"), &[kv, h]));
            if self.qkv_bias {
                out.push(p(layer_bias(i, "self_attn.v_proj"), &[kv]));
            }
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

    fn embed(&self, g: &mut GraphBuilder<'_>, ids: ValueId) -> Result<ValueId, BuildError> {
        let table = g.param(EMBED)?;
        g.push(Op::Embed { table, ids })
    }

    /// `x + attn(norm(x))`, then `x + mlp(norm(x))`.
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

        // Self-attention.
        let w = g.param(&layer(i, "input_layernorm"))?;
        let h = g.push(Op::RmsNorm {
            x,
            w,
            eps: c.rms_norm_eps,
        })?;
        let heads = |g: &mut GraphBuilder<'_>, proj: &str, n: u32, rope: bool| {
            let w = g.param(&layer(i, proj))?;
            let mut y = g.push(Op::Linear { x: h, w })?;
            if self.qkv_bias {
                let bias = g.param(&layer_bias(i, proj))?;
                let bias = g.reshape(bias, &[1, 1, n * d])?;
                y = g.binary(BinaryOp::Add, y, bias)?;
            }
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
        let a = ctx.attend(g, i, q, k, v, 1.0 / (d as f32).sqrt())?;
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

    fn head(&self, g: &mut GraphBuilder<'_>, h: ValueId) -> Result<ValueId, BuildError> {
        let c = self.c;
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
}
