//! Kernel outputs kept for the next graph run instead of being freed.
//!
//! A prefill's values have the padded shape `[B, T, …]`, and a buffer of 1 MiB or more is
//! a fresh mapping of the OS's zero pages (`executor::large_buffers_from_fresh_pages`):
//! every page a kernel writes faults in, and the whole mapping is unmapped when its value
//! dies. Measured on a 2-core AMD EPYC VM (SmolLM2, 2 threads): ≈ 1.6 µs per fault, 26k
//! faults in a 64-token refill at batch 16 (≈ 40 ms of ≈ 250), ≈ 90k in a 512-token
//! prefill at batch 1. The plan runs the same shapes every time, so here a CPU kernel's
//! output goes back to a free list of its length when the last tensor viewing it is
//! dropped ([`tensor`]), and the next output of that length takes it ([`floats`]): after
//! the first run, outputs are written into resident pages, and small ones skip the
//! allocator's clearing too.
//!
//! A reused buffer holds an earlier output's values wherever the new one writes nothing:
//! the padding of a prefill that skips it. [`super::super::Live`] says why no real result
//! reads those.

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::sync::Mutex;

use burn::tensor::{DType, Shape, Tensor};
use burn_flex::{Flex, FlexTensor, Layout};
use burn_std::{AccessError, AccessPolicy, AllocationController, AllocationProperty, Bytes};

/// Most bytes the free lists hold; a buffer freed beyond it goes back to the allocator.
/// The lists hold, for each length, what one run had live at once (a run takes back what
/// the previous one freed): the activations of the prefill and of the decode step
/// together (the memory plan counts the larger of the two) and any f16 weights widened for
/// a product. The bound matters when shapes change (several programs in one process).
const MAX_KEPT: usize = 2 << 30;

/// Freed buffers by length in elements, and their bytes in all.
struct Free {
    lists: BTreeMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static FREE: Mutex<Free> = Mutex::new(Free {
    lists: BTreeMap::new(),
    bytes: 0,
});

fn free_lists() -> std::sync::MutexGuard<'static, Free> {
    // The lists stay consistent whatever panicked while they were held (each update is one
    // push or pop plus the byte count).
    FREE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A buffer of `n` floats for a kernel's output, to be wrapped by [`tensor`]. Zeros when
/// new; a reused buffer of `n` floats holds an earlier output's values, so the kernel
/// writes every element a real result reads.
pub(crate) fn floats(n: usize) -> Vec<f32> {
    #[cfg(test)]
    if POISON.get() {
        return vec![f32::NAN; n];
    }
    let mut free = free_lists();
    if let Some(v) = free.lists.get_mut(&n).and_then(Vec::pop) {
        free.bytes -= n * 4;
        return v;
    }
    drop(free);
    vec![0.0; n]
}

#[cfg(test)]
thread_local! {
    static POISON: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// In tests: new outputs of kernels called on this thread start as NaN, so a test sees
/// which elements a kernel left as its buffer held.
#[cfg(test)]
pub(crate) fn poison_outputs() {
    POISON.set(true);
}

/// An f32 tensor of `dims` owning `data`, which goes back to the free lists when the tensor
/// (and every view or in-place result of it) is dropped.
pub(crate) fn tensor<const D: usize>(data: Vec<f32>, dims: [usize; D]) -> Tensor<D> {
    assert_eq!(data.len(), dims.iter().product::<usize>(), "{dims:?}");
    let len = data.len() * 4;
    // SAFETY: the controller owns `data`, whose `len` bytes are initialised floats.
    let bytes = unsafe { Bytes::from_controller(Box::new(Kept(data)), len) };
    let t = FlexTensor::new(bytes, Layout::contiguous(Shape::from(dims)), DType::F32);
    Tensor::from_primitive::<Flex>(t)
}

/// A buffer that returns to the free lists when dropped.
struct Kept(Vec<f32>);

impl Drop for Kept {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        let bytes = v.len() * 4;
        let mut free = free_lists();
        if free.bytes + bytes <= MAX_KEPT {
            free.bytes += bytes;
            free.lists.entry(v.len()).or_default().push(v);
        }
    }
}

impl AllocationController for Kept {
    fn alloc_align(&self) -> usize {
        align_of::<f32>()
    }

    fn property(&self) -> AllocationProperty {
        AllocationProperty::Native
    }

    unsafe fn memory_mut(
        &mut self,
        _: AccessPolicy,
    ) -> Result<&mut [MaybeUninit<u8>], AccessError> {
        let bytes = self.0.len() * 4;
        // SAFETY: the vector's initialised floats viewed as bytes; the caller writes only
        // initialised data (the trait's contract).
        Ok(unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), bytes) })
    }

    fn memory(&self, _: AccessPolicy) -> Result<&[MaybeUninit<u8>], AccessError> {
        // SAFETY: the vector's initialised floats viewed as bytes.
        Ok(unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 4) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dropped output's buffer is the next one of its length, written in place, and its
    /// tensor reads and updates like any Flex tensor.
    #[test]
    fn a_dropped_output_is_reused_by_the_next_of_its_length() {
        let cols = 1 << 18;
        let n = 3 * cols;
        let mut a = floats(n);
        a[7] = 3.5;
        let at = a.as_ptr();
        let t = tensor(a, [3, cols]);
        drop(t);
        let b = floats(n);
        assert_eq!(b.as_ptr(), at, "the freed buffer is handed out again");
        assert_eq!(b[7], 3.5, "with the values it held");
        let t = tensor(b, [n]);
        let doubled = (t.clone() + t).into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(doubled[7], 7.0);
    }
}
