//! The CPU set's kernels given a [`Live`]: each real token's elements equal the kernel's
//! result over the whole value bit for bit, and padding is left as the output buffer held
//! it (NaN here: [`pool::poison_outputs`]; 0 where a kernel's buffer is always new).

use burn::tensor::{Bool, Int, Tensor, TensorData};

use super::{Cpu, pool, test_values};
use crate::Backend;
use crate::blocks::{QuantLayout, QuantTensor};
use crate::exec::kernels::{Form, Kernels, Live, Rows};
use crate::exec::value::Value;
use crate::load::gguf::GgmlType;
use kvc_compiler::ir::BinaryOp;

fn device() -> burn::tensor::Device {
    crate::device(Backend::Flex).unwrap()
}

fn tensor<const D: usize>(dims: [usize; D], seed: u64) -> Tensor<D> {
    let n = dims.iter().product();
    Tensor::from_data(TensorData::new(test_values(n, seed), dims), &device())
}

fn host(t: Tensor<4>) -> Vec<f32> {
    Value::F(t).read_f32().unwrap()
}

/// Row lengths with a row of none, a short one, a full one and one in between.
const LENS: [usize; 4] = [0, 5, 24, 17];

/// `got` equals `full` on the real elements of `live`; elsewhere it is what the output
/// buffer held (NaN, or 0 for the kernels whose buffers are always new): not computed.
fn check(what: &str, full: &[f32], got: &[f32], live: Live<'_>) {
    assert_eq!(full.len(), got.len(), "{what}: lengths");
    let mut real = vec![false; full.len()];
    for r in live.runs() {
        real[r].fill(true);
    }
    assert!(
        real.iter().any(|&r| r) && !real.iter().all(|&r| r),
        "{what}: a trivial case"
    );
    for (i, ((&f, &g), &r)) in full.iter().zip(got).zip(&real).enumerate() {
        if r {
            assert_eq!(
                f.to_bits(),
                g.to_bits(),
                "{what}: real element {i}: {g} vs {f}"
            );
        } else {
            assert!(
                g.is_nan() || g == 0.0,
                "{what}: padding element {i} written: {g}"
            );
        }
    }
}

/// `got` equals `full` on the real elements of `live` (padding: whatever the kernel left).
fn check_real(what: &str, full: &[f32], got: &[f32], live: Live<'_>) {
    for r in live.runs() {
        for i in r {
            assert_eq!(
                full[i].to_bits(),
                got[i].to_bits(),
                "{what}: real element {i}"
            );
        }
    }
}

fn live(dims: [usize; 4], batch: usize, token: Option<usize>) -> Live<'static> {
    Live {
        lens: &LENS,
        rows: Rows { dims, batch, token },
    }
}

