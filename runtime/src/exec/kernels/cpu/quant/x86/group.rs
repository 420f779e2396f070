//! The group kernels: integer dot products of up to eight activation rows with groups of
//! eight weight rows interleaved four bytes at a time (a [`Group`] or interleaved weights).

use std::arch::x86_64::*;

use kvc_compiler::blocks::{Block, Format};

use super::super::interleave::{BYTE, Inter, NIB, NIB1, NIB2, Pack};
use super::super::xq::Xq;
use super::super::{GROUP, Group};
use super::store8;

/// A group of interleaved weight rows, as [`Group`] holds them or as interleaved
/// weights store them ([`Inter`]): unit `j`'s chunks at `u + ustride · j`, its
/// eight scales at `d + dstride · j` and minimums at `m + dstride · j`.
#[derive(Clone, Copy)]
pub(crate) struct GroupRef {
    u: *const u8,
    d: *const f32,
    m: *const f32,
    ustride: usize,
    dstride: usize,
    /// Bytes from this group to the next one, whose lines the kernels prefetch into
    /// L2 as they go (0: none; a [`Group`] is in cache).
    next: usize,
    /// This pass of activation rows over the group, and how many there are: pass
    /// `p` of `P` prefetches the `p`-th of `P` slices of each of the next group's
    /// units, so the next group streams in while every pass multiplies (a group is
    /// read from memory once; a pass that asked for nothing left memory idle).
    pass: (usize, usize),
}

impl GroupRef {
    /// Asks for this pass's slice of unit `j` of the next group.
    #[inline(always)]
    fn prefetch(self, j: usize) {
        if self.next > 0 {
            let (p, passes) = self.pass;
            let unit = self.u.wrapping_add(self.next + self.ustride * j);
            let lo = unit.wrapping_add(self.ustride * p / passes) as usize & !63;
            let hi = unit.wrapping_add(self.ustride * (p + 1) / passes) as usize;
            let mut at = lo;
            while at < hi {
                // SAFETY: prefetching never faults, whatever the address.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(at as *const i8) };
                at += 64;
            }
        }
    }

    /// `self` as pass `p` of `passes`.
    #[inline(always)]
    pub(crate) fn in_pass(self, p: usize, passes: usize) -> GroupRef {
        GroupRef {
            pass: (p, passes),
            ..self
        }
    }

    pub(crate) fn of(q: Block, g: &Group) -> GroupRef {
        GroupRef {
            u: g.u.as_ptr(),
            d: g.d.as_ptr(),
            m: g.m.as_ptr(),
            ustride: GROUP * q.unit(),
            dstride: GROUP,
            next: 0,
            pass: (0, 1),
        }
    }
}

impl Inter {
    /// The kernels' view of the group at `g`.
    pub(crate) fn view(self, g: *const u8) -> GroupRef {
        GroupRef {
            u: g,
            // Pointer arithmetic only: the kernels read `d` and `m` at unit offsets.
            d: g.wrapping_add(self.ub).cast(),
            m: g.wrapping_add(self.ub + 4 * GROUP).cast(),
            ustride: self.stride,
            dstride: self.stride / 4,
            next: self.bytes(),
            pass: (0, 1),
        }
    }
}

/// `v` with each 32-bit lane shifted left by `n` (a constant where this is inlined).
#[inline(always)]
unsafe fn shl(v: __m256i, n: i32) -> __m256i {
    // SAFETY: AVX2 is enabled wherever this is inlined.
    unsafe { _mm256_sll_epi32(v, _mm_cvtsi32_si128(n)) }
}

/// `v` with each 16-bit lane shifted left by `n` (right by `−n`).
#[inline(always)]
unsafe fn shift16(v: __m256i, n: i32) -> __m256i {
    // SAFETY: AVX2 is enabled wherever this is inlined.
    unsafe {
        if n >= 0 {
            _mm256_sll_epi16(v, _mm_cvtsi32_si128(n))
        } else {
            _mm256_srl_epi16(v, _mm_cvtsi32_si128(-n))
        }
    }
}

