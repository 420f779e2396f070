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

pub mod arena;
pub mod attention;
pub mod cache;
pub mod elementwise;
pub mod gemv;
