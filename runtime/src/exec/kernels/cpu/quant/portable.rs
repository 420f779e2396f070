//! The portable forms: one weight row unpacked from the file's blocks ([`Row`]), widened
//! to f32, or multiplied with int8 activations in the SIMD kernels' block arithmetic.

use kvc_compiler::blocks::{Block, f16_at, k_scale_mins};

use super::{Row, xq::Xq};

/// The scales of one block into `ds` and `dm` (see [`Row`]).
pub(super) fn block_scales(q: Block, blk: &[u8], ds: &mut [f32], dm: &mut [f32]) {
    match q {
        Block::Q4K | Block::Q5K => {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let (sc, mn) = k_scale_mins(&blk[4..16]);
            for j in 0..8 {
                ds[j] = d * f32::from(sc[j]);
                dm[j] = dmin * f32::from(mn[j]);
            }
        }
        Block::Q6K => {
            let d = f16_at(blk, 208);
            for (ds, &s) in ds[..16].iter_mut().zip(&blk[192..208]) {
                *ds = d * f32::from(s as i8);
            }
        }
        _ => {
            ds[0] = f16_at(blk, 0);
            dm[0] = if q.format().mins { f16_at(blk, 2) } else { 0.0 };
        }
    }
}

/// The 32 values of 32-value column `sub` of one block, one byte each (see [`Row`]).
pub(super) fn column(q: Block, blk: &[u8], sub: usize, u: &mut [u8]) {
    let bb = q.bytes();
    match q {
        Block::Q4_0 | Block::Q4_1 => {
            for (i, &v) in blk[bb - 16..].iter().enumerate() {
                u[i] = v & 0x0f;
                u[i + 16] = v >> 4;
            }
        }
        Block::Q5_0 | Block::Q5_1 => {
            let o = bb - 20;
            let qh = u32::from_le_bytes([blk[o], blk[o + 1], blk[o + 2], blk[o + 3]]);
            let high = |i: usize| (((qh >> i) & 1) as u8) << 4;
            for (i, &v) in blk[o + 4..].iter().enumerate() {
                u[i] = (v & 0x0f) | high(i);
                u[i + 16] = (v >> 4) | high(i + 16);
            }
        }
        Block::Q8_0 => u[..32].copy_from_slice(&blk[2..]),
        Block::Q4K | Block::Q5K => {
            let qs = &blk[bb - 128 + 32 * (sub / 2)..][..32];
            let shift = 4 * (sub % 2);
            for (l, o) in u[..32].iter_mut().enumerate() {
                *o = (qs[l] >> shift) & 0x0f;
                if q == Block::Q5K {
                    *o |= ((blk[16 + l] >> sub) & 1) << 4;
                }
            }
        }
        Block::Q6K => {
            let (h, kk) = (sub / 4, sub % 4);
            let ql = &blk[64 * h + 32 * (kk % 2)..][..32];
            let qh = &blk[128 + 32 * h..][..32];
            for (l, o) in u[..32].iter_mut().enumerate() {
                *o = ((ql[l] >> (4 * (kk / 2))) & 0x0f) | (((qh[l] >> (2 * kk)) & 3) << 4);
            }
        }
    }
}

/// Unpacks one row's blocks `wr` into `row` (see [`Row`]).
pub(super) fn unpack_portable(q: Block, wr: &[u8], row: &mut Row) {
    let (subs, upb) = (q.values() / 32, q.values() / q.unit());
    for (b, blk) in wr.chunks_exact(q.bytes()).enumerate() {
        block_scales(q, blk, &mut row.ds[b * upb..], &mut row.dm[b * subs..]);
        for sub in 0..subs {
            column(q, blk, sub, &mut row.u[32 * (b * subs + sub)..]);
        }
    }
}

/// Writes the f32 values of an unpacked row to `out` (`k` values), as [`Row`] defines them.
pub(super) fn expand_portable(q: Block, row: &Row, out: &mut [f32]) {
    let f = q.format();
    let off = f.offset as f32;
    for (j, (o, u)) in out
        .chunks_exact_mut(q.unit())
        .zip(row.u.chunks_exact(q.unit()))
        .enumerate()
    {
        let ds = row.ds[j];
        for (o, &u) in o.iter_mut().zip(u) {
            *o = match (f.signed, f.mins, f.is_k()) {
                (true, _, _) => ds * f32::from(u as i8),
                (false, false, _) => ds * (f32::from(u) - off),
                (false, true, false) => ds * f32::from(u) + row.dm[j],
                (false, true, true) => ds * f32::from(u) - row.dm[j],
            };
        }
    }
}

/// Row `r` of `xq` times the unpacked weight row, with the block arithmetic of the
/// SIMD kernels: per unit an integer dot product less the offset times the activations'
/// sum, scaled in f32, then the minimum times the activations' scaled sum.
pub(super) fn dot_portable(q: Block, row: &Row, xq: &Xq, r: usize, k: usize) -> f32 {
    let f = q.format();
    let unit = q.unit();
    let qx = &xq.q[r * k..(r + 1) * k];
    let (k32, k16) = (r * k / 32, r * k / 16);
    let mut acc = 0.0f32;
    for j in 0..k / unit {
        let (i, b) = (unit * j, unit * j / 32);
        let idot: i32 = row.u[i..i + unit]
            .iter()
            .zip(&qx[i..i + unit])
            .map(|(&u, &x)| {
                let u = if f.signed {
                    i32::from(u as i8)
                } else {
                    i32::from(u)
                };
                u * i32::from(x)
            })
            .sum();
        let xsum = if unit == 16 {
            i32::from(xq.bs[k16 + j])
        } else {
            xq.s32[k32 + j]
        };
        let isum = idot - f.offset as i32 * xsum;
        let scaled = isum as f32 * (row.ds[j] * xq.d[k32 + b]);
        // The minimum's term (units of 32 values only: `dm` has one per 32).
        let min = || row.dm[j] * xq.s[k32 + b];
        match (f.mins, f.is_k()) {
            (false, _) => acc += scaled,
            (true, false) => acc += scaled + min(),
            (true, true) => {
                acc += scaled;
                acc -= min();
            }
        }
    }
    acc
}
