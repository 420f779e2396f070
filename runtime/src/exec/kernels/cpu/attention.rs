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
pub fn attention<E: KvElem>(q: &[f32], k: &[E], v: &[E], mask: &[u8], dims: Dims, out: &mut [f32]) {
    attention_on(fused::Isa::best(), q, k, v, mask, dims, out);
}

/// [`attention`] with the fused decode path on `isa` (an available one), or without it.
fn attention_on<E: KvElem>(
    isa: Option<fused::Isa>,
    q: &[f32],
    k: &[E],
    v: &[E],
    mask: &[u8],
    dims: Dims,
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
        return attention_on(isa, q, &widened(k), &widened(v), mask, dims, out);
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

/// Decode attention (one query position) of all `g` query rows of a KV head in one pass
/// over its keys and values: each key or value row is loaded and widened once for up to
/// 3 (AVX2) or 4 (AVX-512) query rows, with explicit AVX2 or AVX-512 code. The arithmetic
/// is the generic path's own (multiplies, then adds, in its order; its lane sums), so the
/// results are bit for bit the same: the quantized models' accuracy checks sit inside the
/// noise of one-ulp changes (NOTES.md), and FMA here moved them. Keys and values are
/// prefetched into L2 16 slots ahead (`fused::AHEAD`): at batch 16 a step's caches stream
/// from memory, and without it Gemma 3's 189 MB of f16 K/V took 25–29 ms per step
/// (`examples/decode_attention.rs`) against 12–14 ms with it.
#[cfg(target_arch = "x86_64")]
mod fused {
    use std::arch::x86_64::*;

    use super::KvElem;

    /// Slots scored together: `rows · SLOTS` independent accumulators (`rows`: the query
    /// rows that share one pass, 3 with AVX2's 16 vector registers, 4 with AVX-512's 32).
    const SLOTS: usize = 4;

    /// The instruction sets of the fused path.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Isa {
        /// AVX2, FMA and F16C: output tiles of 32 columns (16 vector registers).
        Avx2,
        /// AVX-512 (F, VL) as well: tiles of 64 columns (32 vector registers).
        Avx512,
    }

    impl Isa {
        /// The fused path's form of a kernel set (none for portable code).
        pub(super) fn of(isa: crate::exec::kernels::cpu::isa::Isa) -> Option<Isa> {
            use crate::exec::kernels::cpu::isa::Isa as Set;
            match isa {
                Set::Avx512 => Some(Isa::Avx512),
                Set::Avx2 => Some(Isa::Avx2),
                Set::Portable => None,
            }
        }

        /// The fused path's form of [`crate::exec::kernels::cpu::isa::Isa::best`].
        pub(super) fn best() -> Option<Isa> {
            Isa::of(crate::exec::kernels::cpu::isa::Isa::best())
        }
    }

    /// For every query row `r` of `q` (rows of `d` values): the scores of the slots of `k`
    /// into `e[r]` (−∞ where `vis` is 0), their maximum into `bm[r]`, then `exp(score −
    /// max)` in place, their sum into `bs[r]` and `Σ e·v` into `bo[r]` (left alone, like the
    /// scores set to 0, when the row sees no slot).
    ///
    /// # Safety
    /// `isa` is available; `E::supported()`; `d` (`q.len() / e.len()`) is a multiple of 8.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows<E: KvElem>(
        isa: Isa,
        q: &[f32],
        k: &[E],
        v: &[E],
        vis: &[u8],
        scale: f32,
        e: Vec<&mut [f32]>,
        bm: &mut [f32],
        bs: &mut [f32],
        bo: &mut [f32],
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            match isa {
                Isa::Avx2 => rows_avx2(q, k, v, vis, scale, e, bm, bs, bo),
                Isa::Avx512 => rows_avx512(q, k, v, vis, scale, e, bm, bs, bo),
            }
        }
    }

    macro_rules! rows_on {
        ($name:ident, $features:literal, $tile:literal, $rows:literal) => {
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $name<E: KvElem>(
                q: &[f32],
                k: &[E],
                v: &[E],
                vis: &[u8],
                scale: f32,
                mut e: Vec<&mut [f32]>,
                bm: &mut [f32],
                bs: &mut [f32],
                bo: &mut [f32],
            ) {
                let n = vis.len();
                let d = q.len() / e.len();
                assert!(k.len() == n * d && v.len() == n * d && d.is_multiple_of(8));
                let mut r0 = 0;
                while r0 < e.len() {
                    let rr = (e.len() - r0).min($rows);
                    let es = &mut e[r0..r0 + rr];
                    let qs = &q[r0 * d..(r0 + rr) * d];
                    // SAFETY: the shapes are asserted above; the features are enabled.
                    unsafe {
                        match rr {
                            1 => scores::<E, 1>(qs, k, vis, scale, es, &mut bm[r0..]),
                            2 => scores::<E, 2>(qs, k, vis, scale, es, &mut bm[r0..]),
                            3 => scores::<E, 3>(qs, k, vis, scale, es, &mut bm[r0..]),
                            _ => scores::<E, 4>(qs, k, vis, scale, es, &mut bm[r0..]),
                        }
                    }
                    for (r, er) in es.iter_mut().enumerate() {
                        if bm[r0 + r] == f32::NEG_INFINITY {
                            er.fill(0.0);
                            bs[r0 + r] = 0.0;
                        } else {
                            bs[r0 + r] = super::exp_shifted(er, bm[r0 + r]);
                        }
                    }
                    let w: Vec<&[f32]> = es.iter().map(|x| &**x).collect();
                    let o = &mut bo[r0 * d..(r0 + rr) * d];
                    // SAFETY: as above.
                    unsafe {
                        match rr {
                            1 => weighted::<E, 1, $tile>(&w, v, o),
                            2 => weighted::<E, 2, $tile>(&w, v, o),
                            3 => weighted::<E, 3, $tile>(&w, v, o),
                            _ => weighted::<E, 4, $tile>(&w, v, o),
                        }
                    }
                    r0 += rr;
                }
            }
        };
    }

    rows_on!(rows_avx2, "avx2,fma,f16c", 4, 3);
    rows_on!(rows_avx512, "avx2,fma,f16c,avx512f,avx512vl", 4, 4);

    /// Slots ahead of the one being read whose keys or values are prefetched. Into L2:
    /// prefetching into L1 (or 64 slots ahead) measured no better than none.
    const AHEAD: usize = 16;

    /// Asks for the cache lines of the `n` elements at `p` into L2 (any address:
    /// prefetches never fault).
    #[inline(always)]
    fn prefetch_rows<E>(p: *const E, n: usize) {
        let bytes = n * std::mem::size_of::<E>();
        let p = p.cast::<i8>();
        let mut at = 0;
        while at < bytes {
            // SAFETY: prefetching never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(at)) };
            at += 64;
        }
    }

    /// Eight elements at `p` as f32.
    ///
    /// # Safety
    /// Eight elements are readable at `p`; `E::supported()`.
    #[inline(always)]
    unsafe fn load<E: KvElem>(p: *const E) -> __m256 {
        // SAFETY: the caller's contract.
        unsafe {
            let x = E::load8(std::slice::from_raw_parts(p, 8));
            std::mem::transmute::<[f32; 8], __m256>(x)
        }
    }

    /// The sum of the lanes of each of four vectors, in the order the generic `dot` adds
    /// them: `h = lanes 0..4 + lanes 4..8`, then `(h0 + h2) + (h1 + h3)`.
    #[inline(always)]
    unsafe fn hsum4(a: [__m256; SLOTS]) -> [f32; SLOTS] {
        // SAFETY: AVX is enabled wherever this is inlined (AVX2 callers).
        unsafe {
            let h: [__m128; SLOTS] = std::array::from_fn(|s| {
                _mm_add_ps(
                    _mm256_castps256_ps128(a[s]),
                    _mm256_extractf128_ps::<1>(a[s]),
                )
            });
            // Transposed: `c[l]` holds lane l of every slot's `h`.
            let (t0, t1) = (_mm_unpacklo_ps(h[0], h[1]), _mm_unpacklo_ps(h[2], h[3]));
            let (t2, t3) = (_mm_unpackhi_ps(h[0], h[1]), _mm_unpackhi_ps(h[2], h[3]));
            let c = [
                _mm_movelh_ps(t0, t1),
                _mm_movehl_ps(t1, t0),
                _mm_movelh_ps(t2, t3),
                _mm_movehl_ps(t3, t2),
            ];
            let v = _mm_add_ps(_mm_add_ps(c[0], c[2]), _mm_add_ps(c[1], c[3]));
            std::mem::transmute::<__m128, [f32; 4]>(v)
        }
    }

    /// Scores of `R` query rows (the rows of `q`) against every slot of `k`, into `e`, and
    /// their maxima into `mx[..R]`. Groups of four slots that no row sees are not read.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are enabled; `k` holds `vis.len()` rows of `q.len() / R` values,
    /// a multiple of 8; `E::supported()`.
    #[inline(always)]
    unsafe fn scores<E: KvElem, const R: usize>(
        q: &[f32],
        k: &[E],
        vis: &[u8],
        scale: f32,
        e: &mut [&mut [f32]],
        mx: &mut [f32],
    ) {
        let (n, d) = (vis.len(), q.len() / R);
        let mut top = [f32::NEG_INFINITY; R];
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut j = 0;
        // SAFETY (whole body): slot j + s reads k at (j + s) · d.. (d values), row r of q
        // at r · d..; both in bounds for j + s < n.
        unsafe {
            while j + SLOTS <= n {
                let seen = &vis[j..j + SLOTS];
                if seen.iter().all(|&x| x == 0) {
                    for er in e.iter_mut() {
                        er[j..j + SLOTS].fill(f32::NEG_INFINITY);
                    }
                    j += SLOTS;
                    continue;
                }
                prefetch_rows(kp.wrapping_add((j + AHEAD) * d), SLOTS * d);
                let mut acc = [[_mm256_setzero_ps(); SLOTS]; R];
                for c in (0..d).step_by(8) {
                    let kv: [__m256; SLOTS] =
                        std::array::from_fn(|s| load(kp.add((j + s) * d + c)));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let qv = _mm256_loadu_ps(qp.add(r * d + c));
                        for (a, kv) in a.iter_mut().zip(kv) {
                            *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, kv));
                        }
                    }
                }
                for (r, a) in acc.into_iter().enumerate() {
                    let dots = hsum4(a);
                    for (s, dot) in dots.into_iter().enumerate() {
                        let x = if seen[s] != 0 {
                            scale * dot
                        } else {
                            f32::NEG_INFINITY
                        };
                        e[r][j + s] = x;
                        top[r] = top[r].max(x);
                    }
                }
                j += SLOTS;
            }
            for j in j..n {
                for (r, er) in e.iter_mut().enumerate() {
                    let x = if vis[j] != 0 {
                        let mut a = _mm256_setzero_ps();
                        for c in (0..d).step_by(8) {
                            let qv = _mm256_loadu_ps(qp.add(r * d + c));
                            a = _mm256_add_ps(a, _mm256_mul_ps(qv, load(kp.add(j * d + c))));
                        }
                        scale
                            * hsum4([
                                a,
                                _mm256_setzero_ps(),
                                _mm256_setzero_ps(),
                                _mm256_setzero_ps(),
                            ])[0]
                    } else {
                        f32::NEG_INFINITY
                    };
                    er[j] = x;
                    top[r] = top[r].max(x);
                }
            }
        }
        mx[..R].copy_from_slice(&top);
    }

    /// `o[r] = Σ_j w[r][j] · v[j]` for `R` rows (rows of `d` values in `o`), slots where
    /// every weight is 0 skipped; columns in tiles of `8 · W` held in registers.
    ///
    /// # Safety
    /// As [`scores`]; `v` holds `w[r].len()` rows of `o.len() / R` values.
    #[inline(always)]
    unsafe fn weighted<E: KvElem, const R: usize, const W: usize>(
        w: &[&[f32]],
        v: &[E],
        o: &mut [f32],
    ) {
        let d = o.len() / R;
        let n = w[0].len();
        let mut c0 = 0;
        while c0 < d {
            // SAFETY: as the caller's contract; columns c0.. of a tile lie in the rows.
            unsafe {
                if c0 + 8 * W <= d {
                    tile::<E, R, W>(w, v, n, d, c0, o);
                    c0 += 8 * W;
                } else {
                    tile::<E, R, 1>(w, v, n, d, c0, o);
                    c0 += 8;
                }
            }
        }
    }

    /// Columns `c0..c0 + 8 · W` of [`weighted`].
    ///
    /// # Safety
    /// As [`weighted`], with `c0 + 8 · W <= d`.
    #[inline(always)]
    unsafe fn tile<E: KvElem, const R: usize, const W: usize>(
        w: &[&[f32]],
        v: &[E],
        n: usize,
        d: usize,
        c0: usize,
        o: &mut [f32],
    ) {
        let vp = v.as_ptr();
        // SAFETY: slot j's columns c0..c0 + 8W are in bounds; so are o's rows.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); W]; R];
            // Slot j's weight in each row (`w` is `R` rows, not slots).
            #[allow(clippy::needless_range_loop)]
            for j in 0..n {
                if c0 == 0 {
                    prefetch_rows(vp.wrapping_add((j + AHEAD) * d), d);
                }
                let wj: [f32; R] = std::array::from_fn(|r| w[r][j]);
                if wj.iter().all(|&x| x == 0.0) {
                    continue;
                }
                let vv: [__m256; W] = std::array::from_fn(|c| load(vp.add(j * d + c0 + 8 * c)));
                for (a, &x) in acc.iter_mut().zip(&wj) {
                    let b = _mm256_set1_ps(x);
                    for (a, vv) in a.iter_mut().zip(vv) {
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(b, vv));
                    }
                }
            }
            for (r, a) in acc.into_iter().enumerate() {
                for (c, a) in a.into_iter().enumerate() {
                    _mm256_storeu_ps(o.as_mut_ptr().add(r * d + c0 + 8 * c), a);
                }
            }
        }
    }
}

