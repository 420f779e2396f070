//! Criterion benchmarks of the kernels a SmolLM2-135M decode step spends its time in
//! (shapes of batch 1, 9 query heads, 3 KV heads, head_dim 64):
//! `cargo bench -p kvc-runtime --bench ops`. The kernels are the executor's own
//! (`kvc_runtime::kernels`), so these numbers are what a graph runs.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, black_box, criterion_group, criterion_main};
use kvc_runtime::kernels;
use kvc_runtime::{Backend, device};

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
    for (n, k) in [(576, 576), (1536, 576), (576, 1536), (49152, 576)] {
        let x = tensor([1, k], 1, &d);
        let w = tensor([n, k], 2, &d);
        group.bench_with_input(
            BenchmarkId::from_parameter(format!("{n}x{k}")),
            &(),
            |b, _| b.iter(|| black_box(kernels::linear(x.clone(), w.clone()))),
        );
    }
    group.finish();
}

/// One decode query over `s` slots (all visible), without and with the probabilities
/// (`attention_mass`'s input).
fn attention(c: &mut Criterion) {
    let d = dev();
    let mut group = c.benchmark_group("attention_decode");
    for s in [576usize, 4096] {
        let q = tensor([1, 9, 1, 64], 3, &d);
        let k = tensor([1, 3, s, 64], 4, &d);
        let v = tensor([1, 3, s, 64], 5, &d);
        let mask: Tensor<4, Bool> = Tensor::<4, Int>::ones([1, 1, 1, s], &d).bool();
        for explicit in [false, true] {
            let name = if explicit { "with_probs" } else { "output" };
            group.bench_with_input(BenchmarkId::new(name, s), &(), |b, _| {
                b.iter(|| {
                    black_box(kernels::attention(
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        mask.clone(),
                        0.125,
                        explicit,
                    ))
                })
            });
        }
        let probs = kernels::attention_probs(q.clone(), k.clone(), mask.clone(), 0.125);
        let weight = Tensor::<4>::ones([1, 1, 1, 1], &d);
        group.bench_with_input(BenchmarkId::new("mass_from_probs", s), &(), |b, _| {
            b.iter(|| black_box(kernels::attention_mass(probs.clone(), weight.clone(), 3)))
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
    let mut cache = Some(tensor([1, h, s, 64], 7, &d));
    group.bench_function("kv_write_one_token_576", |b| {
        b.iter(|| {
            // Moved through, as the executor does, so the update is in place.
            let c = cache.take().expect("cache");
            cache = Some(kernels::kv_write(
                c,
                new.clone(),
                start.clone(),
                len.clone(),
            ));
        })
    });
    let x = filled(h * s, 8);
    let tiebreak: Vec<i32> = (0..(h * s) as i32).collect();
    for k in [1usize, s] {
        group.bench_with_input(BenchmarkId::new("top_k_576", k), &k, |b, &k| {
            b.iter(|| black_box(kernels::top_k(&x, &tiebreak, s, k)))
        });
    }
    let order: Tensor<4, Int> = Tensor::from_data(
        TensorData::new(kernels::top_k(&x, &tiebreak, s, s), [1, 1, h, s]),
        &d,
    );
    let kc = tensor([1, h, s, 64], 9, &d);
    group.bench_function("gather_rows_576", |b| {
        b.iter(|| black_box(kernels::gather_rows(kc.clone(), order.clone())))
    });
    group.finish();
}

criterion_group!(benches, linear, attention, cache_ops);
criterion_main!(benches);
