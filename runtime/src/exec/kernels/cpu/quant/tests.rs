use half::f16;

use super::*;
use crate::exec::kernels::cpu::test_values as values;
use crate::load::gguf::dequantize;

/// The GGUF type of every block format.
fn types() -> impl Iterator<Item = GgmlType> {
    Block::ALL
        .into_iter()
        .map(|b| GgmlType::from_id(b.format().ggml_type).expect("a block format ggml knows"))
}

/// `n` rows of `k` values of type `ty`: random bytes with every f16 scale and minimum
/// replaced by a finite value in ±0.02.
fn random_matrix(ty: GgmlType, k: usize, n: usize, seed: u64) -> Vec<u8> {
    let q = ty.block_format().unwrap();
    let blocks = n * k / q.values();
    let mut w: Vec<u8> = values(blocks * q.bytes(), seed)
        .iter()
        .map(|v| ((v + 1.0) * 128.0) as u8)
        .collect();
    let fields: &[usize] = match q {
        Block::Q4_0 | Block::Q5_0 | Block::Q8_0 => &[0],
        Block::Q6K => &[208],
        _ => &[0, 2],
    };
    let scales = values(blocks * fields.len(), seed + 1);
    for (blk, s) in w
        .chunks_exact_mut(q.bytes())
        .zip(scales.chunks_exact(fields.len()))
    {
        for (&at, &s) in fields.iter().zip(s) {
            blk[at..at + 2].copy_from_slice(&f16::from_f32(0.02 * s).to_le_bytes());
        }
    }
    w
}

/// Per output: the float64 product with the dequantized weights, `Σ |x · w|`, and the
/// int8 bound `Σ_b (max_b |x| / 254) · Σ_{i ∈ b} |w_i|` over activation blocks `b` of
/// 32 values (rounding `x / d`, `d = max |x| / 127`, moves each value by ≤ d / 2).
fn reference(x: &[f32], m: usize, k: usize, wf: &[f32], n: usize) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::with_capacity(m * n);
    for xr in x.chunks_exact(k) {
        for wr in wf.chunks_exact(k) {
            let (mut e, mut a, mut bound) = (0.0f64, 0.0f64, 0.0f64);
            for (xb, wb) in xr.chunks_exact(32).zip(wr.chunks_exact(32)) {
                let amax = xb.iter().fold(0.0f64, |a, &v| a.max(f64::from(v).abs()));
                let mut wabs = 0.0;
                for (&xv, &wv) in xb.iter().zip(wb) {
                    e += f64::from(xv) * f64::from(wv);
                    a += (f64::from(xv) * f64::from(wv)).abs();
                    wabs += f64::from(wv).abs();
                }
                bound += amax / 254.0 * wabs;
            }
            out.push((e, a, bound));
        }
    }
    out
}

fn paths() -> Vec<Path> {
    let mut out = Vec::new();
    for isa in Isa::covered("quantized products", &Isa::ALL) {
        for method in [Method::Dequant, Method::Int8, Method::Panel] {
            out.push(Path { isa, method });
        }
    }
    out
}

fn run(path: Path, x: &[f32], m: usize, k: usize, w: &[u8], ty: GgmlType, n: usize) -> Vec<f32> {
    let mut got = vec![f32::NAN; m * n];
    qmatmul_t_with(path, x, m, k, w, ty, n, &mut got);
    got
}

/// The assembly that widens block scales gives the `half` crate's value for every one
/// of the 65,536 f16 bit patterns (NaNs as NaNs).
#[cfg(target_arch = "x86_64")]
#[test]
fn block_scales_widen_like_half_for_every_bit_pattern() {
    if Isa::covered("f16 block scales", &[Isa::Avx2]).is_empty() {
        return;
    }
    for bits in 0..=u16::MAX {
        let b = bits.to_le_bytes();
        // SAFETY: AVX2, FMA and F16C are available; `b` holds two bytes.
        let got = unsafe { x86::f16_at(b.as_ptr()) };
        let want = f16::from_bits(bits).to_f32();
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{bits:#06x}: {got} vs {want}"
        );
    }
}

