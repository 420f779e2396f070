//! kvc's intermediate representation: plain data, serde on all of it.
//!
//! A [`Program`] holds a parameter table, a state table and exactly two [`Graph`]s
//! (prefill and decode). A graph is an arena of [`Node`]s; a node's index is its
//! [`ValueId`], and every node produces exactly one value of a static [`Type`].
//!
//! Invariants of a verified program (checked by [`crate::verify`]):
//! - nodes appear after their arguments (the node list is a valid schedule);
//! - every node's recorded type equals the type its op's typing rule gives;
//! - every dimension is a compile-time constant greater than zero;
//! - a state variable is updated at most once per graph, with a value of its declared type;
//! - parameter, state, input and output names are unique.

mod builder;
mod display;
pub mod parse;
mod typing;

pub use builder::{BuildError, GraphBuilder};
pub use display::{GraphDisplay, Tables};
pub use typing::{Decls, infer_type};

use crate::blocks::Block;
use serde::{Deserialize, Serialize};

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float (weight storage).
    F16,
    /// 32-bit signed integer (token ids, positions, lengths).
    I32,
    /// 8-bit signed integer (quantized KV cache storage).
    I8,
    /// Boolean (masks, done flags).
    Bool,
    /// GGUF `Q4_0` blocks (weight storage): 32 values in 18 bytes.
    Q4_0,
    /// GGUF `Q4_1` blocks: 32 values in 20 bytes.
    Q4_1,
    /// GGUF `Q5_0` blocks: 32 values in 22 bytes.
    Q5_0,
    /// GGUF `Q5_1` blocks: 32 values in 24 bytes.
    Q5_1,
    /// GGUF `Q8_0` blocks: 32 values in 34 bytes.
    Q8_0,
    /// GGUF `Q4_K` super-blocks: 256 values in 144 bytes.
    Q4K,
    /// GGUF `Q5_K` super-blocks: 256 values in 176 bytes.
    Q5K,
    /// GGUF `Q6_K` super-blocks: 256 values in 210 bytes.
    Q6K,
}

impl DType {
    /// Every quantized weight type, in [`Block::ALL`] order.
    pub const QUANTIZED: [DType; 8] = {
        let mut out = [DType::F32; 8];
        let mut i = 0;
        while i < 8 {
            out[i] = DType::of_block(Block::ALL[i]);
            i += 1;
        }
        out
    };

    /// The storage type of GGUF blocks of format `b`.
    pub const fn of_block(b: Block) -> DType {
        match b {
            Block::Q4_0 => DType::Q4_0,
            Block::Q4_1 => DType::Q4_1,
            Block::Q5_0 => DType::Q5_0,
            Block::Q5_1 => DType::Q5_1,
            Block::Q8_0 => DType::Q8_0,
            Block::Q4K => DType::Q4K,
            Block::Q5K => DType::Q5K,
            Block::Q6K => DType::Q6K,
        }
    }

    /// The block format of a block-quantized type.
    pub const fn block_format(self) -> Option<Block> {
        Some(match self {
            DType::F32 | DType::F16 | DType::I32 | DType::I8 | DType::Bool => return None,
            DType::Q4_0 => Block::Q4_0,
            DType::Q4_1 => Block::Q4_1,
            DType::Q5_0 => Block::Q5_0,
            DType::Q5_1 => Block::Q5_1,
            DType::Q8_0 => Block::Q8_0,
            DType::Q4K => Block::Q4K,
            DType::Q5K => Block::Q5K,
            DType::Q6K => Block::Q6K,
        })
    }

    /// For a block-quantized type, `(values, bytes)` per block along the last dimension.
    pub fn block(self) -> Option<(u32, u32)> {
        self.block_format()
            .map(|b| (b.format().values, b.format().bytes()))
    }

    /// Whether values are stored as GGUF blocks (weights only).
    pub fn is_quantized(self) -> bool {
        self.block().is_some()
    }

    /// Bytes per element as the runtime stores it; for a block-quantized type, the bytes
    /// of a block divided by its values (use [`Type::size_bytes`] for exact sizes).
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::Bool | DType::I8 => 1,
            quantized => {
                let (values, bytes) = quantized.block().expect("quantized");
                (bytes as u64).div_ceil(values as u64)
            }
        }
    }
}

