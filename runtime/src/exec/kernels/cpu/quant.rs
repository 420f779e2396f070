//! Products of activation rows with GGUF block-quantized weights read in their file form:
//! `out[r, j] = Σ_i x[r, i] · W[j, i]` for `r < m`, `j < n`, where row `j` of `W` is the
//! `k / B` blocks at `w[j · ty.row_bytes(k)..]` (`B` = 32, or 256 for the k-quants).
//!
//! Every method unpacks the blocks into one byte per value plus block scales (the file's
//! nibbles and high bits spread out), then:
//! - [`Method::Dequant`]: widens four unpacked rows to f32 and multiplies them against
//!   the f32 activations (the f32 product with the dequantized weights, up to rounding
//!   order);
//! - [`Method::Int8`]: quantizes the activation rows once per call to int8 (one scale per
//!   32 values, for every type: the k-quants' sub-blocks too, where llama.cpp takes one
//!   per 256) and takes integer dot products (VNNI `vpdpbusd`, or AVX2 `maddubs`),
//!   applying the block scales in f32. Up to four rows, each block is
//!   unpacked in registers and multiplied at once; more rows share groups of eight weight
//!   rows interleaved four bytes at a time, so that one vector of products holds one dot
//!   product per weight row. The result is the f32 product of the weights with the
//!   int8-rounded activations: each activation moves by at most `max|x_b| / 254` over its
//!   block `b`, so the error is at most `Σ_b max|x_b| / 254 · Σ_{i ∈ b} |w_i|` (plus f32
//!   rounding);
//! - [`Method::Panel`]: widens 16 or 32 rows to f32, transposes them into a panel and runs
//!   a register-blocked f32 kernel over all activation rows (a GEMM; no f32 copy of the
//!   whole matrix).
//!
//! With AVX2 or AVX-512, [`qmatmul_t`] runs `Int8` at every row count: faster than
//! `Dequant` for every type and shape measured at decode widths, and than `Panel` at
//! prefill widths (1.0–2.1× at 512 rows; bench/results/history.md). Portable code runs `Int8`
//! for one row, `Dequant` up to [`DECODE_ROWS`] and `Panel` above.
//!
//! Work is split over rayon tasks by blocks of weight rows; each weight byte is read once
//! per call. Kernels for AVX-512 (F, BW, VL and VNNI), AVX2 (with FMA and F16C) or
//! portable code are chosen once per process from the CPU's features.

use half::f16;
use rayon::prelude::*;

use super::SendPtr;
pub use super::isa::Isa;
use crate::load::gguf::GgmlType;

/// Activation rows up to which portable code runs the decode kernels; larger products run
/// the panel GEMM there.
pub const DECODE_ROWS: usize = 16;

/// Weight rows per parallel decode task at least.
const MIN_TASK_ROWS: usize = 32;

/// Weight rows the dequantizing decode kernel widens and multiplies at a time.
const TILE_ROWS: usize = 4;

/// Whether [`qmatmul_t`] multiplies weights of type `ty`.
pub fn supports(ty: GgmlType) -> bool {
    Block::of(ty).is_some()
}

/// Why a byte slice is not an `[n, k]` matrix that [`qmatmul_t`] can multiply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantMatrixError {
    /// No kernel reads this type.
    #[error("no quantized matrix kernel reads {0} weights")]
    Unsupported(GgmlType),
    /// Rows are not whole blocks.
    #[error("rows of {k} values are not whole {ty} blocks of {block}")]
    PartialBlock {
        /// The type.
        ty: GgmlType,
        /// Values per row.
        k: usize,
        /// Values per block.
        block: usize,
    },
    /// The slice length is not `n` rows of `k` values.
    #[error("{n} rows of {k} {ty} values take {expected} bytes, found {found}")]
    Length {
        /// The type.
        ty: GgmlType,
        /// Values per row.
        k: usize,
        /// Rows.
        n: usize,
        /// Bytes the shape takes (`usize::MAX` if that overflows).
        expected: usize,
        /// Bytes present.
        found: usize,
    },
}

/// Checks that `bytes` bytes of type `ty` hold `n` rows of `k` values (whole blocks), as
/// [`qmatmul_t`] requires.
pub fn check_quant_matrix(
    ty: GgmlType,
    k: usize,
    n: usize,
    bytes: usize,
) -> Result<(), QuantMatrixError> {
    let Some(q) = Block::of(ty) else {
        return Err(QuantMatrixError::Unsupported(ty));
    };
    if !k.is_multiple_of(q.block()) {
        return Err(QuantMatrixError::PartialBlock {
            ty,
            k,
            block: q.block(),
        });
    }
    let expected = (k / q.block())
        .checked_mul(q.bytes())
        .and_then(|r| r.checked_mul(n))
        .unwrap_or(usize::MAX);
    if expected != bytes {
        return Err(QuantMatrixError::Length {
            ty,
            k,
            n,
            expected,
            found: bytes,
        });
    }
    Ok(())
}

/// `out = x · Wᵀ` with x `[m, k]` f32, `W` `[n, k]` as `n` rows of GGUF blocks of type
/// `ty` in `w`, and out `[m, n]`. Parallel over blocks of weight rows on rayon's pool.
///
/// # Panics
/// If [`check_quant_matrix`] rejects `(ty, k, n, w.len())` or a slice length disagrees
/// with `m`, `k` and `n`.
pub fn qmatmul_t(x: &[f32], m: usize, k: usize, w: &[u8], ty: GgmlType, n: usize, out: &mut [f32]) {
    let isa = Isa::best();
    let path = Path {
        isa,
        method: method(isa, m),
    };
    qmatmul_t_with(path, x, m, k, w, ty, n, out);
}

/// The method for `m` rows, chosen by the `quant_paths` example (see bench/results/history.md):
/// with SIMD kernels `Int8` beats `Dequant` for every type at 1 and 16 rows and `Panel` at
/// 512; the portable integer loop wins at one row only.
fn method(isa: Isa, m: usize) -> Method {
    match (isa, m) {
        (Isa::Portable, m) if m > DECODE_ROWS => Method::Panel,
        (Isa::Portable, m) if m > 1 => Method::Dequant,
        _ => Method::Int8,
    }
}

/// Columns (weight rows) of a prefill panel on `isa`.
fn panel_cols(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 32,
        _ => 16,
    }
}

/// How a product is computed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// f32 weights widened four rows at a time, f32 dot products.
    Dequant,
    /// int8 activations, integer dot products, f32 block scales.
    Int8,
    /// f32 panels of weight rows, register-blocked f32 GEMM.
    Panel,
}

/// An instruction set and a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    /// The instruction set.
    pub isa: Isa,
    /// The method.
    pub method: Method,
}

