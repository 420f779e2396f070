//! The ggml tensor types and their dequantizers: the block layouts of ggml's reference
//! code, decoded with its f32 arithmetic.

use std::fmt;

use half::f16;
use kvc_compiler::blocks::{Block, f16_at, k_scale_mins};
use rayon::prelude::*;

use super::DequantizeError;

/// ggml tensor element types known to this reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half float.
    F16,
    /// 32-element blocks: f16 scale, 16 bytes of 4-bit values offset by 8.
    Q4_0,
    /// 32-element blocks: f16 scale, f16 minimum, 16 bytes of 4-bit values.
    Q4_1,
    /// 32-element blocks: f16 scale, 32 high bits, 16 bytes of low nibbles;
    /// 5-bit values offset by 16.
    Q5_0,
    /// 32-element blocks: f16 scale, f16 minimum, 32 high bits, 16 bytes of
    /// low nibbles.
    Q5_1,
    /// 32-element blocks: f16 scale, 32 signed bytes.
    Q8_0,
    /// 32-element blocks of 8-bit values with scale and sum.
    Q8_1,
    /// 256-element k-quant, 2 bits.
    Q2_K,
    /// 256-element k-quant, 3 bits.
    Q3_K,
    /// 256-element k-quant, 4 bits: f16 scale and minimum, eight 6-bit
    /// sub-block scales and minimums, 4-bit values.
    Q4_K,
    /// 256-element k-quant, 5 bits: as [`GgmlType::Q4_K`] plus one high bit
    /// per value.
    Q5_K,
    /// 256-element k-quant, 6 bits: 4 low and 2 high bits per value, sixteen
    /// signed 8-bit sub-block scales, f16 scale; values offset by 32.
    Q6_K,
    /// 256-element k-quant, 8 bits: f32 scale, signed bytes, sixteen 16-bit
    /// partial sums (unused when dequantizing).
    Q8_K,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
    /// bfloat16.
    BF16,
}

