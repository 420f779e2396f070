//! The AVX2 tile kernels of [`super::block`].

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
                            let (v0, v1) = (_mm256_loadu_ps(x0.add(c)), _mm256_loadu_ps(x1.add(c)));
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
unsafe fn f16_rows(x: &[f32], m: usize, k: usize, w: &[f16], j0: usize, n: usize, out: *mut f32) {
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
