//! Times the parts of prefill attention for SmolLM2's shapes (T = 512, S = 518).
use std::time::Instant;

use burn::tensor::activation::softmax;
use burn::tensor::{Distribution, Tensor};

fn time<T>(label: &str, f: impl Fn() -> T, sink: impl Fn(T)) {
    sink(f());
    let t = Instant::now();
    for _ in 0..5 {
        sink(f());
    }
    println!("{label}: {:.2} ms", t.elapsed().as_secs_f64() / 5.0 * 1e3);
}

fn main() {
    let dev = kvc_runtime::device(kvc_runtime::Backend::Flex).unwrap();
    let (hkv, gt, s, d) = (3, 3 * 512, 518, 64);
    let q = Tensor::<4>::random([1, hkv, gt, d], Distribution::Default, &dev);
    let k = Tensor::<4>::random([1, hkv, s, d], Distribution::Default, &dev);
    let kt = Tensor::<4>::from_data(k.clone().transpose().into_data(), &dev);
    let sink4 = |t: Tensor<4>| {
        let _ = t.into_data();
    };
    time(
        "q·kᵀ (transposed view)",
        || q.clone().matmul(k.clone().transpose()),
        sink4,
    );
    time(
        "q·kᵀ (contiguous kᵀ)",
        || q.clone().matmul(kt.clone()),
        sink4,
    );
    let q3 = q.clone().reshape([hkv, gt, d]);
    let k3 = k.clone().reshape([hkv, s, d]);
    time(
        "per-head 2-D matmuls",
        || {
            let outs: Vec<Tensor<2>> = (0..hkv)
                .map(|h| {
                    let qh = q3.clone().narrow(0, h, 1).reshape([gt, d]);
                    let kh = k3.clone().narrow(0, h, 1).reshape([s, d]);
                    qh.matmul(kh.transpose())
                })
                .collect();
            Tensor::stack::<3>(outs, 0).reshape([1, hkv, gt, s])
        },
        sink4,
    );
    let scores = q.clone().matmul(k.clone().transpose());
    time("softmax", || softmax(scores.clone(), 3), sink4);
}
