//! The quantized matrix products of `kvc_runtime::exec::kernels::cpu::quant` on each
//! method and instruction set, beside the f32 GEMV, at the real models' decode shapes.
//! Paths run in turn call after call, so that a shared machine's load shifts all of them
//! alike (criterion's runs of one path after another do not). The `stream` shapes cycle
//! through 32 matrices (≈ 100 MB), too large for the caches, as a decode step does.
//! Row counts above `quant::DECODE_ROWS` (prefill) compare int8 with the f32 panels;
//! products above `quant::INTERLEAVE_ABOVE` rows also time the interleaved weights.
//!
//! `cargo run --release -p kvc-runtime --example quant_paths [-- M,M.. [REPS]]`
#[path = "../benches/support/quant_matrix.rs"]
mod quant_matrix;

use std::rc::Rc;
use std::time::Instant;

use kvc_runtime::exec::kernels::cpu::gemv;
use kvc_runtime::exec::kernels::cpu::isa::Isa;
use kvc_runtime::exec::kernels::cpu::quant::{self, Method, Path};
use kvc_runtime::exec::kernels::hash_uniform;
use kvc_runtime::load::gguf::GgmlType;
use quant_matrix::quant_matrix;

/// One way to compute a product into `out`.
type Run = Box<dyn FnMut(&mut [f32])>;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| hash_uniform(seed, i as i32, 0) * 2.0 - 1.0)
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ms: Vec<usize> = args.get(1).map_or(vec![1, 16], |s| {
        s.split(',').map(|v| v.parse().expect("rows")).collect()
    });
    let reps: usize = args.get(2).map_or(30, |s| s.parse().expect("repetitions"));
    let shapes = [
        ("smollm2-qo", GgmlType::Q4_1, 576, 576, 1),
        ("smollm2-up", GgmlType::Q4_1, 576, 1536, 1),
        ("smollm2-head", GgmlType::Q8_0, 576, 49152, 1),
        ("qwen-up", GgmlType::Q5_0, 896, 4864, 1),
        ("qwen-down-q4k", GgmlType::Q4_K, 4864, 896, 1),
        ("qwen-down-q6k", GgmlType::Q6_K, 4864, 896, 1),
        ("qwen-head", GgmlType::Q8_0, 896, 151936, 1),
        ("gemma-up", GgmlType::Q5_0, 640, 2048, 1),
        ("gemma-o-q4k", GgmlType::Q4_K, 1024, 640, 1),
        ("gemma-head", GgmlType::Q8_0, 640, 262144, 1),
        ("stream-qwen-up", GgmlType::Q5_0, 896, 4864, 32),
        ("stream-qwen-down-q4k", GgmlType::Q4_K, 4864, 896, 32),
    ];
    let isas: Vec<Isa> = [Isa::Avx512, Isa::Avx2]
        .into_iter()
        .filter(|i| i.available())
        .collect();
    println!("shape, type, m, path: median µs (GB/s of weight bytes), min µs");
    for (name, ty, k, n, copies) in shapes {
        let ws: Rc<Vec<Vec<u8>>> = Rc::new(
            (0..copies)
                .map(|c| quant_matrix(ty, k, n, 11 + c as u32))
                .collect(),
        );
        let bytes = ws[0].len();
        // Eight f32 copies (≥ 140 MB) defeat the caches as well.
        let f32_copies = if copies > 1 { 8 } else { 1 };
        let wf: Rc<Vec<Vec<f32>>> =
            Rc::new((0..f32_copies).map(|c| values(n * k, 2 + c)).collect());
        for &m in &ms {
            let x = Rc::new(values(m * k, 1));
            let mut runs: Vec<(String, usize, Run)> = Vec::new();
            // Prefill widths (more than `quant::DECODE_ROWS`) compare int8 with the f32
            // panels; LM heads multiply one row at prefill and are skipped there.
            let prefill = m > quant::DECODE_ROWS;
            if prefill && name.ends_with("head") {
                continue;
            }
            let methods = if prefill {
                [Method::Int8, Method::Panel]
            } else {
                [Method::Int8, Method::Dequant]
            };
            for &isa in &isas {
                for method in methods {
                    let (ws, x) = (ws.clone(), x.clone());
                    let mut i = 0;
                    let run: Run = Box::new(move |out: &mut [f32]| {
                        i = (i + 1) % ws.len();
                        let path = Path { isa, method };
                        quant::qmatmul_t_with(path, &x, m, k, &ws[i], ty, n, out);
                    });
                    let label = format!("{isa:?}-{method:?}").to_lowercase();
                    runs.push((label, bytes, run));
                }
            }
            // Batches above `quant::INTERLEAVE_ABOVE` rows read interleaved weights (a
            // prefill too, where the plan stores them so for its decode step).
            if m > quant::INTERLEAVE_ABOVE && quant::interleaving() {
                let wi: Vec<Vec<u8>> = ws
                    .iter()
                    .map(|w| quant::interleave(ty, k, n, w).expect("interleaved"))
                    .collect();
                let ibytes = wi[0].len();
                let x = x.clone();
                let mut i = 0;
                let run: Run = Box::new(move |out: &mut [f32]| {
                    i = (i + 1) % wi.len();
                    quant::qmatmul_t_interleaved(&x, m, k, &wi[i], ty, n, out);
                });
                runs.push(("interleaved".into(), ibytes, run));
            }
            let (wf, xf) = (wf.clone(), x.clone());
            let mut i = 0;
            let f32_run: Run = Box::new(move |out: &mut [f32]| {
                i = (i + 1) % wf.len();
                gemv::matmul_t(&xf, m, k, &wf[i], n, out);
            });
            runs.push(("f32-matmul_t".into(), n * k * 4, f32_run));
            let mut out = vec![0.0f32; m * n];
            let mut times = vec![Vec::with_capacity(reps); runs.len()];
            for _ in 0..reps {
                for ((_, _, run), t) in runs.iter_mut().zip(&mut times) {
                    let start = Instant::now();
                    run(&mut out);
                    t.push(start.elapsed().as_secs_f64() * 1e6);
                }
            }
            for ((label, bytes, _), t) in runs.iter().zip(&mut times) {
                t.sort_by(f64::total_cmp);
                let med = t[t.len() / 2];
                let gbs = *bytes as f64 / med / 1e3;
                println!(
                    "{name}, {ty}, {m}, {label}: {med:.1} ({gbs:.1}), {:.1}",
                    t[0]
                );
            }
        }
    }
}
