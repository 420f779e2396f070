//! Elementwise activations on host slices, written so that their loops vectorise (libm's
//! `expf`, which Flex's activations call per element, does not).

use std::ops::Range;

use rayon::prelude::*;

use super::pool;
use crate::exec::kernels::{GELU_CUBIC, GELU_SCALE};

/// Values per parallel task at least: below this a call runs on the calling thread (a
/// decode step's rows are too small to pay for a hand-off).
const PAR_VALUES: usize = 32 * 1024;

/// `f(x_part, out_part)` over parts of whole `unit`-value rows, in parallel when the
/// input is long (a prefill's activations); every value's result is the same either way.
fn by_parts(x: &[f32], out: &mut [f32], unit: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    let unit = unit.max(1);
    let part = PAR_VALUES.div_ceil(unit) * unit;
    if x.len() < 2 * part {
        f(x, out);
    } else {
        out.par_chunks_mut(part)
            .zip(x.par_chunks(part))
            .for_each(|(o, x)| f(x, o));
    }
}

/// `f(x_part, out_part)` over the element ranges `runs` of `x` (each a whole number of
/// `unit`-value rows), in parallel parts as [`by_parts`], into an output buffer
/// ([`pool::floats`]) whose other values stay as it held them.
fn over_runs(
    x: &[f32],
    runs: &[Range<usize>],
    unit: usize,
    f: impl Fn(&[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    let mut out = pool::floats(x.len());
    for r in runs {
        by_parts(&x[r.clone()], &mut out[r.clone()], unit, &f);
    }
    out
}

/// The one run covering all of a value of `n` elements.
pub fn whole(n: usize) -> Vec<Range<usize>> {
    std::iter::once(0..n).collect()
}

/// `eˣ` in f32 for any `x` (underflows to 0 below −87.3, overflows to ∞ above 88.7),
/// within 2 ulp: `2ⁿ · p(r)` with `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, degree-6 Taylor.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 · 2²³: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln 2 split in two so that n·ln 2 is exact in the first part.
    let r = (xc - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else {
        p * scale
    }
}

/// `x · σ(x) = x / (1 + e⁻ˣ)` elementwise over the element ranges `runs` (elsewhere: what
/// the buffer held).
pub fn silu(x: &[f32], runs: &[Range<usize>]) -> Vec<f32> {
    // SAFETY: no contract beyond the slices' own.
    over_runs(x, runs, 1, |x, o| unsafe { silu_into(x, o) })
}

multiversion! {
    /// # Safety
    /// None beyond the slices' own (required by the macro's form).
    unsafe fn silu_into(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = silu1(v);
        }
    }
}

/// `v · σ(v)` of one value (the loops above and below inline it).
#[inline(always)]
fn silu1(v: f32) -> f32 {
    v / (1.0 + exp(-v))
}

/// [`silu`] in place over the element ranges `runs` of `x` (the rest left as it is).
pub fn silu_in_place(x: &mut [f32], runs: &[Range<usize>]) {
    in_place_over_runs(x, runs, silu_self)
}

multiversion! {
    /// # Safety
    /// None beyond the slice's own (required by the macro's form).
    unsafe fn silu_self(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = silu1(*v);
        }
    }
}

/// [`gelu`] in place over the element ranges `runs` of `x` (the rest left as it is).
pub fn gelu_in_place(x: &mut [f32], runs: &[Range<usize>]) {
    in_place_over_runs(x, runs, gelu_self)
}

multiversion! {
    /// # Safety
    /// None beyond the slice's own (required by the macro's form).
    unsafe fn gelu_self(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = gelu1(*v);
        }
    }
}

/// `a = a op b` elementwise over the element ranges `runs` (the rest left as it is).
pub fn binary_in_place(a: &mut [f32], b: &[f32], op: fn(f32, f32) -> f32, runs: &[Range<usize>]) {
    let part = |a: &mut [f32], b: &[f32]| {
        for (x, &y) in a.iter_mut().zip(b) {
            *x = op(*x, y);
        }
    };
    for r in runs {
        let (a, b) = (&mut a[r.clone()], &b[r.clone()]);
        if a.len() < 2 * PAR_VALUES {
            part(a, b);
        } else {
            a.par_chunks_mut(PAR_VALUES)
                .zip(b.par_chunks(PAR_VALUES))
                .for_each(|(a, b)| part(a, b));
        }
    }
}

/// [`over_runs`] for an in-place kernel `f` (one with no contract beyond its slice's):
/// the values outside `runs` are left as they are.
fn in_place_over_runs(x: &mut [f32], runs: &[Range<usize>], f: unsafe fn(&mut [f32])) {
    for r in runs {
        // SAFETY: `f` has no contract beyond the slice's own.
        in_parts(&mut x[r.clone()], |x| unsafe { f(x) });
    }
}

/// `f` over parts of `x`, in parallel when `x` is long.
fn in_parts(x: &mut [f32], f: impl Fn(&mut [f32]) + Sync) {
    if x.len() < 2 * PAR_VALUES {
        f(x);
    } else {
        x.par_chunks_mut(PAR_VALUES).for_each(&f);
    }
}

/// GELU, tanh approximation, elementwise: `x/2 · (1 + tanh(u))` with
/// `u = √(2/π) · (x + 0.044715·x³)` and `tanh(u) = 1 − 2 / (1 + e²ᵘ)`, over the element
/// ranges `runs` (elsewhere: what the buffer held).
pub fn gelu(x: &[f32], runs: &[Range<usize>]) -> Vec<f32> {
    // SAFETY: no contract beyond the slices' own.
    over_runs(x, runs, 1, |x, o| unsafe { gelu_into(x, o) })
}

