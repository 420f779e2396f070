//! Burn ops for every backend: the kernel set of non-CPU devices, and the reference the
//! CPU kernels are tested against (the same programs run with both sets must agree).
//!
//! Nothing here reads a tensor back to the host: `top_k` and `hash` are built from
//! device sorts, reductions and integer arithmetic, so a graph run issues no device→host
//! transfer.

use burn::tensor::activation::softmax;
use burn::tensor::module;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, IndexingUpdateOp, Int, IntDType, Tensor, kind::Basic};

use kvc_compiler::ir::BinaryOp;

use super::{Form, GELU_CUBIC, GELU_SCALE, Kernels, Live};
use crate::blocks::QuantTensor;
use crate::exec::value::{Value, to_f32};

/// Burn ops on any backend.
pub struct Portable;

impl Kernels for Portable {
    fn run_on_pool(&self) -> bool {
        false
    }

    fn linear_form(&self, _m: usize) -> Form {
        Form::Burn
    }

    fn qlinear_form(&self, _m: usize, _w: &QuantTensor) -> Form {
        Form::Burn
    }

    fn attention_form(&self, _rows: usize) -> Form {
        Form::Burn
    }

    fn skips_padding(&self) -> bool {
        false
    }

    fn linear(
        &self,
        x: Tensor<2>,
        w: Tensor<2>,
        _form: Form,
        _live: Option<Live<'_>>,
    ) -> Tensor<2> {
        to_f32(x.matmul(to_f32(w).transpose()))
    }

    fn rms_norm(&self, x: Tensor<4>, w: Tensor<4>, eps: f32, _live: Option<Live<'_>>) -> Tensor<4> {
        let ms = x.clone().powi_scalar(2).mean_dim(3);
        let inv = ms.add_scalar(eps).sqrt().recip();
        x.mul(inv).mul(w)
    }

    fn rope(
        &self,
        x: Tensor<4>,
        pos: Tensor<4, Int>,
        (cos, sin): (Tensor<2>, Tensor<2>),
        _live: Option<Live<'_>>,
    ) -> Tensor<4> {
        let [b, t, _, d] = x.dims();
        let half = d / 2;
        let max = cos.dims()[0] as i32 - 1;
        let idx = pos.reshape([b * t]).clamp(0, max);
        let cos = cos.select(0, idx.clone()).reshape([b, t, 1, half]);
        let sin = sin.select(0, idx).reshape([b, t, 1, half]);
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        let r1 = x1.clone().mul(cos.clone()).sub(x2.clone().mul(sin.clone()));
        let r2 = x2.mul(cos).add(x1.mul(sin));
        Tensor::cat(vec![r1, r2], 3)
    }

    fn silu(&self, x: Tensor<4>, _live: Option<Live<'_>>) -> Tensor<4> {
        burn::tensor::activation::silu(x)
    }

    /// The blocks dequantized for the call (the executor dequantizes a portable set's
    /// weights once at load, so a plan of this set never reaches here with blocks).
    fn qlinear(
        &self,
        x: Tensor<2>,
        w: &QuantTensor,
        _form: Form,
        _live: Option<Live<'_>>,
    ) -> Tensor<2> {
        let wt = Tensor::<2>::from_data(
            burn::tensor::TensorData::new(w.to_f32(), [w.rows, w.cols]),
            &x.device(),
        );
        x.matmul(wt.transpose())
    }

    fn qembed(
        &self,
        table: &QuantTensor,
        ids: Tensor<4, Int>,
        _live: Option<Live<'_>>,
    ) -> Tensor<2> {
        let t = Tensor::<2>::from_data(
            burn::tensor::TensorData::new(table.to_f32(), [table.rows, table.cols]),
            &ids.device(),
        );
        let n = ids.shape().num_elements();
        t.select(0, ids.reshape([n]))
    }

    fn binary(&self, op: BinaryOp, a: Tensor<4>, b: Tensor<4>, _live: Live<'_>) -> Tensor<4> {
        let dims = a.dims();
        binary(op, Value::F(a), Value::F(b), dims).f()
    }

    fn to_f16(&self, x: Tensor<4>, _live: Live<'_>) -> Tensor<4> {
        x.cast(burn::tensor::FloatDType::F16)
    }

    fn permute(&self, x: Tensor<4>, axes: [usize; 4], _live: Live<'_>) -> Tensor<4> {
        x.permute(axes)
    }

