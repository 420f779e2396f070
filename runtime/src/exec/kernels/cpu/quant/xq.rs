//! Activations quantized to int8 per block of 32 values, and their layout for the group
//! kernels.

use rayon::prelude::*;

use super::Isa;

/// Activation rows quantized per block of 32 values to int8: `x[r, i] ≈ d[r, b] · q[r, i]`
/// with `d = max |x| / 127` over the block. One scale per 32 values for the k-quants as
/// well (llama.cpp's Q8_K takes one per 256): their sub-blocks have f32 scales anyway, and
/// the finer rounding keeps the logits of Qwen's and Gemma's Q4_K_M files closer to f32
/// than llama.cpp's own run (tests/real_models.rs).
pub(super) struct Xq {
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    /// Per 32 values: `d · Σ q` (the sum of the rounded values, for minimums).
    pub(super) s: Vec<f32>,
    /// Per 32 values: `Σ q` (offset corrections).
    pub(super) s32: Vec<i32>,
    /// Per 16 values: `Σ q` (k-quant minimum and offset corrections; at most 16 · 127).
    pub(super) bs: Vec<i16>,
    /// The same values for the group kernels, by pass ([`Passes`]); empty where no group
    /// kernel runs.
    pub(super) by_pass: Passes,
}

/// [`Xq`] reordered for the group kernels, which multiply a pass of `rr` activation rows
/// (rows `r0..r0 + rr`, [`pass_rows`]) with each group of weight rows. A pass's values sit
/// at its rows' own offsets (`r0 · k` bytes, `r0 · k / 32` per-32 values, `r0 · k / 16`
/// per-16 values), block-major inside: `q` holds block `b` of row `r0 + r` at `(b · rr + r)
/// · 32`, the per-32 values of `(r, b)` are at `b · rr + r` and the per-16 ones of `(r, u)`
/// at `u · rr + r`. One pointer then reaches every row of a block at constant offsets,
/// where eight row pointers left the eight-row kernels short of registers.
#[derive(Default)]
pub(super) struct Passes {
    /// The instruction set whose passes ([`pass_rows`]) the layout follows.
    pub(super) isa: Option<Isa>,
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    /// `−Σ q` per 32 values (the kernels shift it into their offset corrections).
    pub(super) ns32: Vec<i32>,
    /// `−Σ q` per 16 values.
    pub(super) nbs: Vec<i32>,
}

/// Activation rows in the group kernels' pass that starts with `left` rows to go: eight
/// with AVX-512's 32 vector registers, else up to four.
pub(super) fn pass_rows(isa: Isa, left: usize) -> usize {
    if isa == Isa::Avx512 && left >= WIDE_ROWS {
        WIDE_ROWS
    } else {
        left.min(ROWS)
    }
}

/// How many passes of [`pass_rows`] cover `m` activation rows.
pub(super) fn passes(isa: Isa, m: usize) -> usize {
    let (mut r0, mut n) = (0, 0);
    while r0 < m {
        r0 += pass_rows(isa, m - r0);
        n += 1;
    }
    n
}

/// Activation rows per pass over a group.
pub(super) const ROWS: usize = 4;

/// Activation rows per pass over a group with AVX-512's 32 vector registers: eight
/// independent accumulators hide the latency of `vpdpbusd` (four chains leave half its
/// throughput unused).
pub(super) const WIDE_ROWS: usize = 8;

/// Activation rows up to which the fused kernels run (AVX2, AVX-512): they unpack each
/// block in registers and multiply it at once, skipping the group interleaving, which
/// pays off only over more rows. Above it the group kernels run, on [`Passes`].
pub(super) const FUSED_ROWS: usize = 4;

/// Whether the int8 products of `m` rows on the file's blocks run the group kernels
/// (which read [`Passes`]) rather than the fused ones or the portable code.
pub(super) fn group_kernels(isa: Isa, m: usize) -> bool {
    matches!(isa, Isa::Avx2 | Isa::Avx512) && m > FUSED_ROWS
}