/// Query positions per task of [`chunk`]: the `g` query heads at these positions share
/// every widened tile of keys and values.
const CHUNK_POSITIONS: usize = 16;

/// Slots per tile of [`chunk`].
const TILE_SLOTS: usize = 64;

/// Query rows and slot columns of the score micro-tile.
const SCORE_ROWS: usize = 4;
const SCORE_COLS: usize = 32;

/// Query rows and output columns of the `probs · v` micro-tile.
const VALUE_ROWS: usize = 4;
const VALUE_COLS: usize = 32;

/// [`attention`] for a long chunk of query positions (prefill), flash-style: one task per
/// (row, KV head, 16 positions) holds the `g · 16` query rows of that KV head and walks
/// the slots any of them sees in tiles of 64. The tiles of each head's seen span (first to
/// last seen slot of any position) are widened once per call, keys transposed. Each
/// tile's scores are a register-blocked product, the softmax is kept online (a running
/// maximum and sum per row, earlier output rescaled when the maximum grows), and
/// `probs · v` is added in register tiles; the `[T, S]` probabilities are never stored.
/// A task skips the tiles none of its positions sees (a causal chunk's future, a budgeted
/// cache's free slots). Rows that see nothing get zero output. As in Burn's attention,
/// a hidden slot holding a non-finite value still reaches the product (weight 0 times
/// it); the decode kernel skips such slots.
///
/// # Panics
/// If a slice length disagrees with `dims`.
pub fn chunk<E: KvElem>(q: &[f32], k: &[E], v: &[E], mask: &[u8], dims: Dims, out: &mut [f32]) {
    check_fused(dims, q.len(), k.len(), v.len(), mask.len(), out.len());
    let Dims {
        b, hkv, t, s, d, m, ..
    } = dims;
    if !E::supported() {
        return chunk(q, &widened(k), &widened(v), mask, dims, out);
    }
    if s == 0 {
        out.fill(0.0);
        return;
    }
    // The tiles of each head's seen span (from the tile holding its first seen slot to
    // the one holding its last), widened once for all tasks: keys transposed (`[D,
    // TILE_SLOTS]` per tile), values as they are (`[TILE_SLOTS, D]`).
    let tile = d * TILE_SLOTS;
    let spans: Vec<(usize, usize)> = (0..b * hkv)
        .map(|h| {
            let (bi, kvh) = (h / hkv, h % hkv);
            let mh = if m == 1 { 0 } else { kvh };
            let (lo, hi) = seen_slots(&mask[(bi * m + mh) * t * s..][..t * s], s);
            if lo < hi {
                (lo / TILE_SLOTS, hi.div_ceil(TILE_SLOTS))
            } else {
                (0, 0)
            }
        })
        .collect();
    // Each head's first tile in the widened buffers, and (head, tile) of every tile.
    let mut first = Vec::with_capacity(b * hkv + 1);
    first.push(0);
    for &(c0, c1) in &spans {
        first.push(first.last().copied().unwrap_or(0) + c1 - c0);
    }
    let tiles: Vec<(usize, usize)> = spans
        .iter()
        .enumerate()
        .flat_map(|(h, &(c0, c1))| (c0..c1).map(move |c| (h, c)))
        .collect();
    let mut kt = vec![0.0f32; tiles.len() * tile];
    let mut vw = vec![0.0f32; tiles.len() * tile];
    kt.par_chunks_mut(tile)
        .zip(vw.par_chunks_mut(tile))
        .zip(tiles.par_iter())
        .for_each(|((kt, vw), &(h, c))| {
            let (j0, j1) = (c * TILE_SLOTS, ((c + 1) * TILE_SLOTS).min(s));
            let at = (h * s + j0) * d..(h * s + j1) * d;
            // SAFETY: no contract beyond the slices' own.
            unsafe { widen_tile(&k[at.clone()], &v[at], d, kt, vw) };
        });
    let blocks = t.div_ceil(CHUNK_POSITIONS);
    let o = SendPtr(out.as_mut_ptr());
    // SAFETY: task i writes only the output rows of its KV head's query heads at its
    // positions.
    (0..b * hkv * blocks).into_par_iter().for_each(|i| unsafe {
        let h = i / blocks;
        let span = first[h] * tile..first[h + 1] * tile;
        let head = WidenedHead {
            kt: &kt[span.clone()],
            vw: &vw[span],
            first_tile: spans[h].0,
        };
        chunk_task(q, head, mask, dims, i, o)
    });
}