/// How a group of format `B` stores its values: as [`Pack::of`] says where `PACKED`
/// (interleaved weights), else one byte per value (a [`Group`]).
#[inline(always)]
const fn pack<const B: u8, const PACKED: bool>() -> u8 {
    if PACKED {
        Pack::of(Block::from_index(B)) as u8
    } else {
        BYTE
    }
}

/// The eight 32-byte chunks (values `4c..4c + 4` of each row) of the 32-value unit at
/// `gu`, stored as [`pack`] says; `FLIP` flips the top bit of bytes.
///
/// # Safety
/// The unit's bytes are readable.
#[inline(always)]
unsafe fn unit_chunks<const B: u8, const PACKED: bool, const FLIP: bool>(
    gu: *const u8,
) -> [__m256i; 8] {
    let pack = const { pack::<B, PACKED>() };
    // SAFETY: the caller's contract; AVX2 is enabled wherever this is inlined.
    unsafe {
        if pack == NIB || pack == NIB1 {
            let m4 = _mm256_set1_epi8(0x0f);
            let mut w = [_mm256_setzero_si256(); 8];
            for p in 0..4 {
                let v = _mm256_loadu_si256(gu.add(32 * p).cast());
                w[p] = _mm256_and_si256(v, m4);
                w[p + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
            }
            if pack == NIB1 {
                // Bit c of each plane byte becomes bit 4 of chunk c's byte; bits that
                // a 16-bit shift carries over from the neighbour byte are masked off.
                let plane = _mm256_loadu_si256(gu.add(128).cast());
                let b4 = _mm256_set1_epi8(0x10);
                for (c, w) in w.iter_mut().enumerate() {
                    let h = _mm256_and_si256(shift16(plane, 4 - c as i32), b4);
                    *w = _mm256_or_si256(*w, h);
                }
            }
            w
        } else {
            std::array::from_fn(|c| {
                let v = _mm256_loadu_si256(gu.add(32 * c).cast());
                if FLIP {
                    _mm256_xor_si256(v, _mm256_set1_epi8(-128))
                } else {
                    v
                }
            })
        }
    }
}

/// The four chunks of the 16-value unit (Q6_K) at `gu`, in the first four lanes,
/// stored as [`pack`] says (bytes or [`Pack::Nib2`]).
///
/// # Safety
/// As [`unit_chunks`].
#[inline(always)]
unsafe fn chunks4<const B: u8, const PACKED: bool>(gu: *const u8) -> [__m256i; 8] {
    let pack = const { pack::<B, PACKED>() };
    // SAFETY: the caller's contract.
    unsafe {
        let mut w = [_mm256_setzero_si256(); 8];
        if pack == NIB2 {
            let m4 = _mm256_set1_epi8(0x0f);
            let (v0, v1) = (
                _mm256_loadu_si256(gu.cast()),
                _mm256_loadu_si256(gu.add(32).cast()),
            );
            let plane = _mm256_loadu_si256(gu.add(64).cast());
            let nib = [
                _mm256_and_si256(v0, m4),
                _mm256_and_si256(v1, m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v0), m4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v1), m4),
            ];
            // Bits 2c, 2c + 1 of each plane byte become bits 4, 5 of chunk c's byte.
            let b45 = _mm256_set1_epi8(0x30);
            for (c, (w, nib)) in w.iter_mut().zip(nib).enumerate() {
                let h = _mm256_and_si256(shift16(plane, 4 - 2 * c as i32), b45);
                *w = _mm256_or_si256(nib, h);
            }
        } else {
            for (c, w) in w.iter_mut().take(4).enumerate() {
                *w = _mm256_loadu_si256(gu.add(32 * c).cast());
            }
        }
        w
    }
}

/// Chunks of format `f` whose `maddubs` pair sums add up in i16 before they are widened
/// to i32 (AVX2 without VNNI): a pair sum is at most `2 · 127 · max w` (unsigned values
/// below `2^bits`, Q8_0 as `|w| ≤ 128`), so 8 for 4-bit values, 4 for 5-bit, 2 for 6-bit
/// and 1 for Q8_0 keep every partial sum within `i16::MAX` (exact: no saturation).
const fn i16_chunks(f: Format) -> usize {
    let wmax = if f.signed { 128 } else { (1 << f.bits) - 1 };
    let n = i16::MAX as usize / (2 * 127 * wmax);
    if n > 8 { 8 } else { n }
}

