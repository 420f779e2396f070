//! Test matrices of GGUF blocks for the `ops` benchmarks and the `quant_paths` example.

use kvc_runtime::exec::kernels::hash_uniform;
use kvc_runtime::load::gguf::GgmlType;

/// `n` rows of `k` values of GGUF blocks of type `ty`: hashed bytes with every f16 scale
/// and minimum set to 0.01, so every value is finite.
pub fn quant_matrix(ty: GgmlType, k: usize, n: usize, seed: u32) -> Vec<u8> {
    let bb = ty.block_bytes() as usize;
    let blocks = n * k / ty.block_size() as usize;
    let mut w: Vec<u8> = (0..blocks * bb)
        .map(|i| (hash_uniform(seed, (i >> 20) as i32, (i & 0xfffff) as i32) * 256.0) as u8)
        .collect();
    let fields: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q6_K => &[208],
        _ => &[0, 2],
    };
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    for blk in w.chunks_exact_mut(bb) {
        for &at in fields {
            blk[at..at + 2].copy_from_slice(&scale);
        }
    }
    w
}
