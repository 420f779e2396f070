//! The row kernels every form shares: cached elements widened as they load ([`KvElem`]),
//! scores, the shifted exponential, weighted sums of value rows.

/// An element of cached keys and values: f32, or f16 widened to f32 as it is loaded.
pub trait KvElem: Copy + Send + Sync {
    /// Whether this CPU runs [`KvElem::load8`] (f16 needs F16C on x86-64). The entry
    /// points widen the whole cache to f32 first where it does not.
    fn supported() -> bool;
    /// The first eight elements of `x` as f32.
    ///
    /// # Safety
    /// [`KvElem::supported`] is true.
    unsafe fn load8(x: &[Self]) -> [f32; 8];
    /// The element as f32.
    fn widen(self) -> f32;
}

impl KvElem for f32 {
    fn supported() -> bool {
        true
    }
    #[inline(always)]
    unsafe fn load8(x: &[f32]) -> [f32; 8] {
        x[..8].try_into().expect("8 lanes")
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl KvElem for half::f16 {
    fn supported() -> bool {
        // F16C comes with the AVX2 set; under `KVC_ISA=portable` the cache is widened first.
        #[cfg(target_arch = "x86_64")]
        {
            crate::exec::kernels::cpu::isa::Isa::best() >= crate::exec::kernels::cpu::isa::Isa::Avx2
        }
        #[cfg(not(target_arch = "x86_64"))]
        true
    }
    #[inline(always)]
    unsafe fn load8(x: &[half::f16]) -> [f32; 8] {
        let x = &x[..8];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{__m128i, __m256, _mm_loadu_si128, _mm256_cvtph_ps};
            // SAFETY: eight halves are in bounds; the caller's contract gives F16C.
            unsafe {
                let v = _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().cast::<__m128i>()));
                std::mem::transmute::<__m256, [f32; 8]>(v)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        std::array::from_fn(|l| f16_to_f32(x[l].to_bits()))
    }
    #[inline(always)]
    fn widen(self) -> f32 {
        f16_to_f32(self.to_bits())
    }
}

/// `x` as f32 (a copy), for a CPU that cannot widen `E` as it loads it.
pub(super) fn widened<E: KvElem>(x: &[E]) -> Vec<f32> {
    x.iter().map(|&a| a.widen()).collect()
}

/// The f32 value of the half float with bits `h`, exactly, without branches (so loops of
/// it vectorise): exponent and mantissa shifted into f32 position and rescaled by 2¹¹²
/// (the bias difference; subnormal halves become normal floats exactly), infinities and
/// NaNs given the all-ones exponent.
#[inline(always)]
pub(super) fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let em = h & 0x7fff;
    let scaled = (f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let bits = if em >= 0x7c00 {
        (em << 13) | 0x7f80_0000
    } else {
        scaled
    };
    f32::from_bits(bits | ((h & 0x8000) << 16))
}

/// Slots scored together: eight independent dot products keep the adders busy where one
/// would wait on its own accumulator.
pub(super) const CHUNK: usize = 8;

/// `e[j] = scale · q·k[j]` for the visible slots of `k` (rows of `q.len()`), −∞ for the
/// hidden ones; returns the maximum (−∞ when nothing is visible). Chunks of slots that
/// are all hidden are not read.
#[inline(always)]
pub(super) fn scores<E: KvElem>(q: &[f32], k: &[E], vis: &[u8], scale: f32, e: &mut [f32]) -> f32 {
    let d = q.len();
    let n = e.len();
    let mut mx = f32::NEG_INFINITY;
    let mut j = 0;
    if d.is_multiple_of(8) {
        while j + CHUNK <= n {
            let seen = &vis[j..j + CHUNK];
            let out = &mut e[j..j + CHUNK];
            if seen.iter().all(|&v| v == 0) {
                out.fill(f32::NEG_INFINITY);
            } else {
                let dots = dots8(q, &k[j * d..(j + CHUNK) * d]);
                for ((o, &v), dot) in out.iter_mut().zip(seen).zip(dots) {
                    *o = if v != 0 {
                        scale * dot
                    } else {
                        f32::NEG_INFINITY
                    };
                    mx = mx.max(*o);
                }
            }
            j += CHUNK;
        }
    }
    for j in j..n {
        e[j] = if vis[j] != 0 {
            scale * dot(q, &k[j * d..(j + 1) * d])
        } else {
            f32::NEG_INFINITY
        };
        mx = mx.max(e[j]);
    }
    mx
}

/// The dot products of `q` with the eight rows of `k` (`q.len()` a multiple of 8).
#[inline(always)]
pub(super) fn dots8<E: KvElem>(q: &[f32], k: &[E]) -> [f32; CHUNK] {
    let d = q.len();
    let mut acc = [[0.0f32; 8]; CHUNK];
    for (i, x) in q.chunks_exact(8).enumerate() {
        for (s, a) in acc.iter_mut().enumerate() {
            // SAFETY: the entry points run here only where `E::supported()`.
            let y = unsafe { E::load8(&k[s * d + i * 8..]) };
            for l in 0..8 {
                a[l] += x[l] * y[l];
            }
        }
    }
    acc.map(|a| {
        let h = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        (h[0] + h[2]) + (h[1] + h[3])
    })
}

/// Dot product with eight independent lanes (vectorised by the compiler).
#[inline(always)]
pub(super) fn dot<E: KvElem>(a: &[f32], b: &[E]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; 8];
    let mut i = 0;
    while i + 8 <= n {
        let x: &[f32; 8] = a[i..i + 8].try_into().expect("8 lanes");
        // SAFETY: the entry points run here only where `E::supported()`.
        let y = unsafe { E::load8(&b[i..]) };
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
        i += 8;
    }
    let mut tail = 0.0;
    while i < n {
        tail += a[i] * b[i].widen();
        i += 1;
    }
    let h = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (h[0] + h[2]) + (h[1] + h[3]) + tail
}