/// [`qmatmul_t`] on a given path (for tests and benchmarks; [`qmatmul_t`] picks the
/// fastest measured one).
///
/// # Panics
/// As [`qmatmul_t`], and if `path.isa` is not [available](Isa::available).
#[allow(clippy::too_many_arguments)]
pub fn qmatmul_t_with(
    path: Path,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    ty: GgmlType,
    n: usize,
    out: &mut [f32],
) {
    if let Err(e) = check_quant_matrix(ty, k, n, w.len()) {
        panic!("{e}");
    }
    assert_eq!(x.len(), m * k, "x is not [m, k]");
    assert_eq!(out.len(), m * n, "out is not [m, n]");
    assert!(path.isa.available(), "{:?} is not available", path.isa);
    let q = Block::of(ty).expect("checked");
    if m == 0 || n == 0 {
        return;
    }
    let isa = path.isa;
    let rb = ty.row_bytes(k);
    let threads = rayon::current_num_threads().max(1);
    // Four tasks per thread balance a core slowed by other work.
    let unit = match path.method {
        Method::Panel => panel_cols(isa),
        Method::Int8 => GROUP,
        Method::Dequant => TILE_ROWS,
    };
    let rows = n
        .div_ceil(4 * threads)
        .max(MIN_TASK_ROWS)
        .next_multiple_of(unit);
    let tasks = n.div_ceil(rows);
    let xq = (path.method == Method::Int8).then(|| {
        let mut xq = quantize(isa, x, m, k);
        if group_kernels(isa, m) {
            xq.fill_passes(isa, m, k);
        }
        xq
    });
    let out = SendPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let j0 = t * rows;
        let j1 = (j0 + rows).min(n);
        let ws = &w[j0 * rb..j1 * rb];
        let task = Task {
            q,
            m,
            k,
            j0,
            n,
            out,
        };
        // SAFETY: tasks write the disjoint columns j0..j1 of `out` (m · n floats, alive
        // for the whole loop).
        unsafe {
            match (path.method, &xq) {
                (Method::Int8, Some(xq)) => int8_task(isa, &task, xq, ws),
                (Method::Panel, _) => panel_task(isa, &task, x, ws),
                _ => dequant_task(isa, &task, x, ws),
            }
        }
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// Decode products of more activation rows than this multiply interleaved weights
/// ([`interleave`]) when a plan stores them so: below it the kernels that read the file's
/// blocks directly are as fast, and the file's own layout costs no extra memory.
pub const INTERLEAVE_ABOVE: usize = 4;

/// How an interleaved unit stores its values (see [`Inter`]); the discriminants are the
/// kernels' constants ([`BYTE`] ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pack {
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
const BYTE: u8 = Pack::Byte as u8;
/// [`Pack::Nib`] as a kernel constant.
const NIB: u8 = Pack::Nib as u8;
/// [`Pack::Nib1`] as a kernel constant.
const NIB1: u8 = Pack::Nib1 as u8;
/// [`Pack::Nib2`] as a kernel constant.
const NIB2: u8 = Pack::Nib2 as u8;

impl Pack {
    fn of(q: Block) -> Pack {
        match q {
            Block::Q4_0 | Block::Q4_1 | Block::Q4K => Pack::Nib,
            Block::Q5_0 | Block::Q5_1 | Block::Q5K => Pack::Nib1,
            Block::Q6K => Pack::Nib2,
            Block::Q8_0 => Pack::Byte,
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
struct Inter {
    q: Block,
    k: usize,
    pack: Pack,
    ub: usize,
    stride: usize,
}

impl Inter {
    fn of(q: Block, k: usize) -> Inter {
        let pack = Pack::of(q);
        let mins = matches!(q, Block::Q4_1 | Block::Q5_1 | Block::Q4K | Block::Q5K);
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
    fn bytes(self) -> usize {
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
    let q = Block::of(ty)?;
    Some(n.div_ceil(GROUP) * Inter::of(q, k).bytes())
}

/// Whether this process multiplies interleaved weights: its kernels ([`Isa::best`]) are
/// AVX2 or AVX-512 ones.
pub fn interleaving() -> bool {
    matches!(Isa::best(), Isa::Avx2 | Isa::Avx512)
}

/// The weights `w` (`[n, k]`, GGUF blocks of type `ty`) interleaved eight rows at a
/// time (see [`Inter`]), unpacked once here instead of in every decode product; `None`
/// where [`interleaving`] is false or the matrix is not one [`qmatmul_t`] multiplies.
/// The result is [`interleaved_len`] bytes: values take the bits they have (nibbles plus
/// bit planes), scales and minimums are f32, so per 32 values and row Q4_0 takes 20
/// bytes (18 in the file), Q4_1 24 (20), Q5_0 24 (22), Q5_1 28 (24), Q8_0 36 (34), Q4_K 24
/// (18), Q5_K 28 (22) and Q6_K 32 (26.25).
pub fn interleave(ty: GgmlType, k: usize, n: usize, w: &[u8]) -> Option<Vec<u8>> {
    check_quant_matrix(ty, k, n, w.len()).ok()?;
    if !interleaving() {
        return None;
    }
    let q = Block::of(ty)?;
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
                x86::fill_group(q, rows, k, &mut g, false)
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
    let q = Block::of(ty).expect("a supported type");
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

/// [`qmatmul_t`] on weights interleaved by [`interleave`] (on this process's kernels).
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

/// [`qmatmul_t_interleaved`] on the kernels of `isa` (AVX2 or AVX-512, available).
#[allow(clippy::too_many_arguments)]
fn qmatmul_t_interleaved_with(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u8],
    ty: GgmlType,
    n: usize,
    out: &mut [f32],
) {
    let q = Block::of(ty).expect("a supported type");
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
    let threads = rayon::current_num_threads().max(1);
    let rows = n
        .div_ceil(4 * threads)
        .max(MIN_TASK_ROWS)
        .next_multiple_of(GROUP);
    let tasks = n.div_ceil(rows);
    let mut xq = quantize(isa, x, m, k);
    xq.fill_passes(isa, m, k);
    let out = SendPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let j0 = t * rows;
        let j1 = (j0 + rows).min(n);
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
                Isa::Avx512 => x86::inter_avx512(&task, lay, &xq, ws, j1),
                _ => x86::inter_avx2(&task, lay, &xq, ws, j1),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            // The assertions above fail first: no set reads interleaved weights here.
            let _ = (task, lay, &xq, ws, j1);
            unreachable!("{isa:?} does not read interleaved weights")
        }
    };
    if tasks == 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// The supported block types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Block {
    fn of(ty: GgmlType) -> Option<Block> {
        Some(match ty {
            GgmlType::Q4_0 => Block::Q4_0,
            GgmlType::Q4_1 => Block::Q4_1,
            GgmlType::Q5_0 => Block::Q5_0,
            GgmlType::Q5_1 => Block::Q5_1,
            GgmlType::Q8_0 => Block::Q8_0,
            GgmlType::Q4_K => Block::Q4K,
            GgmlType::Q5_K => Block::Q5K,
            GgmlType::Q6_K => Block::Q6K,
            _ => return None,
        })
    }

    /// Whether this is a 256-value k-quant.
    fn is_k(self) -> bool {
        matches!(self, Block::Q4K | Block::Q5K | Block::Q6K)
    }

    /// Values per block.
    fn block(self) -> usize {
        if self.is_k() { 256 } else { 32 }
    }

    /// Bytes per block.
    fn bytes(self) -> usize {
        match self {
            Block::Q4_0 => 18,
            Block::Q4_1 => 20,
            Block::Q5_0 => 22,
            Block::Q5_1 => 24,
            Block::Q8_0 => 34,
            Block::Q4K => 144,
            Block::Q5K => 176,
            Block::Q6K => 210,
        }
    }

    /// Values per scale of a [`Row`].
    fn unit(self) -> usize {
        if self == Block::Q6K { 16 } else { 32 }
    }

    /// The offset subtracted from an unpacked 32-block byte (Q8_0's bytes are signed).
    fn offset(self) -> i32 {
        match self {
            Block::Q4_0 => 8,
            Block::Q5_0 => 16,
            _ => 0,
        }
    }
}

/// The shape of one task's product: columns `j0..` of `out` (`[m, n]`).
struct Task {
    q: Block,
    m: usize,
    k: usize,
    j0: usize,
    n: usize,
    out: SendPtr<f32>,
}

/// One weight row unpacked: `u[i]` is value `i`'s integer (0..2^bits; Q8_0's signed byte)
/// and its value is, with `j = i / unit` (16 values for Q6_K, else 32):
/// - 32-blocks: `ds[j] · (u[i] − offset) + dm[j]` (Q8_0: `ds[j] · (u[i] as i8)`);
/// - Q4_K/Q5_K: `ds[j] · u[i] − dm[j]` (`ds = d · sc`, `dm = dmin · mn` per sub-block);
/// - Q6_K: `ds[j] · (u[i] − 32)` (`ds = d · sc` per 16 values).
struct Row {
    u: Vec<u8>,
    ds: Vec<f32>,
    dm: Vec<f32>,
}

impl Row {
    /// A row of `k` values (scales padded to whole vectors of [`GROUP`]).
    fn new(q: Block, k: usize) -> Row {
        Row {
            u: vec![0; k],
            ds: vec![0.0; (k / q.unit()).next_multiple_of(GROUP)],
            dm: vec![0.0; (k / 32).next_multiple_of(GROUP)],
        }
    }
}

/// Weight rows per [`Group`].
const GROUP: usize = 8;

/// [`GROUP`] weight rows for the integer kernels: values interleaved four at a time
/// (bytes `32c + 4t .. 32c + 4t + 4` are values `4c .. 4c + 4` of row `t`), so one vector
/// of products holds one dot product per row, and [`Row`]'s scales in lanes of eight
/// (`d[8j + t]` is `ds[j]` of row `t`, `m[8j + t]` its `dm[j]`). Rows past the matrix
/// are 0.
struct Group {
    u: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

impl Group {
    fn new(q: Block, k: usize) -> Group {
        let row = Row::new(q, k);
        Group {
            u: vec![0; GROUP * k],
            d: vec![0.0; GROUP * row.ds.len()],
            m: vec![0.0; GROUP * row.dm.len()],
        }
    }
}

/// Activation rows quantized per block of 32 values to int8: `x[r, i] ≈ d[r, b] · q[r, i]`
/// with `d = max |x| / 127` over the block. One scale per 32 values for the k-quants as
/// well (llama.cpp's Q8_K takes one per 256): their sub-blocks have f32 scales anyway, and
/// the finer rounding keeps the logits of Qwen's and Gemma's Q4_K_M files closer to f32
/// than llama.cpp's own run (tests/real_models.rs).
struct Xq {
    q: Vec<i8>,
    d: Vec<f32>,
    /// Per 32 values: `d · Σ q` (the sum of the rounded values, for minimums).
    s: Vec<f32>,
    /// Per 32 values: `Σ q` (offset corrections).
    s32: Vec<i32>,
    /// Per 16 values: `Σ q` (k-quant minimum and offset corrections; at most 16 · 127).
    bs: Vec<i16>,
    /// The same values for the group kernels, by pass ([`Passes`]); empty where no group
    /// kernel runs.
    by_pass: Passes,
}

/// [`Xq`] reordered for the group kernels, which multiply a pass of `rr` activation rows
/// (rows `r0..r0 + rr`, [`pass_rows`]) with each group of weight rows. A pass's values sit
/// at its rows' own offsets (`r0 · k` bytes, `r0 · k / 32` per-32 values, `r0 · k / 16`
/// per-16 values), block-major inside: `q` holds block `b` of row `r0 + r` at `(b · rr + r)
/// · 32`, the per-32 values of `(r, b)` are at `b · rr + r` and the per-16 ones of `(r, u)`
/// at `u · rr + r`. One pointer then reaches every row of a block at constant offsets,
/// where eight row pointers left the eight-row kernels short of registers.
#[derive(Default)]
struct Passes {
    /// The instruction set whose passes ([`pass_rows`]) the layout follows.
    isa: Option<Isa>,
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    /// `−Σ q` per 32 values (the kernels shift it into their offset corrections).
    ns32: Vec<i32>,
    /// `−Σ q` per 16 values.
    nbs: Vec<i32>,
}

/// Activation rows in the group kernels' pass that starts with `left` rows to go: eight
/// with AVX-512's 32 vector registers, else up to four.
fn pass_rows(isa: Isa, left: usize) -> usize {
    if isa == Isa::Avx512 && left >= WIDE_ROWS {
        WIDE_ROWS
    } else {
        left.min(ROWS)
    }
}

/// How many passes of [`pass_rows`] cover `m` activation rows.
fn passes(isa: Isa, m: usize) -> usize {
    let (mut r0, mut n) = (0, 0);
    while r0 < m {
        r0 += pass_rows(isa, m - r0);
        n += 1;
    }
    n
}

/// Activation rows per pass over a group.
const ROWS: usize = 4;

/// Activation rows per pass over a group with AVX-512's 32 vector registers: eight
/// independent accumulators hide the latency of `vpdpbusd` (four chains leave half its
/// throughput unused).
const WIDE_ROWS: usize = 8;

/// Activation rows up to which the fused kernels run (AVX2, AVX-512): they unpack each
/// block in registers and multiply it at once, skipping the group interleaving, which
/// pays off only over more rows. Above it the group kernels run, on [`Passes`].
const FUSED_ROWS: usize = 4;

/// Whether the int8 products of `m` rows on the file's blocks run the group kernels
/// (which read [`Passes`]) rather than the fused ones or the portable code.
fn group_kernels(isa: Isa, m: usize) -> bool {
    matches!(isa, Isa::Avx2 | Isa::Avx512) && m > FUSED_ROWS
}

impl Xq {
    /// Fills [`Xq::by_pass`] for `m` rows of `k` values on `isa`.
    fn fill_passes(&mut self, isa: Isa, m: usize, k: usize) {
        let (nb, nu) = (k / 32, k / 16);
        let mut p = Passes {
            isa: Some(isa),
            q: vec![0; m * k],
            d: vec![0.0; m * nb],
            s: vec![0.0; m * nb],
            ns32: vec![0; m * nb],
            nbs: vec![0; m * nu],
        };
        let mut r0 = 0;
        while r0 < m {
            let rr = pass_rows(isa, m - r0);
            for r in 0..rr {
                let row = r0 + r;
                for b in 0..nb {
                    let at = r0 * k + (b * rr + r) * 32;
                    p.q[at..at + 32].copy_from_slice(&self.q[row * k + 32 * b..][..32]);
                    let (from, to) = (row * nb + b, r0 * nb + b * rr + r);
                    p.d[to] = self.d[from];
                    p.s[to] = self.s[from];
                    p.ns32[to] = -self.s32[from];
                }
                for u in 0..nu {
                    p.nbs[r0 * nu + u * rr + r] = -i32::from(self.bs[row * nu + u]);
                }
            }
            r0 += rr;
        }
        self.by_pass = p;
    }
}

/// Quantizes `x` `[m, k]` in blocks of 32 values. Every instruction set runs the same
/// operations, so all produce the same `Xq`.
fn quantize(isa: Isa, x: &[f32], m: usize, k: usize) -> Xq {
    let mut xq = Xq {
        q: vec![0; m * k],
        d: vec![0.0; m * k / 32],
        s: vec![0.0; m * k / 32],
        s32: vec![0; m * k / 32],
        bs: vec![0; m * k / 16],
        by_pass: Passes::default(),
    };
    let run = |x: &[f32], xq: XqPart| match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => {
            // SAFETY: AVX2 and FMA are available (checked by the caller).
            unsafe { x86::quantize_avx2(x, xq) }
        }
        _ => quantize_body(x, xq),
    };
    // Rows per parallel part: a prefill's activations are quantized on every core.
    let rows = QUANTIZE_VALUES.div_ceil(k.max(1));
    let whole = XqPart {
        q: &mut xq.q,
        d: &mut xq.d,
        s: &mut xq.s,
        s32: &mut xq.s32,
        bs: &mut xq.bs,
    };
    if m < 2 * rows {
        run(x, whole);
    } else {
        let (n, n32, n16) = (rows * k, rows * k / 32, rows * k / 16);
        x.par_chunks(n)
            .zip(whole.q.par_chunks_mut(n))
            .zip(whole.d.par_chunks_mut(n32))
            .zip(whole.s.par_chunks_mut(n32))
            .zip(whole.s32.par_chunks_mut(n32))
            .zip(whole.bs.par_chunks_mut(n16))
            .for_each(|(((((x, q), d), s), s32), bs)| run(x, XqPart { q, d, s, s32, bs }));
    }
    xq
}

/// Values quantized per parallel part of [`quantize`] at least.
const QUANTIZE_VALUES: usize = 64 * 1024;

/// Whole rows of an [`Xq`], being written.
struct XqPart<'a> {
    q: &'a mut [i8],
    d: &'a mut [f32],
    s: &'a mut [f32],
    s32: &'a mut [i32],
    bs: &'a mut [i16],
}

#[inline(always)]
fn quantize_body(x: &[f32], xq: XqPart) {
    // Rounds to nearest, ties to even, for |v| < 2^22.
    const ROUND: f32 = 12_582_912.0;
    for ((xb, qo), d) in x
        .chunks_exact(32)
        .zip(xq.q.chunks_exact_mut(32))
        .zip(xq.d.iter_mut())
    {
        let amax = xb
            .iter()
            .fold(0u32, |a, v| a.max(v.to_bits() & 0x7fff_ffff));
        let amax = f32::from_bits(amax);
        *d = amax / 127.0;
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (o, &v) in qo.iter_mut().zip(xb) {
            *o = ((v * id + ROUND) - ROUND) as i8;
        }
    }
    let sum = |c: &[i8]| c.iter().map(|&v| i32::from(v)).sum::<i32>();
    for (s, c) in xq.s32.iter_mut().zip(xq.q.chunks_exact(32)) {
        *s = sum(c);
    }
    for (bs, c) in xq.bs.iter_mut().zip(xq.q.chunks_exact(16)) {
        *bs = sum(c) as i16;
    }
    for ((s, &c), &d) in xq.s.iter_mut().zip(xq.s32.iter()).zip(xq.d.iter()) {
        *s = d * c as f32;
    }
}

/// The integer dot products of one task.
///
/// # Safety
/// `isa` is available; `task.out` points to `m · n` floats of which no other task writes
/// columns `j0..j0 + rows`.
unsafe fn int8_task(isa: Isa, task: &Task, xq: &Xq, w: &[u8]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Isa::Avx2 => unsafe { x86::int8_avx2(task, xq, w) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract.
        Isa::Avx512 => unsafe { x86::int8_avx512(task, xq, w) },
        _ => {
            let Task {
                q,
                m,
                k,
                j0,
                n,
                out,
            } = *task;
            let mut row = Row::new(q, k);
            for (j, wr) in w.chunks_exact(row_bytes_q(q, k)).enumerate() {
                unpack_portable(q, wr, &mut row);
                for r in 0..m {
                    // SAFETY: r < m and j0 + j < n; the caller's contract.
                    unsafe { *out.at(r * n + j0 + j) = dot_portable(q, &row, xq, r, k) };
                }
            }
        }
    }
}

/// The dequantizing products of one task.
///
/// # Safety
/// As [`int8_task`].
unsafe fn dequant_task(isa: Isa, task: &Task, x: &[f32], w: &[u8]) {
    let Task {
        q,
        m,
        k,
        j0,
        n,
        out,
    } = *task;
    let rb = row_bytes_q(q, k);
    let mut row = Row::new(q, k);
    let mut panel = vec![0.0f32; TILE_ROWS * k];
    for (t, tile) in w.chunks(TILE_ROWS * rb).enumerate() {
        let rows = tile.len() / rb;
        for (wr, p) in tile.chunks_exact(rb).zip(panel.chunks_exact_mut(k)) {
            unpack(isa, q, wr, &mut row);
            expand(isa, q, &row, p);
        }
        let jt = j0 + t * TILE_ROWS;
        // SAFETY: the tile's columns jt..jt + rows lie in this task's; the caller's contract.
        unsafe { tile_product(isa, x, m, k, &panel[..rows * k], jt, n, out) };
    }
}

/// The panel products of one task.
///
/// # Safety
/// As [`int8_task`].
unsafe fn panel_task(isa: Isa, task: &Task, x: &[f32], w: &[u8]) {
    let Task {
        q,
        m,
        k,
        j0,
        n,
        out,
    } = *task;
    let rb = row_bytes_q(q, k);
    let nr = panel_cols(isa);
    let mut row = Row::new(q, k);
    let mut wide = vec![0.0f32; k];
    let mut panel = vec![0.0f32; nr * k];
    for (t, rows) in w.chunks(nr * rb).enumerate() {
        let cols = rows.len() / rb;
        for (c, wr) in rows.chunks_exact(rb).enumerate() {
            unpack(isa, q, wr, &mut row);
            expand(isa, q, &row, &mut wide);
            for (i, &v) in wide.iter().enumerate() {
                panel[i * nr + c] = v;
            }
        }
        for c in cols..nr {
            for i in 0..k {
                panel[i * nr + c] = 0.0;
            }
        }
        let jt = j0 + t * nr;
        // SAFETY: columns jt..jt + cols lie in this task's; the caller's contract.
        unsafe { panel_product(isa, x, m, k, &panel, jt, cols, n, out) };
    }
}

fn row_bytes_q(q: Block, k: usize) -> usize {
    k / q.block() * q.bytes()
}

/// Unpacks one row's blocks `wr` into `row`.
fn unpack(isa: Isa, q: Block, wr: &[u8], row: &mut Row) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2, FMA and F16C are available (every non-portable set has them).
        Isa::Avx2 | Isa::Avx512 => unsafe { x86::unpack(q, wr, row) },
        _ => unpack_portable(q, wr, row),
    }
}

/// Writes the f32 values of an unpacked row to `out` (`k` values).
fn expand(isa: Isa, q: Block, row: &Row, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2, FMA and F16C are available (checked by the caller).
        Isa::Avx2 => unsafe { x86::expand(q, row, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the AVX-512 set is available (checked by the caller).
        Isa::Avx512 => unsafe { x86::expand_avx512(q, row, out) },
        _ => expand_portable(q, row, out),
    }
}

/// Columns `jt..jt + p.len() / k` of `out` from the f32 weight rows `p`: the AVX-512
/// tile here, else the f32 GEMV's own tile ([`super::gemv`], which picks AVX2 or its
/// portable loop by itself).
///
/// # Safety
/// `out` points to `m · n` floats of which no other task writes these columns.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_product(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    p: &[f32],
    jt: usize,
    n: usize,
    out: SendPtr<f32>,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract; the set is available.
        Isa::Avx512 => unsafe { x86::tile_avx512(x, m, k, p, jt, n, out.0) },
        // SAFETY: the caller's contract.
        _ => unsafe { super::gemv::block(x, m, k, p, jt, n, out) },
    }
}