/// The i16 pair sums of four weight bytes per i32 lane (signed or not) with the four
/// activation bytes broadcast in `x`, as `chunk_avx2!` forms them (signed weights as
/// `|w| · (x · sign w)`).
#[inline(always)]
unsafe fn pairs16(w: __m256i, wa: __m256i, x: __m256i, signed: bool) -> __m256i {
    // SAFETY: AVX2 is enabled wherever this is inlined.
    unsafe {
        if signed {
            _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w))
        } else {
            _mm256_maddubs_epi16(w, x)
        }
    }
}

/// Adds the chunks `wvs` (the first `chunks`) times each row's activation bytes (row `r`'s
/// chunk `c` at `xb + 32 r + 4 c`) to the i32 lanes `ai`: through `chunk` one by one with
/// VNNI, else summed in i16 over [`i16_chunks`] chunks at a time and widened once (one
/// `pmaddwd` per group instead of per chunk). The same integers either way.
///
/// # Safety
/// Each row's `4 · chunks` activation bytes are readable.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn add_chunks<const R: usize, const VNNI: bool>(
    ai: &mut [__m256i; R],
    wvs: &[__m256i; 8],
    chunks: usize,
    group: usize,
    xb: *const u8,
    signed: bool,
    chunk: impl Fn(__m256i, __m256i, __m256i, __m256i, bool) -> __m256i,
) {
    // SAFETY: the caller's contract; AVX2 is enabled wherever this is inlined.
    unsafe {
        let abs = |wv: __m256i| {
            if signed && !VNNI {
                _mm256_abs_epi8(wv)
            } else {
                wv
            }
        };
        let x = |r: usize, c: usize| {
            _mm256_set1_epi32(xb.add(32 * r + 4 * c).cast::<i32>().read_unaligned())
        };
        if VNNI || group == 1 {
            for (c, &wv) in wvs.iter().enumerate().take(chunks) {
                let wa = abs(wv);
                for (r, ai) in ai.iter_mut().enumerate() {
                    *ai = chunk(*ai, wv, wa, x(r, c), signed);
                }
            }
            return;
        }
        let ones = _mm256_set1_epi16(1);
        let mut p16 = [_mm256_setzero_si256(); R];
        for (c, &wv) in wvs.iter().enumerate().take(chunks) {
            let wa = abs(wv);
            for (r, p) in p16.iter_mut().enumerate() {
                let prod = pairs16(wv, wa, x(r, c), signed);
                *p = if c % group == 0 {
                    prod
                } else {
                    _mm256_add_epi16(*p, prod)
                };
            }
            if c % group == group - 1 || c + 1 == chunks {
                for (ai, &p) in ai.iter_mut().zip(&p16) {
                    *ai = _mm256_add_epi32(*ai, _mm256_madd_epi16(p, ones));
                }
            }
        }
    }
}

/// Unpacks the values of the interleaved group `g` (`k` values per row, stored as
/// [`Pack`] says) into `u` (`GROUP · k` bytes, as a [`Group`] holds them: unit `j` at
/// `GROUP · unit · j`), and streams the next group into the cache meanwhile. The view
/// returned reads `u` and `g`'s own scales: a product of many activation rows unpacks
/// each unit once instead of once per pass.
///
/// # Safety
/// `g` is a view of a whole interleaved group of format `B` ([`Inter::view`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn unpacked<const B: u8>(g: GroupRef, k: usize, u: &mut [u8]) -> GroupRef {
    let q = const { Block::from_index(B) };
    let (unit, chunks) = (q.unit(), q.unit() / 4);
    assert_eq!(u.len(), GROUP * k, "a group of {k}-value rows");
    for j in 0..k / unit {
        g.in_pass(0, 1).prefetch(j);
        // SAFETY: unit j of the group lies in it (the caller's contract); the
        // stores write chunk c < unit / 4 of unit j, inside `u` (asserted above).
        unsafe {
            let gu = g.u.add(g.ustride * j);
            let wvs = if unit == 16 {
                chunks4::<B, true>(gu)
            } else {
                unit_chunks::<B, true, false>(gu)
            };
            let o = u.as_mut_ptr().add(GROUP * unit * j);
            for (c, wv) in wvs.into_iter().enumerate().take(chunks) {
                _mm256_storeu_si256(o.add(32 * c).cast(), wv);
            }
        }
    }
    GroupRef {
        u: u.as_ptr(),
        ustride: GROUP * unit,
        next: 0,
        ..g
    }
}

