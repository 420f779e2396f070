//! Criterion benchmarks of the kernels a SmolLM2-135M decode step spends its time in
//! (shapes of batch 1, 9 query heads, 3 KV heads, head_dim 64), for both kernel sets on
//! Flex: `cargo bench -p kvc-runtime --bench ops`. The kernels are the plans' own
//! (`kvc_runtime::exec::kernels`), so these numbers are what a graph runs.

#[path = "support/quant_matrix.rs"]
mod quant_matrix;

use burn::tensor::{Bool, Device, FloatDType, Int, Tensor, TensorData};
use criterion::Throughput;
use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use kvc_runtime::exec::Value;
use kvc_runtime::exec::kernels::cpu::gemv;
use kvc_runtime::exec::kernels::cpu::isa::Isa;
use kvc_runtime::exec::kernels::cpu::quant::{self, Method, Path};
use kvc_runtime::exec::kernels::{self, KernelSet, portable};
use kvc_runtime::load::gguf::GgmlType;
use kvc_runtime::{Backend, device};
use quant_matrix::quant_matrix;

const SETS: [KernelSet; 2] = [KernelSet::Cpu, KernelSet::Portable];

fn dev() -> Device {
    device(Backend::Flex).expect("the Flex device")
}

/// Deterministic values in [-1, 1).
fn filled(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| kernels::hash_uniform(seed, i as i32, 0) * 2.0 - 1.0)
        .collect()
}

fn tensor<const D: usize>(shape: [usize; D], seed: u32, d: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(filled(n, seed), shape), d)
}

/// Matrix-vector products of one decode step: q/o, gate/up, down and the LM head.
fn linear(c: &mut Criterion) {
    let d = dev();
    let mut group = c.benchmark_group("linear_gemv");
    for set in SETS {
        let k = set.kernels();
        for (n, kk) in [(576, 576), (1536, 576), (576, 1536), (49152, 576)] {
            let x = tensor([1, kk], 1, &d);
            let w = tensor([n, kk], 2, &d);
            group.bench_with_input(
                BenchmarkId::new(set.name(), format!("{n}x{kk}")),
                &(),
                |b, _| b.iter(|| black_box(k.linear(x.clone(), w.clone(), k.linear_form(1), None))),
            );
        }
    }
    group.finish();
}

/// One decode query over `s` slots (all visible): fused, and split into probabilities
/// and `probs · v` (what a scored policy runs), plus the mass from the probabilities.
fn attention(c: &mut Criterion) {
    let d = dev();
    let mut group = c.benchmark_group("attention_decode");
    for s in [576usize, 4096] {
        let q = tensor([1, 9, 1, 64], 3, &d);
        let kc = tensor([1, 3, s, 64], 4, &d);
        let v = tensor([1, 3, s, 64], 5, &d);
        let mask: Tensor<4, Bool> = Tensor::<4, Int>::ones([1, 1, 1, s], &d).bool();
        for set in SETS {
            let k = set.kernels();
            group.bench_with_input(
                BenchmarkId::new(format!("{}/fused", set.name()), s),
                &(),
                |b, _| {
                    b.iter(|| {
                        black_box(k.attention(
                            q.clone(),
                            kc.clone(),
                            v.clone(),
                            mask.clone(),
                            0.125,
                            k.attention_form(3),
                            None,
                        ))
                    })
                },
            );
            let (kh, vh) = (
                kc.clone().cast(FloatDType::F16),
                v.clone().cast(FloatDType::F16),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{}/fused_f16", set.name()), s),
                &(),
                |b, _| {
                    b.iter(|| {
                        black_box(k.attention(
                            q.clone(),
                            kh.clone(),
                            vh.clone(),
                            mask.clone(),
                            0.125,
                            k.attention_form(3),
                            None,
                        ))
                    })
                },
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{}/probs_values", set.name()), s),
                &(),
                |b, _| {
                    b.iter(|| {
                        let p = k.attention_probs(q.clone(), kc.clone(), mask.clone(), 0.125, None);
                        black_box(k.attention_values(p, v.clone(), k.attention_form(3), None))
                    })
                },
            );
        }
        let probs = portable::attention_probs(q.clone(), kc.clone(), mask.clone(), 0.125);
        let weight = Tensor::<4>::ones([1, 1, 1, 1], &d);
        group.bench_with_input(BenchmarkId::new("mass_from_probs", s), &(), |b, _| {
            b.iter(|| black_box(portable::attention_mass(probs.clone(), weight.clone(), 3)))
        });
    }
    group.finish();
}

