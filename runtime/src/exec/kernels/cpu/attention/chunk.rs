//! Attention over a long chunk of query positions (prefill), flash-style.

use rayon::prelude::*;

use super::rows::{KvElem, axpy, exp_shifted, widened};
use super::{Dims, check_fused};
use crate::exec::kernels::cpu::SendPtr;

/// Query positions per task of [`chunk`]: the `g` query heads at these positions share
/// every widened tile of keys and values.
const CHUNK_POSITIONS: usize = 16;

/// Slots per tile of [`chunk`].
const TILE_SLOTS: usize = 64;

/// Query rows and slot columns of the score micro-tile.
const SCORE_ROWS: usize = 4;
const SCORE_COLS: usize = 32;

/// Query rows and output columns of the `probs · v` micro-tile.
const VALUE_ROWS: usize = 4;
const VALUE_COLS: usize = 32;

/// [`attention`](super::attention) for a long chunk of query positions (prefill), flash-style: one task per
/// (row, KV head, 16 positions) holds the `g · 16` query rows of that KV head and walks
/// the slots any of them sees in tiles of 64. The tiles of each head's seen span (first to
/// last seen slot of any position) are widened once per call, keys transposed. Each
/// tile's scores are a register-blocked product, the softmax is kept online (a running
/// maximum and sum per row, earlier output rescaled when the maximum grows), and
/// `probs · v` is added in register tiles; the `[T, S]` probabilities are never stored.
/// A task skips the tiles none of its positions sees (a causal chunk's future, a budgeted
/// cache's free slots). Rows that see nothing get zero output. As in Burn's attention,
/// a hidden slot holding a non-finite value still reaches the product (weight 0 times
/// it); the decode kernel skips such slots.
///
/// With `real` (each batch row's real positions, see [`super::real_positions`]), only
/// those query positions are computed; the other rows of `out` are left as they are.
///
/// # Panics
/// If a slice length disagrees with `dims`.
pub fn chunk<E: KvElem>(
    q: &[f32],
    k: &[E],
    v: &[E],
    mask: &[u8],
    dims: Dims,
    real: Option<&[usize]>,
    out: &mut [f32],
) {
    check_fused(dims, q.len(), k.len(), v.len(), mask.len(), out.len());
    let Dims {
        b, hkv, t, s, d, m, ..
    } = dims;
    if !E::supported() {
        return chunk(q, &widened(k), &widened(v), mask, dims, real, out);
    }
    let real = |bi: usize| super::real_positions(real, bi, t);
    if s == 0 {
        out.fill(0.0);
        return;
    }
    // The tiles of each head's seen span (from the tile holding its first seen slot to
    // the one holding its last), widened once for all tasks: keys transposed (`[D,
    // TILE_SLOTS]` per tile), values as they are (`[TILE_SLOTS, D]`).
    let tile = d * TILE_SLOTS;
    let spans: Vec<(usize, usize)> = (0..b * hkv)
        .map(|h| {
            let (bi, kvh) = (h / hkv, h % hkv);
            let mh = if m == 1 { 0 } else { kvh };
            let (lo, hi) = seen_slots(&mask[(bi * m + mh) * t * s..][..real(bi) * s], s);
            if lo < hi {
                (lo / TILE_SLOTS, hi.div_ceil(TILE_SLOTS))
            } else {
                (0, 0)
            }
        })
        .collect();
    // Each head's first tile in the widened buffers, and (head, tile) of every tile.
    let mut first = Vec::with_capacity(b * hkv + 1);
    first.push(0);
    for &(c0, c1) in &spans {
        first.push(first.last().copied().unwrap_or(0) + c1 - c0);
    }
    let tiles: Vec<(usize, usize)> = spans
        .iter()
        .enumerate()
        .flat_map(|(h, &(c0, c1))| (c0..c1).map(move |c| (h, c)))
        .collect();
    let mut kt = vec![0.0f32; tiles.len() * tile];
    let mut vw = vec![0.0f32; tiles.len() * tile];
    kt.par_chunks_mut(tile)
        .zip(vw.par_chunks_mut(tile))
        .zip(tiles.par_iter())
        .for_each(|((kt, vw), &(h, c))| {
            let (j0, j1) = (c * TILE_SLOTS, ((c + 1) * TILE_SLOTS).min(s));
            let at = (h * s + j0) * d..(h * s + j1) * d;
            // SAFETY: no contract beyond the slices' own.
            unsafe { widen_tile(&k[at.clone()], &v[at], d, kt, vw) };
        });
    let blocks = t.div_ceil(CHUNK_POSITIONS);
    let o = SendPtr(out.as_mut_ptr());
    // SAFETY: task i writes only the output rows of its KV head's query heads at its
    // positions.
    (0..b * hkv * blocks).into_par_iter().for_each(|i| unsafe {
        let h = i / blocks;
        let positions = real(h / hkv);
        if (i % blocks) * CHUNK_POSITIONS >= positions {
            return;
        }
        let span = first[h] * tile..first[h + 1] * tile;
        let head = WidenedHead {
            kt: &kt[span.clone()],
            vw: &vw[span],
            first_tile: spans[h].0,
        };
        chunk_task(q, head, mask, dims, (i, positions), o)
    });
}