#[test]
fn elementwise_kernels_compute_real_tokens_only() {
    pool::poison_outputs();
    let (b, t, h) = (4, 24, 64);
    let dims = [1, b, t, h];
    let l = live(dims, 1, Some(2));
    let (x, y) = (tensor(dims, 1), tensor(dims, 2));
    let w = tensor([1, 1, 1, h], 3);
    let k = Cpu;
    let pairs = [
        (
            "rms_norm",
            k.rms_norm(x.clone(), w.clone(), 1e-5, None),
            k.rms_norm(x.clone(), w, 1e-5, Some(l)),
        ),
        ("silu", k.silu(x.clone(), None), k.silu(x.clone(), Some(l))),
        ("gelu", k.gelu(x.clone(), None), k.gelu(x.clone(), Some(l))),
        (
            "mul",
            x.clone().mul(y.clone()),
            k.binary(BinaryOp::Mul, x.clone(), y.clone(), l),
        ),
        (
            "add",
            x.clone().add(y.clone()),
            k.binary(BinaryOp::Add, x.clone(), y.clone(), l),
        ),
    ];
    for (what, full, got) in pairs {
        check(what, &host(full), &host(got), l);
    }
    // RoPE over [B, T, N, D] at positions [1, 1, B, T]; the permutation to [B, N, T, D].
    let (n, d) = (4, 16);
    let xr = tensor([b, t, n, d], 4);
    let pos: Tensor<4, Int> =
        Tensor::<1, Int>::arange(0..(b * t) as i64, &device()).reshape([1, 1, b, t]);
    let (cos, sin) = (tensor([b * t, d / 2], 5), tensor([b * t, d / 2], 6));
    let lr = live([b, t, n, d], 0, Some(1));
    let full = Cpu.rope(xr.clone(), pos.clone(), (cos.clone(), sin.clone()), None);
    let got = Cpu.rope(xr.clone(), pos, (cos, sin), Some(lr));
    check("rope", &host(full), &host(got), lr);
    // In place: the kernels given the only handle of their input write into it.
    let (pos, cos, sin) = (
        Tensor::<1, Int>::arange(0..(b * t) as i64, &device()).reshape([1, 1, b, t]),
        tensor([b * t, d / 2], 5),
        tensor([b * t, d / 2], 6),
    );
    let full = host(Cpu.rope(xr.clone(), pos.clone(), (cos.clone(), sin.clone()), None));
    let got = Cpu.rope(tensor([b, t, n, d], 4), pos, (cos, sin), Some(lr));
    check_real("rope in place", &full, &host(got), lr);
    let full = host(k.silu(x.clone(), None));
    check_real(
        "silu in place",
        &full,
        &host(k.silu(tensor(dims, 1), Some(l))),
        l,
    );
    let full = host(x.clone().mul(y.clone()));
    let got = k.binary(BinaryOp::Mul, tensor(dims, 1), y.clone(), l);
    check_real("mul in place", &full, &host(got), l);
    // The f16 cast of k and v before the cache write.
    let full = x
        .clone()
        .cast(burn::tensor::FloatDType::F16)
        .cast(burn::tensor::FloatDType::F32);
    let got = Cpu.to_f16(x.clone(), l).cast(burn::tensor::FloatDType::F32);
    check("to_f16", &host(full), &host(got), l);
    let lp = live([b, n, t, d], 0, Some(2));
    let got = Cpu.permute(xr.clone(), [0, 2, 1, 3], lp);
    check("permute", &host(xr.permute([0, 2, 1, 3])), &host(got), lp);
}

#[test]
fn products_compute_real_rows_only() {
    pool::poison_outputs();
    let (b, t, kk, n) = (4, 24, 64, 40);
    let x = tensor([b * t, kk], 7);
    let lt = live([1, b, t, n], 1, Some(2));
    // f32 and f16 weights: Flex's GEMM at prefill widths.
    for w in [
        tensor([n, kk], 8),
        tensor([n, kk], 8).cast(burn::tensor::FloatDType::F16),
    ] {
        let form = Cpu.linear_form(b * t);
        assert_eq!(form, Form::Gemm);
        let full = Cpu.linear(x.clone(), w.clone(), form, None);
        let got = Cpu.linear(x.clone(), w, form, Some(lt));
        check(
            "linear gemm",
            &host(full.reshape([1, b, t, n])),
            &host(got.reshape([1, b, t, n])),
            lt,
        );
    }
    // kvc's GEMV at the rows a prefill's last tokens take (one per batch row).
    let xb = tensor([b, kk], 9);
    let lb = live([1, 1, b, n], 2, None);
    let w = tensor([n, kk], 10);
    let form = Cpu.linear_form(b);
    assert_eq!(form, Form::Gemv);
    let full = Cpu.linear(xb.clone(), w.clone(), form, None);
    let got = Cpu.linear(xb, w, form, Some(lb));
    check(
        "linear gemv",
        &host(full.reshape([1, 1, b, n])),
        &host(got.reshape([1, 1, b, n])),
        lb,
    );
    // GGUF blocks (Q8_0: a finite f16 scale, then 32 signed bytes per block).
    let mut bytes = Vec::new();
    for (i, v) in test_values(n * kk / 32 * 32, 11).chunks(32).enumerate() {
        bytes.extend(half::f16::from_f32(0.01 + i as f32 * 1e-4).to_le_bytes());
        bytes.extend(v.iter().map(|&v| (v * 127.0) as i8 as u8));
    }
    let q = QuantTensor {
        ty: GgmlType::Q8_0,
        rows: n,
        cols: kk,
        bytes: bytes.into(),
        layout: QuantLayout::File,
    };
    for (m, l, dims) in [(b * t, lt, [1, b, t, n]), (b, lb, [1, 1, b, n])] {
        let xs = tensor([m, kk], 12);
        let form = Cpu.qlinear_form(m, &q);
        let full = Cpu.qlinear(xs.clone(), &q, form, None);
        let got = Cpu.qlinear(xs, &q, form, Some(l));
        check(
            "q_linear",
            &host(full.reshape(dims)),
            &host(got.reshape(dims)),
            l,
        );
    }
}

