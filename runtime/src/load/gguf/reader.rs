//! A bounds-checked little-endian cursor over a GGUF file's bytes.

use super::{GgufError, GgufValue, GgufValueType, MAX_ARRAY_NESTING, Result};

/// Bounds-checked little-endian cursor over the file bytes.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(super) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
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

    pub(super) fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Fails unless `count` items of at least `min_size` bytes each fit in
    /// the rest of the file. `self.pos` is just past the count field.
    pub(super) fn check_count(&self, count: u64, min_size: u64, what: &'static str) -> Result<()> {
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

    pub(super) fn string(&mut self) -> Result<String> {
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

    pub(super) fn value(&mut self, ty: GgufValueType, depth: usize) -> Result<GgufValue> {
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
