//! The AVX2 and AVX-512 kernels. Functions named `*_avx512` need the AVX-512 set of
//! [`Isa::Avx512`](super::Isa::Avx512); all others need AVX2, FMA and F16C.

use std::arch::x86_64::*;

use kvc_compiler::blocks::{Block, k_scale_mins};

use super::interleave::{BYTE, Inter, NIB, NIB1, NIB2, Pack};
use super::xq::{Xq, XqPart, quantize_body};
use super::{GROUP, Group, Isa, Row, Task, row_bytes_q};

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quantize_avx2(x: &[f32], xq: XqPart) {
    quantize_body(x, xq)
}

/// The f16 at `p`, widened.
///
/// Written in assembly so that the bits enter a vector register through `vmovd`,
/// which clears the rest of it. From intrinsics LLVM loads them with `vpinsrw`, which
/// merges into whatever register it picks; where that register last held the
/// previous block's scale, every block waits on the one before (a chain of ≈ 15
/// cycles per block: the fused kernels ran 1.4–2.3× slower on an Intel Xeon).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    // SAFETY: the caller's pointer holds two bytes.
    let bits = u32::from(unsafe { p.cast::<u16>().read_unaligned() });
    let v: __m128;
    // SAFETY: F16C is enabled (this function's target features); registers only. Not
    // `preserves_flags`: a signalling NaN sets MXCSR's invalid-operation flag.
    unsafe {
        std::arch::asm!(
            "vmovd {v}, {b:e}",
            "vcvtph2ps {v}, {v}",
            b = in(reg) bits,
            v = out(xmm_reg) v,
            options(pure, nomem, nostack),
        );
    }
    _mm_cvtss_f32(v)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// 0x10 in byte `i` where bit `i` of `qh` is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn high_bits(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    #[rustfmt::skip]
    let shuf = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, shuf), bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// As `super::column`, in a register.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn column(q: Block, blk: &[u8], sub: usize) -> __m256i {
    let bb = q.bytes();
    assert!(blk.len() >= bb && sub < q.values() / 32);
    let m4 = _mm256_set1_epi8(0x0f);
    let p = blk.as_ptr();
    let shift = |v: __m256i, s: usize| _mm256_srl_epi16(v, _mm_cvtsi32_si128(s as i32));
    // SAFETY: every load lies in the block's `bb` bytes (asserted above).
    unsafe {
        match q {
            Block::Q4_0 | Block::Q4_1 | Block::Q5_0 | Block::Q5_1 => {
                let v = _mm_loadu_si128(p.add(bb - 16).cast());
                let vals = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
                if matches!(q, Block::Q5_0 | Block::Q5_1) {
                    let qh = p.add(bb - 20).cast::<u32>().read_unaligned();
                    _mm256_or_si256(vals, high_bits(qh))
                } else {
                    vals
                }
            }
            Block::Q8_0 => _mm256_loadu_si256(p.add(2).cast()),
            Block::Q4K | Block::Q5K => {
                let v = _mm256_loadu_si256(p.add(bb - 128 + 32 * (sub / 2)).cast());
                let vals = _mm256_and_si256(shift(v, 4 * (sub % 2)), m4);
                if q == Block::Q5K {
                    let qh = _mm256_loadu_si256(p.add(16).cast());
                    let h = _mm256_and_si256(shift(qh, sub), _mm256_set1_epi8(1));
                    _mm256_or_si256(vals, _mm256_slli_epi16(h, 4))
                } else {
                    vals
                }
            }
            Block::Q6K => {
                let (h, kk) = (sub / 4, sub % 4);
                let ql = _mm256_loadu_si256(p.add(64 * h + 32 * (kk % 2)).cast());
                let qh = _mm256_loadu_si256(p.add(128 + 32 * h).cast());
                let low = _mm256_and_si256(shift(ql, 4 * (kk / 2)), m4);
                let high = _mm256_and_si256(shift(qh, 2 * kk), _mm256_set1_epi8(3));
                _mm256_or_si256(low, _mm256_slli_epi16(high, 4))
            }
        }
    }
}