#[test]
fn attention_kernels_compute_real_positions_only() {
    pool::poison_outputs();
    let (b, hq, hkv, d) = (4, 4, 2, 16);
    // A chunk and a few-row width; causal over slots that follow 9 earlier ones.
    for t in [24usize, 6] {
        let lens: Vec<usize> = LENS.iter().map(|&n| n.min(t)).collect();
        let s = 9 + t;
        let q = tensor([b, hq, t, d], 13);
        let (k, v) = (tensor([b, hkv, s, d], 14), tensor([b, hkv, s, d], 15));
        let seen: Vec<bool> = (0..b * t * s).map(|i| i % s <= 9 + i / s % t).collect();
        let mask: Tensor<4, Bool> =
            Tensor::from_data(TensorData::new(seen, [b, 1, t, s]), &device());
        let l = Live {
            lens: &lens,
            rows: Rows {
                dims: [b, hq, t, d],
                batch: 0,
                token: Some(2),
            },
        };
        let form = Cpu.attention_form(hq / hkv * t);
        let full = Cpu.attention(
            q.clone(),
            k.clone(),
            v.clone(),
            mask.clone(),
            0.25,
            form,
            None,
        );
        let got = Cpu.attention(
            q.clone(),
            k.clone(),
            v.clone(),
            mask.clone(),
            0.25,
            form,
            Some(l),
        );
        let (full, got) = (host(full), host(got));
        if form == Form::Chunk {
            check("attention chunk", &full, &got, l);
        } else {
            // Few rows: whole batch rows are skipped, a real row's positions all computed.
            let per = hq * t * d;
            for bi in 0..b {
                let (f, g) = (&full[bi * per..][..per], &got[bi * per..][..per]);
                match lens[bi] {
                    0 => assert!(g.iter().all(|x| x.is_nan()), "few-rows: row {bi} skipped"),
                    _ => assert!(
                        f.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "few-rows: row {bi}"
                    ),
                }
            }
        }
        let lp = Live {
            lens: &lens,
            rows: Rows {
                dims: [b, hq, t, s],
                ..l.rows
            },
        };
        let full = Cpu.attention_probs(q.clone(), k.clone(), mask.clone(), 0.25, None);
        let got = Cpu.attention_probs(q.clone(), k.clone(), mask.clone(), 0.25, Some(lp));
        check(
            "attention_probs",
            &host(full.clone()),
            &host(got.clone()),
            lp,
        );
        let full = Cpu.attention_values(full, v.clone(), form, None);
        let got = Cpu.attention_values(got, v.clone(), form, Some(lp));
        if form == Form::Chunk {
            // Burn's product over whole batch rows: the skipped rows are left as they were.
            let per = hq * t * d;
            let (full, got) = (host(full), host(got));
            for bi in 0..b {
                let (f, g) = (&full[bi * per..][..per], &got[bi * per..][..per]);
                let rows: Vec<bool> = (0..hq * t).map(|r| r % t < lens[bi]).collect();
                for (r, &real) in rows.iter().enumerate() {
                    let (f, g) = (&f[r * d..][..d], &g[r * d..][..d]);
                    if real {
                        assert!(
                            f.iter().zip(g).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "values: row {bi}/{r}"
                        );
                    }
                    if lens[bi] == 0 {
                        assert!(g.iter().all(|x| x.is_nan()), "values: row {bi} skipped");
                    }
                }
            }
        } else {
            check("attention_values", &host(full), &host(got), l);
        }
    }
}