/// Portable panel kernel block: activation rows per pass.
const PORTABLE_MR: usize = 4;

/// Columns `jt..jt + cols` of `out` from the k-major panel `p` (`k × nr`, zero past
/// `cols`).
///
/// # Safety
/// As [`tile_product`].
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    p: &[f32],
    jt: usize,
    cols: usize,
    n: usize,
    out: SendPtr<f32>,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract; the set is available.
        Isa::Avx2 => unsafe { x86::panel_avx2(x, m, k, p, jt, cols, n, out.0) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's contract; the set is available.
        Isa::Avx512 => unsafe { x86::panel_avx512(x, m, k, p, jt, cols, n, out.0) },
        _ => {
            const NR: usize = 16;
            let mut r0 = 0;
            while r0 < m {
                let mr = PORTABLE_MR.min(m - r0);
                let mut acc = [[0.0f32; NR]; PORTABLE_MR];
                for (i, pc) in p.chunks_exact(NR).enumerate() {
                    for (r, a) in acc.iter_mut().enumerate().take(mr) {
                        let xv = x[(r0 + r) * k + i];
                        for (a, &w) in a.iter_mut().zip(pc) {
                            *a += xv * w;
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate().take(mr) {
                    for (c, &v) in a.iter().enumerate().take(cols) {
                        // SAFETY: r0 + r < m, jt + c < n; the caller's contract.
                        unsafe { *out.at((r0 + r) * n + jt + c) = v };
                    }
                }
                r0 += mr;
            }
        }
    }
}

/// The little-endian f16 at `at`, widened.
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The eight 6-bit sub-block scales and minimums of a Q4_K/Q5_K block's 12 scale bytes:
/// bytes 0..4 hold the low 6 bits of scales 0..4 and bytes 4..8 those of minimums 0..4;
/// scales and minimums 4..8 take their low 4 bits from the nibbles of bytes 8..12 and
/// their high 2 bits from the top bits of bytes 0..4 and 4..8.
#[inline]
fn k_scale_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let top = |v: u32| ((v >> 6) & 0x0303_0303) << 4;
    let sc = [a & 0x3f3f_3f3f, (c & 0x0f0f_0f0f) | top(a)];
    let mn = [b & 0x3f3f_3f3f, ((c >> 4) & 0x0f0f_0f0f) | top(b)];
    let bytes = |v: [u32; 2]| {
        let (lo, hi) = (v[0].to_le_bytes(), v[1].to_le_bytes());
        [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
    };
    (bytes(sc), bytes(mn))
}

/// The scales of one block into `ds` and `dm` (see [`Row`]).
fn block_scales(q: Block, blk: &[u8], ds: &mut [f32], dm: &mut [f32]) {
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
            dm[0] = if matches!(q, Block::Q4_1 | Block::Q5_1) {
                f16_at(blk, 2)
            } else {
                0.0
            };
        }
    }
}