/// As `super::block_scales`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_scales(q: Block, blk: &[u8], ds: &mut [f32], dm: &mut [f32]) {
    let p = blk.as_ptr();
    assert!(blk.len() >= q.bytes());
    let widen = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    // SAFETY: loads lie in the block (asserted above); stores in `ds`/`dm` (sliced).
    unsafe {
        match q {
            Block::Q4K | Block::Q5K => {
                let (ds, dm) = (&mut ds[..8], &mut dm[..8]);
                let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
                let (sc, mn) = k_scale_mins(&blk[4..16]);
                let sc = widen(_mm_loadl_epi64(sc.as_ptr().cast()));
                let mn = widen(_mm_loadl_epi64(mn.as_ptr().cast()));
                _mm256_storeu_ps(ds.as_mut_ptr(), _mm256_mul_ps(_mm256_set1_ps(d), sc));
                _mm256_storeu_ps(dm.as_mut_ptr(), _mm256_mul_ps(_mm256_set1_ps(dmin), mn));
            }
            Block::Q6K => {
                let ds = &mut ds[..16];
                let d = _mm256_set1_ps(f16_at(p.add(208)));
                let s = _mm_loadu_si128(p.add(192).cast());
                let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s));
                let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s, 8)));
                _mm256_storeu_ps(ds.as_mut_ptr(), _mm256_mul_ps(d, lo));
                _mm256_storeu_ps(ds.as_mut_ptr().add(8), _mm256_mul_ps(d, hi));
            }
            _ => {
                ds[0] = f16_at(p);
                dm[0] = if matches!(q, Block::Q4_1 | Block::Q5_1) {
                    f16_at(p.add(2))
                } else {
                    0.0
                };
            }
        }
    }
}

/// As `super::unpack_portable` with `column` (`column(q, ..)` for a fixed `q`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn unpack_with<F: Fn(&[u8], usize) -> __m256i>(q: Block, wr: &[u8], row: &mut Row, column: F) {
    let (subs, upb) = (q.values() / 32, q.values() / q.unit());
    for (b, blk) in wr.chunks_exact(q.bytes()).enumerate() {
        block_scales(q, blk, &mut row.ds[b * upb..], &mut row.dm[b * subs..]);
        let o = &mut row.u[32 * b * subs..][..32 * subs];
        for sub in 0..subs {
            // SAFETY: `o` holds 32 bytes per column.
            unsafe { _mm256_storeu_si256(o.as_mut_ptr().add(32 * sub).cast(), column(blk, sub)) };
        }
    }
}

/// As `super::unpack_portable`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn unpack(q: Block, wr: &[u8], row: &mut Row) {
    with_block!(q, B => unpack_with(q, wr, row, |b, s| column(Block::from_index(B), b, s)))
}

/// The value of `u` at `ds · u + c` per [`Row`]'s unit `j` (and whether `u` is
/// signed).
#[inline]
fn affine(q: Block, row: &Row, j: usize) -> (f32, f32, bool) {
    let (f, ds) = (q.format(), row.ds[j]);
    let min = match (f.mins, f.is_k()) {
        (false, _) => 0.0,
        (true, false) => row.dm[j],
        (true, true) => -row.dm[j],
    };
    (ds, min - f.offset as f32 * ds, f.signed)
}

/// As `super::expand_portable` (fused multiply-adds: each value within an ulp).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn expand(q: Block, row: &Row, out: &mut [f32]) {
    let unit = q.unit();
    for (j, (o, u)) in out
        .chunks_exact_mut(unit)
        .zip(row.u.chunks_exact(unit))
        .enumerate()
    {
        let (s, c, signed) = affine(q, row, j);
        let (s, c) = (_mm256_set1_ps(s), _mm256_set1_ps(c));
        for (o, u) in o.chunks_exact_mut(8).zip(u.chunks_exact(8)) {
            // SAFETY: `u` holds 8 bytes and `o` 8 floats.
            unsafe {
                let b = _mm_loadl_epi64(u.as_ptr().cast());
                let v = if signed {
                    _mm256_cvtepi8_epi32(b)
                } else {
                    _mm256_cvtepu8_epi32(b)
                };
                let w = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(v), c);
                _mm256_storeu_ps(o.as_mut_ptr(), w);
            }
        }
    }
}

/// As [`expand`], 16 values at a time.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) fn expand_avx512(q: Block, row: &Row, out: &mut [f32]) {
    let unit = q.unit();
    for (j, (o, u)) in out
        .chunks_exact_mut(unit)
        .zip(row.u.chunks_exact(unit))
        .enumerate()
    {
        let (s, c, signed) = affine(q, row, j);
        let (s, c) = (_mm512_set1_ps(s), _mm512_set1_ps(c));
        for (o, u) in o.chunks_exact_mut(16).zip(u.chunks_exact(16)) {
            // SAFETY: `u` holds 16 bytes and `o` 16 floats.
            unsafe {
                let b = _mm_loadu_si128(u.as_ptr().cast());
                let v = if signed {
                    _mm512_cvtepi8_epi32(b)
                } else {
                    _mm512_cvtepu8_epi32(b)
                };
                let w = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(v), c);
                _mm512_storeu_ps(o.as_mut_ptr(), w);
            }
        }
    }
}

