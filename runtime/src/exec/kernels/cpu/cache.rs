//! In-place KV-cache writes on a host buffer.

/// `cache[b, h, start + t, :] = new[b, h, t, :]` for `t < len[b]` (slots clamped to the
/// cache), in place. `cache` is `[B, H, S, D]`, `new` `[B, H, T, D]`; `start` holds one
/// value per row (`[B]`) or per row and head (`[B, H]`). Rows with `len ≤ 0` are left
/// as they are.
pub fn kv_write<T: Copy>(
    cache: &mut [T],
    new: &[T],
    start: &[i32],
    len: &[i32],
    [b, h, s, d]: [usize; 4],
    t: usize,
) {
    let per_head = start.len() == b * h;
    for bi in 0..b {
        let n = (len[bi].max(0) as usize).min(t);
        for hi in 0..h {
            let st = if per_head {
                start[bi * h + hi]
            } else {
                start[bi]
            };
            for ti in 0..n {
                let slot = (st as i64 + ti as i64).clamp(0, s as i64 - 1) as usize;
                let dst = ((bi * h + hi) * s + slot) * d;
                let src = ((bi * h + hi) * t + ti) * d;
                cache[dst..dst + d].copy_from_slice(&new[src..src + d]);
            }
        }
    }
}
