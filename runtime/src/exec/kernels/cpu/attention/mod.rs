//! Masked grouped-query attention on host slices: of a few query rows per KV head
//! (decode: [`attention`], [`probs`], [`values`]) and of long chunks of positions
//! (prefill: [`chunk`], flash-style).
//!
//! Burn's fused attention costs ≈ 0.1–0.3 ms per call on Flex whatever the size and
//! computes every slot, visible or not. Here slots that no query row of a KV head sees are
//! skipped (a dense cache's unwritten tail, a budgeted cache's free slots), and work is
//! split over (KV head, block of slots) so both cores stream the cache; each block keeps its
//! own maximum, sum and weighted values, rescaled when the blocks are combined.
//!
//! Layouts (row-major): q `[B, Hq, T, D]`; k, v `[B, Hkv, S, D]` of f32 or f16 ([`KvElem`],
//! widened in registers as rows are loaded); mask `[B, M, T, S]`
//! (M = 1 or Hkv, nonzero = visible); out `[B, Hq, T, D]`; probs `[B, Hq, T, S]`, `g =
//! Hq / Hkv` query heads per KV head. A row that sees no slot gets zero output and zero
//! probabilities.
//!
//! [`attention`] is the fused form; [`probs`] and [`values`] are the split form the
//! compiler asks for when the probabilities also feed an `attention_mass`.

mod chunk;
mod rows;

use rayon::prelude::*;

pub use self::chunk::chunk;
pub use self::rows::KvElem;
use self::rows::{axpy, exp_shifted, scores, weighted_sum, widened};
use super::SendPtr;

/// Shapes and scale of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// Factor on `q·k` before the softmax.
    pub scale: f32,
    /// Batch rows.
    pub b: usize,
    /// Query heads.
    pub hq: usize,
    /// KV heads.
    pub hkv: usize,
    /// Query positions per row.
    pub t: usize,
    /// Cache slots.
    pub s: usize,
    /// Head dimension.
    pub d: usize,
    /// Mask heads: 1 (shared) or `hkv`.
    pub m: usize,
}

/// Slots per task at least (one task reads `slots · d` keys and values).
const MIN_BLOCK: usize = 64;

/// `softmax(scale · q·kᵀ | mask) · v` into `out`.
///
/// # Panics
/// If a slice length disagrees with `dims`.
pub fn attention<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    mask: &[u8],
    dims: Dims,
    real: Option<&[usize]>,
    out: &mut [f32],
) {
    attention_on(fused::Isa::best(), q, k, v, mask, dims, real, out);
}

/// Query positions of batch row `bi` that a kernel computes: all `t`, or with `real`
/// (each batch row's count of real positions: a prefill's lengths, 0 or 1 in a decode
/// step) the first `real[bi]` of them. The rest are padding: the kernels leave their rows
/// of the output as the caller's buffer held them.
pub fn real_positions(real: Option<&[usize]>, bi: usize, t: usize) -> usize {
    real.map_or(t, |r| r[bi].min(t))
}

/// [`attention`] with the fused decode path on `isa` (an available one), or without it.
/// With `real`, batch rows without real positions are skipped (a few-row call computes
/// every position of the others: they share each pass over the keys).
#[allow(clippy::too_many_arguments)]
fn attention_on<E: KvElem>(
    isa: Option<fused::Isa>,
    q: &[f32],
    k: &[E],
    v: &[E],
    mask: &[u8],
    dims: Dims,
    real: Option<&[usize]>,
    out: &mut [f32],
) {
    let Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
        ..
    } = dims;
    let g = hq / hkv;
    let rows = g * t;
    check_fused(dims, q.len(), k.len(), v.len(), mask.len(), out.len());
    if !E::supported() {
        return attention_on(isa, q, &widened(k), &widened(v), mask, dims, real, out);
    }
    let heads = b * hkv;
    let threads = rayon::current_num_threads().max(1);
    let block = s
        .div_ceil((4 * threads).div_ceil(heads))
        .max(MIN_BLOCK)
        .min(s.max(1));
    let blocks = s.div_ceil(block).max(1);

    let ctx = Ctx {
        q,
        k,
        v,
        mask,
        dims,
        g,
        rows,
        block,
        blocks,
        fused: isa,
    };

    // One pass per (head, block of slots): scores (−∞ where hidden), the block's maximum
    // per row, exp(score − block max), their sum and the unnormalised Σ e·v.
    let mut scores = vec![f32::NEG_INFINITY; heads * rows * s];
    let mut block_max = vec![f32::NEG_INFINITY; heads * blocks * rows];
    let mut block_sum = vec![0.0f32; heads * blocks * rows];
    let mut block_out = vec![0.0f32; heads * blocks * rows * d];
    let sc = SendPtr(scores.as_mut_ptr());
    block_max
        .par_chunks_mut(rows)
        .zip(block_sum.par_chunks_mut(rows))
        .zip(block_out.par_chunks_mut(rows * d))
        .enumerate()
        .for_each(|(i, ((bm, bs), bo))| {
            if real_positions(real, i / blocks / hkv, t) > 0 {
                // SAFETY: task i reads and writes only its own block's columns of the
                // scores.
                unsafe { block_task(&ctx, i, sc, bm, bs, bo) }
            }
        });

    // Combine the blocks and normalise.
    for h in 0..heads {
        let (bi, kvh) = (h / hkv, h % hkv);
        if real_positions(real, bi, t) == 0 {
            continue;
        }
        let o = &mut out[(bi * hq + kvh * g) * t * d..][..rows * d];
        for r in 0..rows {
            let at = |c: usize| (h * blocks + c) * rows + r;
            let top = (0..blocks)
                .map(|c| block_max[at(c)])
                .fold(f32::NEG_INFINITY, f32::max);
            // Each block's weights were taken against its own maximum: rescale to `top`.
            let factor: Vec<f32> = (0..blocks)
                .map(|c| {
                    let mc = block_max[at(c)];
                    if mc == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (mc - top).exp()
                    }
                })
                .collect();
            let total: f32 = (0..blocks).map(|c| factor[c] * block_sum[at(c)]).sum();
            let inv = if total > 0.0 { 1.0 / total } else { 0.0 };
            let or = &mut o[r * d..(r + 1) * d];
            or.fill(0.0);
            for c in 0..blocks {
                let part = &block_out[at(c) * d..][..d];
                axpy(factor[c] * inv, part, or);
            }
        }
    }
}

