//! The tensor kernels the executor calls for kvc's ops, on Burn tensors of rank 4 (IR
//! shapes padded with leading 1s) unless a signature says otherwise. Public so that the
//! criterion benchmarks (`runtime/benches/ops.rs`) time exactly what a graph runs.

use burn::tensor::activation::softmax;
use burn::tensor::module;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{
    Bool, DType as BurnDType, FloatDType, IndexingUpdateOp, Int, Tensor, TensorData, kind::Basic,
};
use burn_flex::Flex;

/// Rows below which a projection is a memory-bound matrix-vector product (decode: one
/// row per batch row). On the CPU such products run in [`crate::cpu::gemv`], which streams
/// each weight once for all rows on both cores; elsewhere they are split in two halves of
/// the output features, one per thread (Flex's own matmul runs them on one thread).
pub const SPLIT_BELOW_ROWS: usize = 16;

/// Rows up to which a CPU projection runs in [`crate::cpu::gemv`] (decode at batch ≤ 16).
pub const HOST_GEMV_ROWS: usize = 16;

/// `x · wᵀ` for x `[m, k]`, w `[n, k]`.
/// F16 weights are widened to f32 as they are read (GEMV) or for the product (larger
/// products); arithmetic and accumulation are f32.
pub fn linear(x: Tensor<2>, w: Tensor<2>) -> Tensor<2> {
    let [m, k] = x.dims();
    let [n, _] = w.dims();
    if m <= HOST_GEMV_ROWS
        && let Some(y) = host_linear(&x, &w, m, k, n)
    {
        return y;
    }
    // Flex has no fast f16 GEMM on CPUs without AVX512-FP16: widen the weights for the
    // product (a copy of one matrix, small next to an M ≥ 16 product's arithmetic).
    let w = widen(w);
    if m >= SPLIT_BELOW_ROWS || n < 256 || rayon::current_num_threads() < 2 {
        return to_f32(x.matmul(w.transpose()));
    }
    let h = n / 2;
    let (a, b) = rayon::join(
        || x.clone().matmul(w.clone().narrow(0, 0, h).transpose()),
        || x.clone().matmul(w.clone().narrow(0, h, n - h).transpose()),
    );
    to_f32(Tensor::cat(vec![a, b], 1))
}

/// [`crate::cpu::gemv::matmul_t`] on the tensors' own host buffers (no copy of the weights),
/// or `None` when they are not contiguous f32/f16 Flex tensors.
fn host_linear(x: &Tensor<2>, w: &Tensor<2>, m: usize, k: usize, n: usize) -> Option<Tensor<2>> {
    let wt = w.clone().try_into_primitive::<Flex>().ok()?;
    let xt = host(x)?;
    let xs = xt.as_slice::<f32>()?;
    let mut out = vec![0.0f32; m * n];
    if let Some(ws) = wt.as_slice::<f32>() {
        crate::cpu::gemv::matmul_t(xs, m, k, ws, n, &mut out);
    } else {
        let ws = wt.as_slice::<half::f16>()?;
        crate::cpu::gemv::matmul_t(xs, m, k, ws, n, &mut out);
    }
    Some(Tensor::from_data(TensorData::new(out, [m, n]), &x.device()))
}

/// An F32 copy of F16 weights (on the CPU with `half`'s F16C slice conversion, which is
/// several times faster than an elementwise cast); F32 weights as they are.
fn widen(w: Tensor<2>) -> Tensor<2> {
    if w.dtype() != BurnDType::F16 {
        return w;
    }
    if let Some(t) = host(&w)
        && let Some(h) = t.as_slice::<half::f16>()
    {
        use half::slice::HalfFloatSliceExt;
        let mut out = vec![0.0f32; h.len()];
        h.convert_to_f32_slice(&mut out);
        return Tensor::from_data(TensorData::new(out, w.dims()), &w.device());
    }
    to_f32(w)
}

/// Activations are F32; weights may be stored in F16.
pub fn to_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == BurnDType::F32 {
        t
    } else {
        t.cast(FloatDType::F32)
    }
}

/// `x · σ(x)`; on the CPU with a vectorised exp ([`crate::cpu::elementwise`]).
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if let Some(t) = host(&x)
        && let Some(v) = t.as_slice::<f32>()
    {
        let out = crate::cpu::elementwise::silu(v);
        return Tensor::from_data(TensorData::new(out, x.dims()), &x.device());
    }
    burn::tensor::activation::silu(x)
}

