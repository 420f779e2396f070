//! One host allocation for all of a program's parameters on the CPU, aligned to 2 MiB and
//! (on Linux) advised for transparent huge pages before it is written.
//!
//! A decode step streams every weight once. With 4 KiB pages the hardware prefetchers stop
//! at each page boundary and every page costs a TLB miss; with 2 MiB pages the same GEMV
//! kernels read ≈ 20% faster (measured with `examples/gemv_stream.rs`-style passes: 19.4
//! vs 23.6 GB/s). Each parameter is a Flex tensor viewing its part of the arena; the arena
//! is freed when the last of them is dropped. Weights are never written in place, so the
//! views stay read-only (a write would copy, as for any shared buffer).

use std::alloc::{Layout, alloc, dealloc};
use std::ptr::NonNull;
use std::sync::Arc;

use burn::tensor::{DType, Shape, Tensor};
use burn_flex::{Flex, FlexTensor};
use half::f16;
use rayon::prelude::*;

use super::kernels::cpu::SendPtr;

/// Alignment of the arena: one huge page.
const HUGE_PAGE: usize = 2 << 20;
/// Alignment of each parameter inside it (a cache line).
const ITEM_ALIGN: usize = 64;
/// Elements copied before the host vector gives their memory back (8 MiB of f32).
const RELEASE_CHUNK: usize = 2 << 20;

/// Element type a parameter is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// 4-byte floats.
    F32,
    /// 2-byte floats (rounded to nearest even).
    F16,
}

impl Storage {
    fn bytes(self) -> usize {
        match self {
            Storage::F32 => 4,
            Storage::F16 => 2,
        }
    }
}

struct Arena {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the arena is plain memory; after it is filled it is only read.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `Arena::new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl Arena {
    fn new(len: usize) -> Option<Arena> {
        let layout =
            Layout::from_size_align(len.max(1).next_multiple_of(HUGE_PAGE), HUGE_PAGE).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc(layout) })?;
        #[cfg(target_os = "linux")]
        // SAFETY: advice on memory this process owns; it changes no contents. Failure
        // (no THP support) only leaves ordinary pages.
        unsafe {
            libc::madvise(ptr.as_ptr().cast(), layout.size(), libc::MADV_HUGEPAGE);
        }
        Some(Arena { ptr, layout })
    }
}

/// One parameter's bytes inside the arena.
struct View {
    arena: Arc<Arena>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for View {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: start..start + len lies inside the arena and was initialised before the
        // view was made.
        unsafe { std::slice::from_raw_parts(self.arena.ptr.as_ptr().add(self.start), self.len) }
    }
}

/// A parameter's host values, its shape and how to store it.
pub type Item = (Vec<f32>, [usize; 4], Storage);

/// Builds one Flex tensor per `(data, shape, storage)`, all in one arena, freeing each
/// host vector as it is copied. Gives the items back if the arena cannot be allocated
/// (the caller then falls back to one allocation per tensor).
pub fn tensors(items: Vec<Item>) -> Result<Vec<Tensor<4>>, Vec<Item>> {
    let mut offsets = Vec::with_capacity(items.len());
    let mut total = 0usize;
    for (data, _, storage) in &items {
        offsets.push(total);
        total = (total + data.len() * storage.bytes()).next_multiple_of(ITEM_ALIGN);
    }
    let Some(arena) = Arena::new(total) else {
        return Err(items);
    };
    let base = SendPtr(arena.ptr.as_ptr());
    // Filled in parallel: the first touch of fresh pages dominates (page faults).
    let views: Vec<_> = items
        .into_par_iter()
        .zip(offsets.into_par_iter())
        .map(|((mut data, shape, storage), start)| {
            let len = data.len() * storage.bytes();
            // Copied from the end in chunks, each released from the host vector once
            // copied, so a large tensor is never resident twice in full.
            while !data.is_empty() {
                let from = data.len().saturating_sub(RELEASE_CHUNK);
                let chunk = &data[from..];
                // SAFETY: elements from.. of this item lie inside the arena at
                // start + from · size, aligned, and no other task or view touches them.
                unsafe {
                    let dst = base.at(start + from * storage.bytes());
                    match storage {
                        Storage::F32 => {
                            std::ptr::copy_nonoverlapping(chunk.as_ptr(), dst.cast(), chunk.len())
                        }
                        Storage::F16 => {
                            let dst = dst.cast::<f16>();
                            for (i, &v) in chunk.iter().enumerate() {
                                dst.add(i).write(f16::from_f32(v));
                            }
                        }
                    }
                }
                data.truncate(from);
                data.shrink_to_fit();
            }
            (start, len, shape, storage)
        })
        .collect();
    let arena = Arc::new(arena);
    Ok(views
        .into_iter()
        .map(|(start, len, shape, storage)| {
            let view = View {
                arena: arena.clone(),
                start,
                len,
            };
            let bytes = burn_std::Bytes::from_shared(
                bytes::Bytes::from_owner(view),
                burn_std::AllocationProperty::Other,
            );
            let dtype = match storage {
                Storage::F32 => DType::F32,
                Storage::F16 => DType::F16,
            };
            let layout = burn_flex::Layout::contiguous(Shape::from(shape));
            Tensor::from_primitive::<Flex>(FlexTensor::new(bytes, layout, dtype))
        })
        .collect())
}