/// The first and one past the last slot that any row of `mask` (`[T, s]`) sees (`(s, 0)`
/// when none does).
fn seen_slots(mask: &[u8], s: usize) -> (usize, usize) {
    let (mut lo, mut hi) = (s, 0);
    for row in mask.chunks_exact(s) {
        if let Some(a) = row.iter().position(|&v| v != 0) {
            lo = lo.min(a);
            hi = hi.max(row.iter().rposition(|&v| v != 0).map_or(0, |z| z + 1));
        }
    }
    (lo, hi)
}

multiversion! {
    /// Keys `k` and values `v` of up to [`TILE_SLOTS`] slots (`[n, d]`) widened into one
    /// tile: `kt` transposed (`[d, TILE_SLOTS]`), `vw` as they are.
    ///
    /// # Safety
    /// None beyond the slices' own (required by the macro's form).
    unsafe fn widen_tile<E: KvElem>(k: &[E], v: &[E], d: usize, kt: &mut [f32], vw: &mut [f32]) {
        let mut row = vec![0.0f32; d];
        for (j, (kr, vr)) in k.chunks_exact(d).zip(v.chunks_exact(d)).enumerate() {
            widen_row(kr, &mut row);
            for (i, &x) in row.iter().enumerate() {
                kt[i * TILE_SLOTS + j] = x;
            }
            widen_row(vr, &mut vw[j * d..][..d]);
        }
    }
}

/// One KV head's widened tiles in [`chunk`]: keys transposed (`[D, TILE_SLOTS]` per
/// tile) and values (`[TILE_SLOTS, D]` per tile) of the tiles from `first_tile` on.
#[derive(Clone, Copy)]
struct WidenedHead<'a> {
    kt: &'a [f32],
    vw: &'a [f32],
    first_tile: usize,
}

/// Scratch of one [`chunk`] task.
struct ChunkScratch {
    /// Query rows `[R, D]`, row `r` = (head `r / positions`, position `r % positions`).
    q: Vec<f32>,
    /// Unnormalised output rows `[R, D]`.
    o: Vec<f32>,
    /// Running maximum and sum of `exp(score − max)` per row.
    max: Vec<f32>,
    sum: Vec<f32>,
    /// A tile's scores, then weights: `[R, TILE_SLOTS]`.
    p: Vec<f32>,
}