    fn gelu(&self, x: Tensor<4>, _live: Option<Live<'_>>) -> Tensor<4> {
        let inner = x
            .clone()
            .powi_scalar(3)
            .mul_scalar(GELU_CUBIC)
            .add(x.clone())
            .mul_scalar(GELU_SCALE);
        x.mul(inner.tanh().add_scalar(1.0)).mul_scalar(0.5)
    }

    fn attention(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        mask: Tensor<4, Bool>,
        scale: f32,
        _form: Form,
        _live: Option<Live<'_>>,
    ) -> Tensor<4> {
        fused_attention(q, k, v, mask, scale)
    }

    fn attention_probs(
        &self,
        q: Tensor<4>,
        k: Tensor<4>,
        mask: Tensor<4, Bool>,
        scale: f32,
        _live: Option<Live<'_>>,
    ) -> Tensor<4> {
        attention_probs(q, k, mask, scale)
    }

    fn attention_values(
        &self,
        probs: Tensor<4>,
        v: Tensor<4>,
        _form: Form,
        _live: Option<Live<'_>>,
    ) -> Tensor<4> {
        attention_values(probs, v)
    }

    fn kv_write(
        &self,
        cache: Value,
        new: Value,
        start: Tensor<4, Int>,
        len: Tensor<4, Int>,
    ) -> Value {
        match (cache, new) {
            (Value::F(c), Value::F(n)) => Value::F(kv_write(c, n, start, len)),
            (Value::I(c), Value::I(n)) => Value::I(kv_write(c, n, start, len)),
            (c, n) => unreachable!("verified kv_write: {c:?} and {n:?}"),
        }
    }

    fn top_k(&self, x: Tensor<4>, tiebreak: Tensor<4, Int>, k: usize) -> Tensor<4, Int> {
        top_k(x, tiebreak, k)
    }

    fn hash(&self, a: Tensor<4, Int>, b: Tensor<4, Int>, seed: u32) -> Tensor<4> {
        hash(a, b, seed)
    }
}

/// Burn's fused attention with the `g` query heads of a KV group stacked on the query axis
/// (Burn's kernel does not expand grouped KV heads).
pub fn fused_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<4, Bool>,
    scale: f32,
) -> Tensor<4> {
    let [b, hq, t, d] = q.dims();
    let hkv = k.dims()[1];
    let g = hq / hkv;
    let options = AttentionModuleOptions {
        scale: Some(scale as f64),
        softcap: None,
        is_causal: false,
    };
    let q = q.reshape([b, hkv, g * t, d]);
    let hidden = hidden_slots(mask, g);
    module::attention(q, widened(k), widened(v), Some(hidden), None, options).reshape([b, hq, t, d])
}

/// An F16 cache as F32 (a copy), an F32 one as it is: Burn's attention and matmul take
/// one float type.
pub fn widened(x: Tensor<4>) -> Tensor<4> {
    match x.dtype() {
        burn::tensor::DType::F16 => x.cast(burn::tensor::FloatDType::F32),
        _ => x,
    }
}

/// `probs · v` with probs `[B, Hq, T, S]` and v `[B, Hkv, S, D]` → `[B, Hq, T, D]`.
pub fn attention_values(probs: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [b, hq, t, s] = probs.dims();
    let [_, hkv, _, d] = v.dims();
    let g = hq / hkv;
    probs
        .reshape([b, hkv, g * t, s])
        .matmul(widened(v))
        .reshape([b, hq, t, d])
}

/// Softmax of `scale · q·kᵀ` over the visible slots, `[B, Hq, T, S]`; hidden slots get 0,
/// and a query with no visible slot gets all zeros.
pub fn attention_probs(q: Tensor<4>, k: Tensor<4>, mask: Tensor<4, Bool>, scale: f32) -> Tensor<4> {
    let [b, hq, t, d] = q.dims();
    let [_, hkv, s, _] = k.dims();
    let g = hq / hkv;
    let q = q.reshape([b, hkv, g * t, d]);
    let hidden = hidden_slots(mask, g).expand([b, hkv, g * t, s]);
    let scores = q.matmul(widened(k).swap_dims(2, 3)).mul_scalar(scale);
    softmax(scores.mask_fill(hidden.clone(), -1.0e30f32), 3)
        .mask_fill(hidden, 0.0f32)
        .reshape([b, hq, t, s])
}

/// The mask `[B, M, T, S]` (M = 1 or Hkv, true = visible) as Burn's attention wants it
/// for `g` query heads per KV head stacked on the query axis (group-major): `[B, M, g·T,
/// S]`, true = hidden. An M of 1 broadcasts over the KV heads.
pub fn hidden_slots(mask: Tensor<4, Bool>, g: usize) -> Tensor<4, Bool> {
    let [b, m, t, s] = mask.dims();
    mask.bool_not()
        .reshape([b, m, 1, t, s])
        .expand([b, m, g, t, s])
        .reshape([b, m, g * t, s])
}

