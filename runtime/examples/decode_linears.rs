//! The quantized products of one whole decode step of a real model, in the model's order,
//! with distinct weights for every layer (so they stream from memory as in a decode step),
//! called back to back from inside rayon's pool (without the executor's pollers). Prints
//! the median step time and the weight bytes streamed per second, per instruction set and
//! row count: how close the products come to the machine's memory bandwidth, which
//! `quant_paths` (one product repeated, mostly from cache) does not show.
//!
//! `cargo run --release -p kvc-runtime --example decode_linears [-- MODEL [M,M.. [STEPS]]]`
//! with MODEL `smollm2` (default), `qwen` or `gemma`.
#[path = "../benches/support/quant_matrix.rs"]
mod quant_matrix;

use std::time::Instant;

use kvc_runtime::exec::kernels::cpu::isa::Isa;
use kvc_runtime::exec::kernels::cpu::quant::{self, Method, Path};
use kvc_runtime::exec::kernels::hash_uniform;
use kvc_runtime::load::gguf::GgmlType;
use quant_matrix::quant_matrix;

/// A product's weight type, input width `k` and output width `n`.
type Product = (GgmlType, usize, usize);

/// One layer's products `(type, k, n)` and the layer count, then the LM head. SmolLM2's
/// Q4_1 file is uniform; the Q4_K_M files of Qwen and Gemma mix types from layer to layer,
/// and their rows here are a typical layer's mix, not an exact copy.
fn model(name: &str) -> (Vec<Product>, usize, Product) {
    use GgmlType::*;
    match name {
        "smollm2" => (
            vec![
                (Q4_1, 576, 576),
                (Q4_1, 576, 192),
                (Q4_1, 576, 192),
                (Q4_1, 576, 576),
                (Q4_1, 576, 1536),
                (Q4_1, 576, 1536),
                (Q4_1, 1536, 576),
            ],
            30,
            (Q8_0, 576, 49152),
        ),
        "qwen" => (
            vec![
                (Q5_0, 896, 896),
                (Q5_0, 896, 128),
                (Q8_0, 896, 128),
                (Q5_0, 896, 896),
                (Q5_0, 896, 4864),
                (Q5_0, 896, 4864),
                (Q4_K, 4864, 896),
            ],
            24,
            (Q8_0, 896, 151936),
        ),
        "gemma" => (
            vec![
                (Q5_0, 640, 1024),
                (Q5_0, 640, 256),
                (Q8_0, 640, 256),
                (Q4_K, 1024, 640),
                (Q5_0, 640, 2048),
                (Q5_0, 640, 2048),
                (Q8_0, 2048, 640),
            ],
            18,
            (Q8_0, 640, 262144),
        ),
        other => panic!("unknown model {other}: smollm2, qwen or gemma"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map_or("smollm2", String::as_str);
    let ms: Vec<usize> = args.get(2).map_or(vec![1], |s| {
        s.split(',').map(|v| v.parse().expect("rows")).collect()
    });
    let steps: usize = args.get(3).map_or(30, |s| s.parse().expect("steps"));
    let (layer, layers, head) = model(name);
    let mats: Vec<(GgmlType, usize, usize, Vec<u8>)> = (0..layers)
        .flat_map(|_| layer.iter().copied())
        .chain([head])
        .enumerate()
        .map(|(i, (ty, k, n))| (ty, k, n, quant_matrix(ty, k, n, i as u32)))
        .collect();
    let bytes: usize = mats.iter().map(|m| m.3.len()).sum();
    let kmax = mats.iter().map(|t| t.1).max().unwrap_or(0);
    let nmax = mats.iter().map(|t| t.2).max().unwrap_or(0);
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.available())
        .collect();
    println!(
        "{name}: {} products, {:.1} MB of weights; isa, m: median step ms (GB/s), min ms",
        mats.len(),
        bytes as f64 / 1e6
    );
    for &m in &ms {
        let x: Vec<f32> = (0..m * kmax)
            .map(|i| hash_uniform(1, i as i32, 0) * 2.0 - 1.0)
            .collect();
        let mut out = vec![0.0f32; m * nmax];
        // The file's blocks on each instruction set, and (as a plan stores them above
        // `INTERLEAVE_ABOVE` rows) interleaved weights on the best one; each with the
        // bytes it streams.
        let mut labels: Vec<(String, usize)> =
            isas.iter().map(|i| (format!("{i:?}"), bytes)).collect();
        let inter = m > quant::INTERLEAVE_ABOVE && quant::interleaving();
        let wi: Vec<Vec<u8>> = if inter {
            mats.iter()
                .map(|(ty, k, n, w)| quant::interleave(*ty, *k, *n, w).expect("interleaved"))
                .collect()
        } else {
            Vec::new()
        };
        if inter {
            let ibytes = wi.iter().map(Vec::len).sum();
            labels.push((format!("interleaved ({:?})", Isa::best()), ibytes));
        }
        let mut times = vec![Vec::with_capacity(steps); labels.len()];
        for _ in 0..steps {
            for (v, t) in times.iter_mut().enumerate() {
                let start = Instant::now();
                rayon::scope(|_| {
                    for (i, (ty, k, n, w)) in mats.iter().enumerate() {
                        let (x, out) = (&x[..m * k], &mut out[..m * n]);
                        match isas.get(v) {
                            Some(&isa) => {
                                let path = Path {
                                    isa,
                                    method: Method::Int8,
                                };
                                quant::qmatmul_t_with(path, x, m, *k, w, *ty, *n, out)
                            }
                            None => quant::qmatmul_t_interleaved(x, m, *k, &wi[i], *ty, *n, out),
                        }
                    }
                });
                t.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        for ((label, streamed), t) in labels.iter().zip(&mut times) {
            t.sort_by(f64::total_cmp);
            let med = t[t.len() / 2];
            println!(
                "{label}, {m}: {med:.2} ({:.1}), {:.2}",
                *streamed as f64 / med / 1e6,
                t[0]
            );
        }
    }
}