/// The 32 values of 32-value column `sub` of one block, one byte each (see [`Row`]).
fn column(q: Block, blk: &[u8], sub: usize, u: &mut [u8]) {
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

fn unpack_portable(q: Block, wr: &[u8], row: &mut Row) {
    let (subs, upb) = (q.block() / 32, q.block() / q.unit());
    for (b, blk) in wr.chunks_exact(q.bytes()).enumerate() {
        block_scales(q, blk, &mut row.ds[b * upb..], &mut row.dm[b * subs..]);
        for sub in 0..subs {
            column(q, blk, sub, &mut row.u[32 * (b * subs + sub)..]);
        }
    }
}

fn expand_portable(q: Block, row: &Row, out: &mut [f32]) {
    let unit = q.unit();
    for (j, (o, u)) in out
        .chunks_exact_mut(unit)
        .zip(row.u.chunks_exact(unit))
        .enumerate()
    {
        let ds = row.ds[j];
        match q {
            Block::Q8_0 => {
                for (o, &u) in o.iter_mut().zip(u) {
                    *o = ds * f32::from(u as i8);
                }
            }
            Block::Q6K => {
                for (o, &u) in o.iter_mut().zip(u) {
                    *o = ds * (f32::from(u) - 32.0);
                }
            }
            Block::Q4K | Block::Q5K => {
                for (o, &u) in o.iter_mut().zip(u) {
                    *o = ds * f32::from(u) - row.dm[j];
                }
            }
            _ => {
                let off = q.offset() as f32;
                for (o, &u) in o.iter_mut().zip(u) {
                    *o = ds * (f32::from(u) - off) + row.dm[j];
                }
            }
        }
    }
}

/// Row `r` of `xq` times the unpacked weight row, with the block arithmetic of the
/// SIMD kernels.
fn dot_portable(q: Block, row: &Row, xq: &Xq, r: usize, k: usize) -> f32 {
    let qx = &xq.q[r * k..(r + 1) * k];
    let idot = |i: usize, len: usize, signed: bool| -> i32 {
        row.u[i..i + len]
            .iter()
            .zip(&qx[i..i + len])
            .map(|(&u, &x)| {
                let u = if signed {
                    i32::from(u as i8)
                } else {
                    i32::from(u)
                };
                u * i32::from(x)
            })
            .sum()
    };
    let (k32, k16) = (r * k / 32, r * k / 16);
    let mut acc = 0.0f32;
    if q.is_k() {
        let unit = q.unit();
        let units = 256 / unit;
        for sb in 0..k / 256 {
            for j in sb * units..(sb + 1) * units {
                if q == Block::Q6K {
                    let dx = xq.d[k32 + j / 2];
                    let isum = idot(16 * j, 16, false) - 32 * i32::from(xq.bs[k16 + j]);
                    acc += isum as f32 * (row.ds[j] * dx);
                } else {
                    let dx = xq.d[k32 + j];
                    acc += idot(32 * j, 32, false) as f32 * (row.ds[j] * dx);
                    acc -= row.dm[j] * xq.s[k32 + j];
                }
            }
        }
    } else {
        for (b, &dx) in xq.d[k32..k32 + k / 32].iter().enumerate() {
            let isum = if q == Block::Q8_0 {
                idot(32 * b, 32, true)
            } else {
                idot(32 * b, 32, false) - q.offset() * xq.s32[k32 + b]
            };
            acc += isum as f32 * (row.ds[b] * dx) + row.dm[b] * xq.s[k32 + b];
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The AVX2 and AVX-512 kernels. Functions named `*_avx512` need the AVX-512 set of
    //! [`Isa::Avx512`](super::Isa::Avx512); all others need AVX2, FMA and F16C.

    use std::arch::x86_64::*;

    use super::{
        BYTE, Block, GROUP, Group, Inter, Isa, NIB, NIB1, NIB2, Row, Task, Xq, quantize_body,
        row_bytes_q,
    };

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn quantize_avx2(x: &[f32], xq: super::XqPart) {
        quantize_body(x, xq)
    }

    /// The f16 at `p`, widened.
    ///
    /// Written in assembly so that the bits enter a vector register through `vmovd`,
    /// which clears the rest of it. From intrinsics LLVM loads them with `vpinsrw`, which
    /// merges into whatever register it picks; where that register last held the
    /// previous block's scale, every block waits on the one before (a chain of ≈ 15
    /// cycles per block: the fused kernels ran 1.4–2.3× slower on an Intel Xeon).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
        // SAFETY: the caller's pointer holds two bytes.
        let bits = u32::from(unsafe { p.cast::<u16>().read_unaligned() });
        let v: __m128;
        // SAFETY: F16C is enabled (this function's target features); registers only. Not
        // `preserves_flags`: a signalling NaN sets MXCSR's invalid-operation flag.
        unsafe {
            std::arch::asm!(
                "vmovd {v}, {b:e}",
                "vcvtph2ps {v}, {v}",
                b = in(reg) bits,
                v = out(xmm_reg) v,
                options(pure, nomem, nostack),
            );
        }
        _mm_cvtss_f32(v)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// 0x10 in byte `i` where bit `i` of `qh` is set.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn high_bits(qh: u32) -> __m256i {
        let v = _mm256_set1_epi32(qh as i32);
        #[rustfmt::skip]
        let shuf = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, shuf), bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    /// As `super::column`, in a register.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn column(q: Block, blk: &[u8], sub: usize) -> __m256i {
        let bb = q.bytes();
        assert!(blk.len() >= bb && sub < q.block() / 32);
        let m4 = _mm256_set1_epi8(0x0f);
        let p = blk.as_ptr();
        let shift = |v: __m256i, s: usize| _mm256_srl_epi16(v, _mm_cvtsi32_si128(s as i32));
        // SAFETY: every load lies in the block's `bb` bytes (asserted above).
        unsafe {
            match q {
                Block::Q4_0 | Block::Q4_1 | Block::Q5_0 | Block::Q5_1 => {
                    let v = _mm_loadu_si128(p.add(bb - 16).cast());
                    let vals = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), m4);
                    if matches!(q, Block::Q5_0 | Block::Q5_1) {
                        let qh = p.add(bb - 20).cast::<u32>().read_unaligned();
                        _mm256_or_si256(vals, high_bits(qh))
                    } else {
                        vals
                    }
                }
                Block::Q8_0 => _mm256_loadu_si256(p.add(2).cast()),
                Block::Q4K | Block::Q5K => {
                    let v = _mm256_loadu_si256(p.add(bb - 128 + 32 * (sub / 2)).cast());
                    let vals = _mm256_and_si256(shift(v, 4 * (sub % 2)), m4);
                    if q == Block::Q5K {
                        let qh = _mm256_loadu_si256(p.add(16).cast());
                        let h = _mm256_and_si256(shift(qh, sub), _mm256_set1_epi8(1));
                        _mm256_or_si256(vals, _mm256_slli_epi16(h, 4))
                    } else {
                        vals
                    }
                }
                Block::Q6K => {
                    let (h, kk) = (sub / 4, sub % 4);
                    let ql = _mm256_loadu_si256(p.add(64 * h + 32 * (kk % 2)).cast());
                    let qh = _mm256_loadu_si256(p.add(128 + 32 * h).cast());
                    let low = _mm256_and_si256(shift(ql, 4 * (kk / 2)), m4);
                    let high = _mm256_and_si256(shift(qh, 2 * kk), _mm256_set1_epi8(3));
                    _mm256_or_si256(low, _mm256_slli_epi16(high, 4))
                }
            }
        }
    }

    /// As `super::block_scales`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn block_scales(q: Block, blk: &[u8], ds: &mut [f32], dm: &mut [f32]) {
        let p = blk.as_ptr();
        assert!(blk.len() >= q.bytes());
        let widen = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        // SAFETY: loads lie in the block (asserted above); stores in `ds`/`dm` (sliced).
        unsafe {
            match q {
                Block::Q4K | Block::Q5K => {
                    let (ds, dm) = (&mut ds[..8], &mut dm[..8]);
                    let (d, dmin) = (f16_at(p), f16_at(p.add(2)));
                    let (sc, mn) = super::k_scale_mins(&blk[4..16]);
                    let sc = widen(_mm_loadl_epi64(sc.as_ptr().cast()));
                    let mn = widen(_mm_loadl_epi64(mn.as_ptr().cast()));
                    _mm256_storeu_ps(ds.as_mut_ptr(), _mm256_mul_ps(_mm256_set1_ps(d), sc));
                    _mm256_storeu_ps(dm.as_mut_ptr(), _mm256_mul_ps(_mm256_set1_ps(dmin), mn));
                }
                Block::Q6K => {
                    let ds = &mut ds[..16];
                    let d = _mm256_set1_ps(f16_at(p.add(208)));
                    let s = _mm_loadu_si128(p.add(192).cast());
                    let lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s));
                    let hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s, 8)));
                    _mm256_storeu_ps(ds.as_mut_ptr(), _mm256_mul_ps(d, lo));
                    _mm256_storeu_ps(ds.as_mut_ptr().add(8), _mm256_mul_ps(d, hi));
                }
                _ => {
                    ds[0] = f16_at(p);
                    dm[0] = if matches!(q, Block::Q4_1 | Block::Q5_1) {
                        f16_at(p.add(2))
                    } else {
                        0.0
                    };
                }
            }
        }
    }

    /// As `super::unpack_portable` with `column` (`column(q, ..)` for a fixed `q`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn unpack_with<F: Fn(&[u8], usize) -> __m256i>(q: Block, wr: &[u8], row: &mut Row, column: F) {
        let (subs, upb) = (q.block() / 32, q.block() / q.unit());
        for (b, blk) in wr.chunks_exact(q.bytes()).enumerate() {
            block_scales(q, blk, &mut row.ds[b * upb..], &mut row.dm[b * subs..]);
            let o = &mut row.u[32 * b * subs..][..32 * subs];
            for sub in 0..subs {
                // SAFETY: `o` holds 32 bytes per column.
                unsafe {
                    _mm256_storeu_si256(o.as_mut_ptr().add(32 * sub).cast(), column(blk, sub))
                };
            }
        }
    }

    /// As `super::unpack_portable`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn unpack(q: Block, wr: &[u8], row: &mut Row) {
        match q {
            Block::Q4_0 => unpack_with(q, wr, row, |b, s| column(Block::Q4_0, b, s)),
            Block::Q4_1 => unpack_with(q, wr, row, |b, s| column(Block::Q4_1, b, s)),
            Block::Q5_0 => unpack_with(q, wr, row, |b, s| column(Block::Q5_0, b, s)),
            Block::Q5_1 => unpack_with(q, wr, row, |b, s| column(Block::Q5_1, b, s)),
            Block::Q8_0 => unpack_with(q, wr, row, |b, s| column(Block::Q8_0, b, s)),
            Block::Q4K => unpack_with(q, wr, row, |b, s| column(Block::Q4K, b, s)),
            Block::Q5K => unpack_with(q, wr, row, |b, s| column(Block::Q5K, b, s)),
            Block::Q6K => unpack_with(q, wr, row, |b, s| column(Block::Q6K, b, s)),
        }
    }

    /// The value of `u` at `ds · u + c` per [`Row`]'s unit `j` (and whether `u` is
    /// signed).
    #[inline]
    fn affine(q: Block, row: &Row, j: usize) -> (f32, f32, bool) {
        let ds = row.ds[j];
        match q {
            Block::Q8_0 => (ds, 0.0, true),
            Block::Q6K => (ds, -32.0 * ds, false),
            Block::Q4K | Block::Q5K => (ds, -row.dm[j], false),
            _ => (ds, row.dm[j] - q.offset() as f32 * ds, false),
        }
    }

    /// As `super::expand_portable` (fused multiply-adds: each value within an ulp).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn expand(q: Block, row: &Row, out: &mut [f32]) {
        let unit = q.unit();
        for (j, (o, u)) in out
            .chunks_exact_mut(unit)
            .zip(row.u.chunks_exact(unit))
            .enumerate()
        {
            let (s, c, signed) = affine(q, row, j);
            let (s, c) = (_mm256_set1_ps(s), _mm256_set1_ps(c));
            for (o, u) in o.chunks_exact_mut(8).zip(u.chunks_exact(8)) {
                // SAFETY: `u` holds 8 bytes and `o` 8 floats.
                unsafe {
                    let b = _mm_loadl_epi64(u.as_ptr().cast());
                    let v = if signed {
                        _mm256_cvtepi8_epi32(b)
                    } else {
                        _mm256_cvtepu8_epi32(b)
                    };
                    let w = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(v), c);
                    _mm256_storeu_ps(o.as_mut_ptr(), w);
                }
            }
        }
    }

    /// As [`expand`], 16 values at a time.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) fn expand_avx512(q: Block, row: &Row, out: &mut [f32]) {
        let unit = q.unit();
        for (j, (o, u)) in out
            .chunks_exact_mut(unit)
            .zip(row.u.chunks_exact(unit))
            .enumerate()
        {
            let (s, c, signed) = affine(q, row, j);
            let (s, c) = (_mm512_set1_ps(s), _mm512_set1_ps(c));
            for (o, u) in o.chunks_exact_mut(16).zip(u.chunks_exact(16)) {
                // SAFETY: `u` holds 16 bytes and `o` 16 floats.
                unsafe {
                    let b = _mm_loadu_si128(u.as_ptr().cast());
                    let v = if signed {
                        _mm512_cvtepi8_epi32(b)
                    } else {
                        _mm512_cvtepu8_epi32(b)
                    };
                    let w = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(v), c);
                    _mm512_storeu_ps(o.as_mut_ptr(), w);
                }
            }
        }
    }

    /// An 8 × 8 transpose of 4-byte words: output `c` holds word `c` of every input.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn transpose8(r: [__m256i; GROUP]) -> [__m256i; GROUP] {
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
        let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
        let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
        let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
        let s = [
            _mm256_unpacklo_epi64(t0, t2),
            _mm256_unpackhi_epi64(t0, t2),
            _mm256_unpacklo_epi64(t1, t3),
            _mm256_unpackhi_epi64(t1, t3),
            _mm256_unpacklo_epi64(t4, t6),
            _mm256_unpackhi_epi64(t4, t6),
            _mm256_unpacklo_epi64(t5, t7),
            _mm256_unpackhi_epi64(t5, t7),
        ];
        std::array::from_fn(|c| {
            if c < 4 {
                _mm256_permute2x128_si256::<0x20>(s[c], s[c + 4])
            } else {
                _mm256_permute2x128_si256::<0x31>(s[c - 4], s[c])
            }
        })
    }

    /// Unpacks the weight rows `w` (1 to [`GROUP`] rows of `k` values) into `g`: per
    /// 32 values, the eight rows' columns are unpacked in registers, transposed and stored
    /// interleaved; `xor` flips the top bit of every byte (Q8_0 for VNNI: signed bytes
    /// become `w + 128`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn fill_group(q: Block, w: &[u8], k: usize, g: &mut Group, xor: bool) {
        match q {
            Block::Q4_0 => fill_with(q, w, k, g, xor, |b, s| column(Block::Q4_0, b, s)),
            Block::Q4_1 => fill_with(q, w, k, g, xor, |b, s| column(Block::Q4_1, b, s)),
            Block::Q5_0 => fill_with(q, w, k, g, xor, |b, s| column(Block::Q5_0, b, s)),
            Block::Q5_1 => fill_with(q, w, k, g, xor, |b, s| column(Block::Q5_1, b, s)),
            Block::Q8_0 => fill_with(q, w, k, g, xor, |b, s| column(Block::Q8_0, b, s)),
            Block::Q4K => fill_with(q, w, k, g, xor, |b, s| column(Block::Q4K, b, s)),
            Block::Q5K => fill_with(q, w, k, g, xor, |b, s| column(Block::Q5K, b, s)),
            Block::Q6K => fill_with(q, w, k, g, xor, |b, s| column(Block::Q6K, b, s)),
        }
    }

    /// `fill_group` with `column` (`column(q, ..)` for a fixed `q`).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn fill_with<F: Fn(&[u8], usize) -> __m256i>(
        q: Block,
        w: &[u8],
        k: usize,
        g: &mut Group,
        xor: bool,
        column: F,
    ) {
        let rb = row_bytes_q(q, k);
        let lanes = w.len() / rb;
        assert!((1..=GROUP).contains(&lanes) && g.u.len() == GROUP * k);
        let (subs, upb, bb) = (q.block() / 32, q.block() / q.unit(), q.bytes());
        let flip = _mm256_set1_epi8(if xor { -128 } else { 0 });
        // One block's scales per row (at most 16 units, 8 sub-blocks).
        let (mut ds, mut dm) = ([0.0f32; 16], [0.0f32; GROUP]);
        for b in 0..k / q.block() {
            for t in 0..GROUP {
                if t < lanes {
                    block_scales(q, &w[t * rb + b * bb..][..bb], &mut ds, &mut dm);
                } else {
                    ds.fill(0.0);
                    dm.fill(0.0);
                }
                for (u, &v) in ds[..upb].iter().enumerate() {
                    g.d[GROUP * (b * upb + u) + t] = v;
                }
                for (sub, &v) in dm[..subs].iter().enumerate() {
                    g.m[GROUP * (b * subs + sub) + t] = v;
                }
            }
            for sub in 0..subs {
                let v = std::array::from_fn(|t| {
                    if t < lanes {
                        column(&w[t * rb + b * bb..][..bb], sub)
                    } else {
                        _mm256_setzero_si256()
                    }
                });
                let o = &mut g.u[256 * (b * subs + sub)..][..256];
                for (c, v) in transpose8(v).into_iter().enumerate() {
                    // SAFETY: `o` holds 256 bytes.
                    unsafe {
                        _mm256_storeu_si256(
                            o.as_mut_ptr().add(32 * c).cast(),
                            _mm256_xor_si256(v, flip),
                        )
                    };
                }
            }
        }
    }

    /// Stores the first `lanes` floats of `v` at `o`.
    ///
    /// # Safety
    /// `o` has `lanes ≤ 8` writable floats.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn store8(v: __m256, o: *mut f32, lanes: usize) {
        // SAFETY: the caller's contract.
        unsafe {
            if lanes == GROUP {
                _mm256_storeu_ps(o, v);
            } else {
                let mut t = [0.0f32; GROUP];
                _mm256_storeu_ps(t.as_mut_ptr(), v);
                std::ptr::copy_nonoverlapping(t.as_ptr(), o, lanes);
            }
        }
    }

    /// A group of interleaved weight rows, as [`Group`] holds them or as interleaved
    /// weights store them ([`Inter`]): unit `j`'s chunks at `u + ustride · j`, its
    /// eight scales at `d + dstride · j` and minimums at `m + dstride · j`.
    #[derive(Clone, Copy)]
    pub(super) struct GroupRef {
        u: *const u8,
        d: *const f32,
        m: *const f32,
        ustride: usize,
        dstride: usize,
        /// Bytes from this group to the next one, whose lines the kernels prefetch into
        /// L2 as they go (0: none; a [`Group`] is in cache).
        next: usize,
        /// This pass of activation rows over the group, and how many there are: pass
        /// `p` of `P` prefetches the `p`-th of `P` slices of each of the next group's
        /// units, so the next group streams in while every pass multiplies (a group is
        /// read from memory once; a pass that asked for nothing left memory idle).
        pass: (usize, usize),
    }

    impl GroupRef {
        /// Asks for this pass's slice of unit `j` of the next group.
        #[inline(always)]
        fn prefetch(self, j: usize) {
            if self.next > 0 {
                let (p, passes) = self.pass;
                let unit = self.u.wrapping_add(self.next + self.ustride * j);
                let lo = unit.wrapping_add(self.ustride * p / passes) as usize & !63;
                let hi = unit.wrapping_add(self.ustride * (p + 1) / passes) as usize;
                let mut at = lo;
                while at < hi {
                    // SAFETY: prefetching never faults, whatever the address.
                    unsafe { _mm_prefetch::<_MM_HINT_T1>(at as *const i8) };
                    at += 64;
                }
            }
        }

        /// `self` as pass `p` of `passes`.
        #[inline(always)]
        fn in_pass(self, p: usize, passes: usize) -> GroupRef {
            GroupRef {
                pass: (p, passes),
                ..self
            }
        }

        fn of(q: Block, g: &Group) -> GroupRef {
            GroupRef {
                u: g.u.as_ptr(),
                d: g.d.as_ptr(),
                m: g.m.as_ptr(),
                ustride: GROUP * q.unit(),
                dstride: GROUP,
                next: 0,
                pass: (0, 1),
            }
        }
    }

    impl Inter {
        /// The kernels' view of the group at `g`.
        fn view(self, g: *const u8) -> GroupRef {
            GroupRef {
                u: g,
                // Pointer arithmetic only: the kernels read `d` and `m` at unit offsets.
                d: g.wrapping_add(self.ub).cast(),
                m: g.wrapping_add(self.ub + 4 * GROUP).cast(),
                ustride: self.stride,
                dstride: self.stride / 4,
                next: self.bytes(),
                pass: (0, 1),
            }
        }
    }

    /// `v` with each 32-bit lane shifted left by `n` (a constant where this is inlined).
    #[inline(always)]
    unsafe fn shl(v: __m256i, n: i32) -> __m256i {
        // SAFETY: AVX2 is enabled wherever this is inlined.
        unsafe { _mm256_sll_epi32(v, _mm_cvtsi32_si128(n)) }
    }

    /// `v` with each 16-bit lane shifted left by `n` (right by `−n`).
    #[inline(always)]
    unsafe fn shift16(v: __m256i, n: i32) -> __m256i {
        // SAFETY: AVX2 is enabled wherever this is inlined.
        unsafe {
            if n >= 0 {
                _mm256_sll_epi16(v, _mm_cvtsi32_si128(n))
            } else {
                _mm256_srl_epi16(v, _mm_cvtsi32_si128(-n))
            }
        }
    }

    /// The eight 32-byte chunks (values `4c..4c + 4` of each row) of the 32-value unit at
    /// `gu`, stored as `PACK` says ([`super::Pack`]); `FLIP` flips the top bit of bytes.
    ///
    /// # Safety
    /// The unit's bytes are readable.
    #[inline(always)]
    unsafe fn unit_chunks<const PACK: u8, const FLIP: bool>(gu: *const u8) -> [__m256i; 8] {
        // SAFETY: the caller's contract; AVX2 is enabled wherever this is inlined.
        unsafe {
            if PACK == NIB || PACK == NIB1 {
                let m4 = _mm256_set1_epi8(0x0f);
                let mut w = [_mm256_setzero_si256(); 8];
                for p in 0..4 {
                    let v = _mm256_loadu_si256(gu.add(32 * p).cast());
                    w[p] = _mm256_and_si256(v, m4);
                    w[p + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                }
                if PACK == NIB1 {
                    // Bit c of each plane byte becomes bit 4 of chunk c's byte; bits that
                    // a 16-bit shift carries over from the neighbour byte are masked off.
                    let plane = _mm256_loadu_si256(gu.add(128).cast());
                    let b4 = _mm256_set1_epi8(0x10);
                    for (c, w) in w.iter_mut().enumerate() {
                        let h = _mm256_and_si256(shift16(plane, 4 - c as i32), b4);
                        *w = _mm256_or_si256(*w, h);
                    }
                }
                w
            } else {
                std::array::from_fn(|c| {
                    let v = _mm256_loadu_si256(gu.add(32 * c).cast());
                    if FLIP {
                        _mm256_xor_si256(v, _mm256_set1_epi8(-128))
                    } else {
                        v
                    }
                })
            }
        }
    }

    /// The four chunks of the 16-value unit (Q6_K) at `gu`, in the first four lanes,
    /// stored as `PACK` says (bytes or [`super::Pack::Nib2`]).
    ///
    /// # Safety
    /// As [`unit_chunks`].
    #[inline(always)]
    unsafe fn chunks4<const PACK: u8>(gu: *const u8) -> [__m256i; 8] {
        // SAFETY: the caller's contract.
        unsafe {
            let mut w = [_mm256_setzero_si256(); 8];
            if PACK == NIB2 {
                let m4 = _mm256_set1_epi8(0x0f);
                let (v0, v1) = (
                    _mm256_loadu_si256(gu.cast()),
                    _mm256_loadu_si256(gu.add(32).cast()),
                );
                let plane = _mm256_loadu_si256(gu.add(64).cast());
                let nib = [
                    _mm256_and_si256(v0, m4),
                    _mm256_and_si256(v1, m4),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v0), m4),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v1), m4),
                ];
                // Bits 2c, 2c + 1 of each plane byte become bits 4, 5 of chunk c's byte.
                let b45 = _mm256_set1_epi8(0x30);
                for (c, (w, nib)) in w.iter_mut().zip(nib).enumerate() {
                    let h = _mm256_and_si256(shift16(plane, 4 - 2 * c as i32), b45);
                    *w = _mm256_or_si256(nib, h);
                }
            } else {
                for (c, w) in w.iter_mut().take(4).enumerate() {
                    *w = _mm256_loadu_si256(gu.add(32 * c).cast());
                }
            }
            w
        }
    }

    /// Defines the integer dot products of `R` activation rows with a [`Group`] on top of
    /// `$chunk(acc, w, |w|, x, signed)`, which adds to the i32 lanes `acc` the products of
    /// four weight bytes per lane (signed or not) with the four activation bytes broadcast
    /// in `x`.
    macro_rules! group_dots {
        ($dot32:ident, $dotk:ident, $features:literal, $vnni:literal, $chunk:expr) => {
            /// Columns `j..j + lanes` of output rows `r0..r0 + R` for 32-value blocks:
            /// `OFF` (a shift) subtracts `2^OFF` from every weight, `SIGNED` reads signed
            /// weights and adds the minimum when neither is set.
            ///
            /// # Safety
            /// `xq` holds rows `r0..r0 + R` of `k` values, `g` a group of `k`-value rows,
            /// and `out` rows `r0..r0 + R` (stride `n`) `lanes` writable floats at `j`.
            #[inline]
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $dot32<
                const R: usize,
                const OFF: i32,
                const SIGNED: bool,
                const PACK: u8,
                const FLIP: bool,
            >(
                g: GroupRef,
                xq: &Xq,
                r0: usize,
                k: usize,
                out: *mut f32,
                n: usize,
                j: usize,
                lanes: usize,
            ) {
                let nb = k / 32;
                let chunk = $chunk;
                // Offset corrections in i32: Q8_0's VNNI bytes carry +128.
                let shift = if SIGNED && $vnni { 7 } else { OFF };
                let (gu, gd, gm) = (g.u, g.d, g.m);
                let p = &xq.by_pass;
                assert!(p.q.len() >= (r0 + R) * k && p.d.len() >= (r0 + R) * nb);
                let (xq0, xd0) = (p.q[r0 * k..].as_ptr(), p.d[r0 * nb..].as_ptr());
                let (xs0, xc0) = (p.s[r0 * nb..].as_ptr(), p.ns32[r0 * nb..].as_ptr());
                let mut acc = [_mm256_setzero_ps(); R];
                // SAFETY (whole loop): block b reads g.u at 256b.. (256 bytes), g.d and
                // g.m at 8b.. (8 floats), and the pass's activation bytes (b · R + r) · 32..
                // and per-32 values b · R + r (asserted above).
                unsafe {
                    for b in 0..nb {
                        let (xb, at) = (xq0.add(32 * R * b), R * b);
                        let mut ai: [__m256i; R] = std::array::from_fn(|r| {
                            if shift > 0 {
                                shl(_mm256_set1_epi32(*xc0.add(at + r)), shift)
                            } else {
                                _mm256_setzero_si256()
                            }
                        });
                        g.prefetch(b);
                        let wvs = unit_chunks::<PACK, FLIP>(gu.add(g.ustride * b));
                        for (c, wv) in wvs.into_iter().enumerate() {
                            let wa = if SIGNED && !$vnni {
                                _mm256_abs_epi8(wv)
                            } else {
                                wv
                            };
                            for (r, ai) in ai.iter_mut().enumerate() {
                                let xv = xb.add(32 * r + 4 * c).cast::<i32>().read_unaligned();
                                *ai = chunk(*ai, wv, wa, _mm256_set1_epi32(xv), SIGNED);
                            }
                        }
                        let dw = _mm256_loadu_ps(gd.add(g.dstride * b));
                        for (r, (a, ai)) in acc.iter_mut().zip(ai).enumerate() {
                            let s = _mm256_mul_ps(dw, _mm256_set1_ps(*xd0.add(at + r)));
                            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), s, *a);
                        }
                        if OFF == 0 && !SIGNED {
                            let mw = _mm256_loadu_ps(gm.add(g.dstride * b));
                            for (r, a) in acc.iter_mut().enumerate() {
                                *a = _mm256_fmadd_ps(mw, _mm256_set1_ps(*xs0.add(at + r)), *a);
                            }
                        }
                    }
                    for (r, a) in acc.into_iter().enumerate() {
                        store8(a, out.add((r0 + r) * n + j), lanes);
                    }
                }
            }

            /// As the 32-block kernel for k-quants: Q6_K (`Q6`, 16-value groups with
            /// offset 32) or Q4_K/Q5_K (32-value sub-blocks with minimums).
            ///
            /// # Safety
            /// As the 32-block kernel.
            #[inline]
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $dotk<const R: usize, const Q6: bool, const PACK: u8>(
                g: GroupRef,
                xq: &Xq,
                r0: usize,
                k: usize,
                out: *mut f32,
                n: usize,
                j: usize,
                lanes: usize,
            ) {
                let chunk = $chunk;
                let (subs, chunks) = if Q6 { (16, 4) } else { (8, 8) };
                let (gu, gd, gm) = (g.u, g.d, g.m);
                let (nb, nu) = (k / 32, k / 16);
                let p = &xq.by_pass;
                assert!(p.q.len() >= (r0 + R) * k && p.nbs.len() >= (r0 + R) * nu);
                let (xq0, xd0) = (p.q[r0 * k..].as_ptr(), p.d[r0 * nb..].as_ptr());
                let (xs0, xc0) = (p.s[r0 * nb..].as_ptr(), p.nbs[r0 * nu..].as_ptr());
                let mut acc = [_mm256_setzero_ps(); R];
                // SAFETY (whole loop): unit s of super-block sb reads g.u at 32 · c for
                // its chunks c < k / 4, g.d and g.m at 8 · unit.., and the pass's
                // activation bytes of its 32-value block, per-32 values of that block and
                // per-16 values of the unit (asserted above).
                unsafe {
                    for sb in 0..k / 256 {
                        for s in 0..subs {
                            let unit = sb * subs + s;
                            // The unit's 32-value block and its first byte there.
                            let (b, within) = if Q6 {
                                (unit / 2, 16 * (unit % 2))
                            } else {
                                (unit, 0)
                            };
                            let xb = xq0.add(32 * R * b + within);
                            let mut ai: [__m256i; R] = std::array::from_fn(|r| {
                                if Q6 {
                                    shl(_mm256_set1_epi32(*xc0.add(R * unit + r)), 5)
                                } else {
                                    _mm256_setzero_si256()
                                }
                            });
                            g.prefetch(unit);
                            let gu = gu.add(g.ustride * unit);
                            let wvs = if Q6 {
                                chunks4::<PACK>(gu)
                            } else {
                                unit_chunks::<PACK, false>(gu)
                            };
                            for (cc, &wv) in wvs.iter().enumerate().take(chunks) {
                                for (r, ai) in ai.iter_mut().enumerate() {
                                    let xv = xb.add(32 * r + 4 * cc).cast::<i32>().read_unaligned();
                                    *ai = chunk(*ai, wv, wv, _mm256_set1_epi32(xv), false);
                                }
                            }
                            let dsc = _mm256_loadu_ps(gd.add(g.dstride * unit));
                            for (r, (a, ai)) in acc.iter_mut().zip(ai).enumerate() {
                                let s = _mm256_mul_ps(dsc, _mm256_set1_ps(*xd0.add(R * b + r)));
                                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), s, *a);
                            }
                            if !Q6 {
                                let dmn = _mm256_loadu_ps(gm.add(g.dstride * unit));
                                for (r, a) in acc.iter_mut().enumerate() {
                                    let sx = *xs0.add(R * b + r);
                                    *a = _mm256_fnmadd_ps(dmn, _mm256_set1_ps(sx), *a);
                                }
                            }
                        }
                    }
                    for (r, a) in acc.into_iter().enumerate() {
                        store8(a, out.add((r0 + r) * n + j), lanes);
                    }
                }
            }
        };
    }

    // Without VNNI, pairs of products are summed in i16 by `maddubs`: weights below 64
    // keep a pair sum within 2 · 63 · 127 < 2^15, and signed ones (Q8_0) are multiplied
    // as |w| · (x · sign w), at most 2 · 128 · 127 < 2^15.
    group_dots!(
        dot32_avx2,
        dotk_avx2,
        "avx2,fma,f16c",
        false,
        |acc: __m256i, w: __m256i, wa: __m256i, x: __m256i, signed: bool| {
            let p = if signed {
                _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w))
            } else {
                _mm256_maddubs_epi16(w, x)
            };
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        }
    );
    group_dots!(
        dot32_vnni,
        dotk_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        true,
        |acc: __m256i, w: __m256i, _wa: __m256i, x: __m256i, _signed: bool| {
            _mm256_dpbusd_epi32(acc, w, x)
        }
    );

    /// The shuffle that spreads Q6_K's 16-bit scales `2i` and `2i + 1` (of the eight in
    /// each 128-bit lane) over the low and high lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q6_scale_shuffle(i: usize) -> __m256i {
        let (a, b) = (4 * i as i8, 4 * i as i8 + 2);
        #[rustfmt::skip]
        let v = _mm256_setr_epi8(
            a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1,
            b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1, b, b + 1,
        );
        v
    }

    /// Bytes ahead of the block being multiplied that the fused kernels prefetch. A task's
    /// weight rows are one contiguous range, read once; on an Intel Xeon whose one core
    /// streams 10 GB/s, the hardware prefetcher alone left the kernels waiting on memory
    /// for half their time (SmolLM2's decode products: 17 ms a step without, 7.7 ms with;
    /// 2–8 KiB ahead measured alike).
    const AHEAD: usize = 2048;

    /// Defines the fused kernels of one instruction set: `$chunk` as for `group_dots`
    /// (with activation bytes in place of a broadcast), `$scaled(acc, p, s)` adds the
    /// i16 pair sums `p` times the i16 scales `s` to the i32 lanes `acc`.
    macro_rules! fused_dots {
        ($dot32:ident, $dotk:ident, $features:literal, $vnni:literal, $chunk:expr, $scaled:expr) => {
            /// Output rows `r0..r0 + R` at columns `j0..` from the weight rows `w`
            /// (32-value blocks), each block unpacked by `column`; `OFF` and `SIGNED` as
            /// for the group kernels.
            ///
            /// # Safety
            /// `xq` holds rows `r0..r0 + R` of `k` values; `out` rows `r0..r0 + R` (stride
            /// `n`) have writable columns `j0..j0 + rows of w` that no other task writes.
            #[inline]
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $dot32<
                const R: usize,
                const OFF: i32,
                const SIGNED: bool,
                F: Fn(&[u8], usize) -> __m256i,
            >(
                q: Block,
                xq: &Xq,
                r0: usize,
                k: usize,
                w: &[u8],
                j0: usize,
                n: usize,
                out: *mut f32,
                column: F,
            ) {
                let (nb, bb) = (k / 32, q.bytes());
                let chunk = $chunk;
                let shift = if SIGNED && $vnni { 7 } else { OFF };
                let min = OFF == 0 && !SIGNED;
                let xr: [&[i8]; R] = std::array::from_fn(|r| &xq.q[(r0 + r) * k..][..k]);
                let dx: [&[f32]; R] = std::array::from_fn(|r| &xq.d[(r0 + r) * nb..][..nb]);
                let sx: [&[f32]; R] = std::array::from_fn(|r| &xq.s[(r0 + r) * nb..][..nb]);
                let s32: [&[i32]; R] = std::array::from_fn(|r| &xq.s32[(r0 + r) * nb..][..nb]);
                for (j, wr) in w.chunks_exact(nb * bb).enumerate() {
                    let mut acc = [_mm256_setzero_ps(); R];
                    let mut accm = [0.0f32; R];
                    for (b, blk) in wr.chunks_exact(bb).enumerate() {
                        _mm_prefetch::<_MM_HINT_T0>(blk.as_ptr().wrapping_add(AHEAD).cast());
                        let col = column(blk, 0);
                        let wv = if SIGNED && $vnni {
                            _mm256_xor_si256(col, _mm256_set1_epi8(-128))
                        } else {
                            col
                        };
                        let wa = if SIGNED && !$vnni {
                            _mm256_abs_epi8(col)
                        } else {
                            col
                        };
                        // SAFETY: blocks hold at least 4 bytes.
                        let (d, mw) = unsafe {
                            let p = blk.as_ptr();
                            (f16_at(p), if min { f16_at(p.add(2)) } else { 0.0 })
                        };
                        for r in 0..R {
                            let xb = &xr[r][32 * b..][..32];
                            // SAFETY: `xb` holds 32 bytes.
                            let xv = unsafe { _mm256_loadu_si256(xb.as_ptr().cast()) };
                            // The offset correction, exact in lane 0.
                            let init = if shift > 0 {
                                _mm256_zextsi128_si256(_mm_cvtsi32_si128(-(s32[r][b] << shift)))
                            } else {
                                _mm256_setzero_si256()
                            };
                            let ai = chunk(init, wv, wa, xv, SIGNED);
                            let s = _mm256_set1_ps(d * dx[r][b]);
                            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), s, acc[r]);
                            if min {
                                accm[r] += mw * sx[r][b];
                            }
                        }
                    }
                    for r in 0..R {
                        // SAFETY: the caller's contract.
                        unsafe { *out.add((r0 + r) * n + j0 + j) = hsum(acc[r]) + accm[r] };
                    }
                }
            }

            /// As the 32-block fused kernel for k-quants: Q6_K (`Q6`) or Q4_K/Q5_K. The
            /// integer sub-block scales multiply in i32; each 32-value sub-block's sum then
            /// takes its activation scale in f32.
            ///
            /// # Safety
            /// As the 32-block fused kernel.
            #[inline]
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            unsafe fn $dotk<const R: usize, const Q6: bool, F: Fn(&[u8], usize) -> __m256i>(
                q: Block,
                xq: &Xq,
                r0: usize,
                k: usize,
                w: &[u8],
                j0: usize,
                n: usize,
                out: *mut f32,
                column: F,
            ) {
                let (nsb, bb) = (k / 256, q.bytes());
                let scaled = $scaled;
                let xr: [&[i8]; R] = std::array::from_fn(|r| &xq.q[(r0 + r) * k..][..k]);
                let dx: [&[f32]; R] = std::array::from_fn(|r| &xq.d[(r0 + r) * k / 32..][..k / 32]);
                let bs: [&[i16]; R] =
                    std::array::from_fn(|r| &xq.bs[(r0 + r) * k / 16..][..k / 16]);
                for (j, wr) in w.chunks_exact(nsb * bb).enumerate() {
                    let mut acc = [_mm256_setzero_ps(); R];
                    for (sb, blk) in wr.chunks_exact(bb).enumerate() {
                        let p = blk.as_ptr();
                        for line in (0..bb).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD + line).cast());
                        }
                        // Per 32 values the i16 scales of their pair sums; per 16 the
                        // multipliers of the activation sums (Q6_K's scales, Q4_K's
                        // minimums).
                        // SAFETY: the block's scale bytes are in bounds.
                        let (d, dmin, scv, corr16) = unsafe {
                            if Q6 {
                                let s = _mm_loadu_si128(p.add(192).cast());
                                let lo = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(s));
                                let hi = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(
                                    _mm_srli_si128(s, 8),
                                ));
                                let scv: [__m256i; 8] = std::array::from_fn(|i| {
                                    _mm256_shuffle_epi8(
                                        if i < 4 { lo } else { hi },
                                        q6_scale_shuffle(i % 4),
                                    )
                                });
                                (f16_at(p.add(208)), 0.0, scv, _mm256_cvtepi8_epi16(s))
                            } else {
                                let (sc, mn) = super::k_scale_mins(&blk[4..16]);
                                let s8 = _mm_cvtepu8_epi16(_mm_loadl_epi64(sc.as_ptr().cast()));
                                let s16 = _mm256_broadcastsi128_si256(s8);
                                let scv = std::array::from_fn(|i| {
                                    let pick = (2 * i as i16) | ((2 * i as i16 + 1) << 8);
                                    _mm256_shuffle_epi8(s16, _mm256_set1_epi16(pick))
                                });
                                let m8 = _mm_cvtepu8_epi16(_mm_loadl_epi64(mn.as_ptr().cast()));
                                let corr16 = _mm256_set_m128i(
                                    _mm_unpackhi_epi16(m8, m8),
                                    _mm_unpacklo_epi16(m8, m8),
                                );
                                (f16_at(p), f16_at(p.add(2)), scv, corr16)
                            }
                        };
                        for (sub, &sc) in scv.iter().enumerate() {
                            let col = column(blk, sub);
                            for r in 0..R {
                                let xb = &xr[r][256 * sb + 32 * sub..][..32];
                                // SAFETY: `xb` holds 32 bytes.
                                let xv = unsafe { _mm256_loadu_si256(xb.as_ptr().cast()) };
                                // Weights below 64: a pair sum is at most 2 · 63 · 127 < 2^15.
                                let si = scaled(
                                    _mm256_setzero_si256(),
                                    _mm256_maddubs_epi16(col, xv),
                                    sc,
                                );
                                let s = _mm256_set1_ps(d * dx[r][8 * sb + sub]);
                                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), s, acc[r]);
                            }
                        }
                        for r in 0..R {
                            let b16 = &bs[r][16 * sb..][..16];
                            // SAFETY: `b16` and the eight scales hold 16 i16 and 8 f32.
                            let (bsv, dxv) = unsafe {
                                (
                                    _mm256_loadu_si256(b16.as_ptr().cast()),
                                    _mm256_loadu_ps(dx[r][8 * sb..][..8].as_ptr()),
                                )
                            };
                            // Lane i: the minimum or offset correction of sub-block i.
                            let corr = _mm256_madd_epi16(bsv, corr16);
                            let (c, m) = if Q6 {
                                (_mm256_slli_epi32(corr, 5), d)
                            } else {
                                (corr, dmin)
                            };
                            let s = _mm256_mul_ps(dxv, _mm256_set1_ps(m));
                            acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(c), s, acc[r]);
                        }
                    }
                    for r in 0..R {
                        // SAFETY: the caller's contract.
                        unsafe { *out.add((r0 + r) * n + j0 + j) = hsum(acc[r]) };
                    }
                }
            }
        };
    }

    fused_dots!(
        fused32_avx2,
        fusedk_avx2,
        "avx2,fma,f16c",
        false,
        |acc: __m256i, w: __m256i, wa: __m256i, x: __m256i, signed: bool| {
            let p = if signed {
                _mm256_maddubs_epi16(wa, _mm256_sign_epi8(x, w))
            } else {
                _mm256_maddubs_epi16(w, x)
            };
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        },
        |acc: __m256i, p: __m256i, s: __m256i| _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
    );
    fused_dots!(
        fused32_vnni,
        fusedk_vnni,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        true,
        |acc: __m256i, w: __m256i, _wa: __m256i, x: __m256i, _signed: bool| {
            _mm256_dpbusd_epi32(acc, w, x)
        },
        |acc: __m256i, p: __m256i, s: __m256i| _mm256_dpwssd_epi32(acc, p, s)
    );

    /// Calls `$f::<R, ...>` with `R = $rows` (1 to 4).
    macro_rules! by_rows {
        ($rows:expr, $f:ident, [$($c:tt),*], $args:tt) => {
            match $rows {
                1 => $f::<1 $(, $c)*> $args,
                2 => $f::<2 $(, $c)*> $args,
                3 => $f::<3 $(, $c)*> $args,
                _ => $f::<4 $(, $c)*> $args,
            }
        };
    }

    /// As `by_rows!`, with `R = 8` as well (for [`WIDE_ROWS`]).
    macro_rules! by_rows_wide {
        ($rows:expr, $f:ident, [$($c:tt),*], $args:tt) => {
            match $rows {
                8 => $f::<8 $(, $c)*> $args,
                r => by_rows!(r, $f, [$($c),*], $args),
            }
        };
    }

    /// A fused kernel for `$m` rows (1 to 4) with the column kernel of type `$ty`.
    macro_rules! fused {
        ($m:expr, $f:ident, $ty:expr, [$($c:tt),*], ($($a:expr),*)) => {
            by_rows!($m, $f, [$($c,)* _], ($($a,)* |b, s| column($ty, b, s)))
        };
    }

    /// Defines a task of integer dot products over groups of weight rows.
    macro_rules! int8_task {
        ($name:ident, $inter:ident, $isa:expr, $vnni:literal, $features:literal, $dot32:ident, $dotk:ident, $fused32:ident, $fusedk:ident) => {
            /// `super::int8_task` on this instruction set.
            ///
            /// # Safety
            /// As `super::int8_task`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(task: &Task, xq: &Xq, w: &[u8]) {
                let Task {
                    q,
                    m,
                    k,
                    j0,
                    n,
                    out,
                } = *task;
                let rb = row_bytes_q(q, k);
                if !super::group_kernels($isa, m) {
                    let o = out.0;
                    let mut r0 = 0;
                    while r0 < m {
                        let rr = (m - r0).min(super::ROWS);
                        // SAFETY: rows r0..r0 + rr ≤ m of xq and out; columns j0.. of this task's
                        // rows are the caller's.
                        unsafe {
                            match q {
                                Block::Q4_0 => fused!(
                                    rr,
                                    $fused32,
                                    Block::Q4_0,
                                    [3, false],
                                    (q, xq, r0, k, w, j0, n, o)
                                ),
                                Block::Q4_1 => fused!(
                                    rr,
                                    $fused32,
                                    Block::Q4_1,
                                    [0, false],
                                    (q, xq, r0, k, w, j0, n, o)
                                ),
                                Block::Q5_0 => fused!(
                                    rr,
                                    $fused32,
                                    Block::Q5_0,
                                    [4, false],
                                    (q, xq, r0, k, w, j0, n, o)
                                ),
                                Block::Q5_1 => fused!(
                                    rr,
                                    $fused32,
                                    Block::Q5_1,
                                    [0, false],
                                    (q, xq, r0, k, w, j0, n, o)
                                ),
                                Block::Q8_0 => fused!(
                                    rr,
                                    $fused32,
                                    Block::Q8_0,
                                    [0, true],
                                    (q, xq, r0, k, w, j0, n, o)
                                ),
                                Block::Q4K => {
                                    fused!(
                                        rr,
                                        $fusedk,
                                        Block::Q4K,
                                        [false],
                                        (q, xq, r0, k, w, j0, n, o)
                                    )
                                }
                                Block::Q5K => {
                                    fused!(
                                        rr,
                                        $fusedk,
                                        Block::Q5K,
                                        [false],
                                        (q, xq, r0, k, w, j0, n, o)
                                    )
                                }
                                Block::Q6K => {
                                    fused!(
                                        rr,
                                        $fusedk,
                                        Block::Q6K,
                                        [true],
                                        (q, xq, r0, k, w, j0, n, o)
                                    )
                                }
                            }
                        }
                        r0 += rr;
                    }
                    return;
                }
                let mut g = Group::new(q, k);
                let xor = $isa == Isa::Avx512 && q == Block::Q8_0;
                for (gi, rows) in w.chunks(GROUP * rb).enumerate() {
                    fill_group(q, rows, k, &mut g, xor);
                    // The next group's bytes stream in while this one is multiplied (the
                    // hardware prefetcher alone leaves the unpacking waiting on memory).
                    let next = &w[((gi + 1) * GROUP * rb).min(w.len())..];
                    for line in next[..next.len().min(GROUP * rb)].chunks(64) {
                        _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
                    }
                    let (j, lanes) = (j0 + GROUP * gi, rows.len() / rb);
                    group_rows!(
                        $isa,
                        $dot32,
                        $dotk,
                        false,
                        false,
                        q,
                        GroupRef::of(q, &g),
                        xq,
                        m,
                        k,
                        out.0,
                        n,
                        j,
                        lanes
                    );
                }
            }

            /// `super::int8_task` on interleaved weights `w` (whole groups of
            /// `lay`) for columns `j0..j1`.
            ///
            /// # Safety
            /// As `super::int8_task`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $inter(task: &Task, lay: Inter, xq: &Xq, w: &[u8], j1: usize) {
                let Task {
                    q,
                    m,
                    k,
                    j0,
                    n,
                    out,
                } = *task;
                let gb = lay.bytes();
                for (gi, g) in w.chunks_exact(gb).enumerate() {
                    let j = j0 + GROUP * gi;
                    let lanes = (j1 - j).min(GROUP);
                    let view = lay.view(g.as_ptr());
                    group_rows!(
                        $isa, $dot32, $dotk, true, $vnni, q, view, xq, m, k, out.0, n, j, lanes
                    );
                }
            }
        };
    }

    /// Every pass of activation rows over one group `$g`: `$p` (interleaved weights)
    /// reads values packed ([`super::Pack`]), `$f` flips Q8_0's bytes for VNNI.
    macro_rules! group_rows {
        ($isa:expr, $dot32:ident, $dotk:ident, $p:literal, $f:literal, $q:expr, $g:expr, $xq:expr, $m:expr, $k:expr, $o:expr, $n:expr, $j:expr, $lanes:expr) => {{
            let (g, xq, m, k, o, n, j, lanes) = ($g, $xq, $m, $k, $o, $n, $j, $lanes);
            assert!(
                xq.by_pass.isa == Some($isa),
                "activations laid out for the passes of another instruction set"
            );
            let passes = super::passes($isa, m);
            let (mut r0, mut pass) = (0, 0);
            while r0 < m {
                let rr = super::pass_rows($isa, m - r0);
                let g = g.in_pass(pass, passes);
                pass += 1;
                // SAFETY: rows r0..r0 + rr < m of xq and out; columns j..j + lanes are
                // the task's (the caller's contract).
                unsafe {
                    match $q {
                        Block::Q4_0 => by_rows_wide!(
                            rr,
                            $dot32,
                            [3, false, { if $p { NIB } else { BYTE } }, false],
                            (g, xq, r0, k, o, n, j, lanes)
                        ),
                        Block::Q5_0 => by_rows_wide!(
                            rr,
                            $dot32,
                            [4, false, { if $p { NIB1 } else { BYTE } }, false],
                            (g, xq, r0, k, o, n, j, lanes)
                        ),
                        Block::Q4_1 => by_rows_wide!(
                            rr,
                            $dot32,
                            [0, false, { if $p { NIB } else { BYTE } }, false],
                            (g, xq, r0, k, o, n, j, lanes)
                        ),
                        Block::Q5_1 => by_rows_wide!(
                            rr,
                            $dot32,
                            [0, false, { if $p { NIB1 } else { BYTE } }, false],
                            (g, xq, r0, k, o, n, j, lanes)
                        ),
                        Block::Q8_0 => by_rows_wide!(
                            rr,
                            $dot32,
                            [0, true, BYTE, $f],
                            (g, xq, r0, k, o, n, j, lanes)
                        ),
                        Block::Q6K => by_rows_wide!(
                            rr,
                            $dotk,
                            [true, { if $p { NIB2 } else { BYTE } }],
                            (g, xq, r0, k, o, n, j, lanes)
                        ),
                        Block::Q4K => by_rows_wide!(
                            rr,
                            $dotk,
                            [false, { if $p { NIB } else { BYTE } }],
                            (g, xq, r0, k, o, n, j, lanes)
                        ),
                        Block::Q5K => by_rows_wide!(
                            rr,
                            $dotk,
                            [false, { if $p { NIB1 } else { BYTE } }],
                            (g, xq, r0, k, o, n, j, lanes)
                        ),
                    }
                }
                r0 += rr;
            }
        }};
    }

    int8_task!(
        int8_avx2,
        inter_avx2,
        Isa::Avx2,
        false,
        "avx2,fma,f16c",
        dot32_avx2,
        dotk_avx2,
        fused32_avx2,
        fusedk_avx2
    );
    int8_task!(
        int8_avx512,
        inter_avx512,
        Isa::Avx512,
        true,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        dot32_vnni,
        dotk_vnni,
        fused32_vnni,
        fusedk_vnni
    );

    /// `super::tile_product` with AVX-512: four weight rows × two activation rows per pass.
    ///
    /// # Safety
    /// As `super::tile_product`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn tile_avx512(
        x: &[f32],
        m: usize,
        k: usize,
        p: &[f32],
        j0: usize,
        n: usize,
        out: *mut f32,
    ) {
        let rows = p.len() / k;
        assert!(x.len() == m * k && k.is_multiple_of(32) && rows <= 4);
        // SAFETY (whole body): loads stay below k within rows of x (r < m) and of p
        // (j < rows); k is a multiple of 32; outputs r·n + j0 + j are the caller's.
        unsafe {
            let (xp, pp) = (x.as_ptr(), p.as_ptr());
            if rows == 4 {
                let w = [pp, pp.add(k), pp.add(2 * k), pp.add(3 * k)];
                let mut r = 0;
                while r + 2 <= m {
                    let (x0, x1) = (xp.add(r * k), xp.add((r + 1) * k));
                    let mut a = [_mm512_setzero_ps(); 8];
                    for c in (0..k).step_by(16) {
                        let (v0, v1) = (_mm512_loadu_ps(x0.add(c)), _mm512_loadu_ps(x1.add(c)));
                        for q in 0..4 {
                            let u = _mm512_loadu_ps(w[q].add(c));
                            a[q] = _mm512_fmadd_ps(v0, u, a[q]);
                            a[4 + q] = _mm512_fmadd_ps(v1, u, a[4 + q]);
                        }
                    }
                    for q in 0..4 {
                        *out.add(r * n + j0 + q) = _mm512_reduce_add_ps(a[q]);
                        *out.add((r + 1) * n + j0 + q) = _mm512_reduce_add_ps(a[4 + q]);
                    }
                    r += 2;
                }
                if r < m {
                    let x0 = xp.add(r * k);
                    let mut a = [_mm512_setzero_ps(); 8];
                    for c in (0..k).step_by(32) {
                        let (v0, v1) =
                            (_mm512_loadu_ps(x0.add(c)), _mm512_loadu_ps(x0.add(c + 16)));
                        for q in 0..4 {
                            a[q] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(w[q].add(c)), a[q]);
                            a[4 + q] =
                                _mm512_fmadd_ps(v1, _mm512_loadu_ps(w[q].add(c + 16)), a[4 + q]);
                        }
                    }
                    for q in 0..4 {
                        *out.add(r * n + j0 + q) =
                            _mm512_reduce_add_ps(_mm512_add_ps(a[q], a[4 + q]));
                    }
                }
            } else {
                for j in 0..rows {
                    let w0 = pp.add(j * k);
                    for r in 0..m {
                        let x0 = xp.add(r * k);
                        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                        for c in (0..k).step_by(32) {
                            a0 = _mm512_fmadd_ps(
                                _mm512_loadu_ps(x0.add(c)),
                                _mm512_loadu_ps(w0.add(c)),
                                a0,
                            );
                            a1 = _mm512_fmadd_ps(
                                _mm512_loadu_ps(x0.add(c + 16)),
                                _mm512_loadu_ps(w0.add(c + 16)),
                                a1,
                            );
                        }
                        *out.add(r * n + j0 + j) = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
                    }
                }
            }
        }
    }

    /// `MR` activation rows times a k-major AVX2 panel of 16 columns: `MR × 2` vector
    /// accumulators, one broadcast per row and step.
    ///
    /// # Safety
    /// `x` holds `MR` rows of `k`, `p` `16 · k` floats; `out` rows `r < MR` (stride `n`)
    /// have `cols ≤ 16` writable floats that no other task writes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn micro_avx2<const MR: usize>(
        x: *const f32,
        k: usize,
        p: *const f32,
        out: *mut f32,
        n: usize,
        cols: usize,
    ) {
        // SAFETY (whole body): the caller's contract.
        unsafe {
            let mut a = [[_mm256_setzero_ps(); 2]; MR];
            for i in 0..k {
                let w0 = _mm256_loadu_ps(p.add(16 * i));
                let w1 = _mm256_loadu_ps(p.add(16 * i + 8));
                for (r, a) in a.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*x.add(r * k + i));
                    a[0] = _mm256_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm256_fmadd_ps(xv, w1, a[1]);
                }
            }
            for (r, a) in a.iter().enumerate() {
                let o = out.add(r * n);
                if cols == 16 {
                    _mm256_storeu_ps(o, a[0]);
                    _mm256_storeu_ps(o.add(8), a[1]);
                } else {
                    let mut t = [0.0f32; 16];
                    _mm256_storeu_ps(t.as_mut_ptr(), a[0]);
                    _mm256_storeu_ps(t.as_mut_ptr().add(8), a[1]);
                    std::ptr::copy_nonoverlapping(t.as_ptr(), o, cols);
                }
            }
        }
    }

    /// As [`micro_avx2`] with AVX-512 and a panel of 32 columns.
    ///
    /// # Safety
    /// As [`micro_avx2`], with `p` holding `32 · k` floats and `cols ≤ 32`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn micro_avx512<const MR: usize>(
        x: *const f32,
        k: usize,
        p: *const f32,
        out: *mut f32,
        n: usize,
        cols: usize,
    ) {
        // SAFETY (whole body): the caller's contract.
        unsafe {
            let mut a = [[_mm512_setzero_ps(); 2]; MR];
            for i in 0..k {
                let w0 = _mm512_loadu_ps(p.add(32 * i));
                let w1 = _mm512_loadu_ps(p.add(32 * i + 16));
                for (r, a) in a.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(r * k + i));
                    a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                }
            }
            for (r, a) in a.iter().enumerate() {
                let o = out.add(r * n);
                if cols == 32 {
                    _mm512_storeu_ps(o, a[0]);
                    _mm512_storeu_ps(o.add(16), a[1]);
                } else {
                    let mut t = [0.0f32; 32];
                    _mm512_storeu_ps(t.as_mut_ptr(), a[0]);
                    _mm512_storeu_ps(t.as_mut_ptr().add(16), a[1]);
                    std::ptr::copy_nonoverlapping(t.as_ptr(), o, cols);
                }
            }
        }
    }

    /// Defines `super::panel_product` for one instruction set: blocks of `$mr` rows, then
    /// the remainder with a smaller block.
    macro_rules! panel {
        ($name:ident, $features:literal, $micro:ident, $mr:literal, $nr:literal, [$($rem:literal),*]) => {
            /// `super::panel_product` on this instruction set.
            ///
            /// # Safety
            /// As `super::panel_product`.
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(
                x: &[f32],
                m: usize,
                k: usize,
                p: &[f32],
                jt: usize,
                cols: usize,
                n: usize,
                out: *mut f32,
            ) {
                assert!(x.len() == m * k && p.len() == $nr * k && cols <= $nr);
                let (xp, pp) = (x.as_ptr(), p.as_ptr());
                let mut r0 = 0;
                while r0 + $mr <= m {
                    // SAFETY: rows r0..r0 + MR ≤ m of x and out; the caller's contract for
                    // columns jt..jt + cols.
                    unsafe { $micro::<$mr>(xp.add(r0 * k), k, pp, out.add(r0 * n + jt), n, cols) };
                    r0 += $mr;
                }
                let (xr, or) = (xp.wrapping_add(r0 * k), out.wrapping_add(r0 * n + jt));
                // SAFETY: the remaining rows r0..m, as above.
                unsafe {
                    match m - r0 {
                        0 => {}
                        $($rem => $micro::<$rem>(xr, k, pp, or, n, cols),)*
                        _ => unreachable!(),
                    }
                }
            }
        };
    }

    panel!(
        panel_avx2,
        "avx2,fma,f16c",
        micro_avx2,
        6,
        16,
        [1, 2, 3, 4, 5]
    );
    panel!(
        panel_avx512,
        "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
        micro_avx512,
        12,
        32,
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::kernels::cpu::test_values as values;
    use crate::load::gguf::dequantize;

    use crate::load::weights::BLOCK_TYPES as TYPES;

    /// `n` rows of `k` values of type `ty`: random bytes with every f16 scale and minimum
    /// replaced by a finite value in ±0.02.
    fn random_matrix(ty: GgmlType, k: usize, n: usize, seed: u64) -> Vec<u8> {
        let q = Block::of(ty).unwrap();
        let blocks = n * k / q.block();
        let mut w: Vec<u8> = values(blocks * q.bytes(), seed)
            .iter()
            .map(|v| ((v + 1.0) * 128.0) as u8)
            .collect();
        let fields: &[usize] = match q {
            Block::Q4_0 | Block::Q5_0 | Block::Q8_0 => &[0],
            Block::Q6K => &[208],
            _ => &[0, 2],
        };
        let scales = values(blocks * fields.len(), seed + 1);
        for (blk, s) in w
            .chunks_exact_mut(q.bytes())
            .zip(scales.chunks_exact(fields.len()))
        {
            for (&at, &s) in fields.iter().zip(s) {
                blk[at..at + 2].copy_from_slice(&f16::from_f32(0.02 * s).to_le_bytes());
            }
        }
        w
    }

    /// Per output: the float64 product with the dequantized weights, `Σ |x · w|`, and the
    /// int8 bound `Σ_b (max_b |x| / 254) · Σ_{i ∈ b} |w_i|` over activation blocks `b` of
    /// 32 values (rounding `x / d`, `d = max |x| / 127`, moves each value by ≤ d / 2).
    fn reference(x: &[f32], m: usize, k: usize, wf: &[f32], n: usize) -> Vec<(f64, f64, f64)> {
        let mut out = Vec::with_capacity(m * n);
        for xr in x.chunks_exact(k) {
            for wr in wf.chunks_exact(k) {
                let (mut e, mut a, mut bound) = (0.0f64, 0.0f64, 0.0f64);
                for (xb, wb) in xr.chunks_exact(32).zip(wr.chunks_exact(32)) {
                    let amax = xb.iter().fold(0.0f64, |a, &v| a.max(f64::from(v).abs()));
                    let mut wabs = 0.0;
                    for (&xv, &wv) in xb.iter().zip(wb) {
                        e += f64::from(xv) * f64::from(wv);
                        a += (f64::from(xv) * f64::from(wv)).abs();
                        wabs += f64::from(wv).abs();
                    }
                    bound += amax / 254.0 * wabs;
                }
                out.push((e, a, bound));
            }
        }
        out
    }

    fn paths() -> Vec<Path> {
        let mut out = Vec::new();
        for isa in Isa::covered("quantized products", &Isa::ALL) {
            for method in [Method::Dequant, Method::Int8, Method::Panel] {
                out.push(Path { isa, method });
            }
        }
        out
    }

    fn run(
        path: Path,
        x: &[f32],
        m: usize,
        k: usize,
        w: &[u8],
        ty: GgmlType,
        n: usize,
    ) -> Vec<f32> {
        let mut got = vec![f32::NAN; m * n];
        qmatmul_t_with(path, x, m, k, w, ty, n, &mut got);
        got
    }

    /// The assembly that widens block scales gives the `half` crate's value for every one
    /// of the 65,536 f16 bit patterns (NaNs as NaNs).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn block_scales_widen_like_half_for_every_bit_pattern() {
        if Isa::covered("f16 block scales", &[Isa::Avx2]).is_empty() {
            return;
        }
        for bits in 0..=u16::MAX {
            let b = bits.to_le_bytes();
            // SAFETY: AVX2, FMA and F16C are available; `b` holds two bytes.
            let got = unsafe { x86::f16_at(b.as_ptr()) };
            let want = f16::from_bits(bits).to_f32();
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}: {got} vs {want}"
            );
        }
    }

    /// Every type, method and available instruction set against float64 products with the
    /// dequantized weights, on shapes with partial tiles, tasks and panels; each SIMD path
    /// also against the portable one.
    #[test]
    fn every_path_matches_a_float64_reference() {
        let shapes = [
            (1, 37),
            (2, 5),
            (3, 70),
            (7, 33),
            (16, 41),
            (17, 35),
            (40, 66),
        ];
        for ty in TYPES {
            let q = Block::of(ty).unwrap();
            let ks: &[usize] = if q.is_k() {
                &[256, 512, 2304]
            } else {
                &[32, 64, 96, 576]
            };
            for &k in ks {
                for (s, &(m, n)) in shapes.iter().enumerate() {
                    let seed = (k * 31 + s) as u64;
                    let x = values(m * k, seed);
                    let w = random_matrix(ty, k, n, seed + 2);
                    let wf = dequantize(ty, &w).unwrap();
                    let want = reference(&x, m, k, &wf, n);
                    let mut portable: Vec<(Method, Vec<f32>)> = Vec::new();
                    for path in paths() {
                        let got = run(path, &x, m, k, &w, ty, n);
                        for (i, (&g, &(e, a, b))) in got.iter().zip(&want).enumerate() {
                            let tol = match path.method {
                                Method::Int8 => b * 1.001 + 1e-5 * a,
                                _ => 1e-5 * a,
                            } + 1e-30;
                            assert!(
                                (f64::from(g) - e).abs() <= tol,
                                "{ty} {path:?} m={m} k={k} n={n} at {i}: {g} vs {e} (tol {tol})"
                            );
                        }
                        if path.isa == Isa::Portable {
                            portable.push((path.method, got));
                        } else {
                            let (_, p) =
                                portable.iter().find(|(mt, _)| *mt == path.method).unwrap();
                            for (i, ((&g, &p), &(_, a, _))) in
                                got.iter().zip(p).zip(&want).enumerate()
                            {
                                assert!(
                                    (f64::from(g) - f64::from(p)).abs() <= 1e-5 * a + 1e-30,
                                    "{ty} {path:?} vs portable m={m} k={k} n={n} at {i}: {g} vs {p}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Interleaved weights read back as `dequantize`'s values, and multiply exactly as
    /// the file's blocks do from 5 rows on (the same group kernels on the same bytes, at
    /// decode and prefill widths); below that the fused kernels add in another order, so those are
    /// held to the float64 reference's int8 bound. Odd row counts leave partial groups.
    #[test]
    fn interleaved_weights_multiply_like_the_files_blocks() {
        if !interleaving() {
            return;
        }
        let shapes = [
            (1, 37),
            (3, 9),
            (5, 8),
            (8, 70),
            (16, 41),
            (17, 35),
            (40, 66),
        ];
        for ty in TYPES {
            let q = Block::of(ty).unwrap();
            let ks: &[usize] = if q.is_k() {
                &[256, 512]
            } else {
                &[32, 96, 576]
            };
            for &k in ks {
                for (s, &(m, n)) in shapes.iter().enumerate() {
                    let seed = (k * 17 + s) as u64;
                    let x = values(m * k, seed);
                    let w = random_matrix(ty, k, n, seed + 3);
                    let wi = interleave(ty, k, n, &w).unwrap();
                    assert_eq!(Some(wi.len()), interleaved_len(ty, k, n));
                    let wf = dequantize(ty, &w).unwrap();
                    for r in 0..n {
                        let got = interleaved_row(ty, k, n, &wi, r);
                        for (i, (&g, &e)) in got.iter().zip(&wf[r * k..]).enumerate() {
                            assert!(
                                (g - e).abs() <= 2.0 * f32::EPSILON * e.abs() + 1e-30,
                                "{ty} k={k} row {r} value {i}: {g} vs {e}"
                            );
                        }
                    }
                    let want = reference(&x, m, k, &wf, n);
                    for isa in Isa::covered("interleaved products", &[Isa::Avx2, Isa::Avx512]) {
                        let mut got = vec![f32::NAN; m * n];
                        qmatmul_t_interleaved_with(isa, &x, m, k, &wi, ty, n, &mut got);
                        if m > INTERLEAVE_ABOVE {
                            let path = Path {
                                isa,
                                method: method(isa, m),
                            };
                            let file = run(path, &x, m, k, &w, ty, n);
                            for (i, (g, f)) in got.iter().zip(&file).enumerate() {
                                assert_eq!(
                                    g.to_bits(),
                                    f.to_bits(),
                                    "{ty} {isa:?} m={m} k={k} n={n} at {i}: {g} vs {f}"
                                );
                            }
                        } else {
                            for (i, (&g, &(e, a, b))) in got.iter().zip(&want).enumerate() {
                                let tol = b * 1.001 + 1e-5 * a + 1e-30;
                                assert!(
                                    (f64::from(g) - e).abs() <= tol,
                                    "{ty} {isa:?} m={m} k={k} n={n} at {i}: {g} vs {e}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Unpacked rows give back `dequantize`'s values on every instruction set.
    #[test]
    fn unpacked_rows_expand_to_the_dequantized_values() {
        for ty in TYPES {
            let q = Block::of(ty).unwrap();
            let k = 4 * q.block();
            let w = random_matrix(ty, k, 1, 5);
            let want = dequantize(ty, &w).unwrap();
            for isa in Isa::covered("unpack", &Isa::ALL) {
                let mut row = Row::new(q, k);
                unpack(isa, q, &w, &mut row);
                let mut got = vec![0.0f32; k];
                expand(isa, q, &row, &mut got);
                for (i, (&g, &e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 2.0 * f32::EPSILON * e.abs() + 1e-30,
                        "{ty} {isa:?} value {i}: {g} vs {e}"
                    );
                }
            }
        }
    }

    /// Activation blocks of zeros, of one large value and of tiny values.
    #[test]
    fn int8_handles_zero_and_extreme_activation_blocks() {
        for ty in TYPES {
            let q = Block::of(ty).unwrap();
            let (m, k, n) = (3, 2 * q.block(), 9);
            let mut x = values(m * k, 9);
            x[..q.block()].fill(0.0);
            x[k + 3] = 1e4;
            for v in &mut x[2 * k..] {
                *v *= 1e-20;
            }
            let w = random_matrix(ty, k, n, 10);
            let wf = dequantize(ty, &w).unwrap();
            let want = reference(&x, m, k, &wf, n);
            for path in paths() {
                let got = run(path, &x, m, k, &w, ty, n);
                for (i, (&g, &(e, a, b))) in got.iter().zip(&want).enumerate() {
                    let tol = b * 1.001 + 1e-5 * a + 1e-30;
                    assert!(
                        (f64::from(g) - e).abs() <= tol,
                        "{ty} {path:?} at {i}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_default_path_matches_the_reference() {
        for ty in TYPES {
            let q = Block::of(ty).unwrap();
            for (m, k, n) in [
                (1, q.block() * 3, 50),
                (16, q.block(), 7),
                (33, q.block() * 2, 40),
            ] {
                let x = values(m * k, 3);
                let w = random_matrix(ty, k, n, 4);
                let want = reference(&x, m, k, &dequantize(ty, &w).unwrap(), n);
                let mut got = vec![f32::NAN; m * n];
                qmatmul_t(&x, m, k, &w, ty, n, &mut got);
                for (&g, &(e, a, b)) in got.iter().zip(&want) {
                    assert!((f64::from(g) - e).abs() <= b * 1.001 + 1e-5 * a + 1e-30);
                }
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert!(supports(GgmlType::Q4_K) && !supports(GgmlType::F16) && !supports(GgmlType::Q2_K));
        assert_eq!(GgmlType::Q4_1.row_bytes(576), 18 * 20);
        // The kernels' own block table agrees with the reader's.
        for ty in TYPES {
            let q = Block::of(ty).unwrap();
            assert_eq!(
                (q.block(), q.bytes()),
                (ty.block_size() as usize, ty.block_bytes() as usize)
            );
            assert_eq!(row_bytes_q(q, 2304), ty.row_bytes(2304));
        }
        assert_eq!(check_quant_matrix(GgmlType::Q8_0, 64, 3, 3 * 68), Ok(()));
        assert_eq!(
            check_quant_matrix(GgmlType::F32, 64, 3, 768),
            Err(QuantMatrixError::Unsupported(GgmlType::F32))
        );
        assert!(matches!(
            check_quant_matrix(GgmlType::Q6_K, 128, 1, 105),
            Err(QuantMatrixError::PartialBlock { block: 256, .. })
        ));
        assert!(matches!(
            check_quant_matrix(GgmlType::Q4_0, 32, 2, 35),
            Err(QuantMatrixError::Length {
                expected: 36,
                found: 35,
                ..
            })
        ));
        assert!(matches!(
            check_quant_matrix(GgmlType::Q4_0, 32, usize::MAX, 35),
            Err(QuantMatrixError::Length {
                expected: usize::MAX,
                ..
            })
        ));
    }

    #[test]
    fn a_short_matrix_panics() {
        let panic = std::panic::catch_unwind(|| {
            let mut out = [0.0f32; 2];
            qmatmul_t(&[0.0; 32], 1, 32, &[0; 35], GgmlType::Q4_0, 2, &mut out);
        })
        .expect_err("a 35-byte slice is not two Q4_0 rows of 32");
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        assert!(message.contains("take 36 bytes"), "{message}");
    }
}