/// A static tensor type: dtype and concrete shape (slowest dimension first).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Type {
    /// Element type.
    pub dtype: DType,
    /// Dimensions, slowest first. Every dimension is a constant > 0.
    pub shape: Vec<u32>,
}

impl Type {
    /// Builds a type.
    pub fn new(dtype: DType, shape: impl Into<Vec<u32>>) -> Type {
        Type {
            dtype,
            shape: shape.into(),
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        // Saturating: a hostile artifact's shape must not wrap (the verifier then refuses
        // anything over `verify::MAX_VALUE_BYTES`).
        self.shape
            .iter()
            .fold(1u64, |n, &d| n.saturating_mul(d as u64))
    }

    /// Bytes the tensor occupies.
    pub fn size_bytes(&self) -> u64 {
        match self.dtype.block() {
            // A quantized type's last dimension is a whole number of blocks (typing checks).
            Some((values, bytes)) => (self.numel() / values as u64).saturating_mul(bytes as u64),
            None => self.numel().saturating_mul(self.dtype.size_bytes()),
        }
    }
}

/// Handle of a node (and of the value it produces) inside one graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueId(pub u32);

/// Handle of an entry of [`Program::params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ParamId(pub u32);

/// Handle of an entry of [`Program::state`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StateId(pub u32);

/// Handle of an entry of [`Graph::inputs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InputId(pub u32);

/// A constant scalar.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Scalar {
    /// A float constant.
    F32(f32),
    /// An integer constant.
    I32(i32),
    /// A boolean constant.
    Bool(bool),
}

impl Scalar {
    /// The dtype of the constant.
    pub fn dtype(self) -> DType {
        match self {
            Scalar::F32(_) => DType::F32,
            Scalar::I32(_) => DType::I32,
            Scalar::Bool(_) => DType::Bool,
        }
    }
}

/// Element-wise binary operators. Operands have equal rank; a dimension of 1 broadcasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BinaryOp {
    /// `a + b` (F32 or I32).
    Add,
    /// `a - b` (F32 or I32).
    Sub,
    /// `a * b` (F32 or I32).
    Mul,
    /// `min(a, b)` (F32 or I32).
    Min,
    /// `max(a, b)` (F32 or I32).
    Max,
    /// `a / b` (F32 only; IEEE division).
    Div,
    /// `a == b` → Bool (operands of one dtype).
    Eq,
    /// `a < b` → Bool (F32 or I32).
    Lt,
    /// `a <= b` → Bool (F32 or I32).
    Le,
    /// `a && b` (Bool).
    And,
    /// `a || b` (Bool).
    Or,
}

