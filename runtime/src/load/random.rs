//! Deterministic random weights for `WeightSource::Random` specs (tiny test models and
//! benchmarks without a checkpoint). Each tensor's values depend only on the seed and the
//! tensor's name, so adding a layer does not change the others.

use kvc_compiler::ir::ParamDecl;

pub use crate::load::weights::HostTensor;

/// splitmix64: a small, well-mixed generator.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Random values for one parameter: norm gains near 1, matrices uniform with a scale of
/// `1/sqrt(fan_in)` (embeddings use 1) so activations stay of order one.
pub fn random_param(decl: &ParamDecl, seed: u64) -> HostTensor {
    let shape: Vec<usize> = decl.ty.shape.iter().map(|&d| d as usize).collect();
    let n: usize = shape.iter().product();
    let mut rng = SplitMix(seed ^ fnv1a(&decl.name));
    let data = if shape.len() == 1 {
        (0..n).map(|_| 1.0 + 0.1 * rng.unit()).collect()
    } else {
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        let scale = if decl.name.contains("embed_tokens") {
            1.0
        } else {
            1.0 / fan_in.sqrt()
        };
        (0..n).map(|_| scale * rng.unit()).collect()
    };
    HostTensor {
        shape,
        data,
        quant: None,
    }
}
