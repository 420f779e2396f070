//! A self-contained reader for GGUF (versions 2 and 3) model files.
//!
//! [`GgufFile::open`] maps the file into memory; [`GgufFile::from_bytes`]
//! parses a buffer already in memory. Parsing validates every length, count,
//! dimension product and offset against the bytes actually present before
//! anything is allocated, so a hostile or truncated file yields a
//! [`GgufError`] instead of a panic or an oversized allocation.
//!
//! Tensor payloads can be dequantized to `f32` for the types listed in
//! [`GgmlType::can_dequantize`], with the block layouts and the f32
//! arithmetic of ggml's reference dequantizers.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::f16;
use memmap2::Mmap;
use rayon::prelude::*;

/// The four magic bytes at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Alignment of the data section when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most dimensions a ggml tensor may have.
pub const MAX_DIMS: usize = 4;

/// Deepest nesting of arrays inside metadata values that the reader accepts.
pub const MAX_ARRAY_NESTING: usize = 4;

/// Errors produced while reading or decoding a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Two tensors' byte ranges overlap.
    #[error("tensors {first} and {second} overlap in the data section")]
    OverlappingTensors {
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
    },
    /// The file could not be read from disk.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file does not start with the `GGUF` magic.
    #[error("not a GGUF file (magic bytes {found:02x?})")]
    BadMagic {
        /// The first bytes found instead.
        found: Vec<u8>,
    },
    /// The format version is not 2 or 3.
    #[error("unsupported GGUF version {0} (supported: 2, 3)")]
    UnsupportedVersion(u32),
    /// A fixed-size field runs past the end of the file.
    #[error(
        "file truncated while reading {what} at byte {offset}: need {needed} bytes, {available} left"
    )]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Byte offset of the field.
        offset: usize,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file.
        available: usize,
    },
    /// A string's declared length exceeds the bytes left in the file.
    #[error("string at byte {offset} declares {len} bytes but only {available} remain")]
    StringTooLong {
        /// Byte offset of the string's length prefix.
        offset: usize,
        /// Declared length.
        len: u64,
        /// Bytes left in the file after the length prefix.
        available: usize,
    },
    /// A count (tensors, key/values, array items) cannot fit in the rest of the file.
    #[error("{what} {count} at byte {offset} cannot fit in the {available} bytes left in the file")]
    CountTooLarge {
        /// What was being counted.
        what: &'static str,
        /// The declared count.
        count: u64,
        /// Byte offset of the count.
        offset: usize,
        /// Bytes left in the file after the count.
        available: usize,
    },
    /// A string is not valid UTF-8.
    #[error("string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Byte offset of the string's bytes.
        offset: usize,
    },
    /// A metadata value has an unknown type tag.
    #[error("metadata value at byte {offset} has unknown type {type_id}")]
    UnknownValueType {
        /// The type tag found.
        type_id: u32,
        /// Byte offset of the tag.
        offset: usize,
    },
    /// Metadata arrays are nested deeper than [`MAX_ARRAY_NESTING`].
    #[error("metadata arrays nested deeper than {MAX_ARRAY_NESTING} at byte {offset}")]
    NestingTooDeep {
        /// Byte offset of the innermost array.
        offset: usize,
    },
    /// The same metadata key appears twice.
    #[error("duplicate metadata key {0:?}")]
    DuplicateKey(String),
    /// The same tensor name appears twice.
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensor(String),
    /// `general.alignment` is zero or not a power of two.
    #[error("invalid general.alignment {0} (must be a non-zero power of two)")]
    BadAlignment(u64),
    /// A tensor has more than [`MAX_DIMS`] dimensions.
    #[error("tensor {name:?} has {n_dims} dimensions (at most {MAX_DIMS} allowed)")]
    TooManyDims {
        /// Tensor name.
        name: String,
        /// Declared number of dimensions.
        n_dims: u32,
    },
    /// A tensor uses a ggml type id this reader does not know.
    #[error("tensor {name:?} has unknown ggml type id {type_id}")]
    UnknownTensorType {
        /// Tensor name.
        name: String,
        /// The type id found.
        type_id: u32,
    },
    /// The product of a tensor's dimensions (or its byte size) overflows.
    #[error("tensor {name:?} has dimensions {dims:?} whose size overflows")]
    ShapeOverflow {
        /// Tensor name.
        name: String,
        /// The dimensions as listed in the file.
        dims: Vec<u64>,
    },
    /// A quantized tensor's element count is not a whole number of blocks.
    #[error(
        "tensor {name:?} has {elements} elements, not a multiple of the {ty} block size {block}"
    )]
    NotBlockAligned {
        /// Tensor name.
        name: String,
        /// Element count.
        elements: u64,
        /// The tensor type.
        ty: GgmlType,
        /// Elements per block of that type.
        block: u64,
    },
    /// A tensor's offset is not a multiple of the file's alignment.
    #[error("tensor {name:?} offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        /// Tensor name.
        name: String,
        /// Offset relative to the data section.
        offset: u64,
        /// Required alignment.
        alignment: u64,
    },
    /// A tensor's bytes extend past the end of the file.
    #[error(
        "tensor {name:?} data [{offset}, {offset}+{size}) lies outside the {data_len}-byte data section"
    )]
    TensorDataOutOfBounds {
        /// Tensor name.
        name: String,
        /// Offset relative to the data section.
        offset: u64,
        /// Size in bytes.
        size: u64,
        /// Size of the data section present in the file.
        data_len: u64,
    },
    /// A requested metadata key is absent.
    #[error("metadata key {0:?} not found")]
    MissingKey(String),
    /// A metadata value does not have the requested type.
    #[error("metadata key {key:?} is {found}, expected {expected}")]
    WrongType {
        /// The key.
        key: String,
        /// The type that was requested.
        expected: &'static str,
        /// A description of the value's actual type.
        found: String,
    },
    /// A requested tensor is absent.
    #[error("tensor {0:?} not found")]
    MissingTensor(String),
    /// The tensor type has no dequantization routine here.
    #[error("tensor {name:?} has type {ty}, which cannot be dequantized by this reader")]
    UnsupportedTensorType {
        /// Tensor name.
        name: String,
        /// The tensor type.
        ty: GgmlType,
    },
    /// A tensor's payload is not a whole number of blocks of its type.
    #[error("tensor {name:?}: {source}")]
    PartialBlock {
        /// Tensor name.
        name: String,
        /// The length mismatch.
        source: DequantizeError,
    },
}

/// Why [`dequantize`] could not decode a byte slice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantizeError {
    /// The type has no dequantization routine here.
    #[error("type {0} cannot be dequantized by this reader")]
    Unsupported(GgmlType),
    /// The slice is not a whole number of blocks.
    #[error("{len} bytes are not a whole number of {ty} blocks of {block_bytes} bytes")]
    PartialBlock {
        /// The type.
        ty: GgmlType,
        /// Length of the slice in bytes.
        len: usize,
        /// Bytes per block of that type.
        block_bytes: u64,
    },
}

/// Shorthand result type for this module.
pub type Result<T, E = GgufError> = std::result::Result<T, E>;