/// An 8 × 8 transpose of 4-byte words: output `c` holds word `c` of every input.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose8(r: [__m256i; GROUP]) -> [__m256i; GROUP] {
    let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
    let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
    let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
    let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
    let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    let s = [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
        _mm256_unpacklo_epi64(t4, t6),
        _mm256_unpackhi_epi64(t4, t6),
        _mm256_unpacklo_epi64(t5, t7),
        _mm256_unpackhi_epi64(t5, t7),
    ];
    std::array::from_fn(|c| {
        if c < 4 {
            _mm256_permute2x128_si256::<0x20>(s[c], s[c + 4])
        } else {
            _mm256_permute2x128_si256::<0x31>(s[c - 4], s[c])
        }
    })
}

/// Unpacks the weight rows `w` (1 to [`GROUP`] rows of `k` values) into `g`: per
/// 32 values, the eight rows' columns are unpacked in registers, transposed and stored
/// interleaved; `xor` flips the top bit of every byte (Q8_0 for VNNI: signed bytes
/// become `w + 128`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn fill_group(q: Block, w: &[u8], k: usize, g: &mut Group, xor: bool) {
    with_block!(q, B => fill_with(q, w, k, g, xor, |b, s| column(Block::from_index(B), b, s)))
}

/// `fill_group` with `column` (`column(q, ..)` for a fixed `q`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn fill_with<F: Fn(&[u8], usize) -> __m256i>(
    q: Block,
    w: &[u8],
    k: usize,
    g: &mut Group,
    xor: bool,
    column: F,
) {
    let rb = row_bytes_q(q, k);
    let lanes = w.len() / rb;
    assert!((1..=GROUP).contains(&lanes) && g.u.len() == GROUP * k);
    let (subs, upb, bb) = (q.values() / 32, q.values() / q.unit(), q.bytes());
    let flip = _mm256_set1_epi8(if xor { -128 } else { 0 });
    // One block's scales per row (at most 16 units, 8 sub-blocks).
    let (mut ds, mut dm) = ([0.0f32; 16], [0.0f32; GROUP]);
    for b in 0..k / q.values() {
        for t in 0..GROUP {
            if t < lanes {
                block_scales(q, &w[t * rb + b * bb..][..bb], &mut ds, &mut dm);
            } else {
                ds.fill(0.0);
                dm.fill(0.0);
            }
            for (u, &v) in ds[..upb].iter().enumerate() {
                g.d[GROUP * (b * upb + u) + t] = v;
            }
            for (sub, &v) in dm[..subs].iter().enumerate() {
                g.m[GROUP * (b * subs + sub) + t] = v;
            }
        }
        for sub in 0..subs {
            let v = std::array::from_fn(|t| {
                if t < lanes {
                    column(&w[t * rb + b * bb..][..bb], sub)
                } else {
                    _mm256_setzero_si256()
                }
            });
            let o = &mut g.u[256 * (b * subs + sub)..][..256];
            for (c, v) in transpose8(v).into_iter().enumerate() {
                // SAFETY: `o` holds 256 bytes.
                unsafe {
                    _mm256_storeu_si256(
                        o.as_mut_ptr().add(32 * c).cast(),
                        _mm256_xor_si256(v, flip),
                    )
                };
            }
        }
    }
}

/// Stores the first `lanes` floats of `v` at `o`.
///
/// # Safety
/// `o` has `lanes ≤ 8` writable floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store8(v: __m256, o: *mut f32, lanes: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        if lanes == GROUP {
            _mm256_storeu_ps(o, v);
        } else {
            let mut t = [0.0f32; GROUP];
            _mm256_storeu_ps(t.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(t.as_ptr(), o, lanes);
        }
    }
}

/// A group of interleaved weight rows, as [`Group`] holds them or as interleaved
/// weights store them ([`Inter`]): unit `j`'s chunks at `u + ustride · j`, its
/// eight scales at `d + dstride · j` and minimums at `m + dstride · j`.
#[derive(Clone, Copy)]
pub(super) struct GroupRef {
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
    fn in_pass(self, p: usize, passes: usize) -> GroupRef {
        GroupRef {
            pass: (p, passes),
            ..self
        }
    }