/// Panics unless q `[B, Hq, T, D]`, k `[B, Hkv, S, D]` and mask `[B, M, T, S]` have the
/// lengths `dims` gives.
fn check_inputs(dims: Dims, q: usize, k: usize, mask: usize) {
    let Dims {
        b,
        hq,
        hkv,
        t,
        s,
        d,
        m,
        ..
    } = dims;
    assert_eq!(q, b * hq * t * d, "q is not [B, Hq, T, D]");
    assert_eq!(k, b * hkv * s * d, "k is not [B, Hkv, S, D]");
    assert_eq!(mask, b * m * t * s, "mask is not [B, M, T, S]");
}

/// [`check_inputs`], and v as k and out as q.
fn check_fused(dims: Dims, q: usize, k: usize, v: usize, mask: usize, out: usize) {
    check_inputs(dims, q, k, mask);
    assert_eq!(v, k, "v is not [B, Hkv, S, D]");
    assert_eq!(out, q, "out is not [B, Hq, T, D]");
}

/// What every task of one call reads.
struct Ctx<'a, E> {
    q: &'a [f32],
    k: &'a [E],
    v: &'a [E],
    mask: &'a [u8],
    dims: Dims,
    g: usize,
    rows: usize,
    block: usize,
    blocks: usize,
    /// The instruction set of the fused decode path, if it runs.
    fused: Option<fused::Isa>,
}

multiversion! {
    /// Task `i` = (head `i / blocks`, block `i % blocks`): for every row, the scores of the
    /// block's slots (−∞ where hidden), their maximum into `bm`, then `exp(score − max)` in
    /// place (0 where hidden), their sum into `bs` and `Σ e·v` into `bo`.
    ///
    /// # Safety
    /// `sc` points to the `[heads, rows, S]` scores; no other task touches this block.
    unsafe fn block_task<E: KvElem>(x: &Ctx<E>, i: usize, sc: SendPtr<f32>, bm: &mut [f32], bs: &mut [f32], bo: &mut [f32]) {
        let Dims { scale, hq, hkv, t, s, d, m, .. } = x.dims;
        let (h, c) = (i / x.blocks, i % x.blocks);
        let (bi, kvh) = (h / hkv, h % hkv);
        let mh = if m == 1 { 0 } else { kvh };
        let qh = &x.q[(bi * hq + kvh * x.g) * t * d..][..x.rows * d];
        let kh = &x.k[h * s * d..][..s * d];
        let vh = &x.v[h * s * d..][..s * d];
        let mk = &x.mask[(bi * m + mh) * t * s..][..t * s];
        let (j0, j1) = (c * x.block, ((c + 1) * x.block).min(s));
        #[cfg(target_arch = "x86_64")]
        if t == 1 && d.is_multiple_of(8) && let Some(isa) = x.fused {
            let vis = &mk[j0..j1];
            // SAFETY: as above; the rows of head h at columns j0..j1 are this task's.
            let e: Vec<&mut [f32]> = (0..x.rows)
                .map(|r| unsafe { std::slice::from_raw_parts_mut(sc.at((h * x.rows + r) * s + j0), j1 - j0) })
                .collect();
            // SAFETY: `isa` is available.
            unsafe { fused::rows(isa, qh, &kh[j0 * d..j1 * d], &vh[j0 * d..j1 * d], vis, scale, e, bm, bs, bo) };
            return;
        }
        for r in 0..x.rows {
            let qr = &qh[r * d..(r + 1) * d];
            let vis = &mk[(r % t) * s..][j0..j1];
            // SAFETY: row r's columns j0..j1 of head h belong to this task.
            let e = unsafe { std::slice::from_raw_parts_mut(sc.at((h * x.rows + r) * s + j0), j1 - j0) };
            let mx = scores(qr, &kh[j0 * d..j1 * d], vis, scale, e);
            bm[r] = mx;
            if mx == f32::NEG_INFINITY {
                // The row sees no slot of this block.
                e.fill(0.0);
                bs[r] = 0.0;
                continue;
            }
            bs[r] = exp_shifted(e, mx);
            weighted_sum(e, &vh[j0 * d..j1 * d], &mut bo[r * d..(r + 1) * d]);
        }
    }
}

