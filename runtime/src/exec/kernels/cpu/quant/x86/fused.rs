//! The fused kernels: up to four activation rows times weight rows read in the file's
//! blocks, each block unpacked in registers and multiplied at once.

use std::arch::x86_64::*;

use kvc_compiler::blocks::{Block, k_scale_mins};

use super::super::xq::Xq;
use super::{column, f16_at, hsum};

/// The shuffle that spreads Q6_K's 16-bit scales `2i` and `2i + 1` (of the eight in
/// each 128-bit lane) over the low and high lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q6_scale_shuffle(i: usize) -> __m256i {
    let (a, b) = (4 * i as i8, 4 * i as i8 + 2);
    #[rustfmt::skip]
    let v = _mm256_setr_epi8(
        a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1,
        b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1,
    );
    v
}

/// Bytes ahead of the block being multiplied that the fused kernels prefetch. A task's
/// weight rows are one contiguous range, read once; on an Intel Xeon whose one core
/// streams 10 GB/s, the hardware prefetcher alone left the kernels waiting on memory
/// for half their time (SmolLM2's decode products: 17 ms a step without, 7.7 ms with;
/// 2–8 KiB ahead measured alike).
const AHEAD: usize = 2048;

/// Defines the fused kernels of one instruction set: `$chunk` as for `group_dots`
/// (with activation bytes in place of a broadcast), `$scaled(acc, p, s)` adds the
/// i16 pair sums `p` times the i16 scales `s` to the i32 lanes `acc`.
macro_rules! fused_dots {
    ($dot32:ident, $dotk:ident, $features:literal, $vnni:literal, $chunk:expr, $scaled:expr) => {
        /// Output rows `r0..r0 + R` at columns `j0..` from the weight rows `w`
        /// (32-value blocks of format `B`), each block unpacked by [`column`].
        ///
        /// # Safety
        /// `xq` holds rows `r0..r0 + R` of `k` values; `out` rows `r0..r0 + R` (stride
        /// `n`) have writable columns `j0..j0 + rows of w` that no other task writes.
        #[inline]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $dot32<const R: usize, const B: u8>(
            xq: &Xq,
            r0: usize,
            k: usize,
            w: &[u8],
            j0: usize,
            n: usize,
            out: *mut f32,
        ) {
            let (q, f) = const { (Block::from_index(B), Block::from_index(B).format()) };
            let (nb, bb) = (k / 32, q.bytes());
            let chunk = $chunk;
            let shift = if f.signed && $vnni {
                7
            } else {
                f.offset_shift() as i32
            };
            let min = f.mins;
            let xr: [&[i8]; R] = std::array::from_fn(|r| &xq.q[(r0 + r) * k..][..k]);
            let dx: [&[f32]; R] = std::array::from_fn(|r| &xq.d[(r0 + r) * nb..][..nb]);
            let sx: [&[f32]; R] = std::array::from_fn(|r| &xq.s[(r0 + r) * nb..][..nb]);
            let s32: [&[i32]; R] = std::array::from_fn(|r| &xq.s32[(r0 + r) * nb..][..nb]);
            for (j, wr) in w.chunks_exact(nb * bb).enumerate() {
                let mut acc = [_mm256_setzero_ps(); R];
                let mut accm = [0.0f32; R];
                for (b, blk) in wr.chunks_exact(bb).enumerate() {
                    _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(AHEAD).cast());
                    let col = column(q, blk, 0);
                    let wv = if f.signed && $vnni {
                        _mm256_xor_si256(col, _mm256_set1_epi8(-128))
                    } else {
                        col
                    };
                    let wa = if f.signed && !$vnni {
                        _mm256_abs_epi8(col)
                    } else {
                        col
                    };
                    // SAFETY: blocks hold at least 4 bytes.
                    let (d, mw) = unsafe {
                        let p = blk.as_ptr();
                        (f16_at(p), if min { f16_at(p.add(2)) } else { 0.0 })
                    };
                    for r in 0..R {
                        let xb = &xr[r][32 * b..][..32];
                        // SAFETY: `xb` holds 32 bytes.
                        let xv = unsafe { _mm256_loadu_si256(xb.as_ptr().cast()) };
                        // The offset correction, exact in lane 0.
                        let init = if shift > 0 {
                            _mm256_zextsi128_si256(_mm_cvtsi32_si128(-(s32[r][b] << shift)))
                        } else {
                            _mm256_setzero_si256()
                        };
                        let ai = chunk(init, wv, wa, xv, f.signed);
                        let s = _mm256_set1_ps(d * dx[r][b]);
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), s, acc[r]);
                        if min {
                            accm[r] += mw * sx[r][b];
                        }
                    }
                }
                for r in 0..R {
                    // SAFETY: the caller's contract.
                    unsafe { *out.add((r0 + r) * n + j0 + j) = hsum(acc[r]) + accm[r] };
                }
            }
        }

        /// As the 32-block fused kernel for k-quants: Q6_K or Q4_K/Q5_K. The
        /// integer sub-block scales multiply in i32; each 32-value sub-block's sum then
        /// takes its activation scale in f32.
        ///
        /// # Safety
        /// As the 32-block fused kernel.
        #[inline]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $dotk<const R: usize, const B: u8>(
            xq: &Xq,
            r0: usize,
            k: usize,
            w: &[u8],
            j0: usize,
            n: usize,
            out: *mut f32,
        ) {
            let q = const { Block::from_index(B) };
            let q6 = q.unit() == 16;
            let (nsb, bb) = (k / 256, q.bytes());
            let scaled = $scaled;
            let xr: [&[i8]; R] = std::array::from_fn(|r| &xq.q[(r0 + r) * k..][..k]);
            let dx: [&[f32]; R] = std::array::from_fn(|r| &xq.d[(r0 + r) * k / 32..][..k / 32]);
            let bs: [&[i16]; R] = std::array::from_fn(|r| &xq.bs[(r0 + r) * k / 16..][..k / 16]);
            for (j, wr) in w.chunks_exact(nsb * bb).enumerate() {
                let mut acc = [_mm256_setzero_ps(); R];
                for (sb, blk) in wr.chunks_exact(bb).enumerate() {
                    let p = blk.as_ptr();
                    for line in (0..bb).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD + line).cast());
                    }
                    // Per 32 values the i16 scales of their pair sums; per 16 the
                    // multipliers of the activation sums (Q6_K's scales, Q4_K's
                    // minimums).
                    // SAFETY: the block's scale bytes are in bounds.
                    let (d, dmin, scv, corr16) = unsafe {
                        if q6 {
                            let s = _mm_loadu_si128(p.add(192).cast());
                            let lo = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(s));
                            let hi = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(
                                _mm_srli_si128(s, 8),
                            ));
                            let scv: [__m256i; 8] = std::array::from_fn(|i| {
                                _mm256_shuffle_epi8(
                                    if i < 4 { lo } else { hi },
                                    q6_scale_shuffle(i % 4),
                                )
                            });
                            (f16_at(p.add(208)), 0.0, scv, _mm256_cvtepi8_epi16(s))
                        } else {
                            let (sc, mn) = k_scale_mins(&blk[4..16]);
                            let s8 = _mm_cvtepu8_epi16(_mm_loadl_epi64(sc.as_ptr().cast()));
                            let s16 = _mm256_broadcastsi128_si256(s8);
                            let scv = std::array::from_fn(|i| {
                                let pick = (2 * i as i16) | ((2 * i as i16 + 1) << 8);
                                _mm256_shuffle_epi8(s16, _mm256_set1_epi16(pick))
                            });
                            let m8 = _mm_cvtepu8_epi16(_mm_loadl_epi64(mn.as_ptr().cast()));
                            let corr16 = _mm256_set_m128i(
                                _mm_unpackhi_epi16(m8, m8),
                                _mm_unpacklo_epi16(m8, m8),
                            );
                            (f16_at(p), f16_at(p.add(2)), scv, corr16)
                        }
                    };
                    for (sub, &sc) in scv.iter().enumerate() {
                        let col = column(q, blk, sub);
                        for r in 0..R {
                            let xb = &xr[r][256 * sb + 32 * sub..][..32];
                            // SAFETY: `xb` holds 32 bytes.
                            let xv = unsafe { _mm256_loadu_si256(xb.as_ptr().cast()) };
                            // Weights below 64: a pair sum is at most 2 · 63 · 127 < 2^15.
                            let si =
                                scaled(_mm256_setzero_si256(), _mm256_maddubs_epi16(col, xv), sc);
                            let s = _mm256_set1_ps(d * dx[r][8 * sb + sub]);
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), s, acc[r]);
                        }
                    }
                    for r in 0..R {
                        let b16 = &bs[r][16 * sb..][..16];
                        // SAFETY: `b16` and the eight scales hold 16 i16 and 8 f32.
                        let (bsv, dxv) = unsafe {
                            (
                                _mm256_loadu_si256(b16.as_ptr().cast()),
                                _mm256_loadu_ps(dx[r][8 * sb..][..8].as_ptr()),
                            )
                        };
                        // Lane i: the minimum or offset correction of sub-block i.
                        let corr = _mm256_madd_epi16(bsv, corr16);
                        // Q6_K's offset 32 as an immediate shift (checked against the table).
                        const { assert!(Block::Q6K.format().offset == 1 << 5) };
                        let (c, m) = if q6 {
                            (_mm256_slli_epi32(corr, 5), d)
                        } else {
                            (corr, dmin)
                        };
                        let s = _mm256_mul_ps(dxv, _mm256_set1_ps(m));
                        acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(c), s, acc[r]);
                    }
                }
                for r in 0..R {
                    // SAFETY: the caller's contract.
                    unsafe { *out.add((r0 + r) * n + j0 + j) = hsum(acc[r]) };
                }
            }
        }
    };
}

fused_dots!(
    fused32_avx2,
    fusedk_avx2,
    "avx2,fma,f16c",
    false,
    chunk_avx2!(),
    |acc: __m256i, p: __m256i, s: __m256i| _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
);
fused_dots!(
    fused32_vnni,
    fusedk_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true,
    chunk_vnni!(),
    |acc: __m256i, p: __m256i, s: __m256i| _mm256_dpwssd_epi32(acc, p, s)
);