/// The closed set of operations. Every consumer (typing, printer, verifier, executor)
/// matches exhaustively, so a new op fails to compile until all of them handle it.
/// Semantics and typing rules are documented per variant and in `docs/ir.md`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A graph input supplied by the host.
    Input(InputId),
    /// A model parameter (weights), bound by name at load time.
    Param(ParamId),
    /// The current value of a state variable (KV cache, positions, flags).
    State(StateId),
    /// A tensor filled with one constant.
    Const {
        /// The fill value; gives the dtype.
        value: Scalar,
        /// Output shape.
        shape: Vec<u32>,
    },
    /// I32 tensor whose element is its index along `dim`.
    Iota {
        /// Output shape.
        shape: Vec<u32>,
        /// The dimension whose index is stored.
        dim: u32,
    },
    /// `table[ids]`: table `[V, H]` F32 or F16, ids `[..]` I32 → `[.., H]` F32.
    Embed {
        /// Embedding table.
        table: ValueId,
        /// Token ids, each in `0..V`.
        ids: ValueId,
    },
    /// `x · wᵀ`: x `[.., K]` F32, w `[N, K]` F32 or F16 (checkpoint layout `[out, in]`)
    /// → `[.., N]` F32. With F16 weights the product is computed in f16.
    Linear {
        /// Input activations.
        x: ValueId,
        /// Weight matrix `[out, in]`.
        w: ValueId,
    },
    /// RMSNorm over the last dim: `x / sqrt(mean(x²) + eps) * w`; w `[H]`.
    RmsNorm {
        /// Input `[.., H]`.
        x: ValueId,
        /// Gain `[H]`.
        w: ValueId,
        /// Added to the mean square.
        eps: f32,
    },
    /// Rotary position embedding, half-split layout (`rotate_half`): for head dim `D`,
    /// pair `(i, i + D/2)` rotates by `pos · theta^(-2i/D)`. x `[B, T, N, D]`,
    /// pos `[B, T]` I32 → `[B, T, N, D]`.
    Rope {
        /// Queries or keys, `[B, T, heads, D]`.
        x: ValueId,
        /// Position of each token.
        pos: ValueId,
        /// Base frequency.
        theta: f32,
    },
    /// Masked scaled-dot-product attention with grouped KV heads.
    /// q `[B, Hq, T, D]` F32, k/v `[B, Hkv, S, D]` both F32 or both F16 (an F16 cache is
    /// widened as it is read), mask `[B, M, T, S]` Bool with `M` = 1 (one
    /// mask for every head) or `Hkv` (one per KV head); true = may attend
    /// → `[B, Hq, T, D]`. Query head `h` reads KV head `h / (Hq / Hkv)`. A query with no
    /// visible slot yields zeros (and is never used by a valid graph).
    Attention {
        /// Queries.
        q: ValueId,
        /// Keys (the cache).
        k: ValueId,
        /// Values (the cache).
        v: ValueId,
        /// Which slots each query may see.
        mask: ValueId,
        /// Multiplies the dot products (usually `1/sqrt(D)`).
        scale: f32,
    },
    /// Writes new entries into a cache: for each row `b`, head `h` and `t < len[b]`,
    /// `cache[b, h, start[b, h] + t, :] = new[b, h, t, :]`; all other slots keep their
    /// value. cache `[B, H, S, D]` (F32, F16 or I8), new `[B, H, T, D]` of the same dtype, start `[B]` (the same slot for
    /// every head) or `[B, H]`, len `[B]`, both I32 → `[B, H, S, D]`.
    /// Requires `start + len[b] <= S` (the runtime's request check and the policies'
    /// slot arithmetic guarantee it).
    KvWrite {
        /// The cache being updated (consumed: the result replaces it).
        cache: ValueId,
        /// Entries to write.
        new: ValueId,
        /// First slot written per row.
        start: ValueId,
        /// Entries written per row (`0..=T`).
        len: ValueId,
    },
    /// `x · sigmoid(x)`.
    Silu {
        /// Input.
        x: ValueId,
    },
    /// GELU, tanh approximation: `x/2 · (1 + tanh(√(2/π) · (x + 0.044715·x³)))`.
    Gelu {
        /// Input.
        x: ValueId,
    },
    /// Element-wise binary op with broadcasting.
    Binary {
        /// Which operator.
        op: BinaryOp,
        /// Left operand.
        a: ValueId,
        /// Right operand.
        b: ValueId,
    },
    /// Logical not of a Bool tensor.
    Not {
        /// Input.
        x: ValueId,
    },
    /// Membership: `out[i] = x[i] ∈ values`. x I32 → Bool of the same shape. `values`
    /// holds at most [`MAX_IS_IN_VALUES`] constants (a spec's stop tokens).
    IsIn {
        /// Input.
        x: ValueId,
        /// The set (order kept as written; duplicates are harmless).
        values: Vec<i32>,
    },
    /// `cond ? a : b` element-wise with broadcasting.
    Select {
        /// Bool condition.
        cond: ValueId,
        /// Taken where `cond` is true.
        a: ValueId,
        /// Taken where `cond` is false.
        b: ValueId,
    },
    /// Element-wise conversion (Bool → I32 gives 0/1).
    Cast {
        /// Input.
        x: ValueId,
        /// Target dtype.
        dtype: DType,
    },
    /// Same elements, new shape (row-major order); element counts must match.
    Reshape {
        /// Input.
        x: ValueId,
        /// New shape.
        shape: Vec<u32>,
    },
    /// Reorders dimensions: output dim `i` is input dim `perm[i]`.
    Permute {
        /// Input.
        x: ValueId,
        /// A permutation of `0..rank`.
        perm: Vec<u32>,
    },
    /// One row per batch entry: x `[B, T, H]`, index `[B]` I32 → `[B, H]`,
    /// `out[b] = x[b, index[b]]`. Indices are clamped into `0..T`.
    TakeRow {
        /// Input.
        x: ValueId,
        /// Row to take per batch entry.
        index: ValueId,
    },
    /// Draws one token per row: logits `[B, V]`, temperature `[B]` F32, top_k `[B]` I32,
    /// top_p `[B]` F32, uniform `[B]` F32 in `[0, 1)` → `[B]` I32. A row with
    /// temperature <= 0 takes the argmax. Otherwise tokens are ranked by logit (ties in any
    /// order); rank `r` is kept iff `top_k <= 0 || r < top_k` and the probability mass
    /// of the ranks before it is below `top_p` (rank 0 is always kept); the kept
    /// probabilities of `softmax(logits / temperature)` are renormalised and the token is
    /// the first whose cumulative probability exceeds `uniform`.
    Sample {
        /// Logits per row.
        logits: ValueId,
        /// Softmax temperature per row.
        temperature: ValueId,
        /// Top-k cut per row (0 = off).
        top_k: ValueId,
        /// Top-p (nucleus) cut per row (1 = off).
        top_p: ValueId,
        /// The row's uniform draw for this position.
        uniform: ValueId,
    },
    /// Attention probabilities: `out[b, h, t, s] = softmax_s(scale · q[b, h, t] ·
    /// k[b, h / g, s])` over the slots the mask shows (hidden slots get 0; a query with no
    /// visible slot gets all zeros), `g = Hq / Hkv`. q `[B, Hq, T, D]`, k `[B, Hkv, S, D]`
    /// (F32 or F16), mask as in [`Op::Attention`] → `[B, Hq, T, S]` F32.
    AttentionProbs {
        /// Queries.
        q: ValueId,
        /// Keys.
        k: ValueId,
        /// Which slots each query may see.
        mask: ValueId,
        /// Multiplies the dot products.
        scale: f32,
    },
    /// The attention output from its probabilities: `out[b, h, t, :] = Σ_s probs[b, h, t,
    /// s] · v[b, h / g, s, :]`. probs `[B, Hq, T, S]` F32, v `[B, Hkv, S, D]` F32 or F16 →
    /// `[B, Hq, T, D]`. `attention_values(attention_probs(q, k, mask), v)` equals
    /// `attention(q, k, v, mask)`; the pass `share_attention_probs` makes that rewrite
    /// where the probabilities are computed anyway.
    AttentionValues {
        /// Probabilities from [`Op::AttentionProbs`].
        probs: ValueId,
        /// Values (the cache).
        v: ValueId,
    },
    /// Attention probability mass each key receives, averaged over the query heads of
    /// its KV group and summed over weighted queries:
    /// `out[b, h, s] = Σ_t weight[b, t] · (1/g) Σ_{j<g} probs[b, h·g+j, t, s]`.
    /// probs `[B, Hq, T, S]` F32 (from [`Op::AttentionProbs`]), weight `[B, T]` F32 →
    /// `[B, kv_heads, S]` F32; `kv_heads` divides `Hq`.
    AttentionMass {
        /// Probabilities from [`Op::AttentionProbs`].
        probs: ValueId,
        /// Weight of each query (0 drops it).
        weight: ValueId,
        /// KV heads (`Hkv`); `g = Hq / kv_heads` query heads share one.
        kv_heads: u32,
    },
    /// Gathers slots: `out[b, h, m, ..] = x[b, h, index[b, h, m], ..]`.
    /// x `[B, H, N]` (any dtype) or `[B, H, N, D]` (F32, F16 or I8), index `[B, H, M]` I32 with values in
    /// `0..N` → `[B, H, M]` or `[B, H, M, D]`.
    Gather {
        /// Source.
        x: ValueId,
        /// Slot to read per output slot.
        index: ValueId,
    },
    /// Indices of the `k` largest elements over the last dim, largest first, ordered by
    /// `(x, tiebreak)` descending and then by lower index. x `[.., N]` F32, tiebreak
    /// `[.., N]` I32 (same shape) → `[.., k]` I32, `k <= N`. `x` is finite and compares
    /// as an IEEE number (−0 equals +0). Decisions of the KV policies never depend on an
    /// unspecified order.
    TopK {
        /// Primary key.
        x: ValueId,
        /// Secondary key for equal `x`.
        tiebreak: ValueId,
        /// How many indices.
        k: u32,
    },
    /// Sum over the last dim: x `[.., N]` F32 → `[..]`. Rank ≥ 2.
    Sum {
        /// Input.
        x: ValueId,
    },
    /// A counter-based random number per element: `hash(seed, a, b)` mapped to `[0, 1)`
    /// F32 (murmur3's 32-bit finalizer applied to `seed ^ a`, then to that `^ b`; the top
    /// 24 bits over 2²⁴). a, b I32 with broadcasting. Identical on every backend.
    Hash {
        /// First counter.
        a: ValueId,
        /// Second counter.
        b: ValueId,
        /// Stream seed.
        seed: u32,
    },
    /// Largest magnitude over the last dim, kept as a dim of 1: x `[.., N]` F32 →
    /// `[.., 1]` F32.
    AbsMax {
        /// Input.
        x: ValueId,
    },
    /// Symmetric int8 quantization: `clamp(round(x / scale), -127, 127)`, halves rounded
    /// to even. x `[.., N]` F32,
    /// scale F32 broadcastable to x (e.g. `[.., 1]`, all > 0) → `[.., N]` I8.
    /// `cast(q, f32) * scale` dequantizes.
    Quantize {
        /// Input.
        x: ValueId,
        /// Step size.
        scale: ValueId,
    },
    /// Index of the largest element over the last dim (first one on ties):
    /// x `[.., N]` F32 → `[..]` I32. Rank ≥ 2.
    Argmax {
        /// Input.
        x: ValueId,
    },
}