    fn of(q: Block, g: &Group) -> GroupRef {
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
    fn view(self, g: *const u8) -> GroupRef {
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
        unsafe fn $dot32<const R: usize, const B: u8, const PACKED: bool, const FLIP: bool>(
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
                    for (c, wv) in wvs.into_iter().enumerate() {
                        let wa = if f.signed && !$vnni {
                            _mm256_abs_epi8(wv)
                        } else {
                            wv
                        };
                        for (r, ai) in ai.iter_mut().enumerate() {
                            let xv = xb.add(32 * r + 4 * c).cast::<i32>().read_unaligned();
                            *ai = chunk(*ai, wv, wa, _mm256_set1_epi32(xv), f.signed);
                        }
                    }
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
        unsafe fn $dotk<const R: usize, const B: u8, const PACKED: bool>(
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
                                shl(_mm256_set1_epi32(*xc0.add(R * unit + r)), 5)
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
                        for (cc, &wv) in wvs.iter().enumerate().take(chunks) {
                            for (r, ai) in ai.iter_mut().enumerate() {
                                let xv = xb.add(32 * r + 4 * cc).cast::<i32>().read_unaligned();
                                *ai = chunk(*ai, wv, wv, _mm256_set1_epi32(xv), false);
                            }
                        }
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

// Without VNNI, pairs of products are summed in i16 by `maddubs`: weights below 64
// keep a pair sum within 2 · 63 · 127 < 2^15, and signed ones (Q8_0) are multiplied
// as |w| · (x · sign w), at most 2 · 128 · 127 < 2^15.
group_dots!(
    dot32_avx2,
    dotk_avx2,
    "avx2,fma,f16c",
    false,
    |acc: __m256i, w: __m256i, wa: __m256i, x: __m256i, signed: bool| {
        let p = if signed {
            _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w))
        } else {
            _mm256_maddubs_epi16(w, x)
        };
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
);
group_dots!(
    dot32_vnni,
    dotk_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true,
    |acc: __m256i, w: __m256i, _wa: __m256i, x: __m256i, _signed: bool| {
        _mm256_dpbusd_epi32(acc, w, x)
    }
);

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
        unsafe fn $dot32<const R: usize, const B: u8>(
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
        unsafe fn $dotk<const R: usize, const B: u8>(
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
    |acc: __m256i, w: __m256i, wa: __m256i, x: __m256i, signed: bool| {
        let p = if signed {
            _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w))
        } else {
            _mm256_maddubs_epi16(w, x)
        };
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    },
    |acc: __m256i, p: __m256i, s: __m256i| _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
);
fused_dots!(
    fused32_vnni,
    fusedk_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    true,
    |acc: __m256i, w: __m256i, _wa: __m256i, x: __m256i, _signed: bool| {
        _mm256_dpbusd_epi32(acc, w, x)
    },
    |acc: __m256i, p: __m256i, s: __m256i| _mm256_dpwssd_epi32(acc, p, s)
);

/// Calls `$f::<R, ...>` with `R = $rows` (1 to 4).
macro_rules! by_rows {
    ($rows:expr, $f:ident, [$($c:tt),*], $args:tt) => {
        match $rows {
            1 => $f::<1 $(, $c)*> $args,
            2 => $f::<2 $(, $c)*> $args,
            3 => $f::<3 $(, $c)*> $args,
            _ => $f::<4 $(, $c)*> $args,
        }
    };
}

/// As `by_rows!`, with `R = 8` as well (for [`WIDE_ROWS`]).
macro_rules! by_rows_wide {
    ($rows:expr, $f:ident, [$($c:tt),*], $args:tt) => {
        match $rows {
            8 => $f::<8 $(, $c)*> $args,
            r => by_rows!(r, $f, [$($c),*], $args),
        }
    };
}

/// The kernel of format `$q` for `$rows` rows: `$dotk::<R, B, ..>` for a k-quant, else
/// `$dot32::<R, B, .., $c32>`, with `$by` spreading the rows over `R`.
macro_rules! by_format {
    ($by:ident, $rows:expr, $q:expr, $dot32:ident, $dotk:ident, [$($c:tt),*], [$($c32:tt),*], $args:tt) => {
        with_block!($q, B => {
            if const { Block::from_index(B).is_k() } {
                $by!($rows, $dotk, [B $(, $c)*], $args)
            } else {
                $by!($rows, $dot32, [B $(, $c)* $(, $c32)*], $args)
            }
        })
    };
}

/// Defines a task of integer dot products over groups of weight rows.
macro_rules! int8_task {
    ($name:ident, $inter:ident, $isa:expr, $vnni:literal, $features:literal, $dot32:ident, $dotk:ident, $fused32:ident, $fusedk:ident) => {
        /// `super::int8_task` on this instruction set.
        ///
        /// # Safety
        /// As `super::int8_task`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $name(task: &Task, xq: &Xq, w: &[u8]) {
            let Task {
                q,
                m,
                k,
                j0,
                n,
                out,
            } = *task;
            let rb = row_bytes_q(q, k);
            if !super::xq::group_kernels($isa, m) {
                let o = out.0;
                let mut r0 = 0;
                while r0 < m {
                    let rr = (m - r0).min(super::xq::ROWS);
                    // SAFETY: rows r0..r0 + rr ≤ m of xq and out; columns j0.. of this task's
                    // rows are the caller's.
                    unsafe {
                        by_format!(
                            by_rows,
                            rr,
                            q,
                            $fused32,
                            $fusedk,
                            [],
                            [],
                            (xq, r0, k, w, j0, n, o)
                        )
                    }
                    r0 += rr;
                }
                return;
            }
            let mut g = Group::new(q, k);
            let xor = $isa == Isa::Avx512 && q == Block::Q8_0;
            for (gi, rows) in w.chunks(GROUP * rb).enumerate() {
                fill_group(q, rows, k, &mut g, xor);
                // The next group's bytes stream in while this one is multiplied (the
                // hardware prefetcher alone leaves the unpacking waiting on memory).
                let next = &w[((gi + 1) * GROUP * rb).min(w.len())..];
                for line in next[..next.len().min(GROUP * rb)].chunks(64) {
                    _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
                }
                let (j, lanes) = (j0 + GROUP * gi, rows.len() / rb);
                group_rows!(
                    $isa,
                    $dot32,
                    $dotk,
                    false,
                    false,
                    q,
                    GroupRef::of(q, &g),
                    xq,
                    m,
                    k,
                    out.0,
                    n,
                    j,
                    lanes
                );
            }
        }

        /// `super::int8_task` on interleaved weights `w` (whole groups of
        /// `lay`) for columns `j0..j1`.
        ///
        /// # Safety
        /// As `super::int8_task`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn $inter(task: &Task, lay: Inter, xq: &Xq, w: &[u8], j1: usize) {
            let Task {
                q,
                m,
                k,
                j0,
                n,
                out,
            } = *task;
            let gb = lay.bytes();
            for (gi, g) in w.chunks_exact(gb).enumerate() {
                let j = j0 + GROUP * gi;
                let lanes = (j1 - j).min(GROUP);
                let view = lay.view(g.as_ptr());
                group_rows!(
                    $isa, $dot32, $dotk, true, $vnni, q, view, xq, m, k, out.0, n, j, lanes
                );
            }
        }
    };
}

/// Every pass of activation rows over one group `$g`: `$p` (interleaved weights)
/// reads values packed ([`Pack`]), `$f` flips Q8_0's bytes for VNNI.
macro_rules! group_rows {
    ($isa:expr, $dot32:ident, $dotk:ident, $p:literal, $f:literal, $q:expr, $g:expr, $xq:expr, $m:expr, $k:expr, $o:expr, $n:expr, $j:expr, $lanes:expr) => {{
        let (g, xq, m, k, o, n, j, lanes) = ($g, $xq, $m, $k, $o, $n, $j, $lanes);
        assert!(
            xq.by_pass.isa == Some($isa),
            "activations laid out for the passes of another instruction set"
        );
        let passes = super::xq::passes($isa, m);
        let (mut r0, mut pass) = (0, 0);
        while r0 < m {
            let rr = super::xq::pass_rows($isa, m - r0);
            let g = g.in_pass(pass, passes);
            pass += 1;
            // SAFETY: rows r0..r0 + rr < m of xq and out; columns j..j + lanes are
            // the task's (the caller's contract).
            unsafe {
                by_format!(
                    by_rows_wide,
                    rr,
                    $q,
                    $dot32,
                    $dotk,
                    [$p],
                    [$f],
                    (g, xq, r0, k, o, n, j, lanes)
                )
            }
            r0 += rr;
        }
    }};
}

int8_task!(
    int8_avx2,
    inter_avx2,
    Isa::Avx2,
    false,
    "avx2,fma,f16c",
    dot32_avx2,
    dotk_avx2,
    fused32_avx2,
    fusedk_avx2
);
int8_task!(
    int8_avx512,
    inter_avx512,
    Isa::Avx512,
    true,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    dot32_vnni,
    dotk_vnni,
    fused32_vnni,
    fusedk_vnni
);

/// `super::tile_product` with AVX-512: four weight rows × two activation rows per pass.
///
/// # Safety
/// As `super::tile_product`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile_avx512(
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
        pub(super) unsafe fn $name(
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
