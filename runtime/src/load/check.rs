//! The spec ↔ GGUF cross-check at load: every hyper-parameter a spec states is compared
//! with the file's metadata before any weight is used, so a spec with the wrong head
//! split, epsilon or window is a typed error naming the key and both values instead of a
//! model that loads and prints garbage.

use kvc_compiler::spec::Arch;

use super::gguf::GgufFile;
use super::weights::{self, HyperParams, WeightsError};

/// A spec that does not describe the GGUF file it loads.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The file's metadata could not be read.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// The spec names another family than the file holds.
    #[error(
        "the spec describes a {spec} model, but the GGUF file's general.architecture is {file:?}"
    )]
    Family {
        /// The spec's family (`Llama`, `Qwen2`, `Gemma3`).
        spec: &'static str,
        /// The file's architecture.
        file: &'static str,
    },
    /// A hyper-parameter differs.
    #[error("spec field arch.{family}.{field} = {spec}, but the GGUF file has {key} = {file}")]
    Mismatch {
        /// The spec's family.
        family: &'static str,
        /// The spec field.
        field: &'static str,
        /// The GGUF metadata key (or what the file shows, e.g. `output.weight` present).
        key: String,
        /// The spec's value.
        spec: String,
        /// The file's value.
        file: String,
    },
}

/// Checks that `arch` (a spec's architecture section) describes `file`.
pub fn spec_matches_gguf(arch: &Arch, file: &GgufFile) -> Result<(), CheckError> {
    let hp = weights::hyper_params(file)?;
    spec_matches(arch, &hp)
}

/// Checks `arch` against hyper-parameters read from a file.
pub fn spec_matches(arch: &Arch, hp: &HyperParams) -> Result<(), CheckError> {
    if arch.kind() != hp.arch {
        return Err(CheckError::Family {
            spec: arch.family(),
            file: hp.arch.gguf().arch,
        });
    }
    let family = arch.family();
    let a = hp.arch.gguf().arch;
    let d = arch.dims();
    let key = |k: &str| format!("{a}.{k}");
    let mismatch = |field: &'static str, key: String, spec: String, file: String| {
        Err(CheckError::Mismatch {
            family,
            field,
            key,
            spec,
            file,
        })
    };
    let ints: [(&'static str, String, u32, usize); 8] = [
        (
            "vocab_size",
            "tokenizer.ggml.tokens (length)".into(),
            d.vocab_size,
            hp.vocab_size,
        ),
        (
            "hidden_size",
            key("embedding_length"),
            d.hidden_size,
            hp.hidden_size,
        ),
        (
            "num_layers",
            key("block_count"),
            d.num_layers,
            hp.num_layers,
        ),
        (
            "num_heads",
            key("attention.head_count"),
            d.num_heads,
            hp.num_heads,
        ),
        (
            "num_kv_heads",
            key("attention.head_count_kv"),
            d.num_kv_heads,
            hp.num_kv_heads,
        ),
        (
            "head_dim",
            key("attention.key_length"),
            d.head_dim,
            hp.head_dim,
        ),
        (
            "intermediate_size",
            key("feed_forward_length"),
            d.intermediate_size,
            hp.intermediate_size,
        ),
        (
            "max_position_embeddings",
            key("context_length"),
            d.max_position_embeddings,
            hp.context_length,
        ),
    ];
    for (field, key, spec, file) in ints {
        if spec as usize != file {
            return mismatch(field, key, spec.to_string(), file.to_string());
        }
    }
    let close = |x: f32, y: f32| (x - y).abs() <= 1e-6 * x.abs().max(y.abs());
    let eps = arch.rms_norm_eps();
    if !close(eps, hp.rms_norm_eps) {
        return mismatch(
            "rms_norm_eps",
            key("attention.layer_norm_rms_epsilon"),
            format!("{eps:e}"),
            format!("{:e}", hp.rms_norm_eps),
        );
    }
    // The global RoPE base; Gemma 3's local base is not in GGUF files (llama.cpp fixes
    // it at 10000 for the family).
    let (_, theta) = arch.rope_bases()[0];
    if !close(theta, hp.rope_theta) {
        return mismatch(
            "rope_theta",
            key("rope.freq_base"),
            theta.to_string(),
            hp.rope_theta.to_string(),
        );
    }
    let tied = arch.tied_embeddings();
    if tied != hp.tie_word_embeddings {
        let shown = |t: bool| {
            if t {
                "tied (no output.weight)"
            } else {
                "untied (output.weight)"
            }
        };
        return mismatch(
            "tie_word_embeddings",
            "output.weight".into(),
            shown(tied).into(),
            shown(hp.tie_word_embeddings).into(),
        );
    }
    if let Arch::Gemma3(g) = arch
        && hp.sliding_window != Some(g.sliding_window as usize)
    {
        return mismatch(
            "sliding_window",
            key("attention.sliding_window"),
            g.sliding_window.to_string(),
            hp.sliding_window
                .map_or_else(|| "(absent)".into(), |w| w.to_string()),
        );
    }
    Ok(())
}
