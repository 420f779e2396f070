use kvc_runtime::cpu::attention::{Dims, attention};
use std::time::Instant;
fn main() {
    for s in [576usize, 4096] {
        let x = Dims {
            scale: 0.125,
            b: 1,
            hq: 9,
            hkv: 3,
            t: 1,
            s,
            d: 64,
            m: 1,
        };
        let q = vec![0.1f32; 9 * 64];
        let k: Vec<f32> = (0..3 * s * 64).map(|i| (i % 17) as f32 * 0.01).collect();
        let v = k.clone();
        let mask = vec![1u8; s];
        let mut out = vec![0.0f32; 9 * 64];
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                for _ in 0..20 {
                    attention(&q, &k, &v, &mask, x, &mut out, None);
                }
                let t = Instant::now();
                for _ in 0..200 {
                    attention(&q, &k, &v, &mask, x, &mut out, None);
                }
                println!(
                    "s={s} threads={threads}: {:.1} µs",
                    t.elapsed().as_secs_f64() / 200.0 * 1e6
                );
            });
        }
    }
}
