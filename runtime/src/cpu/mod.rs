//! Kernels on host slices for the CPU backend, used where Flex's general ops pay a fixed
//! cost per call that a decode step cannot afford (a projection of one row, one query's
//! attention). The executor reaches them through [`crate::kernels`] when tensors live on
//! Flex; other backends run Burn's ops.

pub mod arena;
pub mod attention;
pub mod gemv;