/// `x / √(mean(x²) + eps) · w` over the last axis (w `[1, 1, 1, H]`).
pub fn rms_norm(x: Tensor<4>, w: Tensor<4>, eps: f32) -> Tensor<4> {
    if let (Some(xt), Some(wt)) = (host(&x), host(&w))
        && let (Some(xs), Some(ws)) = (xt.as_slice::<f32>(), wt.as_slice::<f32>())
    {
        let out = crate::cpu::elementwise::rms_norm(xs, ws, eps);
        return Tensor::from_data(TensorData::new(out, x.dims()), &x.device());
    }
    let ms = x.clone().powi_scalar(2).mean_dim(3);
    let inv = ms.add_scalar(eps).sqrt().recip();
    x.mul(inv).mul(w)
}

/// [`kv_write`] of an F32 cache in place on its host buffer, when the cache lives on Flex
/// with a single owner; otherwise the cache comes back untouched.
pub fn host_kv_write(
    cache: Tensor<4>,
    new: &Tensor<4>,
    start: &Tensor<4, Int>,
    len: &Tensor<4, Int>,
) -> Result<Tensor<4>, Box<Tensor<4>>> {
    let dims = cache.dims();
    let Ok(mut prim) = cache.clone().try_into_primitive::<Flex>() else {
        return Err(Box::new(cache));
    };
    drop(cache);
    let whole = prim.layout().contiguous_offsets() == Some((0, dims.iter().product()));
    let mut write = || -> Option<()> {
        if !whole {
            return None;
        }
        let (nt, st, lt) = (host(new)?, host(start)?, host(len)?);
        let (ns, ss, ls) = (
            nt.as_slice::<f32>()?,
            st.as_slice::<i32>()?,
            lt.as_slice::<i32>()?,
        );
        let c = prim.try_storage_mut::<f32>()?;
        crate::cpu::cache::kv_write(c, ns, ss, ls, dims, new.dims()[2]);
        Some(())
    };
    let done = write().is_some();
    let cache = Tensor::from_primitive::<Flex>(prim);
    if done {
        Ok(cache)
    } else {
        Err(Box::new(cache))
    }
}

