//! Kernels on host slices for the CPU backend, used where Flex's general ops pay a fixed
//! cost per call that a decode step cannot afford (a projection of one row, one query's
//! attention). The executor reaches them through [`crate::kernels`] when tensors live on
//! Flex; other backends run Burn's ops.

/// Defines `$name` to run `$body` compiled for AVX2 + FMA when the CPU has them (the
/// crate is built for baseline x86-64), else as built.
macro_rules! multiversion {
    ($(#[$meta:meta])* unsafe fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$meta])*
        unsafe fn $name($($arg: $ty),*) {
            #[inline(always)]
            unsafe fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    // SAFETY: the caller's contract.
                    unsafe { body($($arg),*) }
                }
                static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                if *AVX2.get_or_init(|| {
                    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
                }) {
                    // SAFETY: the features were detected; the caller's contract.
                    return unsafe { avx2($($arg),*) };
                }
            }
            // SAFETY: the caller's contract.
            unsafe { body($($arg),*) }
        }
    };
}

/// A raw pointer that parallel tasks may share, each writing elements no other task
/// touches (every use states which).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);

// SAFETY: users write disjoint elements from parallel tasks (see each call site).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The address `offset` elements in (a method, so closures capture the `Send` wrapper).
    fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

pub mod arena;
pub mod attention;
pub mod cache;
pub mod elementwise;
pub mod gemv;

/// Deterministic test inputs in [−1, 1) (xorshift).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}
