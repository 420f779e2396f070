//! The kernels an execution plan calls, as one interface with two implementations chosen
//! once per backend when the plan is built ([`KernelSet::for_backend`]):
//!
//! - [`portable::Portable`]: Burn ops only, for every backend (and the reference the CPU
//!   set is tested against). Nothing in it reads a value back to the host, so a graph run
//!   never synchronises a device with the host.
//! - [`cpu::Cpu`]: kvc's own kernels on Flex's host buffers (GEMV, few-row attention,
//!   elementwise, in-place cache writes, top-k, hash), falling back to the portable ops
//!   where Flex's own are as fast (long prefill chunks).
//!
//! Tensors are rank 4 (IR shapes padded with leading 1s) unless a signature says otherwise.
//! Ops with one obvious Burn form for every backend (`embed`, `binary`, `select`, …) are
//! not in the interface: the executor runs them directly.

pub mod cpu;
pub mod portable;

use burn::tensor::{Bool, Int, Tensor};
use kvc_compiler::ir::BinaryOp;

use super::value::Value;
use crate::Backend;
use crate::blocks::{QuantLayout, QuantTensor};
use crate::load::gguf::{GgmlType, dequantize};

/// √(2/π), the scale inside the tanh approximation of GELU.
pub(crate) const GELU_SCALE: f32 = 0.797_884_6;
/// The cubic coefficient of the tanh approximation of GELU.
pub(crate) const GELU_CUBIC: f32 = 0.044_715;

/// Which kernel implementation a plan uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelSet {
    /// kvc's CPU kernels on Flex buffers ([`cpu::Cpu`]); only for Flex devices.
    Cpu,
    /// Burn ops for any backend ([`portable::Portable`]).
    Portable,
}

impl KernelSet {
    /// The set a backend runs by default: the CPU kernels on Flex, portable elsewhere.
    pub fn for_backend(backend: Backend) -> KernelSet {
        match backend {
            Backend::Flex => KernelSet::Cpu,
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => KernelSet::Portable,
            #[cfg(feature = "cuda")]
            Backend::Cuda => KernelSet::Portable,
        }
    }

    /// Whether the set can run on `backend` (the CPU kernels read Flex buffers).
    pub fn supports(self, backend: Backend) -> bool {
        match self {
            KernelSet::Cpu => backend == Backend::Flex,
            KernelSet::Portable => true,
        }
    }

    /// The implementation.
    pub fn kernels(self) -> &'static dyn Kernels {
        match self {
            KernelSet::Cpu => &cpu::Cpu,
            KernelSet::Portable => &portable::Portable,
        }
    }

    /// Name shown in plans and profiles.
    pub fn name(self) -> &'static str {
        match self {
            KernelSet::Cpu => "cpu",
            KernelSet::Portable => "portable",
        }
    }

    /// The layout this set keeps block matrices in for a program of `batch` rows:
    /// interleaved ([`cpu::quant::interleave`]) where the CPU kernels run decode products
    /// of more than [`cpu::quant::INTERLEAVE_ABOVE`] rows on AVX2 or AVX-512, so no product
    /// unpacks the file's blocks again; else the file's own.
    pub fn weight_layout(self, batch: usize) -> QuantLayout {
        match self {
            KernelSet::Cpu
                if batch > cpu::quant::INTERLEAVE_ABOVE && cpu::quant::interleaving() =>
            {
                QuantLayout::Interleaved
            }
            KernelSet::Cpu | KernelSet::Portable => QuantLayout::File,
        }
    }

    /// Bytes of an `[n, k]` block matrix of type `ty` once [prepared](Self::prepare_weight)
    /// in `layout` (`None` where the set keeps the file's bytes).
    pub fn prepared_bytes(
        self,
        ty: GgmlType,
        k: usize,
        n: usize,
        layout: QuantLayout,
    ) -> Option<usize> {
        match layout {
            QuantLayout::File => None,
            QuantLayout::Interleaved => cpu::quant::interleaved_len(ty, k, n),
        }
    }

    /// The set's preparation of a block matrix read in the file's layout: `w` in `layout`
    /// (as [`KernelSet::weight_layout`] chose), the file's bytes dropped where a copy is
    /// made.
    pub fn prepare_weight(self, w: QuantTensor, layout: QuantLayout) -> QuantTensor {
        match layout {
            QuantLayout::File => w,
            QuantLayout::Interleaved => {
                match cpu::quant::interleave(w.ty, w.cols, w.rows, &w.bytes) {
                    Some(v) => QuantTensor {
                        bytes: bytes::Bytes::from(v),
                        layout: QuantLayout::Interleaved,
                        ..w
                    },
                    None => w,
                }
            }
        }
    }
}

