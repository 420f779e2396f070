//! The attention kernels' unit tests: every form against a float64 reference, on every instruction set this CPU has.

use super::rows::f16_to_f32;
use super::*;
use crate::exec::kernels::cpu::test_values as values;

/// Float64 attention straight from the definition, per query head and position.
fn reference(q: &[f32], k: &[f32], v: &[f32], mask: &[u8], x: Dims) -> (Vec<f64>, Vec<f64>) {
    let g = x.hq / x.hkv;
    let mut out = vec![0.0; q.len()];
    let mut probs = vec![0.0; x.b * x.hkv * g * x.t * x.s];
    for bi in 0..x.b {
        for qh in 0..x.hq {
            let kvh = qh / g;
            let mh = if x.m == 1 { 0 } else { kvh };
            for ti in 0..x.t {
                let qr = &q[((bi * x.hq + qh) * x.t + ti) * x.d..][..x.d];
                let vis = |j: usize| mask[((bi * x.m + mh) * x.t + ti) * x.s + j] != 0;
                let sc: Vec<f64> = (0..x.s)
                    .map(|j| {
                        let kj = &k[((bi * x.hkv + kvh) * x.s + j) * x.d..][..x.d];
                        x.scale as f64
                            * qr.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                    })
                    .collect();
                let mx = (0..x.s)
                    .filter(|&j| vis(j))
                    .map(|j| sc[j])
                    .fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = (0..x.s)
                    .map(|j| if vis(j) { (sc[j] - mx).exp() } else { 0.0 })
                    .collect();
                let total: f64 = e.iter().sum();
                let row = (qh % g) * x.t + ti;
                for j in 0..x.s {
                    let p = if total > 0.0 { e[j] / total } else { 0.0 };
                    probs[((bi * x.hkv + kvh) * g * x.t + row) * x.s + j] = p;
                    let vj = &v[((bi * x.hkv + kvh) * x.s + j) * x.d..][..x.d];
                    for c in 0..x.d {
                        out[((bi * x.hq + qh) * x.t + ti) * x.d + c] += p * vj[c] as f64;
                    }
                }
            }
        }
    }
    (out, probs)
}

/// Without the fused decode path, and with it on every instruction set this CPU has.
fn isas() -> Vec<Option<fused::Isa>> {
    let mut all = vec![None];
    #[cfg(target_arch = "x86_64")]
    all.extend(
        crate::exec::kernels::cpu::isa::Isa::covered(
            "fused decode attention",
            &[
                crate::exec::kernels::cpu::isa::Isa::Avx2,
                crate::exec::kernels::cpu::isa::Isa::Avx512,
            ],
        )
        .into_iter()
        .map(fused::Isa::of),
    );
    all
}

/// The fused form without and with the fused decode path on every instruction set
/// here: within 1e-5 of the float64 `want`, and the fused path exactly the generic
/// path's bits.
#[allow(clippy::too_many_arguments)]
fn fused_forms_match<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    mask: &[u8],
    x: Dims,
    want: &[f64],
    what: &str,
) {
    let mut out = vec![f32::NAN; q.len()];
    let mut generic: Vec<u32> = vec![];
    for isa in isas() {
        attention_on(isa, q, k, v, mask, x, None, &mut out);
        for (i, (&a, &e)) in out.iter().zip(want).enumerate() {
            assert!(
                (a as f64 - e).abs() < 1e-5,
                "{x:?} {isa:?} {what} out[{i}]: {a} vs {e}"
            );
        }
        let bits: Vec<u32> = out.iter().map(|a| a.to_bits()).collect();
        if isa.is_none() {
            generic = bits;
        } else {
            assert!(
                bits == generic,
                "{x:?} {isa:?} {what}: not the generic path's bits"
            );
        }
    }
}