impl Op {
    /// The values this op reads, in order.
    pub fn args(&self) -> Vec<ValueId> {
        match *self {
            Op::Input(_) | Op::Param(_) | Op::State(_) | Op::Const { .. } | Op::Iota { .. } => {
                vec![]
            }
            Op::Embed { table, ids } => vec![table, ids],
            Op::Linear { x, w } => vec![x, w],
            Op::RmsNorm { x, w, .. } => vec![x, w],
            Op::Rope { x, pos, .. } => vec![x, pos],
            Op::Attention { q, k, v, mask, .. } => vec![q, k, v, mask],
            Op::KvWrite {
                cache,
                new,
                start,
                len,
            } => vec![cache, new, start, len],
            Op::Silu { x }
            | Op::Gelu { x }
            | Op::Not { x }
            | Op::IsIn { x, .. }
            | Op::Cast { x, .. }
            | Op::Argmax { x }
            | Op::Sum { x }
            | Op::AbsMax { x } => vec![x],
            Op::Quantize { x, scale } => vec![x, scale],
            Op::AttentionProbs { q, k, mask, .. } => vec![q, k, mask],
            Op::AttentionValues { probs, v } => vec![probs, v],
            Op::AttentionMass { probs, weight, .. } => vec![probs, weight],
            Op::Gather { x, index } => vec![x, index],
            Op::TopK { x, tiebreak, .. } => vec![x, tiebreak],
            Op::Hash { a, b, .. } => vec![a, b],
            Op::Reshape { x, .. } | Op::Permute { x, .. } => vec![x],
            Op::Binary { a, b, .. } => vec![a, b],
            Op::Select { cond, a, b } => vec![cond, a, b],
            Op::TakeRow { x, index } => vec![x, index],
            Op::Sample {
                logits,
                temperature,
                top_k,
                top_p,
                uniform,
            } => {
                vec![logits, temperature, top_k, top_p, uniform]
            }
        }
    }

