//! Products with weight matrices kept as GGUF blocks (placeholder: dequantizes one row at
//! a time and multiplies in f32).

use crate::load::gguf::{GgmlType, dequantize};

/// `out[r, j] = Σ_i x[r, i] · W[j, i]`, W `[n, k]` as GGUF blocks of type `ty`.
pub fn qmatmul_t(x: &[f32], m: usize, k: usize, w: &[u8], ty: GgmlType, n: usize, out: &mut [f32]) {
    let rb = w.len() / n;
    for j in 0..n {
        let row = dequantize(ty, &w[j * rb..(j + 1) * rb]).expect("whole blocks");
        for r in 0..m {
            out[r * n + j] = x[r * k..(r + 1) * k]
                .iter()
                .zip(&row)
                .map(|(a, b)| a * b)
                .sum();
        }
    }
}