impl QuantTensor {
    /// Row `r` dequantized to f32.
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        match self.layout {
            QuantLayout::File => {
                let rb = self.row_bytes();
                dequantize(self.ty, &self.bytes[r * rb..(r + 1) * rb]).expect("validated at load")
            }
            QuantLayout::Interleaved => {
                cpu::quant::interleaved_row(self.ty, self.cols, self.rows, &self.bytes, r)
            }
        }
    }

    /// Every value dequantized to f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        match self.layout {
            QuantLayout::File => dequantize(self.ty, &self.bytes).expect("validated at load"),
            QuantLayout::Interleaved => (0..self.rows).flat_map(|r| self.row_f32(r)).collect(),
        }
    }
}

/// The real-token part of a value in a run, for kernels that skip padding: the plan knows
/// which axes of the value are its batch and token axes ([`Rows`]), the run knows each
/// batch row's length (a prefill's `len` input; in a decode step 1, or 0 for a done row,
/// which the step leaves as it is). Elements at token positions
/// `t >= lens[b]` of batch row `b` (every element of a row whose length is 0, for a value
/// with no token axis) are padding: the graph never lets them reach a real result (they
/// are hidden from attention, not written to the cache, not taken as a row's last token),
/// so a kernel may leave them out: they keep what its output buffer held (zeros when the
/// buffer is new, an earlier output's values when `cpu::pool` reuses it, its input's when
/// it computes in place).
#[derive(Clone, Copy, Debug)]
pub struct Live<'a> {
    /// Real tokens per batch row, each at most the token axis' length.
    pub lens: &'a [usize],
    /// Where the batch and token axes are.
    pub rows: Rows,
}

/// The batch and token axes of a value (rank-4 axes, IR shapes padded with leading 1s),
/// as the plan's dataflow from the graph's token ids finds them, and its dims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    /// The value's dims (rank 4).
    pub dims: [usize; 4],
    /// The batch axis.
    pub batch: usize,
    /// The token axis (after the batch axis), or `None`: one entry per batch row (a row
    /// is real when its length is above 0).
    pub token: Option<usize>,
}

impl Live<'_> {
    /// The element ranges of the value (contiguous) that hold real tokens, in increasing
    /// order, adjacent ranges merged. Every range is a whole number of rows of the axes
    /// after the token axis (after the batch axis when there is none).
    pub fn runs(&self) -> Vec<std::ops::Range<usize>> {
        let Rows { dims, batch, token } = self.rows;
        let axis = token.unwrap_or(batch);
        let inner: usize = dims[axis + 1..].iter().product();
        let outer: usize = dims[..axis].iter().product();
        // Index steps of the batch axis within the outer index (axes batch+1..axis).
        let below: usize = dims[(batch + 1).min(axis)..axis].iter().product();
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        let mut push = |r: std::ops::Range<usize>| {
            if r.is_empty() {
                return;
            }
            match runs.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => runs.push(r),
            }
        };
        match token {
            Some(_) => {
                let t = dims[axis];
                for o in 0..outer {
                    let b = (o / below.max(1)) % dims[batch];
                    let n = self.lens[b].min(t);
                    push(o * t * inner..(o * t + n) * inner);
                }
            }
            None => {
                let nb = dims[batch];
                for o in 0..outer {
                    for b in 0..nb {
                        if self.lens[b] > 0 {
                            push((o * nb + b) * inner..(o * nb + b + 1) * inner);
                        }
                    }
                }
            }
        }
        runs
    }

    /// [`Live::runs`] in units of `unit` elements (each run a whole number of them).
    pub fn unit_runs(&self, unit: usize) -> Vec<std::ops::Range<usize>> {
        let unit = unit.max(1);
        self.runs()
            .into_iter()
            .map(|r| {
                debug_assert!(r.start % unit == 0 && r.end % unit == 0, "{r:?} by {unit}");
                r.start / unit..r.end / unit
            })
            .collect()
    }

    /// Whether every element is real (nothing to skip).
    pub fn all(&self) -> bool {
        let runs = self.runs();
        let n: usize = self.rows.dims.iter().product();
        n == 0 || (runs.len() == 1 && runs[0] == (0..n))
    }
}

