//! Weights interleaved eight rows at a time at load, for the AVX2 and AVX-512 group
//! kernels: unpacked once instead of in every decode product.

use kvc_compiler::blocks::Block;
use rayon::prelude::*;

use super::xq::quantize;
use super::{
    GROUP, Group, Isa, Row, SendPtr, Task, check_quant_matrix, expand, for_each_task, row_bytes_q,
};
use crate::load::gguf::GgmlType;

/// Decode products of more activation rows than this multiply interleaved weights
/// ([`interleave`]) when a plan stores them so: below it the kernels that read the file's
/// blocks directly are as fast, and the file's own layout costs no extra memory.
pub const INTERLEAVE_ABOVE: usize = 4;

/// How an interleaved unit stores its values (see [`Inter`]); the discriminants are the
/// kernels' constants ([`BYTE`] ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pack {
    /// One byte per value (Q8_0).
    Byte = 0,
    /// Two values per byte (4-bit types).
    Nib = 1,
    /// Nibbles, then a plane of fifth bits (5-bit types).
    Nib1 = 2,
    /// Nibbles, then a plane of fifth and sixth bits (Q6_K).
    Nib2 = 3,
}

/// [`Pack::Byte`] as a kernel constant.
pub(super) const BYTE: u8 = Pack::Byte as u8;
/// [`Pack::Nib`] as a kernel constant.
pub(super) const NIB: u8 = Pack::Nib as u8;
/// [`Pack::Nib1`] as a kernel constant.
pub(super) const NIB1: u8 = Pack::Nib1 as u8;
/// [`Pack::Nib2`] as a kernel constant.
pub(super) const NIB2: u8 = Pack::Nib2 as u8;

impl Pack {
    /// Whether unpacking merges a bit plane into the nibbles (5- and 6-bit values): the
    /// unpacking that costs enough for a product of several passes of activation rows to
    /// unpack each group once rather than in every pass (measured on AVX2: 5-10% at 16
    /// and 64 rows; bytes and plain nibbles gain nothing, and a memory-bound Q8_0 LM head
    /// loses 8% to the extra stores).
    pub(super) const fn merges_bits(self) -> bool {
        matches!(self, Pack::Nib1 | Pack::Nib2)
    }

    /// How values of `q`'s bit width are stored.
    pub(super) const fn of(q: Block) -> Pack {
        match q.format().bits {
            4 => Pack::Nib,
            5 => Pack::Nib1,
            6 => Pack::Nib2,
            _ => Pack::Byte,
        }
    }
}

/// The byte layout of one group of [`GROUP`] interleaved weight rows of `k` values: per
/// unit of values with one scale (16 values for Q6_K, else 32), `stride` bytes:
/// - `ub` bytes of values. Unpacked, chunk `c` (values `4c..4c + 4` of every row) is 32
///   bytes, row `t`'s four at `4t`. [`Pack`] stores them: bytes as they are (chunk `c`
///   at `32c`); nibbles, low ones the first half of the unit's chunks and high ones the
///   second (chunks `c` and `c + h` share bytes `32c..`, `h` = half the chunks); then for
///   5-bit values 32 bytes whose bit `c` is chunk `c`'s fifth bit, for Q6_K 32 bytes whose
///   bits `2c, 2c + 1` are chunk `c`'s fifth and sixth;
/// - the eight rows' f32 scales `ds` (row `t` at float `t`);
/// - for types with minimums, the eight rows' f32 `dm` the same way.
///
/// One stream per group, read front to back. Each value is what [`Row`] describes for
/// the same `ds`, `dm` and unpacked byte.
#[derive(Clone, Copy, Debug)]
pub(super) struct Inter {
    pub(super) q: Block,
    pub(super) k: usize,
    pub(super) pack: Pack,
    pub(super) ub: usize,
    pub(super) stride: usize,
}

impl Inter {
    pub(super) fn of(q: Block, k: usize) -> Inter {
        let pack = Pack::of(q);
        let mins = q.format().mins;
        let bytes = GROUP * q.unit();
        let ub = match pack {
            Pack::Byte => bytes,
            Pack::Nib => bytes / 2,
            Pack::Nib1 | Pack::Nib2 => bytes / 2 + 32,
        };
        Inter {
            q,
            k,
            pack,
            ub,
            stride: ub + 4 * GROUP * if mins { 2 } else { 1 },
        }
    }

    /// Bytes per group.
    pub(super) fn bytes(self) -> usize {
        self.k / self.q.unit() * self.stride
    }