/// Decode and small-chunk shapes, shared and per-head masks, hidden slots everywhere
/// (including a row that sees nothing), more slots than one block, and head widths
/// that are and are not whole chunks and tiles.
#[test]
fn matches_a_float64_reference() {
    for (x, seed) in [
        (
            Dims {
                scale: 0.3,
                b: 1,
                hq: 9,
                hkv: 3,
                t: 1,
                s: 576,
                d: 64,
                m: 1,
            },
            1,
        ),
        (
            Dims {
                scale: 0.3,
                b: 3,
                hq: 4,
                hkv: 2,
                t: 2,
                s: 70,
                d: 8,
                m: 2,
            },
            2,
        ),
        (
            Dims {
                scale: 0.3,
                b: 2,
                hq: 2,
                hkv: 1,
                t: 3,
                s: 300,
                d: 12,
                m: 1,
            },
            3,
        ),
        // Seven query rows per KV head (fused in passes of 3, 3 and 1 with AVX2, 4
        // and 3 with AVX-512), slots that are not whole groups of four.
        (
            Dims {
                scale: 0.2,
                b: 2,
                hq: 14,
                hkv: 2,
                t: 1,
                s: 131,
                d: 64,
                m: 1,
            },
            5,
        ),
        // Gemma 3 270M's decode shape: heads of 256 (eight tiles), four query rows
        // per KV head (passes of 3 and 1 with AVX2, one pass with AVX-512).
        (
            Dims {
                scale: 0.0625,
                b: 1,
                hq: 4,
                hkv: 1,
                t: 1,
                s: 128,
                d: 256,
                m: 1,
            },
            6,
        ),
        // Two column tiles and a remainder; chunks of slots and a tail.
        (
            Dims {
                scale: 0.1,
                b: 1,
                hq: 4,
                hkv: 1,
                t: 1,
                s: 100,
                d: 136,
                m: 1,
            },
            4,
        ),
    ] {
        let g = x.hq / x.hkv;
        let q = values(x.b * x.hq * x.t * x.d, seed);
        let k = values(x.b * x.hkv * x.s * x.d, seed + 10);
        let v = values(x.b * x.hkv * x.s * x.d, seed + 20);
        let mut mask: Vec<u8> = values(x.b * x.m * x.t * x.s, seed + 30)
            .iter()
            .map(|&u| (u > -0.4) as u8)
            .collect();
        // Row 0's first query sees nothing.
        mask[..x.s].fill(0);
        let (want, want_p) = reference(&q, &k, &v, &mask, x);
        fused_forms_match(&q, &k, &v, &mask, x, &want, "f32");
        // The split form: probabilities alone, then probs · v.
        let mut alone = vec![f32::NAN; x.b * x.hkv * g * x.t * x.s];
        super::probs(&q, &k, &mask, x, None, &mut alone);
        for (i, (&a, &e)) in alone.iter().zip(&want_p).enumerate() {
            assert!((a as f64 - e).abs() < 1e-6, "{x:?} alone[{i}]: {a} vs {e}");
        }
        let mut split = vec![f32::NAN; q.len()];
        super::values(&alone, &v, [x.b, x.hq, x.t, x.s], (x.hkv, None), &mut split);
        for (i, (&a, &e)) in split.iter().zip(&want).enumerate() {
            assert!((a as f64 - e).abs() < 1e-5, "{x:?} split[{i}]: {a} vs {e}");
        }

        // An f16 cache: the reference of its rounded values, in both forms.
        let half =
            |x: &[f32]| -> Vec<half::f16> { x.iter().map(|&a| half::f16::from_f32(a)).collect() };
        let (kh, vh) = (half(&k), half(&v));
        let wide = |x: &[half::f16]| -> Vec<f32> { x.iter().map(|a| a.to_f32()).collect() };
        let (want, want_p) = reference(&q, &wide(&kh), &wide(&vh), &mask, x);
        super::probs(&q, &kh, &mask, x, None, &mut alone);
        super::values(
            &alone,
            &vh,
            [x.b, x.hq, x.t, x.s],
            (x.hkv, None),
            &mut split,
        );
        for (i, (&sp, &e)) in split.iter().zip(&want).enumerate() {
            assert!(
                (sp as f64 - e).abs() < 1e-5,
                "{x:?} f16 split[{i}]: {sp} vs {e}"
            );
        }
        fused_forms_match(&q, &kh, &vh, &mask, x, &want, "f16");
        for (i, (&a, &e)) in alone.iter().zip(&want_p).enumerate() {
            assert!(
                (a as f64 - e).abs() < 1e-6,
                "{x:?} f16 probs[{i}]: {a} vs {e}"
            );
        }
    }
}