/// Every type, method and available instruction set against float64 products with the
/// dequantized weights, on shapes with partial tiles, tasks and panels; each SIMD path
/// also against the portable one.
#[test]
fn every_path_matches_a_float64_reference() {
    let shapes = [
        (1, 37),
        (2, 5),
        (3, 70),
        (7, 33),
        (16, 41),
        (17, 35),
        (40, 66),
    ];
    for ty in types() {
        let q = ty.block_format().unwrap();
        let ks: &[usize] = if q.is_k() {
            &[256, 512, 2304]
        } else {
            &[32, 64, 96, 576]
        };
        for &k in ks {
            for (s, &(m, n)) in shapes.iter().enumerate() {
                let seed = (k * 31 + s) as u64;
                let x = values(m * k, seed);
                let w = random_matrix(ty, k, n, seed + 2);
                let wf = dequantize(ty, &w).unwrap();
                let want = reference(&x, m, k, &wf, n);
                let mut portable: Vec<(Method, Vec<f32>)> = Vec::new();
                for path in paths() {
                    let got = run(path, &x, m, k, &w, ty, n);
                    for (i, (&g, &(e, a, b))) in got.iter().zip(&want).enumerate() {
                        let tol = match path.method {
                            Method::Int8 => b * 1.001 + 1e-5 * a,
                            _ => 1e-5 * a,
                        } + 1e-30;
                        assert!(
                            (f64::from(g) - e).abs() <= tol,
                            "{ty} {path:?} m={m} k={k} n={n} at {i}: {g} vs {e} (tol {tol})"
                        );
                    }
                    if path.isa == Isa::Portable {
                        portable.push((path.method, got));
                    } else {
                        let (_, p) = portable.iter().find(|(mt, _)| *mt == path.method).unwrap();
                        for (i, ((&g, &p), &(_, a, _))) in got.iter().zip(p).zip(&want).enumerate()
                        {
                            assert!(
                                (f64::from(g) - f64::from(p)).abs() <= 1e-5 * a + 1e-30,
                                "{ty} {path:?} vs portable m={m} k={k} n={n} at {i}: {g} vs {p}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Interleaved weights read back as `dequantize`'s values, and multiply exactly as
/// the file's blocks do from 5 rows on (the same group kernels on the same bytes, at
/// decode and prefill widths); below that the fused kernels add in another order, so those are
/// held to the float64 reference's int8 bound. Odd row counts leave partial groups.
#[test]
fn interleaved_weights_multiply_like_the_files_blocks() {
    if !interleaving() {
        return;
    }
    let shapes = [
        (1, 37),
        (3, 9),
        (5, 8),
        (8, 70),
        (16, 41),
        (17, 35),
        (40, 66),
    ];
    for ty in types() {
        let q = ty.block_format().unwrap();
        let ks: &[usize] = if q.is_k() {
            &[256, 512]
        } else {
            &[32, 96, 576]
        };
        for &k in ks {
            for (s, &(m, n)) in shapes.iter().enumerate() {
                let seed = (k * 17 + s) as u64;
                let x = values(m * k, seed);
                let w = random_matrix(ty, k, n, seed + 3);
                let wi = interleave(ty, k, n, &w).unwrap();
                assert_eq!(Some(wi.len()), interleaved_len(ty, k, n));
                let wf = dequantize(ty, &w).unwrap();
                for r in 0..n {
                    let got = interleaved_row(ty, k, n, &wi, r);
                    for (i, (&g, &e)) in got.iter().zip(&wf[r * k..]).enumerate() {
                        assert!(
                            (g - e).abs() <= 2.0 * f32::EPSILON * e.abs() + 1e-30,
                            "{ty} k={k} row {r} value {i}: {g} vs {e}"
                        );
                    }
                }
                let want = reference(&x, m, k, &wf, n);
                for isa in Isa::covered("interleaved products", &[Isa::Avx2, Isa::Avx512]) {
                    let mut got = vec![f32::NAN; m * n];
                    qmatmul_t_interleaved_with(isa, &x, m, k, &wi, ty, n, &mut got);
                    if m > INTERLEAVE_ABOVE {
                        let path = Path {
                            isa,
                            method: method(isa, m),
                        };
                        let file = run(path, &x, m, k, &w, ty, n);
                        for (i, (g, f)) in got.iter().zip(&file).enumerate() {
                            assert_eq!(
                                g.to_bits(),
                                f.to_bits(),
                                "{ty} {isa:?} m={m} k={k} n={n} at {i}: {g} vs {f}"
                            );
                        }
                    } else {
                        for (i, (&g, &(e, a, b))) in got.iter().zip(&want).enumerate() {
                            let tol = b * 1.001 + 1e-5 * a + 1e-30;
                            assert!(
                                (f64::from(g) - e).abs() <= tol,
                                "{ty} {isa:?} m={m} k={k} n={n} at {i}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Unpacked rows give back `dequantize`'s values on every instruction set.
#[test]
fn unpacked_rows_expand_to_the_dequantized_values() {
    for ty in types() {
        let q = ty.block_format().unwrap();
        let k = 4 * q.values();
        let w = random_matrix(ty, k, 1, 5);
        let want = dequantize(ty, &w).unwrap();
        for isa in Isa::covered("unpack", &Isa::ALL) {
            let mut row = Row::new(q, k);
            unpack(isa, q, &w, &mut row);
            let mut got = vec![0.0f32; k];
            expand(isa, q, &row, &mut got);
            for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 2.0 * f32::EPSILON * e.abs() + 1e-30,
                    "{ty} {isa:?} value {i}: {g} vs {e}"
                );
            }
        }
    }
}

/// Activation blocks of zeros, of one large value and of tiny values.
#[test]
fn int8_handles_zero_and_extreme_activation_blocks() {
    for ty in types() {
        let q = ty.block_format().unwrap();
        let (m, k, n) = (3, 2 * q.values(), 9);
        let mut x = values(m * k, 9);
        x[..q.values()].fill(0.0);
        x[k + 3] = 1e4;
        for v in &mut x[2 * k..] {
            *v *= 1e-20;
        }
        let w = random_matrix(ty, k, n, 10);
        let wf = dequantize(ty, &w).unwrap();
        let want = reference(&x, m, k, &wf, n);
        for path in paths() {
            let got = run(path, &x, m, k, &w, ty, n);
            for (i, (&g, &(e, a, b))) in got.iter().zip(&want).enumerate() {
                let tol = b * 1.001 + 1e-5 * a + 1e-30;
                assert!(
                    (f64::from(g) - e).abs() <= tol,
                    "{ty} {path:?} at {i}: {g} vs {e}"
                );
            }
        }
    }
}

#[test]
fn the_default_path_matches_the_reference() {
    for ty in types() {
        let q = ty.block_format().unwrap();
        for (m, k, n) in [
            (1, q.values() * 3, 50),
            (16, q.values(), 7),
            (33, q.values() * 2, 40),
        ] {
            let x = values(m * k, 3);
            let w = random_matrix(ty, k, n, 4);
            let want = reference(&x, m, k, &dequantize(ty, &w).unwrap(), n);
            let mut got = vec![f32::NAN; m * n];
            qmatmul_t(&x, m, k, &w, ty, n, &mut got);
            for (&g, &(e, a, b)) in got.iter().zip(&want) {
                assert!((f64::from(g) - e).abs() <= b * 1.001 + 1e-5 * a + 1e-30);
            }
        }
    }
}

#[test]
fn shapes_are_checked() {
    assert!(supports(GgmlType::Q4_K) && !supports(GgmlType::F16) && !supports(GgmlType::Q2_K));
    assert_eq!(GgmlType::Q4_1.row_bytes(576), 18 * 20);
    // The kernels' own block table agrees with the reader's.
    for ty in types() {
        let q = ty.block_format().unwrap();
        assert_eq!(
            (q.values(), q.bytes()),
            (ty.block_size() as usize, ty.block_bytes() as usize)
        );
        assert_eq!(row_bytes_q(q, 2304), ty.row_bytes(2304));
    }
    assert_eq!(check_quant_matrix(GgmlType::Q8_0, 64, 3, 3 * 68), Ok(()));
    assert_eq!(
        check_quant_matrix(GgmlType::F32, 64, 3, 768),
        Err(QuantMatrixError::Unsupported(GgmlType::F32))
    );
    assert!(matches!(
        check_quant_matrix(GgmlType::Q6_K, 128, 1, 105),
        Err(QuantMatrixError::PartialBlock { block: 256, .. })
    ));
    assert!(matches!(
        check_quant_matrix(GgmlType::Q4_0, 32, 2, 35),
        Err(QuantMatrixError::Length {
            expected: 36,
            found: 35,
            ..
        })
    ));
    assert!(matches!(
        check_quant_matrix(GgmlType::Q4_0, 32, usize::MAX, 35),
        Err(QuantMatrixError::Length {
            expected: usize::MAX,
            ..
        })
    ));
}

#[test]
fn a_short_matrix_panics() {
    let panic = std::panic::catch_unwind(|| {
        let mut out = [0.0f32; 2];
        qmatmul_t(&[0.0; 32], 1, 32, &[0; 35], GgmlType::Q4_0, 2, &mut out);
    })
    .expect_err("a 35-byte slice is not two Q4_0 rows of 32");
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    assert!(message.contains("take 36 bytes"), "{message}");
}

/// A row's result does not depend on the rows that share its product, down to
/// [`min_rows`] rows: what lets a prefill multiply only its real tokens' rows (padding
/// skipped, the rows gathered and zero rows added up to `min_rows`) and still give each
/// the planned product's result, bit for bit, on every path and both layouts.
#[test]
fn rows_multiply_alike_in_any_company_down_to_min_rows() {
    let n = 40;
    for ty in types() {
        let k = if ty.block_format().unwrap().is_k() {
            256
        } else {
            64
        };
        for (s, m) in [3usize, 8, 24, 64].into_iter().enumerate() {
            let seed = (k * 7 + s) as u64;
            let x = values(m * k, seed);
            let w = random_matrix(ty, k, n, seed + 1);
            let wi = interleave(ty, k, n, &w);
            #[allow(clippy::type_complexity)]
            let mut products: Vec<(
                String,
                usize,
                Box<dyn Fn(&[f32], usize) -> Vec<f32>>,
            )> = Vec::new();
            for path in paths() {
                let w = w.clone();
                let floor = min_rows(path, false, m);
                products.push((
                    format!("{path:?}"),
                    floor,
                    Box::new(move |x: &[f32], rows: usize| {
                        let mc = rows.max(floor).min(m);
                        let mut xc = x.to_vec();
                        xc.resize(mc * k, 0.0);
                        run(path, &xc, mc, k, &w, ty, n)
                    }),
                ));
            }
            for isa in [Isa::Avx2, Isa::Avx512] {
                if let (Some(wi), true) = (wi.clone(), interleaving() && isa.available()) {
                    let path = Path {
                        isa,
                        method: Method::Int8,
                    };
                    let floor = min_rows(path, true, m);
                    products.push((
                        format!("{isa:?} interleaved"),
                        floor,
                        Box::new(move |x: &[f32], rows: usize| {
                            let mc = rows.max(floor).min(m);
                            let mut xc = x.to_vec();
                            xc.resize(mc * k, 0.0);
                            let mut out = vec![f32::NAN; mc * n];
                            qmatmul_t_interleaved_with(isa, &xc, mc, k, &wi, ty, n, &mut out);
                            out
                        }),
                    ));
                }
            }
            for (name, floor, product) in &products {
                let full = product(&x, m);
                for live in [1, 2, 5, m / 2, m - 1] {
                    if live == 0 || live >= m {
                        continue;
                    }
                    if live.max(*floor) >= m {
                        // The kernels run the planned product over every row.
                        continue;
                    }
                    let first = m - live;
                    let got = product(&x[first * k..], live);
                    let same = got[..live * n]
                        .iter()
                        .zip(&full[first * n..])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{ty} {name}: the last {live} of {m} rows alone differ"
                    );
                }
            }
        }
    }
}

/// The integer sums at their extremes: every weight at its largest magnitude (all value
/// bits set; Q8_0's −128) times activations that all quantize to ±127, where the AVX2
/// kernels' i16 partial sums reach their bound (`i16_chunks`): every path, both layouts,
/// against the float64 product.
#[test]
fn largest_weights_and_activations_sum_exactly() {
    let (m, n) = (8, 16);
    for ty in types() {
        let q = ty.block_format().unwrap();
        let k = if q.is_k() { 256 } else { 64 };
        let mut w = random_matrix(ty, k, n, 5);
        // The f16 scale (and minimum) bytes, kept from `random_matrix`.
        let header = match q {
            Block::Q4_0 | Block::Q5_0 | Block::Q8_0 => 0..2,
            Block::Q4_1 | Block::Q5_1 | Block::Q4K | Block::Q5K => 0..4,
            Block::Q6K => 208..210,
        };
        let fill = if q == Block::Q8_0 { 0x80 } else { 0xff };
        for blk in w.chunks_exact_mut(q.bytes()) {
            for (i, b) in blk.iter_mut().enumerate() {
                if !header.contains(&i) {
                    *b = fill;
                }
            }
        }
        let wf = dequantize(ty, &w).unwrap();
        for sign in [1.0f32, -1.0] {
            let x = vec![sign; m * k];
            let want = reference(&x, m, k, &wf, n);
            let mut got: Vec<(String, Vec<f32>)> = paths()
                .into_iter()
                .map(|p| (format!("{p:?}"), run(p, &x, m, k, &w, ty, n)))
                .collect();
            if let Some(wi) = interleave(ty, k, n, &w) {
                let mut out = vec![f32::NAN; m * n];
                qmatmul_t_interleaved(&x, m, k, &wi, ty, n, &mut out);
                got.push(("interleaved".into(), out));
            }
            for (name, got) in got {
                for (i, (&g, &(e, a, b))) in got.iter().zip(&want).enumerate() {
                    let tol = b * 1.001 + 1e-5 * a + 1e-30;
                    assert!(
                        (f64::from(g) - e).abs() <= tol,
                        "{ty} {name} x = {sign} at {i}: {g} vs {e}"
                    );
                }
            }
        }
    }
}
