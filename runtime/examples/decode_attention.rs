//! Times decode attention (`attention::attention`, one query position) at Gemma 3 270M's
//! shapes (4 query heads, 1 KV head of 256) over 18 layers of f16 caches, as in a decode
//! step: `cargo run --release --example decode_attention -- [B] [S] [steps] [caches]
//! [MODEL]`, MODEL `gemma` (the default) or `smollm2` (9 query heads, 3 KV heads of 64,
//! 30 layers).
//! With `caches` at least the layer count (the default) every layer has its own cache and
//! the keys and values stream from memory; with 1 the calls reuse one cache (from the
//! last-level cache when it fits), which separates the kernel's arithmetic from its memory
//! stalls.
use std::time::Instant;

use kvc_runtime::exec::kernels::cpu::attention::{Dims, attention};

fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (b, s, reps, caches) = (
        arg(1, 16),
        arg(2, 640),
        arg(3, 20),
        arg(4, usize::MAX).max(1),
    );
    let (hq, hkv, d, layers) = match std::env::args().nth(5).as_deref() {
        None | Some("gemma") => (4, 1, 256, 18),
        Some("smollm2") => (9, 3, 64, 30),
        Some(other) => panic!("unknown model {other}: gemma or smollm2"),
    };
    let dims = Dims {
        scale: 0.0625,
        b,
        hq,
        hkv,
        t: 1,
        s,
        d,
        m: 1,
    };
    let mut seed = 1u32;
    let mut next = || {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
    };
    let n = b * hkv * s * d;
    let kv: Vec<(Vec<half::f16>, Vec<half::f16>)> = (0..caches.min(layers))
        .map(|_| {
            let k = (0..n).map(|_| half::f16::from_f32(next())).collect();
            let v = (0..n).map(|_| half::f16::from_f32(next())).collect();
            (k, v)
        })
        .collect();
    let q: Vec<f32> = (0..b * hq * d).map(|_| next()).collect();
    // Every row sees all but the last 8 slots (the dense cache's unwritten tail).
    let mask: Vec<u8> = (0..b * s).map(|i| u8::from(i % s < s - 8)).collect();
    let mut out = vec![0.0f32; b * hq * d];
    let mut steps = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        // On a worker of the pool, as the executor runs a graph (which also keeps the
        // other workers polling for work; this example does not).
        rayon::scope(|_| {
            for i in 0..layers {
                let (k, v) = &kv[i % kv.len()];
                attention(&q, k, v, &mask, dims, None, &mut out);
            }
        });
        steps.push(t.elapsed().as_secs_f64() * 1e3);
    }
    steps.sort_by(f64::total_cmp);
    // Bytes of keys and values the calls read (each call reads its whole cache).
    let mb = (2 * layers * n * 2) as f64 / 1e6;
    let p50 = steps[steps.len() / 2];
    println!(
        "batch {b}, {s} slots, {} distinct caches: {p50:.2} ms per step (median of {reps}), \
         {mb:.0} MB of K/V read, {:.1} GB/s; out[0] {}",
        kv.len(),
        mb / p50,
        out[0]
    );
}