/// `e = exp(e − mx)` in place (hidden slots hold −∞, whose exp is 0); returns the sum.
/// The exponentials and the sum are separate loops so that both vectorise (one running
/// sum would serialise the first).
#[inline(always)]
pub(super) fn exp_shifted(e: &mut [f32], mx: f32) -> f32 {
    for e in e.iter_mut() {
        *e = crate::exec::kernels::cpu::elementwise::exp(*e - mx);
    }
    let mut acc = [0.0f32; 8];
    let mut chunks = e.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Output columns accumulated in registers per pass over the slots.
pub(super) const TILE: usize = 64;

/// `out = Σ_j w[j] · v[j]` over the rows of `v` (`out.len()` columns), skipping rows of
/// weight 0. Columns go in tiles of [`TILE`] held in a local array, so the sum stays in
/// registers instead of being stored and reloaded for every slot.
#[inline(always)]
pub(super) fn weighted_sum<E: KvElem>(w: &[f32], v: &[E], out: &mut [f32]) {
    let d = out.len();
    let mut c0 = 0;
    while c0 + TILE <= d {
        let mut acc = [0.0f32; TILE];
        for (j, &wj) in w.iter().enumerate() {
            if wj != 0.0 {
                let row = &v[j * d + c0..][..TILE];
                for (a, y) in acc.chunks_exact_mut(8).zip(row.chunks_exact(8)) {
                    // SAFETY: the entry points run here only where `E::supported()`.
                    let y = unsafe { E::load8(y) };
                    for l in 0..8 {
                        a[l] += wj * y[l];
                    }
                }
            }
        }
        out[c0..c0 + TILE].copy_from_slice(&acc);
        c0 += TILE;
    }
    if c0 < d {
        let o = &mut out[c0..];
        o.fill(0.0);
        for (j, &wj) in w.iter().enumerate() {
            if wj != 0.0 {
                axpy(wj, &v[j * d + c0..(j + 1) * d], o);
            }
        }
    }
}

/// `y += a · x`.
#[inline(always)]
pub(super) fn axpy<E: KvElem>(a: f32, x: &[E], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x.widen();
    }
}
