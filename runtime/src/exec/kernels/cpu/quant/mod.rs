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

/// Runs `$e` with `$B` the discriminant of the block format `$q` as a constant, for
/// kernels that take the format as a const generic: the one list of formats the kernel
/// entry points are instantiated for.
macro_rules! with_block {
    ($q:expr, $B:ident => $e:expr) => {
        with_block!(@arms $q, $B, $e, [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K])
    };
    (@arms $q:expr, $B:ident, $e:expr, [$($format:ident),*]) => {
        match $q {
            $(Block::$format => {
                const $B: u8 = Block::$format as u8;
                $e
            })*
        }
    };
}

mod interleave;
mod portable;
mod xq;

use kvc_compiler::blocks::Block;
use rayon::prelude::*;

use self::portable::{dot_portable, expand_portable, unpack_portable};
use self::xq::{Xq, group_kernels, quantize};
use super::SendPtr;
pub use super::isa::Isa;
use crate::load::gguf::GgmlType;
pub use interleave::{
    INTERLEAVE_ABOVE, interleave, interleaved_len, interleaved_row, interleaving,
    qmatmul_t_interleaved, qmatmul_t_interleaved_with,
};

/// Activation rows up to which portable code runs the decode kernels; larger products run
/// the panel GEMM there.
pub const DECODE_ROWS: usize = 16;

/// Weight rows per parallel decode task at least.
const MIN_TASK_ROWS: usize = 32;

/// Weight rows the dequantizing decode kernel widens and multiplies at a time.
const TILE_ROWS: usize = 4;

/// Whether [`qmatmul_t`] multiplies weights of type `ty`.
pub fn supports(ty: GgmlType) -> bool {
    ty.block_format().is_some()
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
    let Some(q) = ty.block_format() else {
        return Err(QuantMatrixError::Unsupported(ty));
    };
    if !k.is_multiple_of(q.values()) {
        return Err(QuantMatrixError::PartialBlock {
            ty,
            k,
            block: q.values(),
        });
    }
    let expected = (k / q.values())
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
pub fn method(isa: Isa, m: usize) -> Method {
    match (isa, m) {
        (Isa::Portable, m) if m > DECODE_ROWS => Method::Panel,
        (Isa::Portable, m) if m > 1 => Method::Dequant,
        _ => Method::Int8,
    }
}

/// The fewest rows a product on `path` planned for `m` rows may run over and give each
/// row the result the planned product gives it: the int8 method runs fused tiles up to
/// four rows and grouped passes above, which may round differently (within either a
/// row's result does not depend on the row count); the dequant method (only planned on
/// the portable path at decode widths) adds a partial tile of rows in another order, so
/// it keeps all `m`. Products of [`interleave`]d weights run the grouped passes at every
/// row count, so one row suffices there. `quant::tests` checks each.
pub fn min_rows(path: Path, interleaved: bool, m: usize) -> usize {
    match path.method {
        Method::Int8 if interleaved => 1,
        Method::Int8 if xq::group_kernels(path.isa, m) => xq::FUSED_ROWS + 1,
        Method::Int8 | Method::Panel => 1,
        Method::Dequant => m,
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

impl Method {
    /// The method's name in plans and profiles.
    pub fn name(self) -> &'static str {
        match self {
            Method::Dequant => "dequant",
            Method::Int8 => "int8",
            Method::Panel => "panel",
        }
    }
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
    let q = ty.block_format().expect("checked");
    if m == 0 || n == 0 {
        return;
    }
    let isa = path.isa;
    let rb = ty.row_bytes(k);
    let unit = match path.method {
        Method::Panel => panel_cols(isa),
        Method::Int8 => GROUP,
        Method::Dequant => TILE_ROWS,
    };
    let xq = (path.method == Method::Int8).then(|| {
        let mut xq = quantize(isa, x, m, k);
        if group_kernels(isa, m) {
            xq.fill_passes(isa, m, k);
        }
        xq
    });
    let out = SendPtr(out.as_mut_ptr());
    for_each_task(n, unit, |j0, j1| {
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
    });
}

/// Runs `run(j0, j1)` over the weight rows `0..n` split into tasks of whole `unit`s of
/// rows, at least [`MIN_TASK_ROWS`] each, four per thread (they balance a core slowed by
/// other work); a single task runs on the calling thread.
fn for_each_task(n: usize, unit: usize, run: impl Fn(usize, usize) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    let rows = n
        .div_ceil(4 * threads)
        .max(MIN_TASK_ROWS)
        .next_multiple_of(unit);
    let tasks = n.div_ceil(rows);
    let task = |t: usize| run(t * rows, ((t + 1) * rows).min(n));
    if tasks == 1 {
        task(0);
    } else {
        (0..tasks).into_par_iter().for_each(task);
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
    k / q.values() * q.bytes()
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

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;