/// Attention probability each key receives, from probabilities `[B, Hq, T, S]`:
/// weighted per query (weight `[1, 1, B, T]`), summed over queries and averaged over the
/// `Hq / kv_heads` query heads of a KV group → `[1, B, kv_heads, S]`.
pub fn attention_mass(probs: Tensor<4>, weight: Tensor<4>, kv_heads: usize) -> Tensor<4> {
    let [b, hq, t, s] = probs.dims();
    let g = hq / kv_heads;
    let w = weight.reshape([b, 1, 1, t, 1]);
    let mass = probs.reshape([b, kv_heads, g, t, s]).mul(w);
    mass.sum_dim(3)
        .sum_dim(2)
        .mul_scalar(1.0 / g as f32)
        .reshape([1, b, kv_heads, s])
}

/// `out[b, h, m, :] = x[b, h, index[b, h, m], :]` as one row selection over the
/// flattened `[B·H·N, D]` view (x `[B, H, N, D]`, index `[1, B, H, M]`).
pub fn gather_rows<K: Basic>(x: Tensor<4, K>, index: Tensor<4, Int>) -> Tensor<4, K> {
    let [b, h, n, d] = x.dims();
    let m = index.dims()[3];
    let device = x.device();
    let base = Tensor::<1, Int>::arange(0..(b * h) as i64, &device)
        .mul_scalar(n as i32)
        .reshape([1, b, h, 1]);
    let rows = index.add(base).reshape([b * h * m]);
    x.reshape([b * h * n, d])
        .select(0, rows)
        .reshape([b, h, m, d])
}

/// `top_k` from device ops only. `k = 1` (a decode step's choice) is three reductions:
/// the largest value, the largest tiebreak among those, the lowest index among those.
/// Larger `k` sorts once by a key unique per element, so the result does not depend on
/// the stability of the backend's sort: the dense rank of `x` (descending) times `n` plus
/// the rank of `(tiebreak descending, index)`; both ranks come from sorts whose ties are
/// harmless (equal keys get equal dense ranks) or impossible (unique keys). Needs
/// `n² < 2³¹` (checked when the plan is built).
pub fn top_k(x: Tensor<4>, tiebreak: Tensor<4, Int>, k: usize) -> Tensor<4, Int> {
    let dims = x.dims();
    let n = dims[3];
    let device = x.device();
    let index = Tensor::<1, Int>::arange(0..n as i64, &device)
        .reshape([1, 1, 1, n])
        .expand(dims);
    if k == 1 {
        let best = x.clone().max_dim(3).expand(dims);
        let top = x.equal(best);
        let tb = tiebreak.clone().mask_fill(top.clone().bool_not(), i32::MIN);
        let best_tb = tb.max_dim(3).expand(dims);
        let chosen = top.bool_and(tiebreak.equal(best_tb));
        return index.mask_fill(chosen.bool_not(), n as i32).min_dim(3);
    }
    // Sort indices come back in the backend's index dtype (I64 on Flex): ranks are I32.
    let i32 = |t: Tensor<4, Int>| t.cast(IntDType::I32);
    let (sorted, order) = x.sort_descending_with_indices(3);
    let x_rank = scatter_rank(
        dense_rank(sorted.clone().equal(shift_right(sorted))),
        i32(order),
    );
    let (sorted, order) = tiebreak.sort_descending_with_indices(3);
    let tb_rank = scatter_rank(
        dense_rank(sorted.clone().equal(shift_right(sorted))),
        i32(order),
    );
    let tb_key = tb_rank.mul_scalar(n as i32).add(index.clone());
    let tb_pos = scatter_rank(index, i32(tb_key.argsort(3)));
    let key = x_rank.mul_scalar(n as i32).add(tb_pos);
    i32(key.argsort(3).narrow(3, 0, k))
}

/// Each element's predecessor along the last axis (the first element repeats itself).
fn shift_right<K: Basic>(x: Tensor<4, K>) -> Tensor<4, K> {
    let n = x.dims()[3];
    if n == 1 {
        return x;
    }
    Tensor::cat(vec![x.clone().narrow(3, 0, 1), x.narrow(3, 0, n - 1)], 3)
}

