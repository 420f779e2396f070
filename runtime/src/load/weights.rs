//! Host-side model weights keyed by Hugging Face Llama parameter names.
//!
//! Weights come from a GGUF file (names mapped from llama.cpp's scheme, Q/K
//! rows un-permuted back to the Hugging Face rotary layout) or from a
//! `.safetensors` file (names used as they are).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use kvc_compiler::family::Family;
use kvc_compiler::ir::{DType, ParamDecl};
use kvc_compiler::lower::WeightTypes;

use crate::blocks::{QuantLayout, QuantTensor};
use crate::load::gguf::{GgmlType, GgufError, GgufFile, GgufValue};

/// A weight tensor in host memory, row-major: dense `f32` values, or (a matrix kept in
/// its file form) GGUF blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, slowest-varying first.
    pub shape: Vec<usize>,
    /// Values in row-major order; `data.len()` is the product of `shape` (empty when
    /// `quant` holds the tensor).
    pub data: Vec<f32>,
    /// The matrix as GGUF blocks instead of `data`.
    pub quant: Option<QuantTensor>,
}

impl HostTensor {
    /// Number of elements described by `shape`.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Errors produced while loading weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A weight or block scale is NaN or infinite.
    #[error("tensor {name}: {what} is {value} (weights must be finite)")]
    NotFinite {
        /// Tensor name in the file.
        name: String,
        /// Which value, e.g. `element 17` or `block 3's scale`.
        what: String,
        /// The value.
        value: f32,
    },
    /// A GGUF file could not be parsed or decoded.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A file could not be read.
    #[error("cannot read weights file {path}: {source}")]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file is neither GGUF nor has a `.safetensors` extension.
    #[error("cannot tell the format of {0}: expected GGUF magic or a .safetensors extension")]
    UnknownFormat(PathBuf),
    /// A safetensors file could not be parsed.
    #[error("invalid safetensors data: {0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// A safetensors tensor has a dtype other than F32, F16 or BF16.
    #[error("tensor {name:?} has unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// Tensor name.
        name: String,
        /// The dtype found.
        dtype: String,
    },
    /// The GGUF model architecture is not one kvc lowers.
    #[error("unsupported GGUF architecture {0:?} (supported: \"llama\", \"qwen2\", \"gemma3\")")]
    UnsupportedArchitecture(String),
    /// A GGUF tensor name has no Hugging Face equivalent.
    #[error("GGUF tensor {0:?} has no known Hugging Face name")]
    UnmappedTensor(String),
    /// A tensor's shape does not suit the operation applied to it.
    #[error("tensor {name:?} has shape {shape:?}: {reason}")]
    BadShape {
        /// Tensor name.
        name: String,
        /// The shape found.
        shape: Vec<usize>,
        /// What was expected.
        reason: String,
    },
    /// A hyper-parameter in the metadata is out of range.
    #[error("metadata {key:?} has invalid value: {reason}")]
    BadHyperParameter {
        /// The metadata key.
        key: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// Shorthand result type for this module.
pub type Result<T, E = WeightsError> = std::result::Result<T, E>;

/// The model family of a GGUF file, by its `general.architecture` (the families'
/// own files say how GGUF holds them: [`kvc_compiler::family`]).
pub fn family_of(file: &GgufFile) -> Result<Family> {
    let arch = file.get_str("general.architecture")?;
    Family::of_gguf_arch(arch).ok_or_else(|| WeightsError::UnsupportedArchitecture(arch.into()))
}

/// Hyper-parameters as recorded in a GGUF file's metadata (`{arch}.*` keys).
#[derive(Debug, Clone, PartialEq)]
pub struct HyperParams {
    /// The model family.
    pub arch: Family,
    /// Number of tokens: length of `tokenizer.ggml.tokens`.
    pub vocab_size: usize,
    /// Model width (`{arch}.embedding_length`).
    pub hidden_size: usize,
    /// Number of transformer blocks (`{arch}.block_count`).
    pub num_layers: usize,
    /// MLP inner width (`{arch}.feed_forward_length`).
    pub intermediate_size: usize,
    /// Query heads (`{arch}.attention.head_count`).
    pub num_heads: usize,
    /// Key/value heads (`{arch}.attention.head_count_kv`, defaulting to `num_heads`).
    pub num_kv_heads: usize,
    /// Per-head width: `{arch}.attention.key_length`, else `hidden_size / num_heads`.
    pub head_dim: usize,
    /// RoPE base frequency (`{arch}.rope.freq_base`, default 10000).
    pub rope_theta: f32,
    /// RMSNorm epsilon (`{arch}.attention.layer_norm_rms_epsilon`).
    pub rms_norm_eps: f32,
    /// Training context length (`{arch}.context_length`).
    pub context_length: usize,
    /// Whether the file lacks `output.weight`, so the LM head reuses the embedding.
    pub tie_word_embeddings: bool,
    /// Span of the sliding-window layers (`{arch}.attention.sliding_window`), if any.
    pub sliding_window: Option<usize>,
}

fn usize_key(file: &GgufFile, key: &str) -> Result<usize> {
    let v = file.get_u64(key)?;
    usize::try_from(v).map_err(|_| WeightsError::BadHyperParameter {
        key: key.to_string(),
        reason: format!("{v} does not fit in usize"),
    })
}

/// Reads the hyper-parameters from GGUF metadata.
pub fn hyper_params(file: &GgufFile) -> Result<HyperParams> {
    let arch = family_of(file)?;
    let key = |k: &str| format!("{}.{k}", arch.gguf().arch);
    let optional = |k: &str| file.metadata().get(&key(k)).is_some();
    let vocab_size = match file.get("tokenizer.ggml.tokens")? {
        GgufValue::Array { .. } => file.array_len("tokenizer.ggml.tokens")?,
        other => {
            return Err(GgufError::WrongType {
                key: "tokenizer.ggml.tokens".into(),
                expected: "array of strings",
                found: other.describe_type(),
            }
            .into());
        }
    };
    let hidden_size = usize_key(file, &key("embedding_length"))?;
    let num_heads = usize_key(file, &key("attention.head_count"))?;
    let num_kv_heads = if optional("attention.head_count_kv") {
        usize_key(file, &key("attention.head_count_kv"))?
    } else {
        num_heads
    };
    let head_dim = if optional("attention.key_length") {
        usize_key(file, &key("attention.key_length"))?
    } else {
        if num_heads == 0 || hidden_size % num_heads != 0 {
            return Err(WeightsError::BadHyperParameter {
                key: key("attention.head_count"),
                reason: format!("{num_heads} heads do not divide width {hidden_size}"),
            });
        }
        hidden_size / num_heads
    };
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(WeightsError::BadHyperParameter {
            key: key("attention.head_count_kv"),
            reason: format!("{num_kv_heads} KV heads do not divide {num_heads} heads"),
        });
    }
    let rope_theta = if optional("rope.freq_base") {
        file.get_f32(&key("rope.freq_base"))?
    } else {
        10_000.0
    };
    let sliding_window = if optional("attention.sliding_window") {
        Some(usize_key(file, &key("attention.sliding_window"))?)
    } else {
        None
    };
    Ok(HyperParams {
        arch,
        vocab_size,
        hidden_size,
        num_layers: usize_key(file, &key("block_count"))?,
        intermediate_size: usize_key(file, &key("feed_forward_length"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta,
        rms_norm_eps: file.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
        context_length: usize_key(file, &key("context_length"))?,
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        sliding_window,
    })
}

/// Undoes llama.cpp's rotary row permutation of a Q or K projection.
///
/// `data` is a row-major `[out, in]` matrix with `out = n_head * head_dim`.
/// Within each head, GGUF row `2 * i + t` holds Hugging Face row
/// `t * head_dim / 2 + i` (for `t` in 0..2, `i` in 0..head_dim/2); the
/// result has the Hugging Face (rotate-half) row order.
pub fn unpermute_qk(name: &str, tensor: &HostTensor, n_head: usize) -> Result<HostTensor> {
    let bad = |reason: String| WeightsError::BadShape {
        name: name.to_string(),
        shape: tensor.shape.clone(),
        reason,
    };
    let [out, inner] = tensor.shape[..] else {
        return Err(bad("expected a 2-D [out, in] matrix".into()));
    };
    if n_head == 0 || out % (2 * n_head) != 0 {
        return Err(bad(format!(
            "{out} rows cannot be split into {n_head} heads of even width"
        )));
    }
    if tensor.data.len() != out * inner {
        return Err(bad(format!("data has {} values", tensor.data.len())));
    }
    let mut data = Vec::with_capacity(tensor.data.len());
    for src in qk_source_rows(out, n_head) {
        data.extend_from_slice(&tensor.data[src * inner..(src + 1) * inner]);
    }
    Ok(HostTensor {
        shape: tensor.shape.clone(),
        data,
        quant: None,
    })
}

/// Loads every tensor of a GGUF file under its Hugging Face name.
///
/// In `llama` files, Q and K projections are converted back to the Hugging Face
/// (half-split RoPE) row order; `qwen2` and `gemma3` files already use it. A file
/// without `output.weight` (tied embeddings) yields no `lm_head.weight`; see
/// [`HyperParams::tie_word_embeddings`]. Gemma 3 norm gains are kept as stored (GGUF
/// stores the `1 + weight` that multiplies the normalised value).
pub fn load_gguf_weights(file: &GgufFile) -> Result<BTreeMap<String, HostTensor>> {
    let hp = hyper_params(file)?;
    let mut out = BTreeMap::new();
    for info in file.tensors() {
        let hf = hp
            .arch
            .checkpoint_name(&info.name)
            .ok_or_else(|| WeightsError::UnmappedTensor(info.name.clone()))?;
        let (shape, data) = file.tensor_f32(&info.name)?;
        let mut tensor = HostTensor {
            shape,
            data,
            quant: None,
        };
        if let Some(n) = rope_permuted_heads(&hp, &info.name) {
            tensor = unpermute_qk(&info.name, &tensor, n)?;
        }
        out.insert(hf, tensor);
    }
    Ok(out)
}

/// The IR storage type of a GGUF tensor type: the block formats kvc's CPU kernels read as
/// they are ([`kvc_compiler::blocks`]), F16, or F32 (every other type is dequantized at
/// load).
pub fn ir_dtype(ty: GgmlType) -> DType {
    match (ty.block_format(), ty) {
        (Some(b), _) => DType::of_block(b),
        (None, GgmlType::F16) => DType::F16,
        (None, _) => DType::F32,
    }
}

/// The GGUF type of an IR block storage type (`None` for the other types).
pub fn ggml_block_type(d: DType) -> Option<GgmlType> {
    GgmlType::from_id(d.block_format()?.format().ggml_type)
}

/// The storage a GGUF file offers each parameter, by Hugging Face name: what a spec with
/// `weight_dtype: Native` compiles to ([`kvc_compiler::compile_with`]).
pub fn gguf_weight_types(file: &GgufFile) -> Result<WeightTypes> {
    let arch = family_of(file)?;
    let mut out = WeightTypes::new();
    for info in file.tensors() {
        if let Some(hf) = arch.checkpoint_name(&info.name) {
            out.insert(hf, ir_dtype(info.ty));
        }
    }
    Ok(out)
}

/// The heads of a tensor whose rows llama.cpp's converter permuted for adjacent-pair RoPE
/// (a `llama` file's Q or K projection), else `None`.
fn rope_permuted_heads(hp: &HyperParams, name: &str) -> Option<usize> {
    if !hp.arch.gguf().permuted_qk {
        None
    } else if name.ends_with(".attn_q.weight") {
        Some(hp.num_heads)
    } else if name.ends_with(".attn_k.weight") {
        Some(hp.num_kv_heads)
    } else {
        None
    }
}

/// For each row of a llama Q or K projection in Hugging Face (half-split RoPE) order, the
/// GGUF row it comes from: within each head of `head_dim` rows, row `t · head_dim/2 + i`
/// is GGUF row `2i + t`.
fn qk_source_rows(rows: usize, n_head: usize) -> Vec<usize> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    (0..rows)
        .map(|dst| {
            let (h, r) = (dst / head_dim, dst % head_dim);
            let (t, i) = (r / half, r % half);
            h * head_dim + 2 * i + t
        })
        .collect()
}

/// Byte offsets of the f16 scales in one block of a quantized type the kernels read
/// (`d`, and `m`/`dmin` where the type has one).
fn scale_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// Every block scale of a quantized tensor is finite: a NaN or infinite scale turns the
/// block's products (and then every logit) into NaN.
fn check_block_scales(name: &str, ty: GgmlType, bytes: &[u8]) -> Result<()> {
    let offsets = scale_offsets(ty);
    if offsets.is_empty() {
        return Ok(());
    }
    for (b, blk) in bytes.chunks_exact(ty.block_bytes() as usize).enumerate() {
        for &o in offsets {
            let v = half::f16::from_le_bytes([blk[o], blk[o + 1]]);
            if !v.is_finite() {
                return Err(WeightsError::NotFinite {
                    name: name.to_string(),
                    what: format!("block {b}'s scale at byte {o}"),
                    value: v.to_f32(),
                });
            }
        }
    }
    Ok(())
}

/// Loads the tensors `params` declares, each in the storage its declaration asks for:
/// GGUF blocks for a quantized declaration (shared with the mapped file; the rows of a
/// llama Q or K projection re-ordered into one copy), f32 values otherwise. A tensor the
/// program does not declare is not read. Every value and block scale must be finite.
pub fn load_gguf_params(
    file: &GgufFile,
    params: &[ParamDecl],
) -> Result<BTreeMap<String, HostTensor>> {
    load_gguf_params_with(file, params, &|w| w)
}

/// [`load_gguf_params`] with each block matrix passed through `prepare` as it is read
/// (the kernel set's weight preparation, e.g. interleaving for the CPU decode kernels): a
/// matrix `prepare` turns into another layout has its mapped pages released at once, so
/// the file and the prepared copy are never resident together.
pub fn load_gguf_params_with(
    file: &GgufFile,
    params: &[ParamDecl],
    prepare: &(dyn Fn(QuantTensor) -> QuantTensor + Sync),
) -> Result<BTreeMap<String, HostTensor>> {
    let hp = hyper_params(file)?;
    let by_hf: BTreeMap<String, &str> = file
        .tensors()
        .iter()
        .filter_map(|t| {
            hp.arch
                .checkpoint_name(&t.name)
                .map(|hf| (hf, t.name.as_str()))
        })
        .collect();
    let mut out = BTreeMap::new();
    for decl in params {
        let Some(&name) = by_hf.get(&decl.name) else {
            continue;
        };
        let info = file
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let heads = rope_permuted_heads(&hp, name);
        let shape = info.shape();
        if !decl.ty.dtype.is_quantized() {
            let (shape, data) = file.tensor_f32(name)?;
            file.release_tensor(name);
            if let Some((i, &v)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(WeightsError::NotFinite {
                    name: name.to_string(),
                    what: format!("element {i}"),
                    value: v,
                });
            }
            let mut t = HostTensor {
                shape,
                data,
                quant: None,
            };
            if let Some(n) = heads {
                t = unpermute_qk(name, &t, n)?;
            }
            out.insert(decl.name.clone(), t);
            continue;
        }
        if ir_dtype(info.ty) != decl.ty.dtype {
            return Err(WeightsError::BadShape {
                name: name.to_string(),
                shape,
                reason: format!(
                    "stored as {} in the file, but the program was compiled for {}",
                    info.ty, decl.ty.dtype
                ),
            });
        }
        let [rows, cols] = shape[..] else {
            return Err(WeightsError::BadShape {
                name: name.to_string(),
                shape,
                reason: "expected a 2-D [out, in] matrix of blocks".into(),
            });
        };
        let mut bytes = file.tensor_shared(name)?;
        check_block_scales(name, info.ty, &bytes)?;
        if let Some(n) = heads {
            if n == 0 || rows % (2 * n) != 0 {
                return Err(WeightsError::BadShape {
                    name: name.to_string(),
                    shape,
                    reason: format!("{rows} rows cannot be split into {n} heads of even width"),
                });
            }
            let rb = bytes.len() / rows;
            let mut v = Vec::with_capacity(bytes.len());
            for src in qk_source_rows(rows, n) {
                v.extend_from_slice(&bytes[src * rb..(src + 1) * rb]);
            }
            bytes = bytes::Bytes::from(v);
            file.release_tensor(name);
        }
        let quant = prepare(QuantTensor {
            ty: info.ty,
            rows,
            cols,
            bytes,
            layout: QuantLayout::File,
        });
        if quant.layout != QuantLayout::File {
            file.release_tensor(name);
        }
        out.insert(
            decl.name.clone(),
            HostTensor {
                shape,
                data: Vec::new(),
                quant: Some(quant),
            },
        );
    }
    Ok(out)
}

/// Loads every tensor of a safetensors buffer (F32, F16 or BF16) under its own name.
pub fn load_safetensors_bytes(bytes: &[u8]) -> Result<BTreeMap<String, HostTensor>> {
    let st = SafeTensors::deserialize(bytes)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(WeightsError::UnsupportedDtype {
                    name,
                    dtype: format!("{other:?}"),
                });
            }
        };
        out.insert(
            name,
            HostTensor {
                shape: view.shape().to_vec(),
                data,
                quant: None,
            },
        );
    }
    Ok(out)
}

/// Loads weights from a GGUF file (detected by its magic bytes; mapped, not
/// read, see [`GgufFile::open`]) or a `.safetensors` file, keyed by Hugging
/// Face parameter names.
pub fn load_weights(path: impl AsRef<Path>) -> Result<BTreeMap<String, HostTensor>> {
    let path = path.as_ref();
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Only regular files: a FIFO would wait for a writer, a device never end.
    kvc_compiler::files::check_regular(path, u64::MAX).map_err(|e| match e {
        kvc_compiler::files::ReadError::Io(e) => io(e),
        other => io(std::io::Error::new(
            ErrorKind::InvalidInput,
            other.to_string(),
        )),
    })?;
    let mut magic = [0u8; 4];
    let is_gguf = match File::open(path).and_then(|mut f| f.read_exact(&mut magic)) {
        Ok(()) => magic == crate::load::gguf::GGUF_MAGIC,
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(io(e)),
    };
    if is_gguf {
        return load_gguf_weights(&GgufFile::open(path)?);
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        let bytes = std::fs::read(path).map_err(io)?;
        return load_safetensors_bytes(&bytes);
    }
    Err(WeightsError::UnknownFormat(path.to_path_buf()))
}

#[cfg(test)]
mod tests;