    /// Rewrites every argument through `f` (used by passes that renumber nodes).
    pub fn map_args(&mut self, mut f: impl FnMut(ValueId) -> ValueId) {
        match self {
            Op::Input(_) | Op::Param(_) | Op::State(_) | Op::Const { .. } | Op::Iota { .. } => {}
            Op::Embed { table, ids } => {
                *table = f(*table);
                *ids = f(*ids);
            }
            Op::Linear { x, w } | Op::RmsNorm { x, w, .. } => {
                *x = f(*x);
                *w = f(*w);
            }
            Op::Rope { x, pos, .. } => {
                *x = f(*x);
                *pos = f(*pos);
            }
            Op::Attention { q, k, v, mask, .. } => {
                *q = f(*q);
                *k = f(*k);
                *v = f(*v);
                *mask = f(*mask);
            }
            Op::KvWrite {
                cache,
                new,
                start,
                len,
            } => {
                *cache = f(*cache);
                *new = f(*new);
                *start = f(*start);
                *len = f(*len);
            }
            Op::Silu { x }
            | Op::Gelu { x }
            | Op::Not { x }
            | Op::IsIn { x, .. }
            | Op::Cast { x, .. }
            | Op::Argmax { x }
            | Op::Sum { x }
            | Op::AbsMax { x }
            | Op::Reshape { x, .. }
            | Op::Permute { x, .. } => *x = f(*x),
            Op::AttentionProbs { q, k, mask, .. } => {
                *q = f(*q);
                *k = f(*k);
                *mask = f(*mask);
            }
            Op::AttentionValues { probs, v } => {
                *probs = f(*probs);
                *v = f(*v);
            }
            Op::AttentionMass { probs, weight, .. } => {
                *probs = f(*probs);
                *weight = f(*weight);
            }
            Op::Gather { x, index } => {
                *x = f(*x);
                *index = f(*index);
            }
            Op::Quantize { x, scale } => {
                *x = f(*x);
                *scale = f(*scale);
            }
            Op::TopK { x, tiebreak, .. } => {
                *x = f(*x);
                *tiebreak = f(*tiebreak);
            }
            Op::Hash { a, b, .. } => {
                *a = f(*a);
                *b = f(*b);
            }
            Op::Binary { a, b, .. } => {
                *a = f(*a);
                *b = f(*b);
            }
            Op::Select { cond, a, b } => {
                *cond = f(*cond);
                *a = f(*a);
                *b = f(*b);
            }
            Op::TakeRow { x, index } => {
                *x = f(*x);
                *index = f(*index);
            }
            Op::Sample {
                logits,
                temperature,
                top_k,
                top_p,
                uniform,
            } => {
                *logits = f(*logits);
                *temperature = f(*temperature);
                *top_k = f(*top_k);
                *top_p = f(*top_p);
                *uniform = f(*uniform);
            }
        }
    }
}

