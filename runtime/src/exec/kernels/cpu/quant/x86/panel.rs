//! The f32 kernels of the `Dequant` and `Panel` methods: weights widened to f32 times
//! activation rows, in register tiles.

use std::arch::x86_64::*;

/// `super::tile_product` with AVX-512: four weight rows × two activation rows per pass.
///
/// # Safety
/// As `super::tile_product`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_avx512(
    x: &[f32],
    m: usize,
    k: usize,
    p: &[f32],
    j0: usize,
    n: usize,
    out: *mut f32,
) {
    let rows = p.len() / k;
    assert!(x.len() == m * k && k.is_multiple_of(32) && rows <= 4);
    // SAFETY (whole body): loads stay below k within rows of x (r < m) and of p
    // (j < rows); k is a multiple of 32; outputs r·n + j0 + j are the caller's.
    unsafe {
        let (xp, pp) = (x.as_ptr(), p.as_ptr());
        if rows == 4 {
            let w = [pp, pp.add(k), pp.add(2 * k), pp.add(3 * k)];
            let mut r = 0;
            while r + 2 <= m {
                let (x0, x1) = (xp.add(r * k), xp.add((r + 1) * k));
                let mut a = [_mm512_setzero_ps(); 8];
                for c in (0..k).step_by(16) {
                    let (v0, v1) = (_mm512_loadu_ps(x0.add(c)), _mm512_loadu_ps(x1.add(c)));
                    for q in 0..4 {
                        let u = _mm512_loadu_ps(w[q].add(c));
                        a[q] = _mm512_fmadd_ps(v0, u, a[q]);
                        a[4 + q] = _mm512_fmadd_ps(v1, u, a[4 + q]);
                    }
                }
                for q in 0..4 {
                    *out.add(r * n + j0 + q) = _mm512_reduce_add_ps(a[q]);
                    *out.add((r + 1) * n + j0 + q) = _mm512_reduce_add_ps(a[4 + q]);
                }
                r += 2;
            }
            if r < m {
                let x0 = xp.add(r * k);
                let mut a = [_mm512_setzero_ps(); 8];
                for c in (0..k).step_by(32) {
                    let (v0, v1) = (_mm512_loadu_ps(x0.add(c)), _mm512_loadu_ps(x0.add(c + 16)));
                    for q in 0..4 {
                        a[q] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(w[q].add(c)), a[q]);
                        a[4 + q] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(w[q].add(c + 16)), a[4 + q]);
                    }
                }
                for q in 0..4 {
                    *out.add(r * n + j0 + q) = _mm512_reduce_add_ps(_mm512_add_ps(a[q], a[4 + q]));
                }
            }
        } else {
            for j in 0..rows {
                let w0 = pp.add(j * k);
                for r in 0..m {
                    let x0 = xp.add(r * k);
                    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    for c in (0..k).step_by(32) {
                        a0 = _mm512_fmadd_ps(
                            _mm512_loadu_ps(x0.add(c)),
                            _mm512_loadu_ps(w0.add(c)),
                            a0,
                        );
                        a1 = _mm512_fmadd_ps(
                            _mm512_loadu_ps(x0.add(c + 16)),
                            _mm512_loadu_ps(w0.add(c + 16)),
                            a1,
                        );
                    }
                    *out.add(r * n + j0 + j) = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                }
            }
        }
    }
}

/// `MR` activation rows times a k-major AVX2 panel of 16 columns: `MR × 2` vector
/// accumulators, one broadcast per row and step.
///
/// # Safety
/// `x` holds `MR` rows of `k`, `p` `16 · k` floats; `out` rows `r < MR` (stride `n`)
/// have `cols ≤ 16` writable floats that no other task writes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro_avx2<const MR: usize>(
    x: *const f32,
    k: usize,
    p: *const f32,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    // SAFETY (whole body): the caller's contract.
    unsafe {
        let mut a = [[_mm256_setzero_ps(); 2]; MR];
        for i in 0..k {
            let w0 = _mm256_loadu_ps(p.add(16 * i));
            let w1 = _mm256_loadu_ps(p.add(16 * i + 8));
            for (r, a) in a.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(r * k + i));
                a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
            }
        }
        for (r, a) in a.iter().enumerate() {
            let o = out.add(r * n);
            if cols == 16 {
                _mm256_storeu_ps(o, a[0]);
                _mm256_storeu_ps(o.add(8), a[1]);
            } else {
                let mut t = [0.0f32; 16];
                _mm256_storeu_ps(t.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(t.as_mut_ptr().add(8), a[1]);
                std::ptr::copy_nonoverlapping(t.as_ptr(), o, cols);
            }
        }
    }
}

/// As [`micro_avx2`] with AVX-512 and a panel of 32 columns.
///
/// # Safety
/// As [`micro_avx2`], with `p` holding `32 · k` floats and `cols ≤ 32`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn micro_avx512<const MR: usize>(
    x: *const f32,
    k: usize,
    p: *const f32,
    out: *mut f32,
    n: usize,
    cols: usize,
) {
    // SAFETY (whole body): the caller's contract.
    unsafe {
        let mut a = [[_mm512_setzero_ps(); 2]; MR];
        for i in 0..k {
            let w0 = _mm512_loadu_ps(p.add(32 * i));
            let w1 = _mm512_loadu_ps(p.add(32 * i + 16));
            for (r, a) in a.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(r * k + i));
                a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
            }
        }
        for (r, a) in a.iter().enumerate() {
            let o = out.add(r * n);
            if cols == 32 {
                _mm512_storeu_ps(o, a[0]);
                _mm512_storeu_ps(o.add(16), a[1]);
            } else {
                let mut t = [0.0f32; 32];
                _mm512_storeu_ps(t.as_mut_ptr(), a[0]);
                _mm512_storeu_ps(t.as_mut_ptr().add(16), a[1]);
                std::ptr::copy_nonoverlapping(t.as_ptr(), o, cols);
            }
        }
    }
}

/// Defines `super::panel_product` for one instruction set: blocks of `$mr` rows, then
/// the remainder with a smaller block.
macro_rules! panel {
    ($name:ident, $features:literal, $micro:ident, $mr:literal, $nr:literal, [$($rem:literal),*]) => {
        /// `super::panel_product` on this instruction set.
        ///
        /// # Safety
        /// As `super::panel_product`.
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $name(
            x: &[f32],
            m: usize,
            k: usize,
            p: &[f32],
            jt: usize,
            cols: usize,
            n: usize,
            out: *mut f32,
        ) {
            assert!(x.len() == m * k && p.len() == $nr * k && cols <= $nr);
            let (xp, pp) = (x.as_ptr(), p.as_ptr());
            let mut r0 = 0;
            while r0 + $mr <= m {
                // SAFETY: rows r0..r0 + MR ≤ m of x and out; the caller's contract for
                // columns jt..jt + cols.
                unsafe { $micro::<$mr>(xp.add(r0 * k), k, pp, out.add(r0 * n + jt), n, cols) };
                r0 += $mr;
            }
            let (xr, or) = (xp.wrapping_add(r0 * k), out.wrapping_add(r0 * n + jt));
            // SAFETY: the remaining rows r0..m, as above.
            unsafe {
                match m - r0 {
                    0 => {}
                    $($rem => $micro::<$rem>(xr, k, pp, or, n, cols),)*
                    _ => unreachable!(),
                }
            }
        }
    };
}

panel!(
    panel_avx2,
    "avx2,fma,f16c",
    micro_avx2,
    6,
    16,
    [1, 2, 3, 4, 5]
);
panel!(
    panel_avx512,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    micro_avx512,
    12,
    32,
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
);
