//! Masked grouped-query attention of a few query rows per KV head (decode) on host
//! slices.
//!
//! Burn's fused attention costs ≈ 0.1–0.3 ms per call on Flex whatever the size and
//! computes every slot, visible or not. Here slots that no query row of a KV head sees are
//! skipped (a dense cache's unwritten tail, a budgeted cache's free slots), and work is
//! split over (KV head, block of slots) so both cores stream the cache; each block keeps its
//! own maximum, sum and weighted values, rescaled when the blocks are combined.
//!
//! Layouts (row-major): q `[B, Hq, T, D]`; k, v `[B, Hkv, S, D]`; mask `[B, M, T, S]`
//! (M = 1 or Hkv, nonzero = visible); out `[B, Hq, T, D]`; probs `[B, Hq, T, S]`, `g =
//! Hq / Hkv` query heads per KV head. A row that sees no slot gets zero output and zero
//! probabilities.
//!
//! [`attention`] is the fused form; [`probs`] and [`values`] are the split form the
//! compiler asks for when the probabilities also feed an `attention_mass`.

use rayon::prelude::*;

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
pub fn attention(q: &[f32], k: &[f32], v: &[f32], mask: &[u8], dims: Dims, out: &mut [f32]) {
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
    let g = hq / hkv;
    let rows = g * t;
    assert_eq!(q.len(), b * hq * t * d, "q is not [B, Hq, T, D]");
    assert_eq!(k.len(), b * hkv * s * d, "k is not [B, Hkv, S, D]");
    assert_eq!(v.len(), k.len(), "v is not [B, Hkv, S, D]");
    assert_eq!(mask.len(), b * m * t * s, "mask is not [B, M, T, S]");
    assert_eq!(out.len(), q.len(), "out is not [B, Hq, T, D]");
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
        // SAFETY: task i reads and writes only its own block's columns of the scores.
        .for_each(|(i, ((bm, bs), bo))| unsafe { block_task(&ctx, i, sc, bm, bs, bo) });

    // Combine the blocks and normalise.
    for h in 0..heads {
        let (bi, kvh) = (h / hkv, h % hkv);
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

/// What every task of one call reads.
struct Ctx<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    mask: &'a [u8],
    dims: Dims,
    g: usize,
    rows: usize,
    block: usize,
    blocks: usize,
}

multiversion! {
    /// Task `i` = (head `i / blocks`, block `i % blocks`): for every row, the scores of the
    /// block's slots (−∞ where hidden), their maximum into `bm`, then `exp(score − max)` in
    /// place (0 where hidden), their sum into `bs` and `Σ e·v` into `bo`.
    ///
    /// # Safety
    /// `sc` points to the `[heads, rows, S]` scores; no other task touches this block.
    unsafe fn block_task(x: &Ctx, i: usize, sc: SendPtr<f32>, bm: &mut [f32], bs: &mut [f32], bo: &mut [f32]) {
        let Dims { scale, hq, hkv, t, s, d, m, .. } = x.dims;
        let (h, c) = (i / x.blocks, i % x.blocks);
        let (bi, kvh) = (h / hkv, h % hkv);
        let mh = if m == 1 { 0 } else { kvh };
        let qh = &x.q[(bi * hq + kvh * x.g) * t * d..][..x.rows * d];
        let kh = &x.k[h * s * d..][..s * d];
        let vh = &x.v[h * s * d..][..s * d];
        let mk = &x.mask[(bi * m + mh) * t * s..][..t * s];
        let (j0, j1) = (c * x.block, ((c + 1) * x.block).min(s));
        for r in 0..x.rows {
            let qr = &qh[r * d..(r + 1) * d];
            let vis = &mk[(r % t) * s..][j0..j1];
            // SAFETY: row r's columns j0..j1 of head h belong to this task.
            let e = unsafe { std::slice::from_raw_parts_mut(sc.at((h * x.rows + r) * s + j0), j1 - j0) };
            let mut mx = f32::NEG_INFINITY;
            for (jj, (o, &seen)) in e.iter_mut().zip(vis).enumerate() {
                if seen != 0 {
                    let j = j0 + jj;
                    let v = scale * dot(qr, &kh[j * d..(j + 1) * d]);
                    *o = v;
                    mx = mx.max(v);
                }
            }
            bm[r] = mx;
            if mx == f32::NEG_INFINITY {
                // The row sees no slot of this block.
                e.fill(0.0);
                bs[r] = 0.0;
                continue;
            }
            // Hidden slots hold −∞, whose exp is 0.
            for e in e.iter_mut() {
                *e = super::elementwise::exp(*e - mx);
            }
            let o = &mut bo[r * d..(r + 1) * d];
            let mut sum = 0.0f32;
            for (jj, &e) in e.iter().enumerate() {
                if e != 0.0 {
                    sum += e;
                    let j = j0 + jj;
                    axpy(e, &vh[j * d..(j + 1) * d], o);
                }
            }
            bs[r] = sum;
        }
    }
}

/// `softmax(scale · q·kᵀ | mask)` alone into `probs` `[B, Hq, T, S]` (the same memory
/// order as `[B, Hkv, g·T, S]`), one task per query row; hidden slots and rows that see
/// nothing get 0.
///
/// # Panics
/// If a slice length disagrees with `dims`.
pub fn probs(q: &[f32], k: &[f32], mask: &[u8], dims: Dims, probs: &mut [f32]) {
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
    assert_eq!(q.len(), b * hq * t * d, "q is not [B, Hq, T, D]");
    assert_eq!(k.len(), b * hkv * s * d, "k is not [B, Hkv, S, D]");
    assert_eq!(mask.len(), b * m * t * s, "mask is not [B, M, T, S]");
    assert_eq!(probs.len(), b * hq * t * s, "probs is not [B, Hq, T, S]");
    probs
        .par_chunks_mut(s)
        .enumerate()
        // SAFETY: no contract beyond the slices' own.
        .for_each(|(i, p)| unsafe { probs_row(q, k, mask, dims, i, p) });
}

multiversion! {
    /// Row `i` = (row, query head, position) of `probs`.
    ///
    /// # Safety
    /// None beyond the slices' own (required by the macro's form).
    unsafe fn probs_row(q: &[f32], k: &[f32], mask: &[u8], x: Dims, i: usize, p: &mut [f32]) {
        let Dims { scale, hq, hkv, t, s, d, m, .. } = x;
        let (ti, qh, bi) = (i % t, i / t % hq, i / (t * hq));
        let kvh = qh / (hq / hkv);
        let mh = if m == 1 { 0 } else { kvh };
        let qr = &q[i * d..(i + 1) * d];
        let kh = &k[(bi * hkv + kvh) * s * d..][..s * d];
        let vis = &mask[((bi * m + mh) * t + ti) * s..][..s];
        let mut mx = f32::NEG_INFINITY;
        for (j, (o, &seen)) in p.iter_mut().zip(vis).enumerate() {
            *o = if seen != 0 {
                let v = scale * dot(qr, &kh[j * d..(j + 1) * d]);
                mx = mx.max(v);
                v
            } else {
                f32::NEG_INFINITY
            };
        }
        if mx == f32::NEG_INFINITY {
            p.fill(0.0);
            return;
        }
        // Hidden slots hold −∞, whose exp is 0.
        let mut sum = 0.0f32;
        for e in p.iter_mut() {
            *e = super::elementwise::exp(*e - mx);
            sum += *e;
        }
        let inv = 1.0 / sum;
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
pub fn values(probs: &[f32], v: &[f32], [b, hq, t, s]: [usize; 4], hkv: usize, out: &mut [f32]) {
    let d = out.len() / (b * hq * t).max(1);
    assert_eq!(probs.len(), b * hq * t * s, "probs is not [B, Hq, T, S]");
    assert_eq!(v.len(), b * hkv * s * d, "v is not [B, Hkv, S, D]");
    assert_eq!(out.len(), b * hq * t * d, "out is not [B, Hq, T, D]");
    let g = hq / hkv;
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let (qh, bi) = (i / t % hq, i / (t * hq));
        let vh = &v[(bi * hkv + qh / g) * s * d..][..s * d];
        o.fill(0.0);
        for (j, &pj) in probs[i * s..(i + 1) * s].iter().enumerate() {
            if pj != 0.0 {
                axpy(pj, &vh[j * d..(j + 1) * d], o);
            }
        }
    });
}

/// Dot product with eight independent lanes (vectorised by the compiler).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; 8];
    let mut i = 0;
    while i + 8 <= n {
        let x: &[f32; 8] = a[i..i + 8].try_into().expect("8 lanes");
        let y: &[f32; 8] = b[i..i + 8].try_into().expect("8 lanes");
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
        i += 8;
    }
    let mut tail = 0.0;
    while i < n {
        tail += a[i] * b[i];
        i += 1;
    }
    let h = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (h[0] + h[2]) + (h[1] + h[3]) + tail
}