multiversion! {
    /// Task `i` of [`chunk`], on its head's widened tiles.
    ///
    /// # Safety
    /// `o` points to the `[B, Hq, T, D]` output; no other task writes this task's rows.
    unsafe fn chunk_task(q: &[f32], head: WidenedHead<'_>, mask: &[u8], x: Dims, task: (usize, usize), o: SendPtr<f32>) {
        let (i, positions) = task;
        let WidenedHead { kt, vw, first_tile } = head;
        let Dims { scale, hq, hkv, t, s, d, m, .. } = x;
        let g = hq / hkv;
        let blocks = t.div_ceil(CHUNK_POSITIONS);
        let (h, c) = (i / blocks, i % blocks);
        let (bi, kvh) = (h / hkv, h % hkv);
        let mh = if m == 1 { 0 } else { kvh };
        let (p0, p1) = (c * CHUNK_POSITIONS, ((c + 1) * CHUNK_POSITIONS).min(positions));
        let np = p1 - p0;
        let rows = g * np;
        let mk = &mask[(bi * m + mh) * t * s..][..t * s];
        let out_row = |r: usize| ((bi * hq + kvh * g + r / np) * t + p0 + r % np) * d;
        let (lo, hi) = seen_slots(&mk[p0 * s..p1 * s], s);
        let mut w = ChunkScratch {
            q: vec![0.0; rows * d],
            o: vec![0.0; rows * d],
            max: vec![f32::NEG_INFINITY; rows],
            sum: vec![0.0; rows],
            p: vec![0.0; rows * TILE_SLOTS],
        };
        for hh in 0..g {
            let src = &q[((bi * hq + kvh * g + hh) * t + p0) * d..][..np * d];
            w.q[hh * np * d..][..np * d].copy_from_slice(src);
        }
        // Whole tiles from the one holding `lo`: the widened tiles start at slot 0.
        let mut j0 = lo / TILE_SLOTS * TILE_SLOTS;
        while j0 < hi {
            let j1 = (j0 + TILE_SLOTS).min(s);
            let n = j1 - j0;
            if (p0..p1).all(|p| mk[p * s + j0..p * s + j1].iter().all(|&v| v == 0)) {
                j0 = j1;
                continue;
            }
            let tile = (j0 / TILE_SLOTS - first_tile) * d * TILE_SLOTS;
            let (ktile, vtile) = (&kt[tile..][..d * TILE_SLOTS], &vw[tile..][..d * TILE_SLOTS]);
            let mut r = 0;
            while r < rows {
                let take = (rows - r).min(SCORE_ROWS);
                let (qr, pr) = (&w.q[r * d..][..take * d], &mut w.p[r * TILE_SLOTS..][..take * TILE_SLOTS]);
                for c0 in (0..TILE_SLOTS).step_by(SCORE_COLS) {
                    match take {
                        4 => score_tile::<4>(qr, ktile, c0, scale, pr),
                        3 => score_tile::<3>(qr, ktile, c0, scale, pr),
                        2 => score_tile::<2>(qr, ktile, c0, scale, pr),
                        _ => score_tile::<1>(qr, ktile, c0, scale, pr),
                    }
                }
                r += take;
            }
            for r in 0..rows {
                let vis = &mk[(p0 + r % np) * s + j0..][..n];
                let e = &mut w.p[r * TILE_SLOTS..][..TILE_SLOTS];
                let mut top = f32::NEG_INFINITY;
                for (e, &seen) in e.iter_mut().zip(vis) {
                    if seen == 0 {
                        *e = f32::NEG_INFINITY;
                    }
                    top = top.max(*e);
                }
                e[n..].fill(f32::NEG_INFINITY);
                if top == f32::NEG_INFINITY {
                    // This row sees none of the tile: it adds nothing.
                    e.fill(0.0);
                    continue;
                }
                let new = w.max[r].max(top);
                if new > w.max[r] {
                    let f = crate::exec::kernels::cpu::elementwise::exp(w.max[r] - new);
                    w.sum[r] *= f;
                    for a in &mut w.o[r * d..][..d] {
                        *a *= f;
                    }
                    w.max[r] = new;
                }
                w.sum[r] += exp_shifted(e, new);
            }
            let mut r = 0;
            while r < rows {
                let take = (rows - r).min(VALUE_ROWS);
                let (pr, or) = (&w.p[r * TILE_SLOTS..][..take * TILE_SLOTS], &mut w.o[r * d..][..take * d]);
                match take {
                    4 => value_tile::<4>(pr, vtile, n, d, or),
                    3 => value_tile::<3>(pr, vtile, n, d, or),
                    2 => value_tile::<2>(pr, vtile, n, d, or),
                    _ => value_tile::<1>(pr, vtile, n, d, or),
                }
                r += take;
            }
            j0 = j1;
        }
        for r in 0..rows {
            let inv = if w.sum[r] > 0.0 { 1.0 / w.sum[r] } else { 0.0 };
            // SAFETY: row r of the output is this task's (the caller's contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(o.at(out_row(r)), d) };
            for (y, &a) in dst.iter_mut().zip(&w.o[r * d..][..d]) {
                *y = a * inv;
            }
        }
    }
}