impl Xq {
    /// Fills [`Xq::by_pass`] for `m` rows of `k` values on `isa`.
    pub(super) fn fill_passes(&mut self, isa: Isa, m: usize, k: usize) {
        let (nb, nu) = (k / 32, k / 16);
        let mut p = Passes {
            isa: Some(isa),
            q: vec![0; m * k],
            d: vec![0.0; m * nb],
            s: vec![0.0; m * nb],
            ns32: vec![0; m * nb],
            nbs: vec![0; m * nu],
        };
        let mut r0 = 0;
        while r0 < m {
            let rr = pass_rows(isa, m - r0);
            for r in 0..rr {
                let row = r0 + r;
                for b in 0..nb {
                    let at = r0 * k + (b * rr + r) * 32;
                    p.q[at..at + 32].copy_from_slice(&self.q[row * k + 32 * b..][..32]);
                    let (from, to) = (row * nb + b, r0 * nb + b * rr + r);
                    p.d[to] = self.d[from];
                    p.s[to] = self.s[from];
                    p.ns32[to] = -self.s32[from];
                }
                for u in 0..nu {
                    p.nbs[r0 * nu + u * rr + r] = -i32::from(self.bs[row * nu + u]);
                }
            }
            r0 += rr;
        }
        self.by_pass = p;
    }
}

/// Quantizes `x` `[m, k]` in blocks of 32 values. Every instruction set runs the same
/// operations, so all produce the same `Xq`.
pub(super) fn quantize(isa: Isa, x: &[f32], m: usize, k: usize) -> Xq {
    let mut xq = Xq {
        q: vec![0; m * k],
        d: vec![0.0; m * k / 32],
        s: vec![0.0; m * k / 32],
        s32: vec![0; m * k / 32],
        bs: vec![0; m * k / 16],
        by_pass: Passes::default(),
    };
    let run = |x: &[f32], xq: XqPart| match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: AVX2 and FMA are available (checked by the caller).
            unsafe { super::x86::quantize_avx2(x, xq) }
        }
        _ => quantize_body(x, xq),
    };
    // Rows per parallel part: a prefill's activations are quantized on every core.
    let rows = QUANTIZE_VALUES.div_ceil(k.max(1));
    let whole = XqPart {
        q: &mut xq.q,
        d: &mut xq.d,
        s: &mut xq.s,
        s32: &mut xq.s32,
        bs: &mut xq.bs,
    };
    if m < 2 * rows {
        run(x, whole);
    } else {
        let (n, n32, n16) = (rows * k, rows * k / 32, rows * k / 16);
        x.par_chunks(n)
            .zip(whole.q.par_chunks_mut(n))
            .zip(whole.d.par_chunks_mut(n32))
            .zip(whole.s.par_chunks_mut(n32))
            .zip(whole.s32.par_chunks_mut(n32))
            .zip(whole.bs.par_chunks_mut(n16))
            .for_each(|(((((x, q), d), s), s32), bs)| run(x, XqPart { q, d, s, s32, bs }));
    }
    xq
}

/// Values quantized per parallel part of [`quantize`] at least.
pub(super) const QUANTIZE_VALUES: usize = 64 * 1024;

/// Whole rows of an [`Xq`], being written.
pub(super) struct XqPart<'a> {
    pub(super) q: &'a mut [i8],
    pub(super) d: &'a mut [f32],
    pub(super) s: &'a mut [f32],
    pub(super) s32: &'a mut [i32],
    pub(super) bs: &'a mut [i16],
}

#[inline(always)]
pub(super) fn quantize_body(x: &[f32], xq: XqPart) {
    // Rounds to nearest, ties to even, for |v| < 2^22.
    const ROUND: f32 = 12_582_912.0;
    for ((xb, qo), d) in x
        .chunks_exact(32)
        .zip(xq.q.chunks_exact_mut(32))
        .zip(xq.d.iter_mut())
    {
        let amax = xb
            .iter()
            .fold(0u32, |a, v| a.max(v.to_bits() & 0x7fff_ffff));
        let amax = f32::from_bits(amax);
        *d = amax / 127.0;
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (o, &v) in qo.iter_mut().zip(xb) {
            *o = ((v * id + ROUND) - ROUND) as i8;
        }
    }
    let sum = |c: &[i8]| c.iter().map(|&v| i32::from(v)).sum::<i32>();
    for (s, c) in xq.s32.iter_mut().zip(xq.q.chunks_exact(32)) {
        *s = sum(c);
    }
    for (bs, c) in xq.bs.iter_mut().zip(xq.q.chunks_exact(16)) {
        *bs = sum(c) as i16;
    }
    for ((s, &c), &d) in xq.s.iter_mut().zip(xq.s32.iter()).zip(xq.d.iter()) {
        *s = d * c as f32;
    }
}