/// The budgeted caches' per-step bookkeeping: one token written per KV head, and the
/// victim choice (k = 1) and prefill sort (k = N) over 576 slots.
fn cache_ops(c: &mut Criterion) {
    let d = dev();
    let (h, s) = (3usize, 576usize);
    let mut group = c.benchmark_group("cache");
    let new = tensor([1, h, 1, 64], 6, &d);
    let start: Tensor<4, Int> =
        Tensor::from_data(TensorData::new(vec![7i32, 300, 512], [1, 1, 1, h]), &d);
    let len: Tensor<4, Int> = Tensor::from_data(TensorData::new(vec![1i32], [1, 1, 1, 1]), &d);
    let x = tensor([1, 1, h, s], 8, &d);
    let tiebreak: Tensor<4, Int> =
        Tensor::<1, Int>::arange(0..(h * s) as i64, &d).reshape([1, 1, h, s]);
    for set in SETS {
        let k = set.kernels();
        let mut cache = Some(Value::F(tensor([1, h, s, 64], 7, &d)));
        group.bench_function(
            BenchmarkId::new(set.name(), "kv_write_one_token_576"),
            |b| {
                b.iter(|| {
                    // Moved through, as the executor does, so the update is in place.
                    let c = cache.take().expect("cache");
                    cache = Some(k.kv_write(c, Value::F(new.clone()), start.clone(), len.clone()));
                })
            },
        );
        for kk in [1usize, s] {
            group.bench_with_input(
                BenchmarkId::new(format!("{}/top_k_576", set.name()), kk),
                &kk,
                |b, &kk| b.iter(|| black_box(k.top_k(x.clone(), tiebreak.clone(), kk))),
            );
        }
    }
    let order = KernelSet::Cpu
        .kernels()
        .top_k(x.clone(), tiebreak.clone(), s);
    let kc = tensor([1, h, s, 64], 9, &d);
    group.bench_function("gather_rows_576", |b| {
        b.iter(|| black_box(portable::gather_rows(kc.clone(), order.clone())))
    });
    group.finish();
}

/// Products with GGUF-quantized weights (`cpu/quant/`) at the real models' decode shapes
/// (m = 1 and 16) on each method and instruction set, beside the f32 GEMV on the same
/// shapes, and one prefill shape (m = 512) beside Flex's f32 GEMM. Throughput is weight
/// bytes read per call.
fn quant(c: &mut Criterion) {
    let mut group = c.benchmark_group("quant");
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.available())
        .collect();
    let shapes = [
        ("smollm2-qo", GgmlType::Q4_1, 576, 576),
        ("smollm2-up", GgmlType::Q4_1, 576, 1536),
        ("smollm2-head", GgmlType::Q8_0, 576, 49152),
        ("qwen-up", GgmlType::Q5_0, 896, 4864),
        ("qwen-down-q4k", GgmlType::Q4_K, 4864, 896),
        ("qwen-down-q6k", GgmlType::Q6_K, 4864, 896),
        ("qwen-head", GgmlType::Q8_0, 896, 151936),
    ];
    for (name, ty, k, n) in shapes {
        let w = quant_matrix(ty, k, n, 11);
        let wf = filled(n * k, 2);
        for m in [1usize, 16] {
            let x = filled(m * k, 1);
            let mut out = vec![0.0f32; m * n];
            let id = |path: &str| BenchmarkId::new(format!("{name}/{ty}/{k}x{n}/m{m}"), path);
            group.throughput(Throughput::Bytes(w.len() as u64));
            for &isa in &isas {
                for method in [Method::Int8, Method::Dequant] {
                    let path = Path { isa, method };
                    let label = format!("{isa:?}-{method:?}").to_lowercase();
                    group.bench_function(id(&label), |b| {
                        b.iter(|| quant::qmatmul_t_with(path, &x, m, k, &w, ty, n, &mut out))
                    });
                }
            }
            if m == 1 && name == "smollm2-up" {
                let path = Path {
                    isa: Isa::Portable,
                    method: Method::Int8,
                };
                group.bench_function(id("portable-int8"), |b| {
                    b.iter(|| quant::qmatmul_t_with(path, &x, m, k, &w, ty, n, &mut out))
                });
            }
            group.throughput(Throughput::Bytes((wf.len() * 4) as u64));
            group.bench_function(id("f32-matmul_t"), |b| {
                b.iter(|| gemv::matmul_t(&x, m, k, &wf, n, &mut out))
            });
        }
    }
    // Prefill: 512 rows through SmolLM2's up projection.
    let (ty, m, k, n) = (GgmlType::Q4_1, 512, 576, 1536);
    let w = quant_matrix(ty, k, n, 11);
    let x = filled(m * k, 1);
    let mut out = vec![0.0f32; m * n];
    let id = |path: &str| BenchmarkId::new(format!("prefill/{ty}/{k}x{n}/m{m}"), path);
    group.throughput(Throughput::Bytes(w.len() as u64));
    for &isa in &isas {
        let path = Path {
            isa,
            method: Method::Panel,
        };
        group.bench_function(id(&format!("{isa:?}-panel").to_lowercase()), |b| {
            b.iter(|| quant::qmatmul_t_with(path, &x, m, k, &w, ty, n, &mut out))
        });
    }
    let d = dev();
    let (xt, wt) = (tensor([m, k], 1, &d), tensor([n, k], 2, &d));
    let cpu = KernelSet::Cpu.kernels();
    group.throughput(Throughput::Bytes((n * k * 4) as u64));
    group.bench_function(id("f32-flex-gemm"), |b| {
        b.iter(|| black_box(cpu.linear(xt.clone(), wt.clone(), cpu.linear_form(m), None)))
    });
    group.finish();
}

criterion_group!(benches, linear, attention, cache_ops, quant);
criterion_main!(benches);