/// Half-split rotary embedding: x `[B, T, N, D]`, pos `[1, 1, B, T]`.
pub fn rope(x: Tensor<4>, pos: Tensor<4, Int>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<4> {
    if let (Some(xt), Some(pt), Some(ct), Some(st)) = (host(&x), host(&pos), host(&cos), host(&sin))
        && let (Some(xs), Some(ps), Some(cs), Some(ss)) = (
            xt.as_slice::<f32>(),
            pt.as_slice::<i32>(),
            ct.as_slice::<f32>(),
            st.as_slice::<f32>(),
        )
    {
        let [_, _, n, d] = x.dims();
        let out = crate::cpu::elementwise::rope(xs, ps, n, d, cs, ss);
        return Tensor::from_data(TensorData::new(out, x.dims()), &x.device());
    }
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

/// Query rows per KV head (`g·T`) up to which attention is a few-row (decode) problem: on
/// the CPU it runs in [`crate::cpu::attention`], which also returns the probabilities when
/// an `attention_mass` reuses them; elsewhere, when the probabilities are wanted, as
/// explicit `q·kᵀ`, softmax and `p·v`, else in Burn's fused kernel.
pub const EXPLICIT_ATTENTION_ROWS: usize = 16;

/// Query positions per block of a long chunk's attention on the CPU.
pub const QUERY_BLOCK: usize = 128;

/// Grouped-query attention without materialising repeated KV heads: the `g` query heads
/// that share a KV head are stacked along the query axis. Returns the output and, when
/// `want_probs` and the query is small ([`EXPLICIT_ATTENTION_ROWS`]), the probabilities
/// `[B, Hkv, g·T, S]`.
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Tensor<4, Bool>,
    scale: f32,
    want_probs: bool,
) -> (Tensor<4>, Option<Tensor<4>>) {
    let [b, hq, t, d] = q.dims();
    let hkv = k.dims()[1];
    let g = hq / hkv;
    if g * t <= EXPLICIT_ATTENTION_ROWS
        && let Some(r) = host_attention(&q, &k, &v, &mask, scale, want_probs)
    {
        return r;
    }
    if want_probs && g * t <= EXPLICIT_ATTENTION_ROWS {
        let probs = attention_probs(q, k, mask, scale);
        let out = probs.clone().matmul(v).reshape([b, hq, t, d]);
        return (out, Some(probs));
    }
    let options = AttentionModuleOptions {
        scale: Some(scale as f64),
        softcap: None,
        is_causal: false,
    };
    // `live`: one past the last slot any of these queries sees (CPU only). Slots past it
    // contribute nothing, so the kernel runs over the prefix up to it.
    let fused = |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, mask: Tensor<4, Bool>, live| {
        let (k, v, mask) = match live {
            Some(live) if live < k.dims()[2] => (
                k.narrow(2, 0, live),
                v.narrow(2, 0, live),
                mask.narrow(3, 0, live),
            ),
            _ => (k, v, mask),
        };
        let tb = q.dims()[2];
        let q = q.reshape([b, hkv, g * tb, d]);
        let hidden = hidden_slots(mask, g);
        module::attention(q, k, v, Some(hidden), None, options).reshape([b, hq, tb, d])
    };
    // A causal chunk's early queries see few slots: split the queries into blocks so
    // each attends over its own live prefix (≈ 40% less work for a first 512-token chunk).
    let live = live_slots(&mask);
    if live.is_none() || t < 2 * QUERY_BLOCK {
        return (fused(q, k, v, mask, live), None);
    }
    let parts: Vec<Tensor<4>> = (0..t)
        .step_by(QUERY_BLOCK)
        .map(|t0| {
            let tb = QUERY_BLOCK.min(t - t0);
            let mask = mask.clone().narrow(2, t0, tb);
            let live = live_slots(&mask);
            fused(
                q.clone().narrow(2, t0, tb),
                k.clone(),
                v.clone(),
                mask,
                live,
            )
        })
        .collect();
    let out = Tensor::cat(parts, 2);
    (out, None)
}

/// One past the last slot that any query of `mask` `[B, M, T, S]` sees (at least 1), or
/// `None` off Flex.
fn live_slots(mask: &Tensor<4, Bool>) -> Option<usize> {
    let s = mask.dims()[3];
    let mt = host(mask)?;
    let last = bool_bytes(&mt)?
        .chunks_exact(s)
        .filter_map(|row| row.iter().rposition(|&v| v != 0))
        .max()
        .unwrap_or(0);
    Some(last + 1)
}

/// [`crate::cpu::attention`] on the tensors' host buffers, or `None` off Flex.
fn host_attention(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    mask: &Tensor<4, Bool>,
    scale: f32,
    want_probs: bool,
) -> Option<(Tensor<4>, Option<Tensor<4>>)> {
    let [b, hq, t, d] = q.dims();
    let [_, hkv, s, _] = k.dims();
    let m = mask.dims()[1];
    let dims = crate::cpu::attention::Dims {
        scale,
        b,
        hq,
        hkv,
        t,
        s,
        d,
        m,
    };
    let (qt, kt, vt) = (host(q)?, host(k)?, host(v)?);
    let mt = host(mask)?;
    let mut out = vec![0.0f32; b * hq * t * d];
    let mut probs = want_probs.then(|| vec![0.0f32; b * hq * t * s]);
    crate::cpu::attention::attention(
        qt.as_slice::<f32>()?,
        kt.as_slice::<f32>()?,
        vt.as_slice::<f32>()?,
        bool_bytes(&mt)?,
        dims,
        &mut out,
        probs.as_deref_mut(),
    );
    let device = q.device();
    let out = Tensor::from_data(TensorData::new(out, [b, hq, t, d]), &device);
    let probs =
        probs.map(|p| Tensor::from_data(TensorData::new(p, [b, hkv, hq / hkv * t, s]), &device));
    Some((out, probs))
}

/// The bytes (0 or 1) of a contiguous Flex bool tensor.
fn bool_bytes(t: &burn_flex::FlexTensor) -> Option<&[u8]> {
    let (start, end) = t.layout().contiguous_offsets()?;
    Some(&t.storage::<u8>()[start..end])
}

/// A contiguous Flex view of a tensor (copied only if it is a strided view), or `None`
/// when it does not live on Flex.
fn host<const D: usize, K>(x: &Tensor<D, K>) -> Option<burn_flex::FlexTensor>
where
    K: Basic + burn::tensor::BackendPrimitive<Flex, Primitive = burn_flex::FlexTensor>,
{
    let t = x.clone().try_into_primitive::<Flex>().ok()?;
    Some(if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    })
}