/// Defines the integer dot products of `R` activation rows with a [`Group`] on top of
/// `$chunk(acc, w, |w|, x, signed)`, which adds to the i32 lanes `acc` the products of
/// four weight bytes per lane (signed or not) with the four activation bytes broadcast
/// in `x`.
macro_rules! group_dots {
    ($dot32:ident, $dotk:ident, $features:literal, $vnni:literal, $chunk:expr) => {
        /// Columns `j..j + lanes` of output rows `r0..r0 + R` for 32-value blocks of
        /// format `B`: its offset is subtracted from every weight as a shift, signed
        /// weights read as such, and minimums added.
        ///
        /// # Safety
        /// `xq` holds rows `r0..r0 + R` of `k` values, `g` a group of `k`-value rows,
        /// and `out` rows `r0..r0 + R` (stride `n`) `lanes` writable floats at `j`.
        #[inline]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $dot32<
            const R: usize,
            const B: u8,
            const PACKED: bool,
            const FLIP: bool,
        >(
            g: GroupRef,
            xq: &Xq,
            r0: usize,
            k: usize,
            out: *mut f32,
            n: usize,
            j: usize,
            lanes: usize,
        ) {
            let f = const { Block::from_index(B).format() };
            let nb = k / 32;
            let chunk = $chunk;
            // Offset corrections in i32: Q8_0's VNNI bytes carry +128.
            let shift = if f.signed && $vnni {
                7
            } else {
                f.offset_shift() as i32
            };
            let (gu, gd, gm) = (g.u, g.d, g.m);
            let p = &xq.by_pass;
            assert!(p.q.len() >= (r0 + R) * k && p.d.len() >= (r0 + R) * nb);
            let (xq0, xd0) = (p.q[r0 * k..].as_ptr(), p.d[r0 * nb..].as_ptr());
            let (xs0, xc0) = (p.s[r0 * nb..].as_ptr(), p.ns32[r0 * nb..].as_ptr());
            let mut acc = [_mm256_setzero_ps(); R];
            // SAFETY (whole loop): block b reads g.u at 256b.. (256 bytes), g.d and
            // g.m at 8b.. (8 floats), and the pass's activation bytes (b · R + r) · 32..
            // and per-32 values b · R + r (asserted above).
            unsafe {
                for b in 0..nb {
                    let (xb, at) = (xq0.add(32 * R * b), R * b);
                    let mut ai: [__m256i; R] = std::array::from_fn(|r| {
                        if shift > 0 {
                            shl(_mm256_set1_epi32(*xc0.add(at + r)), shift)
                        } else {
                            _mm256_setzero_si256()
                        }
                    });
                    g.prefetch(b);
                    let wvs = unit_chunks::<B, PACKED, FLIP>(gu.add(g.ustride * b));
                    let group = const { i16_chunks(Block::from_index(B).format()) };
                    add_chunks::<R, $vnni>(&mut ai, &wvs, 8, group, xb.cast(), f.signed, chunk);
                    let dw = _mm256_loadu_ps(gd.add(g.dstride * b));
                    for (r, (a, ai)) in acc.iter_mut().zip(ai).enumerate() {
                        let s = _mm256_mul_ps(dw, _mm256_set1_ps(*xd0.add(at + r)));
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), s, *a);
                    }
                    if f.mins {
                        let mw = _mm256_loadu_ps(gm.add(g.dstride * b));
                        for (r, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xs0.add(at + r)), *a);
                        }
                    }
                }
                for (r, a) in acc.into_iter().enumerate() {
                    store8(a, out.add((r0 + r) * n + j), lanes);
                }
            }
        }

        /// As the 32-block kernel for k-quants: Q6_K (16-value units with offset 32) or
        /// Q4_K/Q5_K (32-value sub-blocks with minimums).
        ///
        /// # Safety
        /// As the 32-block kernel.
        #[inline]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) unsafe fn $dotk<const R: usize, const B: u8, const PACKED: bool>(
            g: GroupRef,
            xq: &Xq,
            r0: usize,
            k: usize,
            out: *mut f32,
            n: usize,
            j: usize,
            lanes: usize,
        ) {
            let chunk = $chunk;
            let q6 = const { Block::from_index(B).unit() == 16 };
            let (subs, chunks) = if q6 { (16, 4) } else { (8, 8) };
            let (gu, gd, gm) = (g.u, g.d, g.m);
            let (nb, nu) = (k / 32, k / 16);
            let p = &xq.by_pass;
            assert!(p.q.len() >= (r0 + R) * k && p.nbs.len() >= (r0 + R) * nu);
            let (xq0, xd0) = (p.q[r0 * k..].as_ptr(), p.d[r0 * nb..].as_ptr());
            let (xs0, xc0) = (p.s[r0 * nb..].as_ptr(), p.nbs[r0 * nu..].as_ptr());
            let mut acc = [_mm256_setzero_ps(); R];
            // SAFETY (whole loop): unit s of super-block sb reads g.u at 32 · c for
            // its chunks c < k / 4, g.d and g.m at 8 · unit.., and the pass's
            // activation bytes of its 32-value block, per-32 values of that block and
            // per-16 values of the unit (asserted above).
            unsafe {
                for sb in 0..k / 256 {
                    for s in 0..subs {
                        let unit = sb * subs + s;
                        // The unit's 32-value block and its first byte there.
                        let (b, within) = if q6 {
                            (unit / 2, 16 * (unit % 2))
                        } else {
                            (unit, 0)
                        };
                        let xb = xq0.add(32 * R * b + within);
                        let mut ai: [__m256i; R] = std::array::from_fn(|r| {
                            if q6 {
                                let shift = const { Block::from_index(B).format().offset_shift() };
                                shl(_mm256_set1_epi32(*xc0.add(R * unit + r)), shift as i32)
                            } else {
                                _mm256_setzero_si256()
                            }
                        });
                        g.prefetch(unit);
                        let gu = gu.add(g.ustride * unit);
                        let wvs = if q6 {
                            chunks4::<B, PACKED>(gu)
                        } else {
                            unit_chunks::<B, PACKED, false>(gu)
                        };
                        let group = const { i16_chunks(Block::from_index(B).format()) };
                        add_chunks::<R, $vnni>(
                            &mut ai,
                            &wvs,
                            chunks,
                            group,
                            xb.cast(),
                            false,
                            chunk,
                        );
                        let dsc = _mm256_loadu_ps(gd.add(g.dstride * unit));
                        for (r, (a, ai)) in acc.iter_mut().zip(ai).enumerate() {
                            let s = _mm256_mul_ps(dsc, _mm256_set1_ps(*xd0.add(R * b + r)));
                            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), s, *a);
                        }
                        if !q6 {
                            let dmn = _mm256_loadu_ps(gm.add(g.dstride * unit));
                            for (r, a) in acc.iter_mut().enumerate() {
                                let sx = *xs0.add(R * b + r);
                                *a = _mm256_fnmadd_ps(dmn, _mm256_set1_ps(sx), *a);
                            }
                        }
                    }
                }
                for (r, a) in acc.into_iter().enumerate() {
                    store8(a, out.add((r0 + r) * n + j), lanes);
                }
            }
        }
    };
}

group_dots!(dot32_avx2, dotk_avx2, "avx2,fma,f16c", false, chunk_avx2!());
group_dots!(
    dot32_vnni,
    dotk_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true,
    chunk_vnni!()
);