    /// Packs one unit's unpacked interleaved bytes `gu` into `u` (`ub` bytes).
    fn pack_unit(self, gu: &[u8], u: &mut [u8]) {
        let half = gu.len() / 2;
        match self.pack {
            Pack::Byte => u.copy_from_slice(gu),
            Pack::Nib | Pack::Nib1 | Pack::Nib2 => {
                let (nib, plane) = u.split_at_mut(half);
                for (i, b) in nib.iter_mut().enumerate() {
                    *b = (gu[i] & 0x0f) | ((gu[half + i] & 0x0f) << 4);
                }
                let bits = if self.pack == Pack::Nib2 { 2 } else { 1 };
                for (j, b) in plane.iter_mut().enumerate() {
                    *b = (0..gu.len() / 32)
                        .map(|c| (gu[32 * c + j] >> 4) << (bits * c))
                        .fold(0, |a, v| a | v);
                }
            }
        }
    }

    /// Unpacked byte `b` (`4t + e`) of chunk `c` of the unit at `g`.
    fn value(self, g: &[u8], c: usize, b: usize) -> u8 {
        let h = self.q.unit() / 8;
        let nib = |g: &[u8]| {
            if c < h {
                g[32 * c + b] & 0x0f
            } else {
                g[32 * (c - h) + b] >> 4
            }
        };
        match self.pack {
            Pack::Byte => g[32 * c + b],
            Pack::Nib => nib(g),
            Pack::Nib1 => nib(g) | (((g[32 * h + b] >> c) & 1) << 4),
            Pack::Nib2 => nib(g) | (((g[32 * h + b] >> (2 * c)) & 3) << 4),
        }
    }

    /// Row `t` of the group `g` as [`unpack`] gives it.
    fn row(self, g: &[u8], t: usize, row: &mut Row) {
        let f = |at: usize| f32::from_le_bytes(g[at..at + 4].try_into().expect("4 bytes"));
        let unit = self.q.unit();
        for (i, u) in row.u[..self.k].iter_mut().enumerate() {
            let (j, c, e) = (i / unit, i % unit / 4, i % 4);
            *u = self.value(&g[j * self.stride..], c, 4 * t + e);
        }
        let mins = self.stride > self.ub + 4 * GROUP;
        for j in 0..self.k / unit {
            row.ds[j] = f(j * self.stride + self.ub + 4 * t);
        }
        for j in 0..self.k / 32 {
            row.dm[j] = if mins {
                f(j * self.stride + self.ub + 4 * GROUP + 4 * t)
            } else {
                0.0
            };
        }
    }
}

/// Bytes of `[n, k]` weights of type `ty` once interleaved (`n` rounded up to whole
/// groups of eight rows), or `None` for a type no kernel reads.
pub fn interleaved_len(ty: GgmlType, k: usize, n: usize) -> Option<usize> {
    let q = ty.block_format()?;
    Some(n.div_ceil(GROUP) * Inter::of(q, k).bytes())
}

/// Whether this process multiplies interleaved weights: its kernels ([`Isa::best`]) are
/// AVX2 or AVX-512 ones.
pub fn interleaving() -> bool {
    matches!(Isa::best(), Isa::Avx2 | Isa::Avx512)
}

/// The weights `w` (`[n, k]`, GGUF blocks of type `ty`) interleaved eight rows at a
/// time (see `Inter`), unpacked once here instead of in every decode product; `None`
/// where [`interleaving`] is false or the matrix is not one [`qmatmul_t`](super::qmatmul_t) multiplies.
/// The result is [`interleaved_len`] bytes: values take the bits they have (nibbles plus
/// bit planes), scales and minimums are f32, so per 32 values and row Q4_0 takes 20
/// bytes (18 in the file), Q4_1 24 (20), Q5_0 24 (22), Q5_1 28 (24), Q8_0 36 (34), Q4_K 24
/// (18), Q5_K 28 (22) and Q6_K 32 (26.25).
pub fn interleave(ty: GgmlType, k: usize, n: usize, w: &[u8]) -> Option<Vec<u8>> {
    check_quant_matrix(ty, k, n, w.len()).ok()?;
    if !interleaving() {
        return None;
    }
    let q = ty.block_format()?;
    let lay = Inter::of(q, k);
    let rb = row_bytes_q(q, k);
    let mut out = vec![0u8; n.div_ceil(GROUP) * lay.bytes()];
    out.par_chunks_mut(lay.bytes())
        .zip(w.par_chunks(GROUP * rb))
        .for_each(|(o, rows)| {
            let mut g = Group::new(q, k);
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `interleaving()`: AVX2, FMA and F16C are available.
            unsafe {
                super::x86::fill_group(q, rows, k, &mut g, false)
            };
            let mins = lay.stride > lay.ub + 4 * GROUP;
            for (j, o) in o.chunks_exact_mut(lay.stride).enumerate() {
                let (u, scales) = o.split_at_mut(lay.ub);
                lay.pack_unit(&g.u[j * GROUP * q.unit()..][..GROUP * q.unit()], u);
                let (d, m) = scales.split_at_mut(4 * GROUP);
                for (t, o) in d.chunks_exact_mut(4).enumerate() {
                    o.copy_from_slice(&g.d[GROUP * j + t].to_le_bytes());
                }
                if mins {
                    for (t, o) in m.chunks_exact_mut(4).enumerate() {
                        o.copy_from_slice(&g.m[GROUP * j + t].to_le_bytes());
                    }
                }
            }
        });
    Some(out)
}