/// `out = x` widened.
#[inline(always)]
fn widen_row<E: KvElem>(x: &[E], out: &mut [f32]) {
    let mut i = 0;
    while i + 8 <= x.len() {
        // SAFETY: the entry points run here only where `E::supported()`.
        out[i..i + 8].copy_from_slice(&unsafe { E::load8(&x[i..]) });
        i += 8;
    }
    for (o, &a) in out[i..].iter_mut().zip(&x[i..]) {
        *o = a.widen();
    }
}

/// Scores of `R` query rows (`q`, `[R, D]`) with slots `c0..c0 + SCORE_COLS` of a tile of
/// transposed keys `kt` into columns `c0..` of `p` (`[R, TILE_SLOTS]`), times `scale`.
#[inline(always)]
fn score_tile<const R: usize>(q: &[f32], kt: &[f32], c0: usize, scale: f32, p: &mut [f32]) {
    let d = q.len() / R;
    let mut acc = [[0.0f32; SCORE_COLS]; R];
    for i in 0..d {
        let kr: &[f32; SCORE_COLS] = kt[i * TILE_SLOTS + c0..][..SCORE_COLS]
            .try_into()
            .expect("a tile row");
        for (r, a) in acc.iter_mut().enumerate() {
            let x = q[r * d + i];
            for (a, &kv) in a.iter_mut().zip(kr) {
                *a += x * kv;
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (o, &a) in p[r * TILE_SLOTS + c0..][..SCORE_COLS].iter_mut().zip(a) {
            *o = scale * a;
        }
    }
}

/// `o[r] += Σ_{j < n} p[r, j] · v[j]` for `R` rows (`p` `[R, TILE_SLOTS]`, `v` `[n, D]`,
/// `o` `[R, D]`), in register tiles of [`VALUE_COLS`] columns.
#[inline(always)]
fn value_tile<const R: usize>(p: &[f32], v: &[f32], n: usize, d: usize, o: &mut [f32]) {
    let mut c0 = 0;
    while c0 + VALUE_COLS <= d {
        let mut acc = [[0.0f32; VALUE_COLS]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            a.copy_from_slice(&o[r * d + c0..][..VALUE_COLS]);
        }
        for j in 0..n {
            let vr: &[f32; VALUE_COLS] = v[j * d + c0..][..VALUE_COLS]
                .try_into()
                .expect("a value row");
            for (r, a) in acc.iter_mut().enumerate() {
                let x = p[r * TILE_SLOTS + j];
                for (a, &y) in a.iter_mut().zip(vr) {
                    *a += x * y;
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            o[r * d + c0..][..VALUE_COLS].copy_from_slice(a);
        }
        c0 += VALUE_COLS;
    }
    if c0 < d {
        for r in 0..R {
            let or = &mut o[r * d + c0..(r + 1) * d];
            for j in 0..n {
                axpy(p[r * TILE_SLOTS + j], &v[j * d + c0..(j + 1) * d], or);
            }
        }
    }
}
