//! Products of a few activation rows with a row-major weight matrix, on host slices:
//! `out[r, j] = Σ_k x[r, k] · w[j, k]` for `r < m`, `j < n`.
//!
//! At decode a projection has one row per batch row (m ≤ 16 here), so it is bound by
//! streaming the weights from memory, not by arithmetic. Flex's matmul packs its operands
//! for a GEMM and runs a `[1, K]` product on one thread; these kernels read every weight
//! once, for all `m` rows, with both cores streaming disjoint blocks of weight rows.
//! Weights may be f32 or f16 (converted to f32 as they are read; accumulation is f32).
//!
//! On x86-64 with AVX2 and FMA (and F16C for f16 weights) an explicit kernel computes a
//! 4 weight rows × 2 activation rows tile per pass over `k`; elsewhere a portable loop
//! over one weight row and one activation row at a time runs.

use half::f16;
use rayon::prelude::*;

use super::SendPtr;

/// Weight element types the kernels read.
pub trait Weight: Copy + Send + Sync + 'static {
    /// The value as f32.
    fn to_f32(self) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Weight for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Weight rows per parallel task at least (a task streams `rows · k` weights).
const MIN_TASK_ROWS: usize = 32;

/// `out = x · wᵀ` with x `[m, k]`, w `[n, k]` (row-major slices) and out `[m, n]`.
/// Parallel over blocks of weight rows on rayon's pool.
///
/// # Panics
/// If a slice length disagrees with `m`, `k` and `n`.
pub fn matmul_t<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(w.len(), n * k, "w is not [n, k]");
    assert_eq!(out.len(), m * n, "out is not [m, n]");
    let threads = rayon::current_num_threads().max(1);
    // Four tasks per thread balance a core slowed by other work; blocks are whole tiles.
    let rows = n
        .div_ceil(4 * threads)
        .max(MIN_TASK_ROWS)
        .next_multiple_of(4);
    let tasks = n.div_ceil(rows);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let j0 = t * rows;
        let j1 = (j0 + rows).min(n);
        // SAFETY: tasks write the disjoint column ranges j0..j1 of `out` (see `block`),
        // and `out` outlives the parallel loop.
        unsafe { block(x, m, k, &w[j0 * k..j1 * k], j0, n, out_ptr) }
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// Columns `j0..j0 + w.len() / k` of `out` (row stride `n`).
///
/// # Safety
/// `out` must point to `m · n` writable floats that no other task writes in these columns.
pub(super) unsafe fn block<W: Weight>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    j0: usize,
    n: usize,
    out: SendPtr<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(f) = simd::kernel::<W>() {
            // SAFETY: the kernel's CPU features were detected at run time.
            unsafe { f(x, m, k, w, j0, n, out.0) };
            return;
        }
    }
    let rows = w.len() / k;
    for j in 0..rows {
        let wr = &w[j * k..(j + 1) * k];
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            let mut acc = [0.0f32; 8];
            let mut c = 0;
            while c + 8 <= k {
                for l in 0..8 {
                    acc[l] += xr[c + l] * wr[c + l].to_f32();
                }
                c += 8;
            }
            let mut s: f32 = acc.iter().sum();
            while c < k {
                s += xr[c] * wr[c].to_f32();
                c += 1;
            }
            // SAFETY: r < m and j0 + j < n, so the index is inside `out`.
            unsafe { *out.at(r * n + j0 + j) = s };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::Weight;
    use half::f16;
    use std::any::TypeId;
    use std::arch::x86_64::*;

    /// A tile kernel: `(x, m, k, w, j0, n, out)` as in `super::block`.
    pub type Kernel<W> = unsafe fn(&[f32], usize, usize, &[W], usize, usize, *mut f32);

    /// The AVX2 kernel for `W`, if this CPU has the features it needs.
    pub fn kernel<W: Weight>() -> Option<Kernel<W>> {
        use crate::exec::kernels::cpu::isa::Isa;
        // Both kernels need the AVX2 set (f32: AVX2 and FMA; f16: F16C too).
        let ok = Isa::best() >= Isa::Avx2;
        let id = TypeId::of::<W>();
        if id == TypeId::of::<f32>() {
            // SAFETY: W is f32, so the function types are identical.
            ok.then(|| unsafe {
                std::mem::transmute::<Kernel<f32>, Kernel<W>>(tile_f32 as Kernel<f32>)
            })
        } else if id == TypeId::of::<f16>() {
            // SAFETY: W is f16, so the function types are identical.
            ok.then(|| unsafe {
                std::mem::transmute::<Kernel<f16>, Kernel<W>>(f16_rows as Kernel<f16>)
            })
        } else {
            None
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: callers are compiled with AVX enabled.
        unsafe {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    /// One kernel per weight type; `$load` turns a pointer to 8 weights into 8 f32 lanes.
    macro_rules! tile_kernel {
        ($name:ident, $w:ty, $features:literal, $load:expr) => {
            #[target_feature(enable = $features)]
            unsafe fn $name(
                x: &[f32],
                m: usize,
                k: usize,
                w: &[$w],
                j0: usize,
                n: usize,
                out: *mut f32,
            ) {
                let load = $load;
                let rows = w.len() / k;
                let kv = k / 8 * 8;
                let wp = w.as_ptr();
                let xp = x.as_ptr();
                // SAFETY (whole body): indices stay below k within rows j < rows of w and
                // r < m of x, and outputs land at r·n + j0 + j < m·n.
                unsafe {
                    let tail = |r: usize, j: usize| -> f32 {
                        let mut s = 0.0f32;
                        for c in kv..k {
                            s += *xp.add(r * k + c) * Weight::to_f32(*wp.add(j * k + c));
                        }
                        s
                    };
                    let mut j = 0;
                    while j + 4 <= rows {
                        let w0 = wp.add(j * k);
                        let (w1, w2, w3) = (w0.add(k), w0.add(2 * k), w0.add(3 * k));
                        let mut r = 0;
                        while r + 2 <= m {
                            let (x0, x1) = (xp.add(r * k), xp.add((r + 1) * k));
                            let mut a = [_mm256_setzero_ps(); 8];
                            let mut c = 0;
                            while c < kv {
                                let (v0, v1) =
                                    (_mm256_loadu_ps(x0.add(c)), _mm256_loadu_ps(x1.add(c)));
                                let (u0, u1) = (load(w0.add(c)), load(w1.add(c)));
                                let (u2, u3) = (load(w2.add(c)), load(w3.add(c)));
                                a[0] = _mm256_fmadd_ps(v0, u0, a[0]);
                                a[1] = _mm256_fmadd_ps(v0, u1, a[1]);
                                a[2] = _mm256_fmadd_ps(v0, u2, a[2]);
                                a[3] = _mm256_fmadd_ps(v0, u3, a[3]);
                                a[4] = _mm256_fmadd_ps(v1, u0, a[4]);
                                a[5] = _mm256_fmadd_ps(v1, u1, a[5]);
                                a[6] = _mm256_fmadd_ps(v1, u2, a[6]);
                                a[7] = _mm256_fmadd_ps(v1, u3, a[7]);
                                c += 8;
                            }
                            for q in 0..4 {
                                *out.add(r * n + j0 + j + q) = hsum(a[q]) + tail(r, j + q);
                                *out.add((r + 1) * n + j0 + j + q) =
                                    hsum(a[4 + q]) + tail(r + 1, j + q);
                            }
                            r += 2;
                        }
                        if r < m {
                            let x0 = xp.add(r * k);
                            let mut a = [_mm256_setzero_ps(); 4];
                            let mut c = 0;
                            while c < kv {
                                let v0 = _mm256_loadu_ps(x0.add(c));
                                a[0] = _mm256_fmadd_ps(v0, load(w0.add(c)), a[0]);
                                a[1] = _mm256_fmadd_ps(v0, load(w1.add(c)), a[1]);
                                a[2] = _mm256_fmadd_ps(v0, load(w2.add(c)), a[2]);
                                a[3] = _mm256_fmadd_ps(v0, load(w3.add(c)), a[3]);
                                c += 8;
                            }
                            for q in 0..4 {
                                *out.add(r * n + j0 + j + q) = hsum(a[q]) + tail(r, j + q);
                            }
                        }
                        j += 4;
                    }
                    while j < rows {
                        let w0 = wp.add(j * k);
                        for r in 0..m {
                            let x0 = xp.add(r * k);
                            let mut a = _mm256_setzero_ps();
                            let mut c = 0;
                            while c < kv {
                                a = _mm256_fmadd_ps(_mm256_loadu_ps(x0.add(c)), load(w0.add(c)), a);
                                c += 8;
                            }
                            *out.add(r * n + j0 + j) = hsum(a) + tail(r, j);
                        }
                        j += 1;
                    }
                }
            }
        };
    }

    tile_kernel!(tile_f32, f32, "avx2,fma", |p: *const f32| unsafe {
        _mm256_loadu_ps(p)
    });
    /// Rows per block that f16 weights are widened to f32 in when there are more than
    /// two activation rows (each weight is then converted once, not once per row pair).
    const WIDEN_ROWS: usize = 4;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_rows(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f16],
        j0: usize,
        n: usize,
        out: *mut f32,
    ) {
        // SAFETY (whole body): the callee's contract, over sub-blocks of `w`.
        unsafe {
            if m <= 2 {
                return tile_f16(x, m, k, w, j0, n, out);
            }
            let mut wide = vec![0.0f32; WIDEN_ROWS * k];
            for (b, block) in w.chunks(WIDEN_ROWS * k).enumerate() {
                let wide = &mut wide[..block.len()];
                let mut c = 0;
                while c + 8 <= block.len() {
                    let h = _mm_loadu_si128(block.as_ptr().add(c) as *const __m128i);
                    _mm256_storeu_ps(wide.as_mut_ptr().add(c), _mm256_cvtph_ps(h));
                    c += 8;
                }
                for i in c..block.len() {
                    wide[i] = block[i].to_f32();
                }
                tile_f32(x, m, k, wide, j0 + b * WIDEN_ROWS, n, out);
            }
        }
    }

    tile_kernel!(tile_f16, f16, "avx2,fma,f16c", |p: *const f16| unsafe {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::kernels::cpu::test_values as values;

    /// Float64 reference of `x · wᵀ`.
    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|c| x[r * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
            }
        }
        out
    }

    /// `matmul_t` with weights `w` against the float64 product with `w_f32` (their values).
    fn check<W: Weight>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[W],
        w_f32: &[f32],
        n: usize,
        what: &str,
    ) {
        let want = reference(x, m, k, w_f32, n);
        let mut got = vec![f32::NAN; m * n];
        matmul_t(x, m, k, w, n, &mut got);
        for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g as f64 - e).abs() <= 1e-5 * (k as f64).sqrt() * 4.0,
                "{what} m={m} k={k} n={n} at {i}: {g} vs {e}"
            );
        }
    }

    /// Every tile edge: m odd and even, n not a multiple of 4 or of a task, k with a tail.
    #[test]
    fn matches_a_float64_reference_at_every_tile_edge() {
        for &(m, k, n) in &[
            (1, 576, 576),
            (2, 64, 7),
            (3, 67, 130),
            (5, 8, 1),
            (15, 1536, 96),
            (16, 576, 40),
            (4, 13, 301),
        ] {
            let x = values(m * k, 1);
            let w = values(n * k, 2);
            check(&x, m, k, &w, &w, n, "f32");
            // f16 weights: the reference uses the same rounded weights.
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wr: Vec<f32> = wh.iter().map(|v| v.to_f32()).collect();
            check(&x, m, k, &wh, &wr, n, "f16");
        }
    }
}