impl GgmlType {
    /// Maps a ggml type id to a type, if known.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            24 => Self::I8,
            25 => Self::I16,
            26 => Self::I32,
            27 => Self::I64,
            28 => Self::F64,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The ggml type id written in the file.
    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::I8 => 24,
            Self::I16 => 25,
            Self::I32 => 26,
            Self::I64 => 27,
            Self::F64 => 28,
            Self::BF16 => 30,
        }
    }

    /// The block format of a type the runtime keeps as blocks ([`kvc_compiler::blocks`]).
    pub fn block_format(self) -> Option<Block> {
        Block::from_ggml_type(self.id())
    }

    /// Elements per block (1 for plain element types).
    pub fn block_size(self) -> u64 {
        match self {
            Self::F32 | Self::F16 | Self::BF16 | Self::F64 => 1,
            Self::I8 | Self::I16 | Self::I32 | Self::I64 => 1,
            Self::Q8_1 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q8_K => 256,
            Self::Q4_0
            | Self::Q4_1
            | Self::Q5_0
            | Self::Q5_1
            | Self::Q8_0
            | Self::Q4_K
            | Self::Q5_K
            | Self::Q6_K => self.kept().values() as u64,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::F64 | Self::I64 => 8,
            Self::I8 => 1,
            Self::Q8_1 => 36,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q8_K => 292,
            Self::Q4_0
            | Self::Q4_1
            | Self::Q5_0
            | Self::Q5_1
            | Self::Q8_0
            | Self::Q4_K
            | Self::Q5_K
            | Self::Q6_K => self.kept().bytes() as u64,
        }
    }

    /// [`Self::block_format`] of a type listed there.
    fn kept(self) -> Block {
        self.block_format()
            .expect("every type with a block format is listed in kvc_compiler::blocks")
    }

    /// Bytes of a row of `values` values (a multiple of [`Self::block_size`]).
    pub fn row_bytes(self, values: usize) -> usize {
        values / self.block_size() as usize * self.block_bytes() as usize
    }

    /// Whether [`dequantize`] (and so [`GgufFile::tensor_f32`](super::GgufFile::tensor_f32)) can decode
    /// this type.
    pub fn can_dequantize(self) -> bool {
        matches!(
            self,
            Self::F32
                | Self::F16
                | Self::BF16
                | Self::Q4_0
                | Self::Q4_1
                | Self::Q5_0
                | Self::Q5_1
                | Self::Q8_0
                | Self::Q4_K
                | Self::Q5_K
                | Self::Q6_K
                | Self::Q8_K
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Decodes `bytes` of type `ty` to `f32`, in file order.
///
/// Each block is decoded with the same f32 operations, in the same order, as
/// ggml's reference dequantizers (without fused multiply-adds); the results
/// match the `gguf` Python package's bit for bit.
/// Fails if the type is not one [`GgmlType::can_dequantize`] accepts or if
/// `bytes` is not a whole number of blocks.
pub fn dequantize(ty: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, DequantizeError> {
    match ty {
        GgmlType::F32 => decode_blocks(ty, bytes, f32_block),
        GgmlType::F16 => decode_blocks(ty, bytes, f16_block),
        GgmlType::BF16 => decode_blocks(ty, bytes, bf16_block),
        GgmlType::Q4_0 => decode_blocks(ty, bytes, q4_0_block),
        GgmlType::Q4_1 => decode_blocks(ty, bytes, q4_1_block),
        GgmlType::Q5_0 => decode_blocks(ty, bytes, q5_0_block),
        GgmlType::Q5_1 => decode_blocks(ty, bytes, q5_1_block),
        GgmlType::Q8_0 => decode_blocks(ty, bytes, q8_0_block),
        GgmlType::Q4_K => decode_blocks(ty, bytes, q4_k_block),
        GgmlType::Q5_K => decode_blocks(ty, bytes, q5_k_block),
        GgmlType::Q6_K => decode_blocks(ty, bytes, q6_k_block),
        GgmlType::Q8_K => decode_blocks(ty, bytes, q8_k_block),
        _ => Err(DequantizeError::Unsupported(ty)),
    }
}

/// Elements each parallel task decodes (rounded to whole blocks).
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// Splits `bytes` into blocks of `B` bytes and decodes each into `N` values
/// with `decode`, in parallel over runs of blocks.
fn decode_blocks<const B: usize, const N: usize>(
    ty: GgmlType,
    bytes: &[u8],
    decode: impl Fn(&[u8; B], &mut [f32; N]) + Sync,
) -> Result<Vec<f32>, DequantizeError> {
    debug_assert_eq!((B as u64, N as u64), (ty.block_bytes(), ty.block_size()));
    let (blocks, rest) = bytes.as_chunks::<B>();
    if !rest.is_empty() {
        return Err(DequantizeError::PartialBlock {
            ty,
            len: bytes.len(),
            block_bytes: B as u64,
        });
    }
    let mut out = vec![0.0f32; blocks.len() * N];
    let per_task = (ELEMENTS_PER_TASK / N).max(1);
    out.as_chunks_mut::<N>()
        .0
        .par_chunks_mut(per_task)
        .zip(blocks.par_chunks(per_task))
        .for_each(|(outs, blocks)| {
            for (out, block) in outs.iter_mut().zip(blocks) {
                decode(block, out);
            }
        });
    Ok(out)
}

/// F32: one little-endian value.
fn f32_block(b: &[u8; 4], out: &mut [f32; 1]) {
    out[0] = f32::from_le_bytes(*b);
}

/// F16: one little-endian IEEE half.
fn f16_block(b: &[u8; 2], out: &mut [f32; 1]) {
    out[0] = f16::from_le_bytes(*b).to_f32();
}

/// BF16: the high half of an f32.
fn bf16_block(b: &[u8; 2], out: &mut [f32; 1]) {
    out[0] = f32::from_bits(u32::from(u16::from_le_bytes(*b)) << 16);
}

/// Q4_0: `d: f16, qs: [u8; 16]`. Value `i` is `(q - 8) * d` with `q` the low
/// nibble of `qs[i]` for `i < 16` and the high nibble of `qs[i - 16]` after.
fn q4_0_block(b: &[u8; 18], out: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..];
    let (lo, hi) = out.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(qs) {
        *l = (f32::from(q & 0x0f) - 8.0) * d;
        *h = (f32::from(q >> 4) - 8.0) * d;
    }
}

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`. Value is `q * d + m`, nibbles as in
/// Q4_0.
fn q4_1_block(b: &[u8; 20], out: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..];
    let (lo, hi) = out.split_at_mut(16);
    for ((l, h), &q) in lo.iter_mut().zip(hi).zip(qs) {
        *l = f32::from(q & 0x0f) * d + m;
        *h = f32::from(q >> 4) * d + m;
    }
}

/// The 5-bit values of a Q5_0 or Q5_1 block: bit `i` of the little-endian
/// `qh` is bit 4 of value `i`; the low four bits are nibbles as in Q4_0.
fn five_bit_values(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let high = |i: usize| (((qh >> i) & 1) as u8) << 4;
    let mut q = [0u8; 32];
    for (j, &byte) in qs.iter().enumerate() {
        q[j] = (byte & 0x0f) | high(j);
        q[j + 16] = (byte >> 4) | high(j + 16);
    }
    q
}

/// Q5_0: `d: f16, qh: [u8; 4], qs: [u8; 16]`. Value is `(q - 16) * d`.
fn q5_0_block(b: &[u8; 22], out: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let q = five_bit_values(&b[2..6], &b[6..]);
    for (o, &q) in out.iter_mut().zip(&q) {
        *o = (f32::from(q) - 16.0) * d;
    }
}

/// Q5_1: `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`. Value is `q * d + m`.
fn q5_1_block(b: &[u8; 24], out: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let q = five_bit_values(&b[4..8], &b[8..]);
    for (o, &q) in out.iter_mut().zip(&q) {
        *o = f32::from(q) * d + m;
    }
}

/// Q8_0: `d: f16, qs: [i8; 32]`. Value is `q * d`.
fn q8_0_block(b: &[u8; 34], out: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (o, &q) in out.iter_mut().zip(&b[2..]) {
        *o = f32::from(q as i8) * d;
    }
}

/// Q4_K: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: eight
/// sub-blocks of 32 values. Each 32 bytes of `qs` hold two sub-blocks, the
/// first in the low nibbles and the second in the high ones. Value is
/// `(d * sc) * q - dmin * m` with `(sc, m)` the sub-block's 6-bit scale and
/// minimum.
fn q4_k_block(b: &[u8; 144], out: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (scales, mins) = k_scale_mins(&b[4..16]);
    for (pair, (qs, out)) in b[16..]
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (lo, hi) = out.split_at_mut(32);
        for (sub, out, shift) in [(2 * pair, lo, 0), (2 * pair + 1, hi, 4)] {
            let (sc, m) = (scales[sub], mins[sub]);
            let scale = d * f32::from(sc);
            let min = dmin * f32::from(m);
            for (o, &q) in out.iter_mut().zip(qs) {
                *o = scale * f32::from((q >> shift) & 0x0f) - min;
            }
        }
    }
}

/// Q5_K: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`:
/// as Q4_K, with bit 4 of value `l` of sub-block `s` in bit `s` of `qh[l]`.
fn q5_k_block(b: &[u8; 176], out: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let (scales, mins) = k_scale_mins(&b[4..16]);
    let qh = &b[16..48];
    for (pair, (qs, out)) in b[48..]
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (lo, hi) = out.split_at_mut(32);
        for (sub, out, shift) in [(2 * pair, lo, 0), (2 * pair + 1, hi, 4)] {
            let (sc, m) = (scales[sub], mins[sub]);
            let scale = d * f32::from(sc);
            let min = dmin * f32::from(m);
            for ((o, &q), &h) in out.iter_mut().zip(qs).zip(qh) {
                let q = ((q >> shift) & 0x0f) | (((h >> sub) & 1) << 4);
                *o = scale * f32::from(q) - min;
            }
        }
    }
}

/// Q6_K: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: two halves
/// of 128 values, each from 64 bytes of `ql` and 32 of `qh`. In a half,
/// value `l + 32 * k` (`l < 32`, `k < 4`) takes its low 4 bits from byte
/// `l + 32 * (k % 2)` of `ql` (low nibble for `k < 2`, high after) and its
/// high 2 bits from bits `2k, 2k+1` of `qh[l]`. Value is `(d * sc) * (q - 32)`
/// with `sc` the scale of its 16-value group.
fn q6_k_block(b: &[u8; 210], out: &mut [f32; 256]) {
    let d = f16_at(b, 208);
    let halves = b[..128]
        .chunks_exact(64)
        .zip(b[128..192].chunks_exact(32))
        .zip(b[192..208].chunks_exact(8))
        .zip(out.chunks_exact_mut(128));
    for (((ql, qh), scales), out) in halves {
        for (k, out) in out.chunks_exact_mut(32).enumerate() {
            let low = &ql[32 * (k % 2)..][..32];
            let shift = if k < 2 { 0 } else { 4 };
            for (l, o) in out.iter_mut().enumerate() {
                let q = ((low[l] >> shift) & 0x0f) | (((qh[l] >> (2 * k)) & 3) << 4);
                let scale = d * f32::from(scales[2 * k + l / 16] as i8);
                *o = scale * (f32::from(q) - 32.0);
            }
        }
    }
}

/// Q8_K: `d: f32, qs: [i8; 256], bsums: [i16; 16]`. Value is `d * q`; the
/// partial sums serve dot products only.
fn q8_k_block(b: &[u8; 292], out: &mut [f32; 256]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (o, &q) in out.iter_mut().zip(&b[4..260]) {
        *o = d * f32::from(q as i8);
    }
}
