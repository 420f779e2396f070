//! One task of integer products per instruction set: the fused kernels for few rows, the
//! group kernels over the file's blocks or interleaved weights for more; each kernel
//! instantiated for every block format from one list (`with_block!`).

use std::arch::x86_64::*;

use kvc_compiler::blocks::Block;

use super::super::interleave::Inter;
use super::super::xq::Xq;
use super::super::{GROUP, Group, Isa, Task, row_bytes_q};
use super::fill_group;
use super::fused::*;
use super::group::*;

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

/// The kernel of format `$q` for `$rows` rows: `$dotk::<R, B, ..>` for a k-quant, else
/// `$dot32::<R, B, .., $c32>`, with `$by` spreading the rows over `R`.
macro_rules! by_format {
    ($by:ident, $rows:expr, $q:expr, $dot32:ident, $dotk:ident, [$($c:tt),*], [$($c32:tt),*], $args:tt) => {
        with_block!($q, B => {
            if const { Block::from_index(B).is_k() } {
                $by!($rows, $dotk, [B $(, $c)*], $args)
            } else {
                $by!($rows, $dot32, [B $(, $c)* $(, $c32)*], $args)
            }
        })
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
        pub(crate) unsafe fn $name(task: &Task, xq: &Xq, w: &[u8]) {
            let Task {
                q,
                m,
                k,
                j0,
                n,
                out,
            } = *task;
            let rb = row_bytes_q(q, k);
            if !super::super::xq::group_kernels($isa, m) {
                let o = out.0;
                let mut r0 = 0;
                while r0 < m {
                    let rr = (m - r0).min(super::super::xq::ROWS);
                    // SAFETY: rows r0..r0 + rr ≤ m of xq and out; columns j0.. of this task's
                    // rows are the caller's.
                    unsafe {
                        by_format!(
                            by_rows,
                            rr,
                            q,
                            $fused32,
                            $fusedk,
                            [],
                            [],
                            (xq, r0, k, w, j0, n, o)
                        )
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
        pub(crate) unsafe fn $inter(task: &Task, lay: Inter, xq: &Xq, w: &[u8], j1: usize) {
            let Task {
                q,
                m,
                k,
                j0,
                n,
                out,
            } = *task;
            let gb = lay.bytes();
            let once = lay.pack.merges_bits() && super::super::xq::passes($isa, m) > 1;
            let mut u = vec![0u8; if once { GROUP * k } else { 0 }];
            for (gi, g) in w.chunks_exact(gb).enumerate() {
                let j = j0 + GROUP * gi;
                let lanes = (j1 - j).min(GROUP);
                let view = lay.view(g.as_ptr());
                if once {
                    // SAFETY: `view` is a whole group of format `q`.
                    let view = unsafe {
                        with_block!(q, B => unpacked::<B>(view, k, &mut u))
                    };
                    group_rows!(
                        $isa, $dot32, $dotk, false, false, q, view, xq, m, k, out.0, n, j, lanes
                    );
                } else {
                    group_rows!(
                        $isa, $dot32, $dotk, true, $vnni, q, view, xq, m, k, out.0, n, j, lanes
                    );
                }
            }
        }
    };
}

/// Every pass of activation rows over one group `$g`: `$p` (interleaved weights)
/// reads values packed ([`Pack`]), `$f` flips Q8_0's bytes for VNNI.
macro_rules! group_rows {
    ($isa:expr, $dot32:ident, $dotk:ident, $p:literal, $f:literal, $q:expr, $g:expr, $xq:expr, $m:expr, $k:expr, $o:expr, $n:expr, $j:expr, $lanes:expr) => {{
        let (g, xq, m, k, o, n, j, lanes) = ($g, $xq, $m, $k, $o, $n, $j, $lanes);
        assert!(
            xq.by_pass.isa == Some($isa),
            "activations laid out for the passes of another instruction set"
        );
        let passes = super::super::xq::passes($isa, m);
        let (mut r0, mut pass) = (0, 0);
        while r0 < m {
            let rr = super::super::xq::pass_rows($isa, m - r0);
            let g = g.in_pass(pass, passes);
            pass += 1;
            // SAFETY: rows r0..r0 + rr < m of xq and out; columns j..j + lanes are
            // the task's (the caller's contract).
            unsafe {
                by_format!(
                    by_rows_wide,
                    rr,
                    $q,
                    $dot32,
                    $dotk,
                    [$p],
                    [$f],
                    (g, xq, r0, k, o, n, j, lanes)
                )
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