/// The first and one past the last slot that any row of `mask` (`[T, s]`) sees (`(s, 0)`
/// when none does).
fn seen_slots(mask: &[u8], s: usize) -> (usize, usize) {
    let (mut lo, mut hi) = (s, 0);
    for row in mask.chunks_exact(s) {
        if let Some(a) = row.iter().position(|&v| v != 0) {
            lo = lo.min(a);
            hi = hi.max(row.iter().rposition(|&v| v != 0).map_or(0, |z| z + 1));
        }
    }
    (lo, hi)
}

multiversion! {
    /// Keys `k` and values `v` of up to [`TILE_SLOTS`] slots (`[n, d]`) widened into one
    /// tile: `kt` transposed (`[d, TILE_SLOTS]`), `vw` as they are.
    ///
    /// # Safety
    /// None beyond the slices' own (required by the macro's form).
    unsafe fn widen_tile<E: KvElem>(k: &[E], v: &[E], d: usize, kt: &mut [f32], vw: &mut [f32]) {
        let mut row = vec![0.0f32; d];
        for (j, (kr, vr)) in k.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
            widen_row(kr, &mut row);
            for (i, &x) in row.iter().enumerate() {
                kt[i * TILE_SLOTS + j] = x;
            }
            widen_row(vr, &mut vw[j * d..][..d]);
        }
    }
}