/// The f32 operation of a binary op whose result is one IEEE operation (add, sub, mul,
/// div), which any kernel computes bit for bit as Burn does; `None` for the others.
pub fn ieee_op(op: BinaryOp) -> Option<fn(f32, f32) -> f32> {
    match op {
        BinaryOp::Add => Some(|x, y| x + y),
        BinaryOp::Sub => Some(|x, y| x - y),
        BinaryOp::Mul => Some(|x, y| x * y),
        BinaryOp::Div => Some(|x, y| x / y),
        BinaryOp::Min
        | BinaryOp::Max
        | BinaryOp::Eq
        | BinaryOp::Lt
        | BinaryOp::Le
        | BinaryOp::And
        | BinaryOp::Or => None,
    }
}

/// The form a kernel with several takes, chosen by the kernel set when the plan is built
/// from the step's static shapes (and, for products with GGUF blocks, the instruction set
/// and the weights' layout): nothing is chosen per call. `kvc inspect --plan` prints it and
/// `KVC_PROFILE` keys its times by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// Burn's op (the portable set's only form).
    Burn,
    /// kvc's GEMV: each weight streamed once for all rows (decode widths).
    Gemv,
    /// Flex's GEMM over weights widened to f32 (prefill widths).
    Gemm,
    /// kvc's product with GGUF blocks: instruction set and method, on the file's blocks or
    /// on weights interleaved at load.
    Blocks {
        /// Instruction set and method.
        path: cpu::quant::Path,
        /// Whether the weights are interleaved ([`cpu::quant::interleave`]).
        interleaved: bool,
    },
    /// kvc's few-row attention (decode: at most [`cpu::FEW_ROWS`] query rows per KV head).
    FewRows,
    /// kvc's chunk attention (prefill).
    Chunk,
}

impl Form {
    /// The form's name in plans and profiles.
    pub fn name(self) -> String {
        match self {
            Form::Burn => "burn".into(),
            Form::Gemv => "gemv".into(),
            Form::Gemm => "gemm".into(),
            Form::Blocks { path, interleaved } => format!(
                "{}/{}{}",
                path.method.name(),
                path.isa.name(),
                if interleaved { " interleaved" } else { "" }
            ),
            Form::FewRows => "few-rows".into(),
            Form::Chunk => "chunk".into(),
        }
    }
}

/// The kernels whose best form depends on the backend. Every method has the semantics of
/// the IR op of the same name (`docs/ir.md`).
pub trait Kernels: Send + Sync {
    /// Whether a graph should run on a worker of rayon's pool, so that parallel kernels
    /// start on the running thread at once instead of the caller handing every kernel to
    /// the pool and sleeping until it is done.
    fn run_on_pool(&self) -> bool;

    /// The form of [`Kernels::linear`] for `m` rows.
    fn linear_form(&self, m: usize) -> Form;

    /// The form of [`Kernels::qlinear`] for `m` rows with weights `w`.
    fn qlinear_form(&self, m: usize, w: &QuantTensor) -> Form;

    /// The form of [`Kernels::attention`] and [`Kernels::attention_values`] for `rows`
    /// query rows per KV head (`g · T`).
    fn attention_form(&self, rows: usize) -> Form;