/// Row `r` of interleaved weights (as [`interleave`] made them), dequantized.
///
/// # Panics
/// If `w` is not [`interleaved_len`] bytes or `r >= n`.
pub fn interleaved_row(ty: GgmlType, k: usize, n: usize, w: &[u8], r: usize) -> Vec<f32> {
    let q = ty.block_format().expect("a supported type");
    let lay = Inter::of(q, k);
    assert_eq!(
        Some(w.len()),
        interleaved_len(ty, k, n),
        "not interleaved [{n}, {k}]"
    );
    assert!(r < n, "row {r} of {n}");
    let mut row = Row::new(q, k);
    lay.row(
        &w[r / GROUP * lay.bytes()..][..lay.bytes()],
        r % GROUP,
        &mut row,
    );
    let mut out = vec![0.0; k];
    expand(Isa::best(), q, &row, &mut out);
    out
}

/// [`qmatmul_t`](super::qmatmul_t) on weights interleaved by [`interleave`] (on this process's kernels).
///
/// # Panics
/// If `w` is not [`interleaved_len`] bytes, a slice length disagrees with `m`, `k` and
/// `n`, or [`interleaving`] is false.
#[allow(clippy::too_many_arguments)]
pub fn qmatmul_t_interleaved(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    ty: GgmlType,
    n: usize,
    out: &mut [f32],
) {
    assert!(interleaving(), "no kernels read interleaved weights here");
    qmatmul_t_interleaved_with(Isa::best(), x, m, k, w, ty, n, out);
}

/// [`qmatmul_t_interleaved`] on the kernels of `isa`.
///
/// # Panics
/// As [`qmatmul_t_interleaved`], and if `isa` is not AVX2 or AVX-512 and available.
#[allow(clippy::too_many_arguments)]
pub fn qmatmul_t_interleaved_with(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    ty: GgmlType,
    n: usize,
    out: &mut [f32],
) {
    let q = ty.block_format().expect("a supported type");
    let lay = Inter::of(q, k);
    assert_eq!(
        Some(w.len()),
        interleaved_len(ty, k, n),
        "not interleaved [{n}, {k}]"
    );
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(out.len(), m * n, "out is not [m, n]");
    assert!(
        isa != Isa::Portable && isa.available(),
        "{isa:?} does not read interleaved weights"
    );
    if m == 0 || n == 0 {
        return;
    }
    let mut xq = quantize(isa, x, m, k);
    xq.fill_passes(isa, m, k);
    let out = SendPtr(out.as_mut_ptr());
    for_each_task(n, GROUP, |j0, j1| {
        let ws = &w[j0 / GROUP * lay.bytes()..j1.div_ceil(GROUP) * lay.bytes()];
        let task = Task {
            q,
            m,
            k,
            j0,
            n,
            out,
        };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: tasks write the disjoint columns j0..j1 of `out` (m · n floats, alive
        // for the whole loop); `interleaving()` gives the instruction set.
        unsafe {
            match isa {
                Isa::Avx512 => super::x86::inter_avx512(&task, lay, &xq, ws, j1),
                _ => super::x86::inter_avx2(&task, lay, &xq, ws, j1),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            // The assertions above fail first: no set reads interleaved weights here.
            let _ = (task, lay, &xq, ws, j1);
            unreachable!("{isa:?} does not read interleaved weights")
        }
    });
}
