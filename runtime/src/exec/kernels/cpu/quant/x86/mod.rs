//! The AVX2 and AVX-512 kernels. Functions named `*_avx512` need the AVX-512 set of
//! [`Isa::Avx512`](super::Isa::Avx512); all others need AVX2, FMA and F16C.

/// The chunk product of the AVX2 group and fused kernels, `(acc, w, |w|, x, signed)` →
/// `acc` plus the products of four weight bytes per i32 lane with four activation bytes.
/// Without VNNI, pairs of products are summed in i16 by `maddubs`: weights below 64 keep a
/// pair sum within 2 · 63 · 127 < 2^15, and signed ones (Q8_0) are multiplied as
/// |w| · (x · sign w), at most 2 · 128 · 127 < 2^15.
macro_rules! chunk_avx2 {
    () => {
        |acc: __m256i, w: __m256i, wa: __m256i, x: __m256i, signed: bool| {
            let p = if signed {
                _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w))
            } else {
                _mm256_maddubs_epi16(w, x)
            };
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        }
    };
}

/// [`chunk_avx2!`] with VNNI: `vpdpbusd` (weights unsigned; Q8_0's carry +128).
macro_rules! chunk_vnni {
    () => {
        |acc: __m256i, w: __m256i, _wa: __m256i, x: __m256i, _signed: bool| {
            _mm256_dpbusd_epi32(acc, w, x)
        }
    };
}

mod fused;
mod group;
mod panel;
mod tasks;

use std::arch::x86_64::*;

use kvc_compiler::blocks::{Block, k_scale_mins};

use super::xq::{XqPart, quantize_body};
use super::{GROUP, Group, Row, row_bytes_q};

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
                dm[0] = if q.format().mins {
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

pub(super) use panel::{panel_avx2, panel_avx512, tile_avx512};
pub(super) use tasks::{int8_avx2, int8_avx512, inter_avx2, inter_avx512};
