//! Decode attention (one query position) of all `g` query rows of a KV head in one pass
//! over its keys and values: each key or value row is loaded and widened once for up to
//! 3 (AVX2) or 4 (AVX-512) query rows, with explicit AVX2 or AVX-512 code. The arithmetic
//! is the generic path's own (multiplies, then adds, in its order; its lane sums), so the
//! results are bit for bit the same: the quantized models' accuracy checks sit inside the
//! noise of one-ulp changes (NOTES.md), and FMA here moved them. Keys and values are
//! prefetched into L2 16 slots ahead (`fused::AHEAD`): at batch 16 a step's caches stream
//! from memory, and without it Gemma 3's 189 MB of f16 K/V took 25–29 ms per step
//! (`examples/decode_attention.rs`) against 12–14 ms with it.

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
                let kv: [__m256; SLOTS] = std::array::from_fn(|s| load(kp.add((j + s) * d + c)));
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
