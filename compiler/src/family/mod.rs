//! One file per model family: its configuration (the spec's `arch` section), its lowering
//! onto the shared decoder skeleton ([`crate::lower`]), its checkpoint tensor names and how
//! GGUF files hold it ([`Gguf`]: architecture key, tensor names, row order). The runtime's
//! GGUF loader and checks read the facts from here.

pub mod gemma3;
pub mod llama;
pub mod qwen2;

use serde::{Deserialize, Serialize};

/// The model families, without their hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    /// [`llama`].
    Llama,
    /// [`qwen2`].
    Qwen2,
    /// [`gemma3`].
    Gemma3,
}

/// How a family's GGUF files (llama.cpp's conventions) hold its checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gguf {
    /// `general.architecture`, also the prefix of its hyper-parameter keys
    /// (`{arch}.block_count`, ...).
    pub arch: &'static str,
    /// Per-layer tensors the family names its own way (looked up before
    /// [`LAYER_TENSORS`]): `(GGUF name after
    /// `blk.{i}.`, checkpoint name after `model.layers.{i}.`)`.
    pub layer_tensors: &'static [(&'static str, &'static str)],
    /// Whether the converter permuted each Q and K head's rows for adjacent-pair RoPE.
    pub permuted_qk: bool,
}

/// Whole-model tensors every family names alike: `(GGUF name, checkpoint name)`.
pub const MODEL_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-layer tensors every family names alike: `(GGUF name after `blk.{i}.`, checkpoint
/// name after `model.layers.{i}.`)`.
pub const LAYER_TENSORS: [(&str, &str); 8] = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

impl Family {
    /// Every family.
    pub const ALL: [Family; 3] = [Family::Llama, Family::Qwen2, Family::Gemma3];

    /// The family's name as a spec writes it (`Llama`, `Qwen2`, `Gemma3`).
    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "Llama",
            Family::Qwen2 => "Qwen2",
            Family::Gemma3 => "Gemma3",
        }
    }

    /// How GGUF files hold the family.
    pub fn gguf(self) -> &'static Gguf {
        match self {
            Family::Llama => &llama::GGUF,
            Family::Qwen2 => &qwen2::GGUF,
            Family::Gemma3 => &gemma3::GGUF,
        }
    }

    /// The family of a GGUF file's `general.architecture`.
    pub fn of_gguf_arch(arch: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.gguf().arch == arch)
    }

    /// The checkpoint name of GGUF tensor `name` in this family (`None` for a tensor the
    /// family does not have).
    pub fn checkpoint_name(self, name: &str) -> Option<String> {
        if let Some((_, hf)) = MODEL_TENSORS.iter().find(|(g, _)| *g == name) {
            return Some((*hf).into());
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, suffix) = rest.split_once('.')?;
        if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let layer: usize = layer.parse().ok()?;
        // The family's own names first: they may rename a shared one.
        let (_, hf) = self
            .gguf()
            .layer_tensors
            .iter()
            .chain(&LAYER_TENSORS)
            .find(|(g, _)| *g == suffix)?;
        Some(format!("model.layers.{layer}.{hf}"))
    }
}
