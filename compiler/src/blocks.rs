//! The GGUF block formats kvc keeps in their file form, described once.
//!
//! [`FORMATS`] is the one table (in the manner of ggml's type traits): per format its ggml
//! type id, values per block, bits per value, header bytes (scales and minimums), values
//! per scale once unpacked, the offset subtracted from an unpacked value, and whether
//! values are signed or carry a minimum. The IR's quantized [`DType`](crate::ir::DType)s
//! and their sizes, the GGUF reader's block sizes, and the runtime's value arithmetic,
//! interleaved packing and kernel instantiation per format derive from it; only where
//! each format's bits sit in a file block stays written per format (the kernels'
//! `column` and `block_scales`). The GGUF reader's dequantizers stay written out after
//! ggml's reference code, the reference the kernels are tested against; they share with
//! the kernels only [`k_scale_mins`] (tested here against ggml's packing) and [`f16_at`]
//! (the `half` crate's conversion).
//!
//! An unpacked value is an integer `u` in `0..2^bits` (Q8_0: a signed byte); with `s` the
//! scale of its unit and `m` the unit's minimum, its value is `s · (u − offset)` for
//! formats without minimums and `s · u + m` (Q4_1, Q5_1) or `s · u − m` (Q4_K, Q5_K) for
//! those with.

/// A block format whose weights the runtime multiplies as they are in the file. The
/// discriminant is the format's row in [`FORMATS`] (kernels take it as a const generic).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)]
pub enum Block {
    /// 32 values: f16 scale, 4-bit values offset by 8.
    Q4_0,
    /// 32 values: f16 scale and minimum, 4-bit values.
    Q4_1,
    /// 32 values: f16 scale, 5-bit values (a plane of fifth bits) offset by 16.
    Q5_0,
    /// 32 values: f16 scale and minimum, 5-bit values.
    Q5_1,
    /// 32 values: f16 scale, signed bytes.
    Q8_0,
    /// 256 values: f16 scale and minimum, eight 6-bit sub-block scales and minimums,
    /// 4-bit values.
    Q4K,
    /// 256 values: as Q4_K with a plane of fifth bits.
    Q5K,
    /// 256 values: sixteen signed 8-bit scales of 16 values, f16 scale, 6-bit values
    /// offset by 32.
    Q6K,
}

/// The facts of one block format (a row of [`FORMATS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// ggml's name of the type.
    pub name: &'static str,
    /// ggml's type id, as GGUF files write it.
    pub ggml_type: u32,
    /// Values per block (32, or 256 for a k-quant super-block).
    pub values: u32,
    /// Bits per value, high-bit planes included.
    pub bits: u32,
    /// Bytes of scales and minimums per block (everything but the values' bits).
    pub header_bytes: u32,
    /// Values per scale once unpacked (16 for Q6_K, else 32).
    pub unit: u32,
    /// Subtracted from an unpacked value (a power of two, or 0).
    pub offset: u32,
    /// Whether unpacked values are signed bytes (Q8_0).
    pub signed: bool,
    /// Whether each unit carries a minimum.
    pub mins: bool,
}

impl Format {
    /// Bytes per block.
    pub const fn bytes(&self) -> u32 {
        self.header_bytes + self.values * self.bits / 8
    }

    /// Whether this is a 256-value k-quant super-block.
    pub const fn is_k(&self) -> bool {
        self.values == 256
    }

    /// `log2(offset)` (0 without an offset): the kernels' shift.
    pub const fn offset_shift(&self) -> u32 {
        if self.offset == 0 {
            0
        } else {
            self.offset.trailing_zeros()
        }
    }
}

/// The block formats, indexed by [`Block`]'s discriminant.
pub const FORMATS: [Format; 8] = [
    Format {
        name: "Q4_0",
        ggml_type: 2,
        values: 32,
        bits: 4,
        header_bytes: 2,
        unit: 32,
        offset: 8,
        signed: false,
        mins: false,
    },
    Format {
        name: "Q4_1",
        ggml_type: 3,
        values: 32,
        bits: 4,
        header_bytes: 4,
        unit: 32,
        offset: 0,
        signed: false,
        mins: true,
    },
    Format {
        name: "Q5_0",
        ggml_type: 6,
        values: 32,
        bits: 5,
        header_bytes: 2,
        unit: 32,
        offset: 16,
        signed: false,
        mins: false,
    },
    Format {
        name: "Q5_1",
        ggml_type: 7,
        values: 32,
        bits: 5,
        header_bytes: 4,
        unit: 32,
        offset: 0,
        signed: false,
        mins: true,
    },
    Format {
        name: "Q8_0",
        ggml_type: 8,
        values: 32,
        bits: 8,
        header_bytes: 2,
        unit: 32,
        offset: 0,
        signed: true,
        mins: false,
    },
    Format {
        name: "Q4_K",
        ggml_type: 12,
        values: 256,
        bits: 4,
        header_bytes: 16,
        unit: 32,
        offset: 0,
        signed: false,
        mins: true,
    },
    Format {
        name: "Q5_K",
        ggml_type: 13,
        values: 256,
        bits: 5,
        header_bytes: 16,
        unit: 32,
        offset: 0,
        signed: false,
        mins: true,
    },
    Format {
        name: "Q6_K",
        ggml_type: 14,
        values: 256,
        bits: 6,
        header_bytes: 18,
        unit: 16,
        offset: 32,
        signed: false,
        mins: false,
    },
];