    /// Whether the set's kernels skip padding when given a [`Live`] (the portable set
    /// computes every element and ignores it).
    fn skips_padding(&self) -> bool;

    /// `x · wᵀ` for x `[m, k]` F32, w `[n, k]` F32 or F16 → `[m, n]` F32, in the form
    /// [`Kernels::linear_form`] chose. `live` (the product's, whose rows are x's) may
    /// leave padding rows out.
    fn linear(&self, x: Tensor<2>, w: Tensor<2>, form: Form, live: Option<Live<'_>>) -> Tensor<2>;

    /// RMSNorm over the last axis (w `[1, 1, 1, H]`).
    fn rms_norm(&self, x: Tensor<4>, w: Tensor<4>, eps: f32, live: Option<Live<'_>>) -> Tensor<4>;

    /// Half-split rotary embedding: x `[B, T, N, D]`, pos `[1, 1, B, T]`, tables `[P, D/2]`.
    fn rope(
        &self,
        x: Tensor<4>,
        pos: Tensor<4, Int>,
        tables: (Tensor<2>, Tensor<2>),
        live: Option<Live<'_>>,
    ) -> Tensor<4>;

    /// `x · σ(x)`.
    fn silu(&self, x: Tensor<4>, live: Option<Live<'_>>) -> Tensor<4>;
    /// `x · wᵀ` with `w` `[n, k]` as GGUF blocks: x `[m, k]` → `[m, n]`, in the form
    /// [`Kernels::qlinear_form`] chose; `live` as for [`Kernels::linear`].
    fn qlinear(
        &self,
        x: Tensor<2>,
        w: &QuantTensor,
        form: Form,
        live: Option<Live<'_>>,
    ) -> Tensor<2>;
    /// Rows `ids` (any shape, `n` ids) of a table of GGUF blocks, dequantized → `[n, h]`;
    /// `live` is the lookup's (rows of `h` per id).
    fn qembed(&self, table: &QuantTensor, ids: Tensor<4, Int>, live: Option<Live<'_>>)
    -> Tensor<2>;
    /// GELU, tanh approximation.
    fn gelu(&self, x: Tensor<4>, live: Option<Live<'_>>) -> Tensor<4>;

    /// `a op b` for `op` add, sub, mul or div on F32 values of the same dims, `live`
    /// giving the real elements of all three.
    fn binary(&self, op: BinaryOp, a: Tensor<4>, b: Tensor<4>, live: Live<'_>) -> Tensor<4>;

    /// F32 x as F16 (the f16 cache's storage), `live` giving the real elements.
    fn to_f16(&self, x: Tensor<4>, live: Live<'_>) -> Tensor<4>;

    /// x with its axes permuted (`axes[i]` is the input axis of output axis `i`), `live`
    /// giving the output's real elements.
    fn permute(&self, x: Tensor<4>, axes: [usize; 4], live: Live<'_>) -> Tensor<4>;

    /// Masked grouped-query attention → `[B, Hq, T, D]`, in the form
    /// [`Kernels::attention_form`] chose (`live`: q's).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Tensor<4, Bool>,
        scale: f32,
        form: Form,
        live: Option<Live<'_>>,
    ) -> Tensor<4>;

    /// Attention probabilities `[B, Hq, T, S]` (`live`: q's).
    fn attention_probs(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        mask: Tensor<4, Bool>,
        scale: f32,
        live: Option<Live<'_>>,
    ) -> Tensor<4>;

    /// `probs · v` per KV group → `[B, Hq, T, D]`, in the form
    /// [`Kernels::attention_form`] chose (`live`: probs').
    fn attention_values(
        &self,
        probs: Tensor<4>,
        v: Tensor<4>,
        form: Form,
        live: Option<Live<'_>>,
    ) -> Tensor<4>;

    /// Writes `new` into `cache` (F32 or I8, as [`Value`]s of one kind) at `start` for
    /// `len` entries per row. With a single owner of `cache` the write is in place.
    fn kv_write(
        &self,
        cache: Value,
        new: Value,
        start: Tensor<4, Int>,
        len: Tensor<4, Int>,
    ) -> Value;

    /// Indices of the `k` largest `(x, tiebreak)` pairs of each row of the last axis,
    /// largest first, equal pairs by lower index → `[.., k]`.
    fn top_k(&self, x: Tensor<4>, tiebreak: Tensor<4, Int>, k: usize) -> Tensor<4, Int>;

    /// The counter-based uniform draw of `hash` for `a`, `b` already expanded to the
    /// output dims.
    fn hash(&self, a: Tensor<4, Int>, b: Tensor<4, Int>, seed: u32) -> Tensor<4>;
}

/// murmur3's 32-bit finalizer.
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The uniform draw of `hash` for one element: `fmix32(fmix32(seed ^ a) ^ b)`, top 24 bits
/// / 2²⁴ (the host definition both kernel sets are tested against).
pub fn hash_uniform(seed: u32, a: i32, b: i32) -> f32 {
    let h = fmix32(fmix32(seed ^ a as u32) ^ b as u32);
    (h >> 8) as f32 / 16_777_216.0
}

/// `top_k` of host rows of `n`: indices of the `k` largest `(x, tiebreak)` pairs, largest
/// first, equal pairs by lower index. Values compare as IEEE numbers (−0 equals +0), as
/// on the device.
pub fn top_k_host(x: &[f32], tiebreak: &[i32], n: usize, k: usize) -> Vec<i32> {
    let mut out = Vec::with_capacity(x.len() / n * k);
    let better = |i: usize, j: usize| -> bool {
        if x[i] == x[j] {
            tiebreak[i] > tiebreak[j]
        } else {
            x[i] > x[j]
        }
    };
    let mut order: Vec<usize> = Vec::with_capacity(n);
    for row in 0..x.len() / n {
        let base = row * n;
        if k == 1 {
            let mut best = base;
            for i in base + 1..base + n {
                if better(i, best) {
                    best = i;
                }
            }
            out.push((best - base) as i32);
            continue;
        }
        order.clear();
        order.extend(base..base + n);
        order.sort_by(|&i, &j| {
            if better(i, j) {
                std::cmp::Ordering::Less
            } else if better(j, i) {
                std::cmp::Ordering::Greater
            } else {
                i.cmp(&j)
            }
        });
        out.extend(order[..k].iter().map(|&i| (i - base) as i32));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_runs_follow_the_batch_and_token_axes() {
        let live = |lens: &'static [usize], dims, batch, token| Live {
            lens,
            rows: Rows { dims, batch, token },
        };
        // [B, T, H]: each row's first len[b] tokens.
        let l = live(&[1, 3], [1, 2, 3, 2], 1, Some(2));
        assert_eq!(l.runs(), vec![0..2, 6..12]);
        assert_eq!(l.unit_runs(2), vec![0..1, 3..6]);
        assert!(!l.all());
        // [B, H, T, D]: per head; a full row's heads merge into one run.
        let l = live(&[1, 3], [2, 2, 3, 1], 0, Some(2));
        assert_eq!(l.runs(), vec![0..1, 3..4, 6..12]);
        // One entry per batch row: the rows with tokens.
        let l = live(&[0, 3], [1, 1, 2, 4], 2, None);
        assert_eq!(l.runs(), vec![4..8]);
        assert!(live(&[2, 3], [1, 1, 2, 4], 2, None).all());
        assert!(live(&[3, 3], [1, 2, 3, 2], 1, Some(2)).all());
    }

    #[test]
    fn top_k_orders_by_value_then_tiebreak_then_index() {
        // Row 0: values tie at 3 (tiebreak 1 beats 0); row 1: full ties fall back to index.
        let x = [1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 2.0, 2.0];
        let tb = [0, 0, 1, 5, 7, 7, 7, 7];
        assert_eq!(top_k_host(&x, &tb, 4, 4), vec![2, 1, 0, 3, 0, 1, 2, 3]);
        assert_eq!(top_k_host(&x, &tb, 4, 1), vec![2, 0]);
    }
}