/// One node: an op and the type of the value it produces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// The operation.
    pub op: Op,
    /// Type of the produced value.
    pub ty: Type,
}

/// A host-supplied graph input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputDecl {
    /// Input name (unique within the graph).
    pub name: String,
    /// Its type.
    pub ty: Type,
}

/// A named graph result returned to the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// Output name (unique within the graph).
    pub name: String,
    /// The value returned.
    pub value: ValueId,
}

/// The new value of a state variable after the graph runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateUpdate {
    /// Which variable.
    pub state: StateId,
    /// Its new value (same type as the declaration).
    pub value: ValueId,
}

/// A fixed-shape dataflow graph. `nodes[i]` defines `ValueId(i)`; nodes appear after
/// their arguments. State variables not listed in `updates` keep their value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    /// `prefill` or `decode`.
    pub name: String,
    /// Host inputs, referenced by [`Op::Input`].
    pub inputs: Vec<InputDecl>,
    /// The node arena, in schedule order.
    pub nodes: Vec<Node>,
    /// Values returned to the host.
    pub outputs: Vec<Output>,
    /// State written back.
    pub updates: Vec<StateUpdate>,
}

impl Graph {
    /// An empty graph with the given name and inputs.
    pub fn new(name: &str, inputs: Vec<InputDecl>) -> Graph {
        Graph {
            name: name.to_string(),
            inputs,
            nodes: vec![],
            outputs: vec![],
            updates: vec![],
        }
    }

    /// The type of a value.
    pub fn ty(&self, v: ValueId) -> &Type {
        &self.nodes[v.0 as usize].ty
    }

    /// For each value, the index of the last node that reads it; `nodes.len()` for values
    /// returned as outputs or state updates (they live to the end), and the defining
    /// node itself for values nothing reads.
    pub fn last_uses(&self) -> Vec<usize> {
        let n = self.nodes.len();
        let mut last: Vec<usize> = (0..n).collect();
        for (i, node) in self.nodes.iter().enumerate() {
            for a in node.op.args() {
                last[a.0 as usize] = i;
            }
        }
        for v in self
            .outputs
            .iter()
            .map(|o| o.value)
            .chain(self.updates.iter().map(|u| u.value))
        {
            last[v.0 as usize] = n;
        }
        last
    }
}

/// A named model parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamDecl {
    /// Checkpoint tensor name (Hugging Face Llama naming).
    pub name: String,
    /// Shape and dtype the runtime must bind.
    pub ty: Type,
}

