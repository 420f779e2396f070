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
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

mod blocks;
mod reader;
#[cfg(test)]
pub(crate) mod test_writer;
#[cfg(test)]
mod tests;
mod value;

pub use blocks::{GgmlType, dequantize};
use reader::Reader;
pub use value::{GgufValue, GgufValueType, Metadata};

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

    /// `GgufFile::release` of one tensor's bytes, once they have been converted into an
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
