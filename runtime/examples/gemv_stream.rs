//! Decode-shaped projections over weights too large for the caches (like a real model's):
//! the GEMV kernels of `kvc_runtime::exec::kernels::cpu::gemv` for f32 and f16 weights and 1–15 rows, on one
//! and on all threads, against a plain streaming read of the same bytes (the memory
//! bandwidth they are bound by) and Flex's matmul.
//!
//! `cargo run --release -p kvc-runtime --example gemv_stream`
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use half::f16;
use kvc_runtime::exec::kernels::cpu::gemv::{Weight, matmul_t};

const K: usize = 576;
const N: usize = 1536;
const LAYERS: usize = 60;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| kvc_runtime::exec::kernels::hash_uniform(seed, i as i32, 0) * 2.0 - 1.0)
        .collect()
}

/// Best of 5 passes over all matrices, in GB/s of weight bytes.
fn rate(bytes: usize, mut pass: impl FnMut()) -> f64 {
    pass();
    (0..5)
        .map(|_| {
            let t = Instant::now();
            pass();
            bytes as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

fn gemv<W: Weight>(ws: &[Vec<W>], m: usize) -> f64 {
    let x = values(m * K, 1);
    let mut out = vec![0.0f32; m * N];
    let bytes = LAYERS * N * K * std::mem::size_of::<W>();
    rate(bytes, || {
        for w in ws {
            matmul_t(&x, m, K, w, N, &mut out);
        }
    })
}

fn main() {
    let w32: Vec<Vec<f32>> = (0..LAYERS).map(|l| values(N * K, 10 + l as u32)).collect();
    let w16: Vec<Vec<f16>> = w32
        .iter()
        .map(|w| w.iter().map(|&v| f16::from_f32(v)).collect())
        .collect();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let all = rayon::current_num_threads();
    println!(
        "{LAYERS} matrices [{N}, {K}]: {:.0} MB f32 — GB/s of weights read",
        (LAYERS * N * K * 4) as f64 / 1e6
    );
    let read = |threads: usize| {
        rate(LAYERS * N * K * 4, || {
            let s: f32 = if threads == 1 {
                w32.iter().map(|w| w.iter().sum::<f32>()).sum()
            } else {
                use rayon::prelude::*;
                w32.par_iter().map(|w| w.iter().sum::<f32>()).sum()
            };
            std::hint::black_box(s);
        })
    };
    println!(
        "plain read (sum)      1 thread {:6.1}   {all} threads {:6.1}",
        one.install(|| read(1)),
        read(all)
    );
    for m in [1usize, 2, 4, 8, 16] {
        println!(
            "gemv m={m:<2} f32           1 thread {:6.1}   {all} threads {:6.1}",
            one.install(|| gemv(&w32, m)),
            gemv(&w32, m)
        );
        println!(
            "gemv m={m:<2} f16           1 thread {:6.1}   {all} threads {:6.1}",
            one.install(|| gemv(&w16, m)),
            gemv(&w16, m)
        );
    }
    let dev = kvc_runtime::device(kvc_runtime::Backend::Flex).unwrap();
    let wt: Vec<Tensor<2>> = w32
        .iter()
        .map(|w| Tensor::from_data(TensorData::new(w.clone(), [N, K]), &dev))
        .collect();
    let x = Tensor::<2>::from_data(TensorData::new(values(K, 1), [1, K]), &dev);
    let flex = rate(LAYERS * N * K * 4, || {
        for w in &wt {
            let _ = x.clone().matmul(w.clone().transpose()).into_data();
        }
    });
    println!("Flex matmul m=1 f32   {flex:6.1}");
}