/// `y += a · x`.
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::kernels::cpu::test_values as values;

    /// Float64 attention straight from the definition, per query head and position.
    fn reference(q: &[f32], k: &[f32], v: &[f32], mask: &[u8], x: Dims) -> (Vec<f64>, Vec<f64>) {
        let g = x.hq / x.hkv;
        let mut out = vec![0.0; q.len()];
        let mut probs = vec![0.0; x.b * x.hkv * g * x.t * x.s];
        for bi in 0..x.b {
            for qh in 0..x.hq {
                let kvh = qh / g;
                let mh = if x.m == 1 { 0 } else { kvh };
                for ti in 0..x.t {
                    let qr = &q[((bi * x.hq + qh) * x.t + ti) * x.d..][..x.d];
                    let vis = |j: usize| mask[((bi * x.m + mh) * x.t + ti) * x.s + j] != 0;
                    let sc: Vec<f64> = (0..x.s)
                        .map(|j| {
                            let kj = &k[((bi * x.hkv + kvh) * x.s + j) * x.d..][..x.d];
                            x.scale as f64
                                * qr.iter()
                                    .zip(kj)
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let mx = (0..x.s)
                        .filter(|&j| vis(j))
                        .map(|j| sc[j])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = (0..x.s)
                        .map(|j| if vis(j) { (sc[j] - mx).exp() } else { 0.0 })
                        .collect();
                    let total: f64 = e.iter().sum();
                    let row = (qh % g) * x.t + ti;
                    for j in 0..x.s {
                        let p = if total > 0.0 { e[j] / total } else { 0.0 };
                        probs[((bi * x.hkv + kvh) * g * x.t + row) * x.s + j] = p;
                        let vj = &v[((bi * x.hkv + kvh) * x.s + j) * x.d..][..x.d];
                        for c in 0..x.d {
                            out[((bi * x.hq + qh) * x.t + ti) * x.d + c] += p * vj[c] as f64;
                        }
                    }
                }
            }
        }
        (out, probs)
    }

    /// Decode and small-chunk shapes, shared and per-head masks, hidden slots everywhere
    /// (including a row that sees nothing), and more slots than one block.
    #[test]
    fn matches_a_float64_reference() {
        for (x, seed) in [
            (
                Dims {
                    scale: 0.3,
                    b: 1,
                    hq: 9,
                    hkv: 3,
                    t: 1,
                    s: 576,
                    d: 64,
                    m: 1,
                },
                1,
            ),
            (
                Dims {
                    scale: 0.3,
                    b: 3,
                    hq: 4,
                    hkv: 2,
                    t: 2,
                    s: 70,
                    d: 8,
                    m: 2,
                },
                2,
            ),
            (
                Dims {
                    scale: 0.3,
                    b: 2,
                    hq: 2,
                    hkv: 1,
                    t: 3,
                    s: 300,
                    d: 12,
                    m: 1,
                },
                3,
            ),
        ] {
            let g = x.hq / x.hkv;
            let q = values(x.b * x.hq * x.t * x.d, seed);
            let k = values(x.b * x.hkv * x.s * x.d, seed + 10);
            let v = values(x.b * x.hkv * x.s * x.d, seed + 20);
            let mut mask: Vec<u8> = values(x.b * x.m * x.t * x.s, seed + 30)
                .iter()
                .map(|&u| (u > -0.4) as u8)
                .collect();
            // Row 0's first query sees nothing.
            mask[..x.s].fill(0);
            let (want, want_p) = reference(&q, &k, &v, &mask, x);
            let mut out = vec![f32::NAN; q.len()];
            attention(&q, &k, &v, &mask, x, &mut out);
            for (i, (&a, &e)) in out.iter().zip(&want).enumerate() {
                assert!((a as f64 - e).abs() < 1e-5, "{x:?} out[{i}]: {a} vs {e}");
            }
            // The split form: probabilities alone, then probs · v.
            let mut alone = vec![f32::NAN; x.b * x.hkv * g * x.t * x.s];
            super::probs(&q, &k, &mask, x, &mut alone);
            for (i, (&a, &e)) in alone.iter().zip(&want_p).enumerate() {
                assert!((a as f64 - e).abs() < 1e-6, "{x:?} alone[{i}]: {a} vs {e}");
            }
            let mut split = vec![f32::NAN; q.len()];
            super::values(&alone, &v, [x.b, x.hq, x.t, x.s], x.hkv, &mut split);
            for (i, (&a, &e)) in split.iter().zip(&want).enumerate() {
                assert!((a as f64 - e).abs() < 1e-5, "{x:?} split[{i}]: {a} vs {e}");
            }
        }
    }
}