/// Without x86-64 there is no fused path.
#[cfg(not(target_arch = "x86_64"))]
mod fused {
    /// No instruction set.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Isa {}

    impl Isa {
        /// None.
        pub(super) fn best() -> Option<Isa> {
            None
        }
    }
}

/// The fused decode path on x86-64 (see `x86.rs`).
#[cfg(target_arch = "x86_64")]
#[path = "x86.rs"]
mod fused;

/// `softmax(scale · q·kᵀ | mask)` alone into `probs` `[B, Hq, T, S]` (the same memory
/// order as `[B, Hkv, g·T, S]`), one task per query row; hidden slots and rows that see
/// nothing get 0.
///
/// # Panics
/// If a slice length disagrees with `dims`.
pub fn probs<E: KvElem>(
    q: &[f32],
    k: &[E],
    mask: &[u8],
    dims: Dims,
    real: Option<&[usize]>,
    probs: &mut [f32],
) {
    let Dims { b, hq, t, s, .. } = dims;
    check_inputs(dims, q.len(), k.len(), mask.len());
    assert_eq!(probs.len(), b * hq * t * s, "probs is not [B, Hq, T, S]");
    if !E::supported() {
        return self::probs(q, &widened(k), mask, dims, real, probs);
    }
    probs.par_chunks_mut(s).enumerate().for_each(|(i, p)| {
        if i % t < real_positions(real, i / (t * hq), t) {
            // SAFETY: no contract beyond the slices' own.
            unsafe { probs_row(q, k, mask, dims, i, p) }
        }
    });
}

multiversion! {
    /// Row `i` = (row, query head, position) of `probs`.
    ///
    /// # Safety
    /// None beyond the slices' own (required by the macro's form).
    unsafe fn probs_row<E: KvElem>(q: &[f32], k: &[E], mask: &[u8], x: Dims, i: usize, p: &mut [f32]) {
        let Dims { scale, hq, hkv, t, s, d, m, .. } = x;
        let (ti, qh, bi) = (i % t, i / t % hq, i / (t * hq));
        let kvh = qh / (hq / hkv);
        let mh = if m == 1 { 0 } else { kvh };
        let qr = &q[i * d..(i + 1) * d];
        let kh = &k[(bi * hkv + kvh) * s * d..][..s * d];
        let vis = &mask[((bi * m + mh) * t + ti) * s..][..s];
        let mx = scores(qr, kh, vis, scale, p);
        if mx == f32::NEG_INFINITY {
            p.fill(0.0);
            return;
        }
        let inv = 1.0 / exp_shifted(p, mx);
        for e in p.iter_mut() {
            *e *= inv;
        }
    }
}

/// `out[b, h, t, :] = Σ_s probs[b, h, t, s] · v[b, h / g, s, :]`, one task per query row,
/// skipping slots of probability 0 (hidden or free ones). probs `[B, Hq, T, S]`, v
/// `[B, Hkv, S, D]`, out `[B, Hq, T, D]`.
///
/// # Panics
/// If a slice length disagrees with the others.
pub fn values<E: KvElem>(
    probs: &[f32],
    v: &[E],
    [b, hq, t, s]: [usize; 4],
    (hkv, real): (usize, Option<&[usize]>),
    out: &mut [f32],
) {
    let d = out.len() / (b * hq * t).max(1);
    assert_eq!(probs.len(), b * hq * t * s, "probs is not [B, Hq, T, S]");
    assert_eq!(v.len(), b * hkv * s * d, "v is not [B, Hkv, S, D]");
    assert_eq!(out.len(), b * hq * t * d, "out is not [B, Hq, T, D]");
    if !E::supported() {
        return values(probs, &widened(v), [b, hq, t, s], (hkv, real), out);
    }
    let g = hq / hkv;
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let (qh, bi) = (i / t % hq, i / (t * hq));
        if i % t >= real_positions(real, bi, t) {
            return;
        }
        let vh = &v[(bi * hkv + qh / g) * s * d..][..s * d];
        // SAFETY: no contract beyond the slices' own.
        unsafe { values_row(&probs[i * s..(i + 1) * s], vh, o) };
    });
}

multiversion! {
    /// One output row of [`values`].
    ///
    /// # Safety
    /// None beyond the slices' own (required by the macro's form).
    unsafe fn values_row<E: KvElem>(p: &[f32], v: &[E], o: &mut [f32]) {
        weighted_sum(p, v, o);
    }
}

#[cfg(test)]
mod tests;