/// One KV head's widened tiles in [`chunk`]: keys transposed (`[D, TILE_SLOTS]` per
/// tile) and values (`[TILE_SLOTS, D]` per tile) of the tiles from `first_tile` on.
#[derive(Clone, Copy)]
struct WidenedHead<'a> {
    kt: &'a [f32],
    vw: &'a [f32],
    first_tile: usize,
}

/// Scratch of one [`chunk`] task.
struct ChunkScratch {
    /// Query rows `[R, D]`, row `r` = (head `r / positions`, position `r % positions`).
    q: Vec<f32>,
    /// Unnormalised output rows `[R, D]`.
    o: Vec<f32>,
    /// Running maximum and sum of `exp(score − max)` per row.
    max: Vec<f32>,
    sum: Vec<f32>,
    /// A tile's scores, then weights: `[R, TILE_SLOTS]`.
    p: Vec<f32>,
}

multiversion! {
    /// Task `i` of [`chunk`], on its head's widened tiles.
    ///
    /// # Safety
    /// `o` points to the `[B, Hq, T, D]` output; no other task writes this task's rows.
    unsafe fn chunk_task(q: &[f32], head: WidenedHead<'_>, mask: &[u8], x: Dims, i: usize, o: SendPtr<f32>) {
        let WidenedHead { kt, vw, first_tile } = head;
        let Dims { scale, hq, hkv, t, s, d, m, .. } = x;
        let g = hq / hkv;
        let blocks = t.div_ceil(CHUNK_POSITIONS);
        let (h, c) = (i / blocks, i % blocks);
        let (bi, kvh) = (h / hkv, h % hkv);
        let mh = if m == 1 { 0 } else { kvh };
        let (p0, p1) = (c * CHUNK_POSITIONS, ((c + 1) * CHUNK_POSITIONS).min(t));
        let np = p1 - p0;
        let rows = g * np;
        let mk = &mask[(bi * m + mh) * t * s..][..t * s];
        let out_row = |r: usize| ((bi * hq + kvh * g + r / np) * t + p0 + r % np) * d;
        let (lo, hi) = seen_slots(&mk[p0 * s..p1 * s], s);
        let mut w = ChunkScratch {
            q: vec![0.0; rows * d],
            o: vec![0.0; rows * d],
            max: vec![f32::NEG_INFINITY; rows],
            sum: vec![0.0; rows],
            p: vec![0.0; rows * TILE_SLOTS],
        };
        for hh in 0..g {
            let src = &q[((bi * hq + kvh * g + hh) * t + p0) * d..][..np * d];
            w.q[hh * np * d..][..np * d].copy_from_slice(src);
        }
        // Whole tiles from the one holding `lo`: the widened tiles start at slot 0.
        let mut j0 = lo / TILE_SLOTS * TILE_SLOTS;
        while j0 < hi {
            let j1 = (j0 + TILE_SLOTS).min(s);
            let n = j1 - j0;
            if (p0..p1).all(|p| mk[p * s + j0..p * s + j1].iter().all(|&v| v == 0)) {
                j0 = j1;
                continue;
            }
            let tile = (j0 / TILE_SLOTS - first_tile) * d * TILE_SLOTS;
            let (ktile, vtile) = (&kt[tile..][..d * TILE_SLOTS], &vw[tile..][..d * TILE_SLOTS]);
            let mut r = 0;
            while r < rows {
                let take = (rows - r).min(SCORE_ROWS);
                let (qr, pr) = (&w.q[r * d..][..take * d], &mut w.p[r * TILE_SLOTS..][..take * TILE_SLOTS]);
                for c0 in (0..TILE_SLOTS).step_by(SCORE_COLS) {
                    match take {
                        4 => score_tile::<4>(qr, ktile, c0, scale, pr),
                        3 => score_tile::<3>(qr, ktile, c0, scale, pr),
                        2 => score_tile::<2>(qr, ktile, c0, scale, pr),
                        _ => score_tile::<1>(qr, ktile, c0, scale, pr),
                    }
                }
                r += take;
            }
            for r in 0..rows {
                let vis = &mk[(p0 + r % np) * s + j0..][..n];
                let e = &mut w.p[r * TILE_SLOTS..][..TILE_SLOTS];
                let mut top = f32::NEG_INFINITY;
                for (e, &seen) in e.iter_mut().zip(vis) {
                    if seen == 0 {
                        *e = f32::NEG_INFINITY;
                    }
                    top = top.max(*e);
                }
                e[n..].fill(f32::NEG_INFINITY);
                if top == f32::NEG_INFINITY {
                    // This row sees none of the tile: it adds nothing.
                    e.fill(0.0);
                    continue;
                }
                let new = w.max[r].max(top);
                if new > w.max[r] {
                    let f = super::elementwise::exp(w.max[r] - new);
                    w.sum[r] *= f;
                    for a in &mut w.o[r * d..][..d] {
                        *a *= f;
                    }
                    w.max[r] = new;
                }
                w.sum[r] += exp_shifted(e, new);
            }
            let mut r = 0;
            while r < rows {
                let take = (rows - r).min(VALUE_ROWS);
                let (pr, or) = (&w.p[r * TILE_SLOTS..][..take * TILE_SLOTS], &mut w.o[r * d..][..take * d]);
                match take {
                    4 => value_tile::<4>(pr, vtile, n, d, or),
                    3 => value_tile::<3>(pr, vtile, n, d, or),
                    2 => value_tile::<2>(pr, vtile, n, d, or),
                    _ => value_tile::<1>(pr, vtile, n, d, or),
                }
                r += take;
            }
            j0 = j1;
        }
        for r in 0..rows {
            let inv = if w.sum[r] > 0.0 { 1.0 / w.sum[r] } else { 0.0 };
            // SAFETY: row r of the output is this task's (the caller's contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(o.at(out_row(r)), d) };
            for (y, &a) in dst.iter_mut().zip(&w.o[r * d..][..d]) {
                *y = a * inv;
            }
        }
    }
}