/// Type tags of GGUF metadata values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 16-bit integer.
    U16,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 32-bit integer.
    U32,
    /// Signed 32-bit integer.
    I32,
    /// 32-bit float.
    F32,
    /// Boolean stored as one byte.
    Bool,
    /// Length-prefixed UTF-8 string.
    String,
    /// Typed, length-prefixed array.
    Array,
    /// Unsigned 64-bit integer.
    U64,
    /// Signed 64-bit integer.
    I64,
    /// 64-bit float.
    F64,
}

impl GgufValueType {
    /// Maps a type tag from the file to a value type.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// The type tag written in the file.
    pub fn id(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::Array => 9,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }

    /// The fewest bytes one value of this type occupies in the file.
    fn min_encoded_size(self) -> u64 {
        match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 | Self::String => 8,
            // element type tag + length
            Self::Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Unsigned 8-bit integer.
    U8(u8),
    /// Signed 8-bit integer.
    I8(i8),
    /// Unsigned 16-bit integer.
    U16(u16),
    /// Signed 16-bit integer.
    I16(i16),
    /// Unsigned 32-bit integer.
    U32(u32),
    /// Signed 32-bit integer.
    I32(i32),
    /// 32-bit float.
    F32(f32),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Homogeneous array; every item has type `elem_type`.
    Array {
        /// The declared element type.
        elem_type: GgufValueType,
        /// The items.
        items: Vec<GgufValue>,
    },
    /// Unsigned 64-bit integer.
    U64(u64),
    /// Signed 64-bit integer.
    I64(i64),
    /// 64-bit float.
    F64(f64),
}

impl GgufValue {
    /// The value's type tag.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            Self::U8(_) => GgufValueType::U8,
            Self::I8(_) => GgufValueType::I8,
            Self::U16(_) => GgufValueType::U16,
            Self::I16(_) => GgufValueType::I16,
            Self::U32(_) => GgufValueType::U32,
            Self::I32(_) => GgufValueType::I32,
            Self::F32(_) => GgufValueType::F32,
            Self::Bool(_) => GgufValueType::Bool,
            Self::String(_) => GgufValueType::String,
            Self::Array { .. } => GgufValueType::Array,
            Self::U64(_) => GgufValueType::U64,
            Self::I64(_) => GgufValueType::I64,
            Self::F64(_) => GgufValueType::F64,
        }
    }

    /// The value as a signed 128-bit integer, for any integer variant.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The value as `f64`, for float variants.
    pub fn as_float(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as a string slice, for the string variant.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// A short description of the value's type, used in error messages.
    pub fn describe_type(&self) -> String {
        match self {
            Self::Array { elem_type, items } => {
                format!("array of {} {elem_type:?}", items.len())
            }
            other => format!("{:?}", other.value_type()),
        }
    }
}

/// Metadata key/value pairs in file order, with lookup by key.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    entries: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    /// Looks up a key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// All entries in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn insert(&mut self, key: String, value: GgufValue) -> Result<()> {
        if self.index.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        self.index.insert(key.clone(), self.entries.len());
        self.entries.push((key, value));
        Ok(())
    }
}

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

    /// Elements per block (1 for plain element types).
    pub fn block_size(self) -> u64 {
        match self {
            Self::F32 | Self::F16 | Self::BF16 | Self::F64 => 1,
            Self::I8 | Self::I16 | Self::I32 | Self::I64 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::F64 | Self::I64 => 8,
            Self::I8 => 1,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::Q8_K => 292,
        }
    }

    /// Bytes of a row of `values` values (a multiple of [`Self::block_size`]).
    pub fn row_bytes(self, values: usize) -> usize {
        values / self.block_size() as usize * self.block_bytes() as usize
    }

    /// Whether [`dequantize`] (and so [`GgufFile::tensor_f32`]) can decode
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

/// One entry of the tensor table.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions as listed in the file: fastest-varying first.
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Byte offset relative to the start of the data section.
    pub offset: u64,
    /// Payload size in bytes (validated to lie inside the file).
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        // Validated during parsing not to overflow.
        self.dims.iter().product()
    }

    /// Row-major shape, slowest dimension first (the file's dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        // Validated during parsing to fit in usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// The bytes of a GGUF file: mapped from disk, or owned.
#[derive(Debug)]
enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned(bytes) => bytes,
        }
    }
}

/// One tensor's bytes, keeping the file's storage alive (see [`GgufFile::tensor_shared`]).
struct TensorSlice {
    storage: Arc<Storage>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for TensorSlice {
    fn as_ref(&self) -> &[u8] {
        &self.storage.bytes()[self.start..self.end]
    }
}

/// A parsed GGUF file. Clones share the underlying bytes.
#[derive(Debug, Clone)]
pub struct GgufFile {
    version: u32,
    alignment: u64,
    metadata: Metadata,
    /// The lengths of the arrays [`GgufFile::drop_metadata_arrays`] emptied, by key.
    dropped: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    storage: Arc<Storage>,
    data_start: usize,
}

impl GgufFile {
    /// Maps a GGUF file from disk and parses it.
    ///
    /// The file is memory-mapped, not copied: tensor data is paged in as it
    /// is read. The file must not be modified or truncated while this value
    /// (or any clone of it) is alive; a change shows through in the tensor
    /// data, and a truncation makes reading the lost pages kill the process.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io_error = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_error)?;
        // SAFETY: the map is only ever read, and the contract documented
        // above is that nothing modifies or truncates the file while it is
        // mapped, which is what `Mmap::map` asks of its caller.
        let map = unsafe { Mmap::map(&file) }.map_err(io_error)?;
        Self::parse(Storage::Mapped(map))
    }