/// Dense ranks along the last axis of a sorted row, from `same[j]` = element `j` equals
/// element `j − 1` (true at `j = 0` is ignored): 0 for the first run of equal elements,
/// 1 for the next, ….
fn dense_rank(same: Tensor<4, Bool>) -> Tensor<4, Int> {
    let n = same.dims()[3];
    let step = same.bool_not().int();
    let first = step.clone().narrow(3, 0, 1).mul_scalar(0);
    let step = if n == 1 {
        first
    } else {
        Tensor::cat(vec![first, step.narrow(3, 1, n - 1)], 3)
    };
    step.cumsum(3)
}

/// `out[order[j]] = rank[j]` along the last axis (`order` a permutation per row).
fn scatter_rank(rank: Tensor<4, Int>, order: Tensor<4, Int>) -> Tensor<4, Int> {
    let zeros = rank.clone().mul_scalar(0);
    zeros.scatter(3, order, rank, IndexingUpdateOp::Assign)
}

/// `x >> s` for x holding u32 bits in i32 (a logical shift: the sign bits are cleared).
fn shr(x: Tensor<4, Int>, s: u32) -> Tensor<4, Int> {
    x.bitwise_right_shift_scalar(s as i32)
        .bitwise_and_scalar((u32::MAX >> s) as i32)
}

/// murmur3's 32-bit finalizer on u32 bits held in i32 (products wrap, as on the host).
fn fmix32(h: Tensor<4, Int>) -> Tensor<4, Int> {
    let h = h.clone().bitwise_xor(shr(h, 16));
    let h = h.mul_scalar(0x85eb_ca6bu32 as i32);
    let h = h.clone().bitwise_xor(shr(h, 13));
    let h = h.mul_scalar(0xc2b2_ae35u32 as i32);
    h.clone().bitwise_xor(shr(h, 16))
}

/// [`super::hash_uniform`] on the device: `fmix32(fmix32(seed ^ a) ^ b)`, top 24 bits / 2²⁴.
pub fn hash(a: Tensor<4, Int>, b: Tensor<4, Int>, seed: u32) -> Tensor<4> {
    let h = fmix32(a.bitwise_xor_scalar(seed as i32));
    let h = fmix32(h.bitwise_xor(b));
    shr(h, 8).float().mul_scalar(1.0 / 16_777_216.0)
}

/// `cache[b, h, start + t, :] = new[b, h, t, :]` for `t < len[b]`. Entries past a row's
/// length rewrite the row's last entry (or, for an empty row, a slot's own old value), so
/// every scatter target receives one well-defined value and the op stays fixed-shape.
pub fn kv_write<K: Basic>(
    cache: Tensor<4, K>,
    new: Tensor<4, K>,
    start: Tensor<4, Int>,
    len: Tensor<4, Int>,
) -> Tensor<4, K> {
    let [b, h, s, d] = cache.dims();
    let t = new.dims()[2];
    let device = new.device();
    let len = len.reshape([b, 1, 1]);
    // start is per row ([B]) or per row and head ([B, H]).
    let hs = start.shape().num_elements() / b;
    let start = start.reshape([b, hs, 1]).expand([b, h, t]);
    let steps = Tensor::<1, Int>::arange(0..t as i64, &device).reshape([1, 1, t]);
    let last = len.clone().sub_scalar(1).clamp_min(0);
    let src = steps.expand([b, h, t]).min_pair(last.expand([b, h, t]));
    let slot = start.add(src.clone()).clamp(0, s as i32 - 1);
    // Whole rows of D values move: index the flattened [B·H·rows, D] views.
    let base = |rows: usize| {
        Tensor::<1, Int>::arange(0..(b * h) as i64, &device)
            .mul_scalar(rows as i32)
            .reshape([b, h, 1])
            .expand([b, h, t])
    };
    let src = src.add(base(t)).reshape([b * h * t]);
    let dst = slot.add(base(s)).reshape([b * h * t]);
    let cache = cache.reshape([b * h * s, d]);
    let fresh = new.reshape([b * h * t, d]).select(0, src);
    let old = cache.clone().select(0, dst.clone());
    let empty = len
        .lower_equal_elem(0)
        .reshape([b, 1, 1])
        .expand([b, h, t])
        .reshape([b * h * t, 1])
        .expand([b * h * t, d]);
    let values = fresh.mask_where(empty, old);
    cache
        .select_assign(0, dst, values, IndexingUpdateOp::Assign)
        .reshape([b, h, s, d])
}

