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

    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
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