    /// Parses a GGUF file already in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Storage::Owned(bytes))
    }

    fn parse(storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let mut r = Reader::new(bytes);
        let magic = r.take(4, "magic").map_err(|_| GgufError::BadMagic {
            found: bytes.iter().take(4).copied().collect(),
        })?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                found: magic.to_vec(),
            });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;

        // Smallest key/value: 8-byte key length + 4-byte type + 1-byte value.
        r.check_count(kv_count, 13, "metadata count")?;
        let mut metadata = Metadata::default();
        for _ in 0..kv_count {
            let key = r.string()?;
            let type_off = r.pos;
            let type_id = r.u32("metadata value type")?;
            let ty = GgufValueType::from_id(type_id).ok_or(GgufError::UnknownValueType {
                type_id,
                offset: type_off,
            })?;
            let value = r.value(ty, 0)?;
            metadata.insert(key, value)?;
        }

        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => {
                let a = v.as_integer().ok_or_else(|| GgufError::WrongType {
                    key: "general.alignment".into(),
                    expected: "integer",
                    found: v.describe_type(),
                })?;
                let a = u64::try_from(a).unwrap_or(0);
                if a == 0 || !a.is_power_of_two() {
                    return Err(GgufError::BadAlignment(a));
                }
                a
            }
        };

        // Smallest tensor entry: name length 8 + n_dims 4 + type 4 + offset 8.
        r.check_count(tensor_count, 24, "tensor count")?;
        let mut raw = Vec::new();
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims as usize > MAX_DIMS {
                return Err(GgufError::TooManyDims { name, n_dims });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let type_id = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            raw.push((name, dims, type_id, offset));
        }

        let header_end = r.pos as u64;
        let data_start = header_end
            .checked_next_multiple_of(alignment)
            .unwrap_or(u64::MAX)
            .min(bytes.len() as u64) as usize;
        let data_len = (bytes.len() - data_start) as u64;

        let mut tensors = Vec::with_capacity(raw.len());
        let mut tensor_index = HashMap::with_capacity(raw.len());
        for (name, dims, type_id, offset) in raw {
            let Some(ty) = GgmlType::from_id(type_id) else {
                return Err(GgufError::UnknownTensorType { name, type_id });
            };
            let overflow = || GgufError::ShapeOverflow {
                name: name.clone(),
                dims: dims.clone(),
            };
            let mut elements: u64 = 1;
            for &d in &dims {
                elements = elements.checked_mul(d).ok_or_else(overflow)?;
                usize::try_from(d).map_err(|_| overflow())?;
            }
            usize::try_from(elements).map_err(|_| overflow())?;
            let block = ty.block_size();
            if !elements.is_multiple_of(block) {
                return Err(GgufError::NotBlockAligned {
                    name,
                    elements,
                    ty,
                    block,
                });
            }
            let n_bytes = (elements / block)
                .checked_mul(ty.block_bytes())
                .ok_or_else(overflow)?;
            if offset % alignment != 0 {
                return Err(GgufError::MisalignedTensor {
                    name,
                    offset,
                    alignment,
                });
            }
            match offset.checked_add(n_bytes) {
                Some(end) if end <= data_len => {}
                _ => {
                    return Err(GgufError::TensorDataOutOfBounds {
                        name,
                        offset,
                        size: n_bytes,
                        data_len,
                    });
                }
            }
            if tensor_index.contains_key(&name) {
                return Err(GgufError::DuplicateTensor(name));
            }
            tensor_index.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_bytes,
            });
        }
        // Two tensors sharing bytes would alias (a write-free format, but a file that
        // does this is damaged or crafted).
        let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
        by_offset.sort_by_key(|t| t.offset);
        for w in by_offset.windows(2) {
            if w[0].offset + w[0].n_bytes > w[1].offset {
                return Err(GgufError::OverlappingTensors {
                    first: w[0].name.clone(),
                    second: w[1].name.clone(),
                });
            }
        }

        let file = Self {
            version,
            alignment,
            metadata,
            dropped: HashMap::new(),
            tensors,
            tensor_index,
            storage: Arc::new(storage),
            data_start,
        };
        // The metadata (vocabularies of up to 262k tokens) is parsed into owned values.
        file.release(0..data_start);
        Ok(file)
    }

    /// Drops the whole pages inside the byte range `range` of a mapped file from this
    /// process's resident memory: bytes that were copied out (parsed metadata, converted
    /// tensors) are not held twice. They stay readable, paged in again from the file if
    /// read. Does nothing for an in-memory file or where the system declines.
    fn release(&self, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let Storage::Mapped(map) = &*self.storage else {
            return;
        };
        let (start, end) = (range.start.next_multiple_of(PAGE), range.end / PAGE * PAGE);
        #[cfg(unix)]
        if end > start && end <= map.len() {
            // SAFETY: the map is a read-only shared mapping of the file; dropping its
            // pages loses nothing (a later read faults them in from the file again), so
            // the slices that other owners hold keep their contents.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }

    /// [`GgufFile::release`] of one tensor's bytes, once they have been converted into an
    /// owned copy (dequantized, or with rows reordered). Unknown names are ignored.
    pub fn release_tensor(&self, name: &str) {
        if let Some(info) = self.tensor_info(name) {
            let start = self.data_start + info.offset as usize;
            self.release(start..start + info.n_bytes as usize);
        }
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data-section alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Drops the metadata's arrays (a vocabulary's tokens, scores, types and merges: up
    /// to hundreds of thousands of values, tens of MiB in memory), keeping its scalars, so
    /// that they are gone before the weights are read. Afterwards the arrays read as
    /// empty; [`GgufFile::array_len`] still gives their lengths.
    pub fn drop_metadata_arrays(&mut self) {
        for (key, v) in &mut self.metadata.entries {
            if let GgufValue::Array { items, .. } = v
                && !items.is_empty()
            {
                self.dropped.insert(key.clone(), items.len());
                *items = Vec::new();
            }
        }
    }

    /// The number of items of an array metadata value, also after
    /// [`GgufFile::drop_metadata_arrays`].
    pub fn array_len(&self, key: &str) -> Result<usize> {
        if let Some(&n) = self.dropped.get(key) {
            return Ok(n);
        }
        match self.get(key)? {
            GgufValue::Array { items, .. } => Ok(items.len()),
            v => Err(wrong_type(key, "array", v)),
        }
    }

    /// The tensor table, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Looks up a tensor's table entry.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// Byte offset of the data section from the start of the file.
    pub fn data_offset(&self) -> usize {
        self.data_start
    }

    /// A metadata value, or [`GgufError::MissingKey`].
    pub fn get(&self, key: &str) -> Result<&GgufValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str().ok_or_else(|| wrong_type(key, "string", v))
    }

    /// A boolean metadata value.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        match self.get(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(wrong_type(key, "bool", v)),
        }
    }

    /// An integer metadata value of any integer type that fits in `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.get(key)?;
        v.as_integer()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| wrong_type(key, "integer in u32 range", v))
    }

    /// An integer metadata value of any integer type that fits in `u64`.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        v.as_integer()
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(|| wrong_type(key, "integer in u64 range", v))
    }

    /// A float metadata value (`F32`, or `F64` narrowed to `f32`).
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        let v = self.get(key)?;
        v.as_float()
            .map(|f| f as f32)
            .ok_or_else(|| wrong_type(key, "float", v))
    }

    /// The items of an array metadata value.
    pub fn get_array(&self, key: &str) -> Result<&[GgufValue]> {
        match self.get(key)? {
            GgufValue::Array { items, .. } => Ok(items),
            v => Err(wrong_type(key, "array", v)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.get(key)?;
        match v {
            GgufValue::Array {
                elem_type: GgufValueType::String,
                items,
            } => Ok(items.iter().filter_map(GgufValue::as_str).collect()),
            _ => Err(wrong_type(key, "array of strings", v)),
        }
    }

    /// An array of integers that each fit in `i32`.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        let v = self.get(key)?;
        let items = match v {
            GgufValue::Array { items, .. } => items,
            _ => return Err(wrong_type(key, "array of integers", v)),
        };
        items
            .iter()
            .map(|item| item.as_integer().and_then(|i| i32::try_from(i).ok()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| wrong_type(key, "array of integers in i32 range", v))
    }

    /// The raw payload bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        // Bounds were validated in `from_bytes`.
        let start = self.data_start + info.offset as usize;
        Ok(&self.storage.bytes()[start..start + info.n_bytes as usize])
    }

    /// A tensor's raw bytes as a shared buffer that keeps the file (or its mapping)
    /// alive: no copy is made.
    pub fn tensor_shared(&self, name: &str) -> Result<bytes::Bytes> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        // Bounds were validated in `from_bytes`.
        let start = self.data_start + info.offset as usize;
        Ok(bytes::Bytes::from_owner(TensorSlice {
            storage: Arc::clone(&self.storage),
            start,
            end: start + info.n_bytes as usize,
        }))
    }

    /// Dequantizes a tensor to `f32`.
    ///
    /// Returns the row-major shape (slowest dimension first, i.e. the file's
    /// dims reversed) and the values in that order.
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| GgufError::MissingTensor(name.to_string()))?;
        let bytes = self.tensor_bytes(name)?;
        let values = dequantize(info.ty, bytes).map_err(|e| match e {
            DequantizeError::Unsupported(ty) => GgufError::UnsupportedTensorType {
                name: name.to_string(),
                ty,
            },
            source @ DequantizeError::PartialBlock { .. } => GgufError::PartialBlock {
                name: name.to_string(),
                source,
            },
        })?;
        Ok((info.shape(), values))
    }
}