/// The chunk (prefill) kernel against the float64 reference, f32 and f16 caches:
/// several position blocks (the last partial, with an odd row count), partial slot
/// tiles, head widths that are and are not whole register tiles, shared and per-head
/// masks, causal masks whose future tiles are skipped, random holes, a query that sees
/// nothing, a whole block of positions that sees nothing, a KV head that sees nothing
/// and a cache of no slots.
#[test]
fn chunk_matches_a_float64_reference() {
    let empty = Dims {
        scale: 1.0,
        b: 1,
        hq: 2,
        hkv: 1,
        t: 20,
        s: 0,
        d: 8,
        m: 1,
    };
    let mut out = vec![f32::NAN; 2 * 20 * 8];
    super::chunk(
        &values(2 * 20 * 8, 9),
        &[0.0f32; 0],
        &[0.0f32; 0],
        &[],
        empty,
        None,
        &mut out,
    );
    assert!(out.iter().all(|&o| o == 0.0), "no slots: {out:?}");
    let dims = |hq, hkv, b, t, s, d, m| Dims {
        scale: 0.25,
        b,
        hq,
        hkv,
        t,
        s,
        d,
        m,
    };
    for (x, causal, seed) in [
        // Gemma 3 270M: four query heads on one KV head of 256.
        (dims(4, 1, 1, 40, 150, 256, 1), true, 1),
        (dims(14, 2, 2, 20, 70, 64, 2), false, 2),
        (dims(3, 1, 1, 17, 200, 12, 1), true, 3),
        (dims(2, 2, 2, 33, 64, 136, 2), false, 4),
    ] {
        let q = values(x.b * x.hq * x.t * x.d, seed);
        let k = values(x.b * x.hkv * x.s * x.d, seed + 10);
        let v = values(x.b * x.hkv * x.s * x.d, seed + 20);
        let holes = values(x.b * x.m * x.t * x.s, seed + 30);
        let mut mask: Vec<u8> = (0..holes.len())
            .map(|i| {
                let (p, j) = (i / x.s % x.t, i % x.s);
                // Causal: the chunk's positions follow s − t earlier slots.
                let seen = if causal { j <= x.s - x.t + p } else { true };
                (seen && holes[i] > -0.6) as u8
            })
            .collect();
        mask[..x.s].fill(0);
        if x.m > 1 {
            // Row 0's second KV head sees nothing at all: no tile of it is widened.
            mask[x.t * x.s..2 * x.t * x.s].fill(0);
        }
        if x.t > 16 {
            // The second block of positions of the last mask row sees nothing.
            let last = (x.b * x.m - 1) * x.t * x.s;
            mask[last + 16 * x.s..last + x.t.min(32) * x.s].fill(0);
        }
        let (want, _) = reference(&q, &k, &v, &mask, x);
        let mut out = vec![f32::NAN; q.len()];
        super::chunk(&q, &k, &v, &mask, x, None, &mut out);
        for (i, (&a, &e)) in out.iter().zip(&want).enumerate() {
            assert!(
                (a as f64 - e).abs() < 1e-5,
                "{x:?} f32 out[{i}]: {a} vs {e}"
            );
        }
        let half =
            |x: &[f32]| -> Vec<half::f16> { x.iter().map(|&a| half::f16::from_f32(a)).collect() };
        let (kh, vh) = (half(&k), half(&v));
        let wide = |x: &[half::f16]| -> Vec<f32> { x.iter().map(|a| a.to_f32()).collect() };
        let (want, _) = reference(&q, &wide(&kh), &wide(&vh), &mask, x);
        super::chunk(&q, &kh, &vh, &mask, x, None, &mut out);
        for (i, (&a, &e)) in out.iter().zip(&want).enumerate() {
            assert!(
                (a as f64 - e).abs() < 1e-5,
                "{x:?} f16 out[{i}]: {a} vs {e}"
            );
        }
    }
}

/// Every half float widens to the value `half` gives it (NaNs stay NaN).
#[test]
fn f16_widening_is_exact() {
    for bits in 0..=u16::MAX {
        let want = half::f16::from_bits(bits).to_f32();
        let got = f16_to_f32(bits);
        if want.is_nan() {
            assert!(got.is_nan(), "{bits:#06x}: {got}");
        } else {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{bits:#06x}: {got} vs {want}"
            );
        }
    }
}
