//! Criterion benchmarks of the kernels a SmolLM2-135M decode step spends its time in
//! (shapes of batch 1, 9 query heads, 3 KV heads, head_dim 64), for both kernel sets on
//! Flex: `cargo bench -p kvc-runtime --bench ops`. The kernels are the plans' own
//! (`kvc_runtime::exec::kernels`), so these numbers are what a graph runs.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use kvc_runtime::exec::Value;
use kvc_runtime::exec::kernels::{self, KernelSet, portable};
use kvc_runtime::{Backend, device};

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
                |b, _| b.iter(|| black_box(k.linear(x.clone(), w.clone()))),
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
                        ))
                    })
                },
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{}/probs_values", set.name()), s),
                &(),
                |b, _| {
                    b.iter(|| {
                        let p = k.attention_probs(q.clone(), kc.clone(), mask.clone(), 0.125);
                        black_box(k.attention_values(p, v.clone()))
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

criterion_group!(benches, linear, attention, cache_ops);
criterion_main!(benches);
