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

/// The AVX2 tiles (`x86.rs`).
#[cfg(target_arch = "x86_64")]
#[path = "x86.rs"]
mod simd;

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