/// Softmax of `scale · q·kᵀ` over the visible slots, `[B, Hkv, g·T, S]` (group-major query
/// axis); hidden slots get 0, and a query with no visible slot gets all zeros.
pub fn attention_probs(q: Tensor<4>, k: Tensor<4>, mask: Tensor<4, Bool>, scale: f32) -> Tensor<4> {
    let [b, hq, t, d] = q.dims();
    let [_, hkv, s, _] = k.dims();
    let g = hq / hkv;
    let q = q.reshape([b, hkv, g * t, d]);
    let hidden = hidden_slots(mask, g).expand([b, hkv, g * t, s]);
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    softmax(scores.mask_fill(hidden.clone(), -1.0e30f32), 3).mask_fill(hidden, 0.0f32)
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

/// Attention probability each key receives, from the probabilities `[B, Hkv, g·T, S]`
/// of [`attention_probs`]: weighted per query (weight `[1, 1, B, T]`), summed over
/// queries and averaged over the `g` query heads of a KV group → `[1, B, Hkv, S]`.
pub fn attention_mass(probs: Tensor<4>, weight: Tensor<4>, g: usize) -> Tensor<4> {
    let [b, hkv, gt, s] = probs.dims();
    let t = gt / g;
    let w = weight.reshape([b, 1, 1, t, 1]);
    let mass = probs.reshape([b, hkv, g, t, s]).mul(w);
    mass.sum_dim(3)
        .sum_dim(2)
        .mul_scalar(1.0 / g as f32)
        .reshape([1, b, hkv, s])
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

/// Indices of the `k` largest `(x, tiebreak)` pairs of each row of `n`, largest first,
/// equal pairs by lower index (the order [`Op::TopK`] specifies).
pub fn top_k(x: &[f32], tiebreak: &[i32], n: usize, k: usize) -> Vec<i32> {
    let mut out = Vec::with_capacity(x.len() / n * k);
    let better = |i: usize, j: usize| -> bool {
        match x[i].total_cmp(&x[j]) {
            std::cmp::Ordering::Equal => tiebreak[i] > tiebreak[j],
            o => o == std::cmp::Ordering::Greater,
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

/// murmur3's 32-bit finalizer.
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The uniform draw of [`Op::Hash`]: `fmix32(fmix32(seed ^ a) ^ b)`, top 24 bits / 2²⁴.
pub fn hash_uniform(seed: u32, a: i32, b: i32) -> f32 {
    let h = fmix32(fmix32(seed ^ a as u32) ^ b as u32);
    (h >> 8) as f32 / 16_777_216.0
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A long causal chunk (blocked queries, trimmed slots) against softmax·v written out
    /// with Burn's plain ops, over a cache prefix and unwritten tail slots.
    #[test]
    fn blocked_long_chunk_attention_matches_plain_softmax() {
        let dev = crate::device(crate::Backend::Flex).unwrap();
        let (b, hq, hkv, t, s, d, prefix) = (2, 4, 2, 300, 420, 8, 50);
        let vals = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| hash_uniform(seed, i as i32, 0) * 2.0 - 1.0)
                .collect()
        };
        let q = Tensor::<4>::from_data(
            TensorData::new(vals(b * hq * t * d, 1), [b, hq, t, d]),
            &dev,
        );
        let k = Tensor::<4>::from_data(
            TensorData::new(vals(b * hkv * s * d, 2), [b, hkv, s, d]),
            &dev,
        );
        let v = Tensor::<4>::from_data(
            TensorData::new(vals(b * hkv * s * d, 3), [b, hkv, s, d]),
            &dev,
        );
        // Row 1 has a shorter prefix: its queries see fewer slots.
        let seen: Vec<i32> = (0..b * t * s)
            .map(|i| {
                let (row, qi, j) = (i / (t * s), i / s % t, i % s);
                (j <= prefix - 20 * row + qi) as i32
            })
            .collect();
        let mask = Tensor::<4, Int>::from_data(TensorData::new(seen, [b, 1, t, s]), &dev).bool();
        let (got, _) = attention(q.clone(), k.clone(), v.clone(), mask.clone(), 0.3, false);
        let g = hq / hkv;
        let want = attention_probs(q, k, mask, 0.3)
            .matmul(v)
            .reshape([b, hq, t, d]);
        let diff: f32 = got.sub(want).abs().max().into_scalar();
        assert!(diff < 1e-5, "max |blocked − plain| = {diff} (g = {g})");
    }

    #[test]
    fn top_k_orders_by_value_then_tiebreak_then_index() {
        // Row 0: values tie at 3 (tiebreak 1 beats 0); row 1: full ties fall back to index.
        let x = [1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 2.0, 2.0];
        let tb = [0, 0, 1, 5, 7, 7, 7, 7];
        assert_eq!(top_k(&x, &tb, 4, 4), vec![2, 1, 0, 3, 0, 1, 2, 3]);
        assert_eq!(top_k(&x, &tb, 4, 1), vec![2, 0]);
    }

    #[test]
    fn kv_write_takes_a_slot_per_row_and_head() {
        let dev = crate::device(crate::Backend::Flex).unwrap();
        // cache [1, 2 heads, 4 slots, 1]; row 0 writes its one new entry per head at slots
        // 3 (head 0) and 1 (head 1).
        let cache = Tensor::<4>::zeros([1, 2, 4, 1], &dev);
        let new = Tensor::<4>::from_data(TensorData::new(vec![5.0f32, 6.0], [1, 2, 1, 1]), &dev);
        let start = Tensor::<4, Int>::from_data(TensorData::new(vec![3i32, 1], [1, 1, 1, 2]), &dev);
        let len = Tensor::<4, Int>::from_data(TensorData::new(vec![1i32], [1, 1, 1, 1]), &dev);
        let out = kv_write(cache.clone(), new.clone(), start.clone(), len);
        let got = out
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(got, vec![0.0, 0.0, 0.0, 5.0, 0.0, 6.0, 0.0, 0.0]);
        // len 0 leaves the cache as it was.
        let zero = Tensor::<4, Int>::zeros([1, 1, 1, 1], &dev);
        let same = kv_write(cache, new, start, zero);
        let got = same
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(got, vec![0.0; 8]);
    }

    /// Hand-computed draws: probabilities 0.1, 0.2, 0.3, 0.4 for ids 0..4, so the ranked
    /// order is ids 3, 2, 1, 0 with cumulative mass 0.4, 0.7, 0.9, 1.0.
    #[test]
    fn sample_follows_the_documented_rule() {
        let dev = crate::device(crate::Backend::Flex).unwrap();
        let logits: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
        // (temperature, top_k, top_p, uniform, expected id)
        let cases: [(f32, i32, f32, f32, i32); 10] = [
            (1.0, 0, 1.0, 0.0, 3),
            (1.0, 0, 1.0, 0.45, 2),
            (1.0, 0, 1.0, 0.95, 0),
            (1.0, 0, 1.0, 0.999_999, 0),
            (1.0, 2, 1.0, 0.95, 2),  // kept 0.4, 0.3: target 0.665
            (1.0, 0, 0.5, 0.95, 2),  // mass before rank 2 is 0.7 >= 0.5
            (1.0, 0, 0.01, 0.99, 3), // rank 0 is always kept
            (0.0, 0, 1.0, 0.95, 3),  // greedy
            (1.0e6, 0, 1.0, 0.3, 2), // flat: 0.25 each
            (1.0, 0, 1.0, 0.3, 3),
        ];
        let b = cases.len();
        let rows: Vec<f32> = (0..b).flat_map(|_| logits.clone()).collect();
        let col = |f: fn(&(f32, i32, f32, f32, i32)) -> f32| -> Vec<f32> {
            cases.iter().map(f).collect()
        };
        let tensor = |v: Vec<f32>, shape: [usize; 4]| {
            Tensor::<4>::from_data(TensorData::new(v, shape), &dev)
        };
        let got = sample(
            tensor(rows, [1, 1, b, 4]),
            tensor(col(|c| c.0), [1, 1, 1, b]),
            Tensor::<4, Int>::from_data(
                TensorData::new(
                    cases.iter().map(|c| c.1).collect::<Vec<i32>>(),
                    [1, 1, 1, b],
                ),
                &dev,
            ),
            tensor(col(|c| c.2), [1, 1, 1, b]),
            tensor(col(|c| c.3), [1, 1, 1, b]),
        );
        let got = got
            .into_data()
            .convert::<i32>()
            .try_to_vec::<i32>()
            .unwrap();
        let want: Vec<i32> = cases.iter().map(|c| c.4).collect();
        assert_eq!(got, want);
    }
}