impl Block {
    /// Every format, in [`FORMATS`] order.
    pub const ALL: [Block; 8] = [
        Block::Q4_0,
        Block::Q4_1,
        Block::Q5_0,
        Block::Q5_1,
        Block::Q8_0,
        Block::Q4K,
        Block::Q5K,
        Block::Q6K,
    ];

    /// The format's facts.
    pub const fn format(self) -> Format {
        FORMATS[self as usize]
    }

    /// The format with discriminant `i` (kernels' const generics).
    ///
    /// # Panics
    /// If `i` is not a discriminant (at compile time where `i` is a constant).
    pub const fn from_index(i: u8) -> Block {
        Block::ALL[i as usize]
    }

    /// The format of ggml type id `id`, if it is one of these.
    pub fn from_ggml_type(id: u32) -> Option<Block> {
        Block::ALL.into_iter().find(|b| b.format().ggml_type == id)
    }

    /// Values per block.
    pub const fn values(self) -> usize {
        self.format().values as usize
    }

    /// Bytes per block.
    pub const fn bytes(self) -> usize {
        self.format().bytes() as usize
    }

    /// Values per scale once unpacked.
    pub const fn unit(self) -> usize {
        self.format().unit as usize
    }

    /// Whether this is a 256-value k-quant.
    pub const fn is_k(self) -> bool {
        self.format().is_k()
    }
}

/// The little-endian f16 at `at` of a block, widened to f32.
///
/// # Panics
/// If `bytes` has no two bytes at `at`.
pub fn f16_at(bytes: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The eight 6-bit sub-block scales and minimums of a Q4_K or Q5_K block, packed in the
/// 12 bytes `s`: bytes 0..4 hold the low 6 bits of scales 0..4 and bytes 4..8 those of
/// minimums 0..4; scales and minimums 4..8 take their low 4 bits from the nibbles of
/// bytes 8..12 and their high 2 bits from the top bits of bytes 0..4 and 4..8.
///
/// # Panics
/// If `s` is shorter than 12 bytes.
#[inline]
pub fn k_scale_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let top = |v: u32| ((v >> 6) & 0x0303_0303) << 4;
    let sc = [a & 0x3f3f_3f3f, (c & 0x0f0f_0f0f) | top(a)];
    let mn = [b & 0x3f3f_3f3f, ((c >> 4) & 0x0f0f_0f0f) | top(b)];
    let bytes = |v: [u32; 2]| {
        let (lo, hi) = (v[0].to_le_bytes(), v[1].to_le_bytes());
        [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
    };
    (bytes(sc), bytes(mn))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte counts ggml's `block_*` structs declare, written out independently of
    /// the table's header + bits.
    #[test]
    fn block_bytes_match_ggml_structs() {
        let ggml = [18, 20, 22, 24, 34, 144, 176, 210];
        for (b, bytes) in Block::ALL.into_iter().zip(ggml) {
            assert_eq!(b.bytes(), bytes, "{}", b.format().name);
            assert_eq!(Block::from_index(b as u8), b);
            assert_eq!(Block::from_ggml_type(b.format().ggml_type), Some(b));
            assert_eq!(b.values() % b.unit(), 0);
            let f = b.format();
            assert!(f.offset == 0 || f.offset == 1 << f.offset_shift());
            assert!(!(f.signed && (f.mins || f.offset > 0)));
            // The IR's storage type of the format: its text form is ggml's name.
            let d = crate::ir::DType::of_block(b);
            assert_eq!(d.block_format(), Some(b));
            assert_eq!(d.to_string(), f.name.to_lowercase());
        }
        assert_eq!(Block::from_ggml_type(0), None);
    }

    #[test]
    fn k_scale_mins_unpack_what_ggml_packs() {
        // Scales and minimums spanning all six bits, packed as ggml's quantizer packs them.
        let sc: [u8; 8] = [1, 63, 17, 32, 48, 5, 62, 33];
        let mn: [u8; 8] = [40, 0, 63, 21, 16, 47, 2, 59];
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
        }
        assert_eq!(k_scale_mins(&s), (sc, mn));
    }
}