/// A state variable: lives on the device across graph runs, owned by the runtime.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateDecl {
    /// Name (unique).
    pub name: String,
    /// Shape and dtype.
    pub ty: Type,
    /// Initial value when a batch starts (all elements).
    pub init: Scalar,
    /// One-line meaning, shown in the text form.
    pub doc: String,
    /// What the variable is to the runtime and the memory plan.
    pub role: StateRole,
}

/// What a state variable is. The runtime finds its control state and caches by role
/// (through [`Program::interface`]), never by name; the verifier checks that every
/// program has exactly one variable of each control role with its fixed type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum StateRole {
    /// Tokens in the cache per row = position of the next token, `[B]` I32.
    Pos,
    /// A row is done once `pos >= limit`, `[B]` I32.
    Limit,
    /// The row emits no more tokens, `[B]` Bool.
    Done,
    /// The row's last emitted token (the next decode input), `[B]` I32.
    Token,
    /// Sampling temperature per row, `[B]` F32 (sampler `Sample`).
    Temperature,
    /// Top-k cut per row, `[B]` I32 (sampler `Sample`).
    TopK,
    /// Top-p cut per row, `[B]` F32 (sampler `Sample`).
    TopP,
    /// Uniform draw per row and position, `[B, S]` F32 (sampler `Sample`).
    Uniform,
    /// Part of one layer's KV cache.
    Cache {
        /// Layer index.
        layer: u32,
        /// Which part.
        part: CachePart,
    },
}

/// The parts of one layer's KV cache state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum CachePart {
    /// Keys after RoPE `[B, Hkv, N, D]` (F32 or I8).
    Keys,
    /// Values `[B, Hkv, N, D]` (F32 or I8).
    Values,
    /// Per-token key scales `[B, Hkv, N, 1]` F32 (int8 storage).
    KeyScales,
    /// Per-token value scales `[B, Hkv, N, 1]` F32 (int8 storage).
    ValueScales,
    /// Position held by each slot, `[B, Hkv, N]` I32, −1 = free (budgeted policies).
    SlotPositions,
    /// Eviction score of each slot, `[B, Hkv, N]` F32 (H2O, TOVA, SnapKV).
    Scores,
}

/// One layer's KV cache state, by role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerState {
    /// Keys.
    pub keys: Option<StateId>,
    /// Values.
    pub values: Option<StateId>,
    /// Key scales (int8 storage).
    pub key_scales: Option<StateId>,
    /// Value scales (int8 storage).
    pub value_scales: Option<StateId>,
    /// Slot table (budgeted policies).
    pub slot_positions: Option<StateId>,
    /// Scores (H2O, TOVA, SnapKV).
    pub scores: Option<StateId>,
}

/// The sampler's per-row settings (sampler `Sample`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplingState {
    /// [`StateRole::Temperature`].
    pub temperature: StateId,
    /// [`StateRole::TopK`].
    pub top_k: StateId,
    /// [`StateRole::TopP`].
    pub top_p: StateId,
    /// [`StateRole::Uniform`].
    pub uniform: StateId,
}

/// A program's state table read by role: what the session and the memory plan use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// [`StateRole::Pos`].
    pub pos: StateId,
    /// [`StateRole::Limit`].
    pub limit: StateId,
    /// [`StateRole::Done`].
    pub done: StateId,
    /// [`StateRole::Token`].
    pub token: StateId,
    /// The sampler's settings, when the program samples.
    pub sampling: Option<SamplingState>,
    /// Per layer, its cache state (index = layer).
    pub layers: Vec<LayerState>,
}

/// Shapes and policy a program was compiled for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompiledConfig {
    /// Rows per batch (`B`).
    pub batch: u32,
    /// Prefill width (`T`).
    pub prefill_len: u32,
    /// Cache slots per row (`S`).
    pub cache_len: u32,
    /// Vocabulary size (`V`).
    pub vocab_size: u32,
    /// KV policy (of every layer without an attention span).
    pub kv: crate::spec::KvPolicy,
    /// The policy each layer's cache was compiled with (index = layer): `kv`, or the
    /// window of a sliding-window layer.
    pub layer_kv: Vec<crate::spec::KvPolicy>,
    /// Token choice.
    pub sampler: crate::spec::Sampler,
    /// Storage dtype of the weight matrices.
    pub weight_dtype: crate::spec::DTypeSpec,
    /// Storage of cached keys and values.
    #[serde(default)]
    pub kv_storage: crate::spec::KvStorage,
    /// Token ids that stop a row.
    pub stop_tokens: Vec<u32>,
}