/// Temperature / top-k / top-p sampling with fixed shapes: one descending sort per row,
/// masks for the cuts, and an inverse-CDF lookup of the row's uniform draw.
pub fn sample(
    logits: Tensor<4>,
    temperature: Tensor<4>,
    top_k: Tensor<4, Int>,
    top_p: Tensor<4>,
    uniform: Tensor<4>,
) -> Tensor<2, Int> {
    let [_, _, b, v] = logits.dims();
    let logits = logits.reshape([b, v]);
    let temperature = temperature.reshape([b, 1]);
    let greedy = logits.clone().argmax(1);
    let z = logits.div(temperature.clone().clamp_min(1e-6).expand([b, v]));
    let (sorted, order) = z.sort_descending_with_indices(1);
    let probs = softmax(sorted, 1);
    let device = probs.device();
    let rank = Tensor::<1, Int>::arange(0..v as i64, &device)
        .reshape([1, v])
        .expand([b, v]);
    let k = top_k.reshape([b, 1]);
    let k = k.clone().mask_fill(k.lower_equal_elem(0), v as i32);
    let keep_k = rank.clone().lower(k.expand([b, v]));
    let before = probs.clone().cumsum(1).sub(probs.clone());
    let first = rank.clone().equal_elem(0);
    let keep_p = before
        .lower(top_p.reshape([b, 1]).expand([b, v]))
        .bool_or(first);
    let keep = keep_k.bool_and(keep_p);
    // Kept ranks form a prefix; the draw never lands past its last element, even when
    // rounding puts `uniform · total` at the total.
    let last_kept = keep.clone().int().sum_dim(1).sub_scalar(1);
    let kept = probs.mask_fill(keep.bool_not(), 0.0f32);
    let cdf = kept.cumsum(1);
    let total = cdf.clone().narrow(1, v - 1, 1);
    let target = uniform.reshape([b, 1]).mul(total).expand([b, v]);
    let idx = cdf.lower_equal(target).int().sum_dim(1).min_pair(last_kept);
    let drawn = order.gather(1, idx);
    drawn.mask_where(temperature.lower_equal_elem(0.0f32), greedy)
}

/// Elementwise binary op broadcast to `dims` (Burn's ops, for both kernel sets).
pub fn binary(op: BinaryOp, a: Value, b: Value, dims: [usize; 4]) -> Value {
    match (a, b) {
        (Value::F(a), Value::F(b)) => {
            let (a, b) = (a.expand(dims), b.expand(dims));
            match op {
                BinaryOp::Add => Value::F(a.add(b)),
                BinaryOp::Sub => Value::F(a.sub(b)),
                BinaryOp::Mul => Value::F(a.mul(b)),
                BinaryOp::Min => Value::F(a.min_pair(b)),
                BinaryOp::Max => Value::F(a.max_pair(b)),
                BinaryOp::Div => Value::F(a.div(b)),
                BinaryOp::Eq => Value::B(a.equal(b)),
                BinaryOp::Lt => Value::B(a.lower(b)),
                BinaryOp::Le => Value::B(a.lower_equal(b)),
                BinaryOp::And | BinaryOp::Or => unreachable!("verified: logic on f32"),
            }
        }
        (Value::I(a), Value::I(b)) => {
            let (a, b) = (a.expand(dims), b.expand(dims));
            match op {
                BinaryOp::Add => Value::I(a.add(b)),
                BinaryOp::Sub => Value::I(a.sub(b)),
                BinaryOp::Mul => Value::I(a.mul(b)),
                BinaryOp::Min => Value::I(a.min_pair(b)),
                BinaryOp::Max => Value::I(a.max_pair(b)),
                BinaryOp::Eq => Value::B(a.equal(b)),
                BinaryOp::Lt => Value::B(a.lower(b)),
                BinaryOp::Le => Value::B(a.lower_equal(b)),
                BinaryOp::And | BinaryOp::Or => unreachable!("verified: logic on i32"),
                BinaryOp::Div => unreachable!("verified: division on f32 only"),
            }
        }
        (Value::B(a), Value::B(b)) => {
            let (a, b) = (a.expand(dims), b.expand(dims));
            match op {
                BinaryOp::And => Value::B(a.bool_and(b)),
                BinaryOp::Or => Value::B(a.bool_or(b)),
                BinaryOp::Eq => Value::B(a.equal(b)),
                BinaryOp::Add
                | BinaryOp::Sub
                | BinaryOp::Mul
                | BinaryOp::Min
                | BinaryOp::Max
                | BinaryOp::Div
                | BinaryOp::Lt
                | BinaryOp::Le => unreachable!("verified: arithmetic on bool"),
            }
        }
        (a, b) => unreachable!("verified binary: {a:?} vs {b:?}"),
    }
}
