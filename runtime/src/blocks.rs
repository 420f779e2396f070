//! Weight matrices kept as GGUF blocks: the data the loader produces ([`crate::load`]) and
//! the kernels read ([`crate::exec::kernels`]). Decoding a layout is the kernels' business
//! (`QuantTensor::row_f32` lives beside them): this module depends on no code of either
//! side, only on the GGUF type tag.

use crate::load::gguf::GgmlType;

/// A weight matrix `[rows, cols]` stored as GGUF blocks, laid out as `layout` says.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantTensor {
    /// The block format.
    pub ty: GgmlType,
    /// Rows (output features).
    pub rows: usize,
    /// Values per row (input features); a multiple of the block size.
    pub cols: usize,
    /// The blocks (shared with the mapped file when possible).
    pub bytes: bytes::Bytes,
    /// How `bytes` is arranged.
    pub layout: QuantLayout,
}

/// The arrangement of a [`QuantTensor`]'s bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantLayout {
    /// The file's: row `r` is `bytes[r * row_bytes .. (r + 1) * row_bytes]`,
    /// `cols / block_size` blocks.
    File,
    /// Unpacked and interleaved eight rows at a time for the CPU decode kernels
    /// ([`crate::exec::kernels::cpu::quant::interleave`]), by the CPU kernel set's weight
    /// preparation ([`crate::exec::kernels::KernelSet::prepare_weight`]).
    Interleaved,
}

impl QuantTensor {
    /// Bytes of one row in the file's layout.
    pub fn row_bytes(&self) -> usize {
        self.ty.row_bytes(self.cols)
    }
}