/// Artifact format tag written into every serialized program.
pub const FORMAT: &str = "kvc-program";
/// Version of the serialized program format; bumped on any incompatible IR change.
pub const FORMAT_VERSION: u32 = 7;

/// Most constants an [`Op::IsIn`] holds.
pub const MAX_IS_IN_VALUES: usize = 256;

// The IR depends on the spec (a program embeds its spec and compiled settings), never the
// reverse: the spec's own limit on stop tokens must fit one `is_in`.
const _: () = assert!(crate::spec::MAX_STOP_TOKENS <= MAX_IS_IN_VALUES);

/// A compiled model: parameters, state and the two graphs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Program {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`FORMAT_VERSION`] for programs this build writes.
    pub version: u32,
    /// The spec the program was compiled from (with overrides applied).
    pub spec: crate::spec::ModelSpec,
    /// Shapes the graphs were compiled for.
    pub config: CompiledConfig,
    /// Parameter table.
    pub params: Vec<ParamDecl>,
    /// State table.
    pub state: Vec<StateDecl>,
    /// The padded prefill graph `[B, T]`.
    pub prefill: Graph,
    /// The one-token decode graph `[B, 1]`.
    pub decode: Graph,
}

impl Program {
    /// Both graphs, prefill first.
    pub fn graphs(&self) -> [&Graph; 2] {
        [&self.prefill, &self.decode]
    }

    /// The state table by role. `None` when a control role is missing or repeated, a
    /// sampling role is missing while another is present, or a cache part repeats
    /// (a verified program has none of these).
    pub fn interface(&self) -> Option<Interface> {
        let mut one: [Option<StateId>; 8] = [None; 8];
        let mut layers: Vec<LayerState> = vec![];
        for (i, s) in self.state.iter().enumerate() {
            let id = StateId(i as u32);
            let slot = match s.role {
                StateRole::Pos => &mut one[0],
                StateRole::Limit => &mut one[1],
                StateRole::Done => &mut one[2],
                StateRole::Token => &mut one[3],
                StateRole::Temperature => &mut one[4],
                StateRole::TopK => &mut one[5],
                StateRole::TopP => &mut one[6],
                StateRole::Uniform => &mut one[7],
                StateRole::Cache { layer, part } => {
                    let l = layer as usize;
                    if l >= layers.len() {
                        // Layers are bounded by the state table's length.
                        if l >= self.state.len() {
                            return None;
                        }
                        layers.resize(l + 1, LayerState::default());
                    }
                    let ls = &mut layers[l];
                    match part {
                        CachePart::Keys => &mut ls.keys,
                        CachePart::Values => &mut ls.values,
                        CachePart::KeyScales => &mut ls.key_scales,
                        CachePart::ValueScales => &mut ls.value_scales,
                        CachePart::SlotPositions => &mut ls.slot_positions,
                        CachePart::Scores => &mut ls.scores,
                    }
                }
            };
            if slot.replace(id).is_some() {
                return None;
            }
        }
        let [pos, limit, done, token, t, k, p, u] = one;
        let sampling = match (t, k, p, u) {
            (Some(temperature), Some(top_k), Some(top_p), Some(uniform)) => Some(SamplingState {
                temperature,
                top_k,
                top_p,
                uniform,
            }),
            (None, None, None, None) => None,
            _ => return None,
        };
        Some(Interface {
            pos: pos?,
            limit: limit?,
            done: done?,
            token: token?,
            sampling,
            layers,
        })
    }

    /// Looks up a state variable by name (tools and tests; the runtime uses
    /// [`Program::interface`]).
    pub fn state_id(&self, name: &str) -> Option<StateId> {
        self.state
            .iter()
            .position(|s| s.name == name)
            .map(|i| StateId(i as u32))
    }
}

/// The declarations a node of `g` may refer to, for [`infer_type`].
pub fn typing_decls<'a>(p: &'a Program, g: &'a Graph) -> typing::Decls<'a> {
    typing::Decls {
        inputs: &g.inputs,
        params: &p.params,
        state: &p.state,
    }
}
