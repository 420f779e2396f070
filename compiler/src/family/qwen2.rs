//! The Qwen2 family (Yang et al. 2024, "Qwen2 Technical Report"): the Llama decoder of
//! `llama.rs` with biases on the query, key and value projections
//! (`model.layers.{i}.self_attn.{q,k,v}_proj.bias`) and, in its checkpoints, a large RoPE
//! base and usually an untied LM head. Everything else is the Llama block.

use super::Gguf;
use super::llama::{Llama, LlamaConfig};
use crate::lower::decoder::Family;

/// How GGUF files hold a Qwen2 checkpoint: the Llama names plus the projection biases;
/// Q and K rows as the checkpoint has them.
pub const GGUF: Gguf = Gguf {
    arch: "qwen2",
    layer_tensors: &[
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
        ("attn_q.bias", "self_attn.q_proj.bias"),
        ("attn_k.bias", "self_attn.k_proj.bias"),
        ("attn_v.bias", "self_attn.v_proj.bias"),
    ],
    permuted_qk: false,
};

/// The Qwen2 decoder.
pub(crate) fn family(c: &LlamaConfig) -> impl Family + '_ {
    Llama { c, qkv_bias: true }
}
