//! The Qwen2 family (Yang et al. 2024, "Qwen2 Technical Report"): the Llama decoder of
//! `llama.rs` with biases on the query, key and value projections
//! (`model.layers.{i}.self_attn.{q,k,v}_proj.bias`) and, in its checkpoints, a large RoPE
//! base and usually an untied LM head. Everything else is the Llama block.

use super::decoder::Family;
use super::llama::Llama;
use crate::spec::LlamaConfig;

/// The Qwen2 decoder.
pub(super) fn family(c: &LlamaConfig) -> impl Family + '_ {
    Llama { c, qkv_bias: true }
}