multiversion! {
    /// # Safety
    /// None beyond the slices' own (required by the macro's form).
    unsafe fn gelu_into(x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = gelu1(v);
        }
    }
}

/// GELU (tanh approximation) of one value (the loops above inline it).
#[inline(always)]
fn gelu1(v: f32) -> f32 {
    let u = GELU_SCALE * (v + GELU_CUBIC * v * v * v);
    let tanh = 1.0 - 2.0 / (1.0 + exp(2.0 * u));
    0.5 * v * (1.0 + tanh)
}

/// `x / √(mean(x²) + eps) · w` over rows of `w.len()` values, in the element ranges
/// `runs` (whole rows; elsewhere: what the buffer held).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, runs: &[Range<usize>]) -> Vec<f32> {
    let h = w.len();
    over_runs(x, runs, h, |x, out| {
        for (o, x) in out.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
            let ms = x.iter().map(|v| (v * v) as f64).sum::<f64>() / h as f64;
            let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = x * inv * w;
            }
        }
    })
}

/// `a op b` elementwise over the element ranges `runs` (elsewhere: what the buffer held),
/// `op` one IEEE operation.
pub fn binary(a: &[f32], b: &[f32], op: fn(f32, f32) -> f32, runs: &[Range<usize>]) -> Vec<f32> {
    let mut out = copy_runs(a, runs);
    binary_in_place(&mut out, b, op, runs);
    out
}

/// `x` on the element ranges `runs` of an output buffer ([`pool::floats`]; elsewhere as it
/// held them): the buffer a kernel then works on in place.
fn copy_runs(x: &[f32], runs: &[Range<usize>]) -> Vec<f32> {
    let mut out = pool::floats(x.len());
    for r in runs {
        out[r.clone()].copy_from_slice(&x[r.clone()]);
    }
    out
}

/// Half-split rotary embedding of x `[B·T, N, D]` at positions `pos` `[B·T]` (clamped to
/// the tables), with `cos`, `sin` `[P, D/2]`, over the `[N, D]` rows `rows` (elsewhere:
/// what the buffer held).
pub fn rope(
    x: &[f32],
    pos: &[i32],
    (n, d): (usize, usize),
    tables: (&[f32], &[f32]),
    rows: &[Range<usize>],
) -> Vec<f32> {
    let nd = n * d;
    let runs: Vec<Range<usize>> = rows.iter().map(|r| r.start * nd..r.end * nd).collect();
    let mut out = copy_runs(x, &runs);
    rope_in_place(&mut out, pos, (n, d), tables, rows);
    out
}

/// x `dims` (contiguous) with its axes permuted (`axes[i]` is the input axis of output
/// axis `i`), written only for the output's last-axis rows `rows` (elsewhere: what the
/// buffer held).
pub fn permute(x: &[f32], dims: [usize; 4], axes: [usize; 4], rows: &[Range<usize>]) -> Vec<f32> {
    let stride = [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1];
    let od = axes.map(|a| dims[a]);
    let st = axes.map(|a| stride[a]);
    let mut out = pool::floats(x.len());
    let n = od[3];
    for r in rows.iter().flat_map(|r| r.clone()) {
        let (i2, i1, i0) = (r % od[2], r / od[2] % od[1], r / (od[2] * od[1]));
        let at = i0 * st[0] + i1 * st[1] + i2 * st[2];
        let o = &mut out[r * n..(r + 1) * n];
        if st[3] == 1 {
            o.copy_from_slice(&x[at..at + n]);
        } else {
            for (j, o) in o.iter_mut().enumerate() {
                *o = x[at + j * st[3]];
            }
        }
    }
    out
}

/// [`rope`] in place over the `[N, D]` rows `rows` of x (the rest left as it is).
pub fn rope_in_place(
    x: &mut [f32],
    pos: &[i32],
    (n, d): (usize, usize),
    (cos, sin): (&[f32], &[f32]),
    rows: &[Range<usize>],
) {
    let half = d / 2;
    let last = (cos.len() / half.max(1)).saturating_sub(1);
    for i in rows.iter().flat_map(|r| r.clone()) {
        let p = (pos[i].max(0) as usize).min(last);
        let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
        for head in x[i * n * d..(i + 1) * n * d].chunks_exact_mut(d) {
            let (x1, x2) = head.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (x1[j], x2[j]);
                x1[j] = a * c[j] - b * s[j];
                x2[j] = b * c[j] + a * s[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_matches_its_definition() {
        for i in -400..=400 {
            let x = i as f32 * 0.05;
            let xd = x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (xd + 0.044715 * xd.powi(3));
            let want = 0.5 * xd * (1.0 + u.tanh());
            let got = gelu(&[x], &whole(1))[0] as f64;
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "gelu({x}) = {got}, want {want}"
            );
        }
        assert_eq!(gelu(&[1.0e30], &whole(1))[0], 1.0e30);
        assert_eq!(gelu(&[-1.0e30], &whole(1))[0], 0.0);
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_f64() {
        let mut worst = 0.0f64;
        for i in 0..=400_000 {
            let x = -87.0 + (i as f32) * (175.0 / 400_000.0);
            let want = (x as f64).exp();
            worst = worst.max((exp(x) as f64 - want).abs() / want);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn silu_matches_its_definition() {
        for &x in &[-100.0f32, -20.0, -1.5, -1e-3, 0.0, 0.7, 3.0, 50.0, 100.0] {
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            let got = silu(&[x], &whole(1))[0] as f64;
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1e-30),
                "silu({x}) = {got}, want {want}"
            );
        }
    }
}
