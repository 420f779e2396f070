//! Decode-shaped GEMVs over weights too large for the caches (like a real model's), run
//! as one matmul or split in two halves on two threads.
use std::time::Instant;

use burn::tensor::{Distribution, Tensor};

fn main() {
    let dev = kvc_runtime::device(kvc_runtime::Backend::Flex).unwrap();
    let (m, k, n, layers) = (1, 576, 1536, 60);
    let x = Tensor::<2>::random([m, k], Distribution::Default, &dev);
    let ws: Vec<Tensor<2>> = (0..layers)
        .map(|_| Tensor::<2>::random([n, k], Distribution::Default, &dev))
        .collect();
    let run = |split: bool| {
        let t = Instant::now();
        for _ in 0..5 {
            for w in &ws {
                let y = if split {
                    let h = n / 2;
                    let (a, b) = rayon::join(
                        || x.clone().matmul(w.clone().narrow(0, 0, h).transpose()),
                        || x.clone().matmul(w.clone().narrow(0, h, n - h).transpose()),
                    );
                    Tensor::cat(vec![a, b], 1)
                } else {
                    x.clone().matmul(w.clone().transpose())
                };
                let _ = y.into_data();
            }
        }
        let secs = t.elapsed().as_secs_f64() / 5.0;
        let bytes = (layers * n * k * 4) as f64;
        println!(
            "split={split}: {:.2} ms per pass over {:.0} MB = {:.1} GB/s",
            secs * 1e3,
            bytes / 1e6,
            bytes / secs / 1e9
        );
    };
    for _ in 0..2 {
        run(false);
        run(true);
    }
}