fn wrong_type(key: &str, expected: &'static str, v: &GgufValue) -> GgufError {
    GgufError::WrongType {
        key: key.to_string(),
        expected,
        found: v.describe_type(),
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

/// The little-endian f16 at `at`, widened to f32.
fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
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

/// Scale and minimum of sub-block `j` (0..8) of a Q4_K or Q5_K block, 6 bits
/// each, packed in 12 bytes: bytes 0..4 hold the low 6 bits of scales 0..4
/// and bytes 4..8 those of minimums 0..4; scales and minimums 4..8 take their
/// low 4 bits from the nibbles of bytes 8..12 and their high 2 bits from the
/// top bits of bytes 0..4 and 4..8 respectively.
fn k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 0x3f, scales[j + 4] & 0x3f)
    } else {
        let low = scales[j + 4];
        (
            (low & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (low >> 4) | ((scales[j] >> 6) << 4),
        )
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
    let scales = &b[4..16];
    for (pair, (qs, out)) in b[16..]
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (lo, hi) = out.split_at_mut(32);
        for (sub, out, shift) in [(2 * pair, lo, 0), (2 * pair + 1, hi, 4)] {
            let (sc, m) = k_scale_min(scales, sub);
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
    let scales = &b[4..16];
    let qh = &b[16..48];
    for (pair, (qs, out)) in b[48..]
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (lo, hi) = out.split_at_mut(32);
        for (sub, out, shift) in [(2 * pair, lo, 0), (2 * pair + 1, hi, 4)] {
            let (sc, m) = k_scale_min(scales, sub);
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

/// Bounds-checked little-endian cursor over the file bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what,
                offset: self.pos,
                needed: n as u64,
                available: self.remaining(),
            });
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Fails unless `count` items of at least `min_size` bytes each fit in
    /// the rest of the file. `self.pos` is just past the count field.
    fn check_count(&self, count: u64, min_size: u64, what: &'static str) -> Result<()> {
        let fits = count
            .checked_mul(min_size)
            .is_some_and(|need| need <= self.remaining() as u64);
        if fits {
            Ok(())
        } else {
            Err(GgufError::CountTooLarge {
                what,
                count,
                offset: self.pos - 8,
                available: self.remaining(),
            })
        }
    }

    fn string(&mut self) -> Result<String> {
        let len_off = self.pos;
        let len = self.u64("string length")?;
        if len > self.remaining() as u64 {
            return Err(GgufError::StringTooLong {
                offset: len_off,
                len,
                available: self.remaining(),
            });
        }
        let start = self.pos;
        let s = self.take(len as usize, "string")?;
        String::from_utf8(s.to_vec()).map_err(|_| GgufError::InvalidUtf8 { offset: start })
    }

    fn value(&mut self, ty: GgufValueType, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.array::<1>("u8 value")?[0]),
            GgufValueType::I8 => GgufValue::I8(self.array::<1>("i8 value")?[0] as i8),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array("u16 value")?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array("i16 value")?)),
            GgufValueType::U32 => GgufValue::U32(self.u32("u32 value")?),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array("i32 value")?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array("f32 value")?)),
            GgufValueType::Bool => GgufValue::Bool(self.array::<1>("bool value")?[0] != 0),
            GgufValueType::String => GgufValue::String(self.string()?),
            GgufValueType::U64 => GgufValue::U64(self.u64("u64 value")?),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array("i64 value")?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array("f64 value")?)),
            GgufValueType::Array => {
                let type_off = self.pos;
                if depth >= MAX_ARRAY_NESTING {
                    return Err(GgufError::NestingTooDeep { offset: type_off });
                }
                let type_id = self.u32("array element type")?;
                let elem_type =
                    GgufValueType::from_id(type_id).ok_or(GgufError::UnknownValueType {
                        type_id,
                        offset: type_off,
                    })?;
                let len = self.u64("array length")?;
                self.check_count(len, elem_type.min_encoded_size(), "array length")?;
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.value(elem_type, depth + 1)?);
                }
                GgufValue::Array { elem_type, items }
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod test_writer {
    //! Builds small GGUF files in memory for tests.

    use super::{GgmlType, GgufValue};

    /// Accumulates metadata and tensors and serialises them as GGUF v3.
    #[derive(Default)]
    pub struct GgufWriter {
        /// Format version to write.
        pub version: u32,
        /// Metadata entries.
        pub kv: Vec<(String, GgufValue)>,
        /// (name, dims fastest-first, type, payload bytes).
        pub tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
        /// Alignment used to place tensor data (must match general.alignment if set).
        pub alignment: u64,
    }

    impl GgufWriter {
        pub fn new() -> Self {
            Self {
                version: 3,
                alignment: 32,
                ..Default::default()
            }
        }

        pub fn kv(&mut self, key: &str, value: GgufValue) -> &mut Self {
            self.kv.push((key.to_string(), value));
            self
        }

        pub fn tensor(
            &mut self,
            name: &str,
            dims: &[u64],
            ty: GgmlType,
            data: Vec<u8>,
        ) -> &mut Self {
            self.tensors
                .push((name.to_string(), dims.to_vec(), ty, data));
            self
        }

        pub fn f32_tensor(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.tensor(name, dims, GgmlType::F32, data)
        }

        pub fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(b"GGUF");
            out.extend_from_slice(&self.version.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
            for (k, v) in &self.kv {
                put_str(&mut out, k);
                out.extend_from_slice(&v.value_type().id().to_le_bytes());
                put_value(&mut out, v);
            }
            let mut offsets = Vec::new();
            let mut cursor = 0u64;
            for (_, _, _, data) in &self.tensors {
                offsets.push(cursor);
                cursor = (cursor + data.len() as u64).next_multiple_of(self.alignment);
            }
            for ((name, dims, ty, _), off) in self.tensors.iter().zip(&offsets) {
                put_str(&mut out, name);
                out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&ty.id().to_le_bytes());
                out.extend_from_slice(&off.to_le_bytes());
            }
            let data_start = (out.len() as u64).next_multiple_of(self.alignment) as usize;
            out.resize(data_start, 0);
            for ((_, _, _, data), off) in self.tensors.iter().zip(&offsets) {
                out.resize(data_start + *off as usize, 0);
                out.extend_from_slice(data);
            }
            out
        }
    }

    pub fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    pub fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.push(*x as u8),
            GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(u8::from(*x)),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::Array { elem_type, items } => {
                out.extend_from_slice(&elem_type.id().to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for item in items {
                    put_value(out, item);
                }
            }
            GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        }
    }

    /// A string array value.
    pub fn str_array(items: &[&str]) -> GgufValue {
        GgufValue::Array {
            elem_type: super::GgufValueType::String,
            items: items
                .iter()
                .map(|s| GgufValue::String(s.to_string()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_writer::{GgufWriter, put_str, str_array};
    use super::*;

    fn f16b(x: f32) -> [u8; 2] {
        f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn metadata_round_trip_all_value_types() {
        let nested = GgufValue::Array {
            elem_type: GgufValueType::Array,
            items: vec![
                GgufValue::Array {
                    elem_type: GgufValueType::I16,
                    items: vec![GgufValue::I16(-3), GgufValue::I16(7)],
                },
                GgufValue::Array {
                    elem_type: GgufValueType::I16,
                    items: vec![],
                },
            ],
        };
        let kv = vec![
            ("a.u8", GgufValue::U8(250)),
            ("a.i8", GgufValue::I8(-100)),
            ("a.u16", GgufValue::U16(65000)),
            ("a.i16", GgufValue::I16(-32000)),
            ("a.u32", GgufValue::U32(4_000_000_000)),
            ("a.i32", GgufValue::I32(-2_000_000_000)),
            ("a.f32", GgufValue::F32(1.5e-5)),
            ("a.bool", GgufValue::Bool(true)),
            ("a.str", GgufValue::String("héllo ✓".into())),
            ("a.u64", GgufValue::U64(u64::MAX - 1)),
            ("a.i64", GgufValue::I64(i64::MIN + 1)),
            ("a.f64", GgufValue::F64(-2.25e100)),
            ("a.strs", str_array(&["x", "", "yz"])),
            ("a.nested", nested),
        ];
        let mut w = GgufWriter::new();
        for (k, v) in &kv {
            w.kv(k, v.clone());
        }
        let f = GgufFile::from_bytes(w.build()).unwrap();
        assert_eq!(f.version(), 3);
        let got: Vec<_> = f
            .metadata()
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let want: Vec<_> = kv.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        assert_eq!(got, want);
        assert_eq!(f.get_u32("a.u16").unwrap(), 65000);
        assert_eq!(f.get_u32("a.u32").unwrap(), 4_000_000_000);
        assert_eq!(f.get_u64("a.u64").unwrap(), u64::MAX - 1);
        assert_eq!(f.get_f32("a.f32").unwrap(), 1.5e-5);
        assert_eq!(f.get_str("a.str").unwrap(), "héllo ✓");
        assert!(f.get_bool("a.bool").unwrap());
        assert_eq!(f.get_str_array("a.strs").unwrap(), vec!["x", "", "yz"]);
        assert!(matches!(
            f.get_u32("a.i32"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(
            f.get_str("a.u8"),
            Err(GgufError::WrongType { .. })
        ));
        assert!(matches!(f.get_u32("nope"), Err(GgufError::MissingKey(k)) if k == "nope"));
    }

    #[test]
    fn version_2_is_accepted_and_1_rejected() {
        let mut w = GgufWriter::new();
        w.version = 2;
        w.kv("k", GgufValue::U32(1));
        assert_eq!(GgufFile::from_bytes(w.build()).unwrap().version(), 2);
        w.version = 1;
        assert!(matches!(
            GgufFile::from_bytes(w.build()),
            Err(GgufError::UnsupportedVersion(1))
        ));
    }

    #[test]
    fn f32_tensor_round_trip_with_shape_reversed() {
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        let mut w = GgufWriter::new();
        w.f32_tensor("first", &[3], &[1.0, 2.0, 3.0]);
        // dims fastest-first [4, 3] -> row-major shape [3, 4]
        w.f32_tensor("m", &[4, 3], &values);
        let f = GgufFile::from_bytes(w.build()).unwrap();
        assert_eq!(f.tensors().len(), 2);
        let info = f.tensor_info("m").unwrap();
        assert_eq!(info.dims, vec![4, 3]);
        assert_eq!(info.offset, 32);
        assert_eq!(info.n_bytes, 48);
        assert_eq!(f.data_offset() % 32, 0);
        let (shape, data) = f.tensor_f32("m").unwrap();
        assert_eq!(shape, vec![3, 4]);
        assert_eq!(data, values);
        assert_eq!(f.tensor_f32("first").unwrap().1, vec![1.0, 2.0, 3.0]);
        assert!(matches!(
            f.tensor_f32("x"),
            Err(GgufError::MissingTensor(_))
        ));
    }

    #[test]
    fn custom_alignment_is_honoured() {
        let mut w = GgufWriter::new();
        w.alignment = 64;
        w.kv("general.alignment", GgufValue::U32(64));
        w.f32_tensor("a", &[1], &[7.0]);
        w.f32_tensor("b", &[2], &[8.0, 9.0]);
        let f = GgufFile::from_bytes(w.build()).unwrap();
        assert_eq!(f.alignment(), 64);
        assert_eq!(f.data_offset() % 64, 0);
        assert_eq!(f.tensor_info("b").unwrap().offset, 64);
        assert_eq!(f.tensor_f32("b").unwrap().1, vec![8.0, 9.0]);

        let mut bad = GgufWriter::new();
        bad.kv("general.alignment", GgufValue::U32(48));
        assert!(matches!(
            GgufFile::from_bytes(bad.build()),
            Err(GgufError::BadAlignment(48))
        ));
    }

    #[test]
    fn f16_and_bf16_decode() {
        let f16_vals = [1.0f32, -2.5, 0.099975586, 65504.0];
        let f16_bytes: Vec<u8> = f16_vals.iter().flat_map(|&v| f16b(v)).collect();
        // bf16 bit patterns: 0x3f80 = 1.0, 0xc040 = -3.0, 0x4049 = 3.140625
        let bf16_bytes: Vec<u8> = [0x3f80u16, 0xc040, 0x4049]
            .iter()
            .flat_map(|b| b.to_le_bytes())
            .collect();
        let mut w = GgufWriter::new();
        w.tensor("h", &[4], GgmlType::F16, f16_bytes);
        w.tensor("b", &[3], GgmlType::BF16, bf16_bytes);
        let f = GgufFile::from_bytes(w.build()).unwrap();
        assert_eq!(f.tensor_f32("h").unwrap().1, f16_vals.to_vec());
        assert_eq!(f.tensor_f32("b").unwrap().1, vec![1.0, -3.0, 3.140625]);
    }

    #[test]
    fn q8_0_decodes_scale_times_signed_bytes() {
        let mut block = Vec::new();
        block.extend_from_slice(&f16b(0.5));
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut block2 = Vec::new();
        block2.extend_from_slice(&f16b(-2.0));
        block2.extend([127u8, 0x80].iter().chain([0u8; 30].iter()));
        let mut w = GgufWriter::new();
        w.tensor("q", &[32, 2], GgmlType::Q8_0, [block, block2].concat());
        let f = GgufFile::from_bytes(w.build()).unwrap();
        let (shape, v) = f.tensor_f32("q").unwrap();
        assert_eq!(shape, vec![2, 32]);
        assert_eq!(v[0], -8.0);
        assert_eq!(v[16], 0.0);
        assert_eq!(v[31], 7.5);
        assert_eq!(v[32], -254.0);
        assert_eq!(v[33], 256.0);
        assert!(v[34..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn q4_0_low_nibbles_first_then_high() {
        let mut block = Vec::new();
        block.extend_from_slice(&f16b(0.25));
        // byte j: low nibble j, high nibble 15 - j
        block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut w = GgufWriter::new();
        w.tensor("q", &[32], GgmlType::Q4_0, block);
        let f = GgufFile::from_bytes(w.build()).unwrap();
        let v = f.tensor_f32("q").unwrap().1;
        for j in 0..16 {
            assert_eq!(v[j], (j as f32 - 8.0) * 0.25, "element {j}");
            assert_eq!(
                v[j + 16],
                ((15 - j) as f32 - 8.0) * 0.25,
                "element {}",
                j + 16
            );
        }
    }

    #[test]
    fn q4_1_is_scale_times_nibble_plus_min() {
        let mut block = Vec::new();
        block.extend_from_slice(&f16b(0.5));
        block.extend_from_slice(&f16b(-3.0));
        block.extend((0..16u8).map(|j| (j % 16) | (((j * 3) % 16) << 4)));
        let mut w = GgufWriter::new();
        w.tensor("q", &[32], GgmlType::Q4_1, block);
        let f = GgufFile::from_bytes(w.build()).unwrap();
        let v = f.tensor_f32("q").unwrap().1;
        for j in 0..16usize {
            assert_eq!(v[j], j as f32 * 0.5 - 3.0);
            assert_eq!(v[j + 16], ((j * 3) % 16) as f32 * 0.5 - 3.0);
        }
    }

    #[test]
    fn known_but_undecodable_type_is_reported() {
        let mut w = GgufWriter::new();
        w.tensor("k", &[256], GgmlType::Q2_K, vec![0; 84]);
        let f = GgufFile::from_bytes(w.build()).unwrap();
        assert_eq!(f.tensor_bytes("k").unwrap().len(), 84);
        assert!(matches!(
            f.tensor_f32("k"),
            Err(GgufError::UnsupportedTensorType {
                ty: GgmlType::Q2_K,
                ..
            })
        ));
    }

    #[test]
    fn truncated_header_is_typed_error() {
        let mut w = GgufWriter::new();
        w.kv("k", GgufValue::U32(1));
        let full = w.build();
        for cut in [0usize, 3] {
            assert!(matches!(
                GgufFile::from_bytes(full[..cut].to_vec()),
                Err(GgufError::BadMagic { .. })
            ));
        }
        // 24-byte header, then key (8 + 1), type (4), value (4) end at byte 41.
        for cut in [4usize, 7, 8, 15, 23, 40] {
            let err = GgufFile::from_bytes(full[..cut].to_vec()).unwrap_err();
            assert!(
                matches!(err, GgufError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
        assert!(matches!(
            GgufFile::from_bytes(b"GGUS\x03\0\0\0".to_vec()),
            Err(GgufError::BadMagic { .. })
        ));
    }

    fn header(tensors: u64, kvs: u64) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&tensors.to_le_bytes());
        out.extend_from_slice(&kvs.to_le_bytes());
        out
    }

    #[test]
    fn string_length_beyond_file_is_rejected() {
        let mut bytes = header(0, 1);
        bytes.extend_from_slice(&(1u64 << 62).to_le_bytes());
        bytes.extend_from_slice(b"abcdefgh");
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::StringTooLong { len, available: 8, .. }) if len == 1 << 62
        ));
    }

    #[test]
    fn huge_counts_are_rejected_before_allocation() {
        let bytes = header(1 << 60, 0);
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::CountTooLarge { what: "tensor count", count, .. }) if count == 1 << 60
        ));
        let bytes = header(0, u64::MAX);
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::CountTooLarge {
                what: "metadata count",
                ..
            })
        ));
        let mut bytes = header(0, 1);
        put_str(&mut bytes, "arr");
        bytes.extend_from_slice(&9u32.to_le_bytes());
        bytes.extend_from_slice(&8u32.to_le_bytes());
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        bytes.extend_from_slice(&[0; 64]);
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::CountTooLarge {
                what: "array length",
                ..
            })
        ));
    }

    #[test]
    fn deep_array_nesting_is_rejected() {
        let mut bytes = header(0, 1);
        put_str(&mut bytes, "deep");
        bytes.extend_from_slice(&9u32.to_le_bytes());
        for _ in 0..40 {
            bytes.extend_from_slice(&9u32.to_le_bytes());
            bytes.extend_from_slice(&1u64.to_le_bytes());
        }
        bytes.extend_from_slice(&[0; 600]);
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::NestingTooDeep { .. })
        ));
    }

    #[test]
    fn tensor_data_past_end_is_rejected() {
        let mut w = GgufWriter::new();
        w.f32_tensor("t", &[4], &[1.0, 2.0, 3.0, 4.0]);
        let mut bytes = w.build();
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::TensorDataOutOfBounds {
                size: 16,
                data_len: 15,
                ..
            })
        ));

        // A declared shape far larger than the file.
        let mut w = GgufWriter::new();
        w.tensor("big", &[1 << 20, 1 << 20], GgmlType::F32, vec![0; 16]);
        assert!(matches!(
            GgufFile::from_bytes(w.build()),
            Err(GgufError::TensorDataOutOfBounds { .. })
        ));

        // A dims product that overflows u64.
        let mut w = GgufWriter::new();
        w.tensor("ovf", &[1 << 40, 1 << 40], GgmlType::F32, vec![0; 16]);
        assert!(matches!(
            GgufFile::from_bytes(w.build()),
            Err(GgufError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn unknown_tensor_type_is_rejected() {
        let mut w = GgufWriter::new();
        w.f32_tensor("t", &[1], &[1.0]);
        let mut bytes = w.build();
        // Patch the type id (after magic, version, counts, name, n_dims, dim).
        let type_pos = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 8;
        assert_eq!(bytes[type_pos..type_pos + 4], 0u32.to_le_bytes());
        bytes[type_pos..type_pos + 4].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::UnknownTensorType { type_id: 99, ref name }) if name == "t"
        ));
    }

    #[test]
    fn other_structural_errors() {
        let mut w = GgufWriter::new();
        w.tensor("q", &[33], GgmlType::Q8_0, vec![0; 68]);
        assert!(matches!(
            GgufFile::from_bytes(w.build()),
            Err(GgufError::NotBlockAligned {
                elements: 33,
                block: 32,
                ..
            })
        ));

        let mut w = GgufWriter::new();
        w.kv("k", GgufValue::U8(1)).kv("k", GgufValue::U8(2));
        assert!(matches!(
            GgufFile::from_bytes(w.build()),
            Err(GgufError::DuplicateKey(k)) if k == "k"
        ));

        let mut w = GgufWriter::new();
        w.f32_tensor("t", &[1], &[1.0])
            .f32_tensor("t", &[1], &[2.0]);
        assert!(matches!(
            GgufFile::from_bytes(w.build()),
            Err(GgufError::DuplicateTensor(_))
        ));

        // Tensor u's offset moved onto t's bytes.
        let mut w = GgufWriter::new();
        w.f32_tensor("t", &[8], &[1.0; 8])
            .f32_tensor("u", &[8], &[2.0; 8]);
        let mut bytes = w.build();
        let name_at = bytes
            .windows(9)
            .position(|b| b == b"\x01\0\0\0\0\0\0\0u")
            .unwrap();
        let offset_at = name_at + 9 + 4 + 8 + 4;
        bytes[offset_at..offset_at + 8].copy_from_slice(&0u64.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::OverlappingTensors { first, second }) if first == "t" && second == "u"
                || first == "u" && second == "t"
        ));

        let mut w = GgufWriter::new();
        w.f32_tensor("t", &[1, 1, 1, 1, 1], &[1.0]);
        assert!(matches!(
            GgufFile::from_bytes(w.build()),
            Err(GgufError::TooManyDims { n_dims: 5, .. })
        ));

        let mut bytes = header(0, 1);
        put_str(&mut bytes, "k");
        bytes.extend_from_slice(&77u32.to_le_bytes());
        bytes.extend_from_slice(&[0; 8]);
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::UnknownValueType { type_id: 77, .. })
        ));

        let mut bytes = header(0, 1);
        bytes.extend_from_slice(&2u64.to_le_bytes());
        bytes.extend_from_slice(&[0xff, 0xfe]);
        bytes.extend_from_slice(&[0; 8]);
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::InvalidUtf8 { offset: 32 })
        ));
    }

    #[test]
    fn misaligned_tensor_offset_is_rejected() {
        let mut w = GgufWriter::new();
        w.f32_tensor("a", &[1], &[1.0]);
        let mut bytes = w.build();
        let off_pos = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 8 + 4;
        bytes[off_pos..off_pos + 8].copy_from_slice(&4u64.to_le_bytes());
        assert!(matches!(
            GgufFile::from_bytes(bytes),
            Err(GgufError::MisalignedTensor {
                offset: 4,
                alignment: 32,
                ..
            })
        ));
    }

    #[test]
    fn ggml_type_table_is_consistent() {
        for id in 0..40 {
            if let Some(t) = GgmlType::from_id(id) {
                assert_eq!(t.id(), id);
                assert!(t.block_bytes() > 0 && t.block_size() > 0);
            }
        }
        // Sizes cross-checked against the ggml block structs.
        assert_eq!(GgmlType::Q8_0.block_bytes(), 2 + 32);
        assert_eq!(GgmlType::Q4_0.block_bytes(), 2 + 16);
        assert_eq!(GgmlType::Q4_1.block_bytes(), 2 + 2 + 16);
        assert_eq!(GgmlType::Q5_0.block_bytes(), 2 + 4 + 16);
        assert_eq!(GgmlType::Q5_1.block_bytes(), 2 + 2 + 4 + 16);
        assert_eq!(GgmlType::Q4_K.block_bytes(), 2 + 2 + 12 + 128);
        assert_eq!(GgmlType::Q5_K.block_bytes(), 2 + 2 + 12 + 32 + 128);
        assert_eq!(GgmlType::Q6_K.block_bytes(), 128 + 64 + 16 + 2);
        assert_eq!(GgmlType::Q8_K.block_bytes(), 4 + 256 + 2 * 16);
    }

    /// Decodes `blocks` as a one-tensor file, through [`GgufFile::tensor_f32`].
    fn decode_tensor(ty: GgmlType, blocks: Vec<u8>) -> Vec<f32> {
        let n = blocks.len() as u64 / ty.block_bytes() * ty.block_size();
        let mut w = GgufWriter::new();
        w.tensor("t", &[n], ty, blocks);
        GgufFile::from_bytes(w.build())
            .unwrap()
            .tensor_f32("t")
            .unwrap()
            .1
    }

    /// 32 5-bit values packed as in Q5_0/Q5_1: `qh` (bit `i` = bit 4 of value
    /// `i`), then 16 bytes of nibbles (value `j` low, value `j + 16` high).
    fn pack_5bit(q: &[u8; 32]) -> Vec<u8> {
        let qh = (0..32).fold(0u32, |acc, i| acc | (u32::from(q[i] >> 4) << i));
        let mut out = qh.to_le_bytes().to_vec();
        out.extend((0..16).map(|j| (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4)));
        out
    }

    /// Every 5-bit value once, in a scrambled order.
    fn five_bit_pattern() -> [u8; 32] {
        std::array::from_fn(|i| ((i * 13 + 7) % 32) as u8)
    }

    #[test]
    fn q5_0_is_scale_times_five_bit_value_minus_16() {
        let q = five_bit_pattern();
        let q2: [u8; 32] = std::array::from_fn(|i| 31 - q[i]);
        let mut blocks = f16b(0.5).to_vec();
        blocks.extend(pack_5bit(&q));
        blocks.extend(f16b(-0.125));
        blocks.extend(pack_5bit(&q2));
        let v = decode_tensor(GgmlType::Q5_0, blocks);
        for i in 0..32 {
            assert_eq!(v[i], (f32::from(q[i]) - 16.0) * 0.5, "element {i}");
            assert_eq!(v[32 + i], (f32::from(q2[i]) - 16.0) * -0.125);
        }
        assert!(v.contains(&-8.0) && v.contains(&7.5));
    }

    #[test]
    fn q5_1_is_scale_times_five_bit_value_plus_min() {
        let q = five_bit_pattern();
        let mut blocks = f16b(0.25).to_vec();
        blocks.extend(f16b(-3.0));
        blocks.extend(pack_5bit(&q));
        let v = decode_tensor(GgmlType::Q5_1, blocks);
        for i in 0..32 {
            assert_eq!(v[i], f32::from(q[i]) * 0.25 - 3.0, "element {i}");
        }
    }

    /// Eight 6-bit scales and minimums packed into 12 bytes as ggml's
    /// quantizers write them.
    fn pack_k_scales(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
        let mut out = [0u8; 12];
        for j in 0..4 {
            out[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            out[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
            out[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
        }
        out
    }

    // Scales and minimums exercising every bit of the packed 6-bit fields.
    const K_SC: [u8; 8] = [1, 17, 33, 63, 5, 21, 40, 62];
    const K_M: [u8; 8] = [0, 2, 47, 63, 9, 16, 32, 60];

    /// A value per element of a 256-element block, below `limit`.
    fn k_values(limit: usize) -> [u8; 256] {
        std::array::from_fn(|e| ((e * 37 + e / 7) % limit) as u8)
    }

    #[test]
    fn q4_k_is_sub_block_scale_times_nibble_minus_sub_block_min() {
        let q = k_values(16);
        let (d, dmin) = (0.5f32, 0.0625f32);
        let mut block = [f16b(d), f16b(dmin)].concat();
        block.extend(pack_k_scales(K_SC, K_M));
        // Each 32 bytes: sub-block 2p in the low nibbles, 2p + 1 in the high.
        for p in 0..4 {
            block.extend((0..32).map(|l| q[64 * p + l] | (q[64 * p + 32 + l] << 4)));
        }
        let v = decode_tensor(GgmlType::Q4_K, block);
        for e in 0..256 {
            let s = e / 32;
            let want = d * f32::from(K_SC[s]) * f32::from(q[e]) - dmin * f32::from(K_M[s]);
            assert_eq!(v[e], want, "element {e}");
        }
    }

    #[test]
    fn q5_k_adds_the_high_bit_from_qh() {
        let q = k_values(32);
        let (d, dmin) = (-0.25f32, 1.5f32);
        let mut block = [f16b(d), f16b(dmin)].concat();
        block.extend(pack_k_scales(K_SC, K_M));
        // Bit s of qh[l]: bit 4 of element l of sub-block s.
        block.extend((0..32).map(|l| (0..8).fold(0u8, |acc, s| acc | ((q[32 * s + l] >> 4) << s))));
        for p in 0..4 {
            block.extend(
                (0..32).map(|l| (q[64 * p + l] & 0x0f) | ((q[64 * p + 32 + l] & 0x0f) << 4)),
            );
        }
        let v = decode_tensor(GgmlType::Q5_K, block);
        for e in 0..256 {
            let s = e / 32;
            let want = d * f32::from(K_SC[s]) * f32::from(q[e]) - dmin * f32::from(K_M[s]);
            assert_eq!(v[e], want, "element {e}");
        }
    }

    #[test]
    fn q6_k_is_group_scale_times_six_bit_value_minus_32() {
        let q = k_values(64);
        let scales: [i8; 16] = [
            1, -1, 127, -128, 3, 64, -7, 0, 12, -33, 100, 5, -64, 2, 90, -100,
        ];
        let d = 0.0078125f32;
        // As ggml's Q6_K quantizer: per 128 values, 64 bytes of nibbles and 32 of high bits.
        let (mut ql, mut qh) = (Vec::new(), Vec::new());
        for h in 0..2 {
            let q = &q[128 * h..];
            ql.extend((0..32).map(|l| (q[l] & 0x0f) | ((q[l + 64] & 0x0f) << 4)));
            ql.extend((0..32).map(|l| (q[l + 32] & 0x0f) | ((q[l + 96] & 0x0f) << 4)));
            qh.extend((0..32).map(|l| {
                (q[l] >> 4)
                    | ((q[l + 32] >> 4) << 2)
                    | ((q[l + 64] >> 4) << 4)
                    | ((q[l + 96] >> 4) << 6)
            }));
        }
        let mut block = [ql, qh].concat();
        block.extend(scales.iter().map(|&s| s as u8));
        block.extend(f16b(d));
        let v = decode_tensor(GgmlType::Q6_K, block);
        for e in 0..256 {
            let want = d * f32::from(scales[e / 16]) * (f32::from(q[e]) - 32.0);
            assert_eq!(v[e], want, "element {e}");
        }
    }

    #[test]
    fn q8_k_is_f32_scale_times_signed_bytes() {
        let d = -0.375f32;
        let mut block = d.to_le_bytes().to_vec();
        block.extend((0..=255u8).map(|b| b.wrapping_add(128)));
        block.extend([0u8; 32]);
        let v = decode_tensor(GgmlType::Q8_K, block);
        for (i, &x) in v.iter().enumerate() {
            assert_eq!(x, d * (i as f32 - 128.0), "element {i}");
        }
    }

    fn from_hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Pseudo-random blocks of every quantized type, dequantized by the `gguf`
    /// Python package (see the fixture's generator and provenance line).
    /// Compared bit for bit: each value is a few f32 products and at most one
    /// sum, done in the same order as numpy does them, and every product of
    /// an f16 scale with an integer sub-block scale is exact, so there is no rounding
    /// difference to allow for.
    #[test]
    fn quant_blocks_match_the_gguf_python_package() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/quant_blocks.json")).unwrap();
        let types = fixture["types"].as_object().unwrap();
        assert_eq!(types.len(), 9);
        for (name, case) in types {
            let ty = GgmlType::from_id(case["type_id"].as_u64().unwrap() as u32).unwrap();
            assert_eq!(&ty.to_string(), name);
            let blocks = from_hex(case["blocks_hex"].as_str().unwrap());
            let want: Vec<u32> = from_hex(case["values_f32_le_hex"].as_str().unwrap())
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let got: Vec<u32> = dequantize(ty, &blocks)
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(got.len(), want.len(), "{name}");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "{name} element {i}: got {}, want {}",
                    f32::from_bits(*g),
                    f32::from_bits(*w)
                );
            }
        }
    }

    #[test]
    fn partial_blocks_are_an_error() {
        for id in 0..40 {
            let Some(ty) = GgmlType::from_id(id) else {
                continue;
            };
            let block = ty.block_bytes() as usize;
            let whole = vec![0u8; 3 * block];
            if !ty.can_dequantize() {
                assert_eq!(
                    dequantize(ty, &whole),
                    Err(DequantizeError::Unsupported(ty))
                );
                continue;
            }
            assert_eq!(
                dequantize(ty, &whole).unwrap().len(),
                3 * ty.block_size() as usize
            );
            assert!(dequantize(ty, &[]).unwrap().is_empty());
            if block > 1 {
                for len in [1, block - 1, 2 * block + 1] {
                    assert_eq!(
                        dequantize(ty, &whole[..len]),
                        Err(DequantizeError::PartialBlock {
                            ty,
                            len,
                            block_bytes: block as u64
                        }),
                        "{ty} with {len} bytes"
                    );
                }
            }
        }
    }

    #[test]
    fn many_blocks_decode_in_order() {
        // Enough Q8_0 blocks for several parallel tasks, each with its own scale.
        let n = 3000;
        let blocks: Vec<u8> = (0..n)
            .flat_map(|b| {
                // Integers up to 2048 are exact in f16.
                let mut block = f16b((b % 2048) as f32).to_vec();
                block.extend((0..32).map(|i| i as u8));
                block
            })
            .collect();
        let v = dequantize(GgmlType::Q8_0, &blocks).unwrap();
        assert_eq!(v.len(), 32 * n);
        for (i, &x) in v.iter().enumerate() {
            let scale = (i / 32 % 2048) as f32;
            assert_eq!(x, scale * (i % 32) as f32, "element {i}");
        }
    }

    #[test]
    fn open_maps_a_file_from_disk() {
        let dir = std::env::temp_dir().join(format!("kvc-gguf-open-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut w = GgufWriter::new();
        w.kv("k", GgufValue::U32(7));
        w.f32_tensor("t", &[3], &[1.0, -2.0, 0.5]);
        let big: Vec<f32> = (0..8192).map(|i| i as f32).collect();
        w.f32_tensor("big", &[8192], &big);
        let path = dir.join("tiny.gguf");
        std::fs::write(&path, w.build()).unwrap();
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.get_u32("k").unwrap(), 7);
        // Released pages (whole pages of the 32 KiB tensor) read back from the file: a
        // shared view taken before and a read after see the same values.
        let shared = f.tensor_shared("big").unwrap();
        f.release_tensor("big");
        f.release(0..f.storage.bytes().len());
        assert_eq!(&shared[..], f.tensor_bytes("big").unwrap());
        assert_eq!(f.tensor_f32("big").unwrap().1, big);
        let clone = f.clone();
        drop(f);
        assert_eq!(clone.tensor_f32("t").unwrap().1, vec![1.0, -2.0, 0.5]);

        let empty = dir.join("empty.gguf");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            GgufFile::open(&empty),
            Err(GgufError::BadMagic { .. })
        ));
        assert!(matches!(
            GgufFile::open(dir.join("absent.gguf")),
            Err(GgufError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