/// `out = x` widened.
#[inline(always)]
fn widen_row<E: KvElem>(x: &[E], out: &mut [f32]) {
    let mut i = 0;
    while i + 8 <= x.len() {
        // SAFETY: the entry points run here only where `E::supported()`.
        out[i..i + 8].copy_from_slice(&unsafe { E::load8(&x[i..]) });
        i += 8;
    }
    for (o, &a) in out[i..].iter_mut().zip(&x[i..]) {
        *o = a.widen();
    }
}

/// Scores of `R` query rows (`q`, `[R, D]`) with slots `c0..c0 + SCORE_COLS` of a tile of
/// transposed keys `kt` into columns `c0..` of `p` (`[R, TILE_SLOTS]`), times `scale`.
#[inline(always)]
fn score_tile<const R: usize>(q: &[f32], kt: &[f32], c0: usize, scale: f32, p: &mut [f32]) {
    let d = q.len() / R;
    let mut acc = [[0.0f32; SCORE_COLS]; R];
    for i in 0..d {
        let kr: &[f32; SCORE_COLS] = kt[i * TILE_SLOTS + c0..][..SCORE_COLS]
            .try_into()
            .expect("a tile row");
        for (r, a) in acc.iter_mut().enumerate() {
            let x = q[r * d + i];
            for (a, &kv) in a.iter_mut().zip(kr) {
                *a += x * kv;
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (o, &a) in p[r * TILE_SLOTS + c0..][..SCORE_COLS].iter_mut().zip(a) {
            *o = scale * a;
        }
    }
}

/// `o[r] += Σ_{j < n} p[r, j] · v[j]` for `R` rows (`p` `[R, TILE_SLOTS]`, `v` `[n, D]`,
/// `o` `[R, D]`), in register tiles of [`VALUE_COLS`] columns.
#[inline(always)]
fn value_tile<const R: usize>(p: &[f32], v: &[f32], n: usize, d: usize, o: &mut [f32]) {
    let mut c0 = 0;
    while c0 + VALUE_COLS <= d {
        let mut acc = [[0.0f32; VALUE_COLS]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            a.copy_from_slice(&o[r * d + c0..][..VALUE_COLS]);
        }
        for j in 0..n {
            let vr: &[f32; VALUE_COLS] = v[j * d + c0..][..VALUE_COLS]
                .try_into()
                .expect("a value row");
            for (r, a) in acc.iter_mut().enumerate() {
                let x = p[r * TILE_SLOTS + j];
                for (a, &y) in a.iter_mut().zip(vr) {
                    *a += x * y;
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            o[r * d + c0..][..VALUE_COLS].copy_from_slice(a);
        }
        c0 += VALUE_COLS;
    }
    if c0 < d {
        for r in 0..R {
            let or = &mut o[r * d + c0..(r + 1) * d];
            for j in 0..n {
                axpy(p[r * TILE_SLOTS + j], &v[j * d + c0..(j + 1) * d], or);
            }
        }
    }
}

/// `softmax(scale · q·kᵀ | mask)` alone into `probs` `[B, Hq, T, S]` (the same memory
/// order as `[B, Hkv, g·T, S]`), one task per query row; hidden slots and rows that see
/// nothing get 0.
///
/// # Panics
/// If a slice length disagrees with `dims`.
pub fn probs<E: KvElem>(q: &[f32], k: &[E], mask: &[u8], dims: Dims, probs: &mut [f32]) {
    let Dims { b, hq, t, s, .. } = dims;
    check_inputs(dims, q.len(), k.len(), mask.len());
    assert_eq!(probs.len(), b * hq * t * s, "probs is not [B, Hq, T, S]");
    if !E::supported() {
        return self::probs(q, &widened(k), mask, dims, probs);
    }
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
    hkv: usize,
    out: &mut [f32],
) {
    let d = out.len() / (b * hq * t).max(1);
    assert_eq!(probs.len(), b * hq * t * s, "probs is not [B, Hq, T, S]");
    assert_eq!(v.len(), b * hkv * s * d, "v is not [B, Hkv, S, D]");
    assert_eq!(out.len(), b * hq * t * d, "out is not [B, Hq, T, D]");
    if !E::supported() {
        return values(probs, &widened(v), [b, hq, t, s], hkv, out);
    }
    let g = hq / hkv;
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let (qh, bi) = (i / t % hq, i / (t * hq));
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

/// An element of cached keys and values: f32, or f16 widened to f32 as it is loaded.
pub trait KvElem: Copy + Send + Sync {
    /// Whether this CPU runs [`KvElem::load8`] (f16 needs F16C on x86-64). The entry
    /// points widen the whole cache to f32 first where it does not.
    fn supported() -> bool;
    /// The first eight elements of `x` as f32.
    ///
    /// # Safety
    /// [`KvElem::supported`] is true.
    unsafe fn load8(x: &[Self]) -> [f32; 8];
    /// The element as f32.
    fn widen(self) -> f32;
}

impl KvElem for f32 {
    fn supported() -> bool {
        true
    }
    #[inline(always)]
    unsafe fn load8(x: &[f32]) -> [f32; 8] {
        x[..8].try_into().expect("8 lanes")
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl KvElem for half::f16 {
    fn supported() -> bool {
        // F16C comes with the AVX2 set; under `KVC_ISA=portable` the cache is widened first.
        #[cfg(target_arch = "x86_64")]
        {
            crate::exec::kernels::cpu::isa::Isa::best() >= crate::exec::kernels::cpu::isa::Isa::Avx2
        }
        #[cfg(not(target_arch = "x86_64"))]
        true
    }
    #[inline(always)]
    unsafe fn load8(x: &[half::f16]) -> [f32; 8] {
        let x = &x[..8];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{__m128i, __m256, _mm_loadu_si128, _mm256_cvtph_ps};
            // SAFETY: eight halves are in bounds; the caller's contract gives F16C.
            unsafe {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().cast::<__m128i>()));
                std::mem::transmute::<__m256, [f32; 8]>(v)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        std::array::from_fn(|l| f16_to_f32(x[l].to_bits()))
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self.to_bits())
    }
}

/// `x` as f32 (a copy), for a CPU that cannot widen `E` as it loads it.
fn widened<E: KvElem>(x: &[E]) -> Vec<f32> {
    x.iter().map(|&a| a.widen()).collect()
}

/// The f32 value of the half float with bits `h`, exactly, without branches (so loops of
/// it vectorise): exponent and mantissa shifted into f32 position and rescaled by 2¹¹²
/// (the bias difference; subnormal halves become normal floats exactly), infinities and
/// NaNs given the all-ones exponent.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let em = h & 0x7fff;
    let scaled = (f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let bits = if em >= 0x7c00 {
        (em << 13) | 0x7f80_0000
    } else {
        scaled
    };
    f32::from_bits(bits | ((h & 0x8000) << 16))
}

/// Slots scored together: eight independent dot products keep the adders busy where one
/// would wait on its own accumulator.
const CHUNK: usize = 8;

/// `e[j] = scale · q·k[j]` for the visible slots of `k` (rows of `q.len()`), −∞ for the
/// hidden ones; returns the maximum (−∞ when nothing is visible). Chunks of slots that
/// are all hidden are not read.
#[inline(always)]
fn scores<E: KvElem>(q: &[f32], k: &[E], vis: &[u8], scale: f32, e: &mut [f32]) -> f32 {
    let d = q.len();
    let n = e.len();
    let mut mx = f32::NEG_INFINITY;
    let mut j = 0;
    if d.is_multiple_of(8) {
        while j + CHUNK <= n {
            let seen = &vis[j..j + CHUNK];
            let out = &mut e[j..j + CHUNK];
            if seen.iter().all(|&v| v == 0) {
                out.fill(f32::NEG_INFINITY);
            } else {
                let dots = dots8(q, &k[j * d..(j + CHUNK) * d]);
                for ((o, &v), dot) in out.iter_mut().zip(seen).zip(dots) {
                    *o = if v != 0 {
                        scale * dot
                    } else {
                        f32::NEG_INFINITY
                    };
                    mx = mx.max(*o);
                }
            }
            j += CHUNK;
        }
    }
    for j in j..n {
        e[j] = if vis[j] != 0 {
            scale * dot(q, &k[j * d..(j + 1) * d])
        } else {
            f32::NEG_INFINITY
        };
        mx = mx.max(e[j]);
    }
    mx
}

/// The dot products of `q` with the eight rows of `k` (`q.len()` a multiple of 8).
#[inline(always)]
fn dots8<E: KvElem>(q: &[f32], k: &[E]) -> [f32; CHUNK] {
    let d = q.len();
    let mut acc = [[0.0f32; 8]; CHUNK];
    for (i, x) in q.chunks_exact(8).enumerate() {
        for (s, a) in acc.iter_mut().enumerate() {
            // SAFETY: the entry points run here only where `E::supported()`.
            let y = unsafe { E::load8(&k[s * d + i * 8..]) };
            for l in 0..8 {
                a[l] += x[l] * y[l];
            }
        }
    }
    acc.map(|a| {
        let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        (h[0] + h[2]) + (h[1] + h[3])
    })
}

/// Dot product with eight independent lanes (vectorised by the compiler).
#[inline(always)]
fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; 8];
    let mut i = 0;
    while i + 8 <= n {
        let x: &[f32; 8] = a[i..i + 8].try_into().expect("8 lanes");
        // SAFETY: the entry points run here only where `E::supported()`.
        let y = unsafe { E::load8(&b[i..]) };
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
        i += 8;
    }
    let mut tail = 0.0;
    while i < n {
        tail += a[i] * b[i].widen();
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

/// `e = exp(e − mx)` in place (hidden slots hold −∞, whose exp is 0); returns the sum.
/// The exponentials and the sum are separate loops so that both vectorise (one running
/// sum would serialise the first).
#[inline(always)]
fn exp_shifted(e: &mut [f32], mx: f32) -> f32 {
    for e in e.iter_mut() {
        *e = super::elementwise::exp(*e - mx);
    }
    let mut acc = [0.0f32; 8];
    let mut chunks = e.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Output columns accumulated in registers per pass over the slots.
const TILE: usize = 64;

/// `out = Σ_j w[j] · v[j]` over the rows of `v` (`out.len()` columns), skipping rows of
/// weight 0. Columns go in tiles of [`TILE`] held in a local array, so the sum stays in
/// registers instead of being stored and reloaded for every slot.
#[inline(always)]
fn weighted_sum<E: KvElem>(w: &[f32], v: &[E], out: &mut [f32]) {
    let d = out.len();
    let mut c0 = 0;
    while c0 + TILE <= d {
        let mut acc = [0.0f32; TILE];
        for (j, &wj) in w.iter().enumerate() {
            if wj != 0.0 {
                let row = &v[j * d + c0..][..TILE];
                for (a, y) in acc.chunks_exact_mut(8).zip(row.chunks_exact(8)) {
                    // SAFETY: the entry points run here only where `E::supported()`.
                    let y = unsafe { E::load8(y) };
                    for l in 0..8 {
                        a[l] += wj * y[l];
                    }
                }
            }
        }
        out[c0..c0 + TILE].copy_from_slice(&acc);
        c0 += TILE;
    }
    if c0 < d {
        let o = &mut out[c0..];
        o.fill(0.0);
        for (j, &wj) in w.iter().enumerate() {
            if wj != 0.0 {
                axpy(wj, &v[j * d + c0..(j + 1) * d], o);
            }
        }
    }
}

/// `y += a · x`.
#[inline(always)]
fn axpy<E: KvElem>(a: f32, x: &[E], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x.widen();
    }
}

#[cfg(test)]
mod tests;
