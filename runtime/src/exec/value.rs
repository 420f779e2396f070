//! Values as the executor holds them: every IR value is a rank-4 Burn tensor (an IR shape
//! of rank `r < 4` is padded with leading 1s), so one code path serves every rank
//! (broadcasting, matmul batching and permutations all act on the trailing dims).
//!
//! Reading a value back to the host is the one device→host transfer of the runtime; it
//! happens only here, through [`crate::exec::Executor`]'s counted reads, never inside a
//! graph run.

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use kvc_compiler::ir::{DType, Scalar};

use crate::RuntimeError;
use crate::blocks::QuantTensor;

/// A tensor of any dtype, rank 4 (IR shape padded with leading 1s).
#[derive(Clone, Debug)]
pub enum Value {
    /// Float tensor (F32, or F16 weights).
    F(Tensor<4>),
    /// Integer tensor (I32, or I8 cache storage).
    I(Tensor<4, Int>),
    /// Bool tensor.
    B(Tensor<4, Bool>),
    /// A weight matrix kept as GGUF blocks in host memory (a parameter only, read by the
    /// CPU kernels' quantized products and lookups).
    Q(QuantTensor),
}

/// An IR shape padded to rank 4 with leading 1s.
pub fn pad4(shape: &[u32]) -> [usize; 4] {
    let mut out = [1usize; 4];
    let off = 4 - shape.len();
    for (i, &d) in shape.iter().enumerate() {
        out[off + i] = d as usize;
    }
    out
}

impl Value {
    /// The address of the value's buffer on the Flex device (`None` for a tensor of
    /// another backend; GGUF blocks are host bytes, whose address it gives on any):
    /// equal addresses before and after a run show an in-place update.
    pub fn flex_buffer_address(&self) -> Option<usize> {
        fn address<const D: usize, K>(t: &Tensor<D, K>) -> Option<usize>
        where
            K: burn::tensor::kind::Basic
                + burn::tensor::BackendPrimitive<burn_flex::Flex, Primitive = burn_flex::FlexTensor>,
        {
            let t = t.clone().try_into_primitive::<burn_flex::Flex>().ok()?;
            Some(t.bytes().as_ptr() as usize)
        }
        match self {
            Value::F(t) => address(t),
            Value::I(t) => address(t),
            Value::B(t) => address(t),
            Value::Q(q) => Some(q.bytes.as_ptr() as usize),
        }
    }

    /// The float tensor of a verified graph's float value.
    pub(crate) fn f(self) -> Tensor<4> {
        match self {
            Value::F(t) => t,
            other => unreachable!("verified graph: expected f32, found {other:?}"),
        }
    }

    /// The integer tensor of a verified graph's integer value.
    pub(crate) fn i(self) -> Tensor<4, Int> {
        match self {
            Value::I(t) => t,
            other => unreachable!("verified graph: expected i32, found {other:?}"),
        }
    }

    /// The blocks of a quantized weight (a verified plan reads them only where the
    /// parameter is bound as blocks).
    pub(crate) fn q(self) -> QuantTensor {
        match self {
            Value::Q(q) => q,
            other => unreachable!("plan: expected quantized blocks, found {other:?}"),
        }
    }

    /// The bool tensor of a verified graph's bool value.
    pub(crate) fn b(self) -> Tensor<4, Bool> {
        match self {
            Value::B(t) => t,
            other => unreachable!("verified graph: expected bool, found {other:?}"),
        }
    }

    /// A tensor filled with `s`.
    pub fn full(s: Scalar, shape: &[u32], device: &Device) -> Value {
        let dims = pad4(shape);
        match s {
            Scalar::F32(v) => Value::F(Tensor::full(dims, v, device)),
            Scalar::I32(v) => Value::I(Tensor::full(dims, v, device)),
            Scalar::Bool(v) => Value::B(Tensor::<4, Int>::full(dims, v as i32, device).bool()),
        }
    }

    /// Uploads host integers of the given IR shape.
    pub fn from_i32(data: Vec<i32>, shape: &[u32], device: &Device) -> Value {
        Value::I(Tensor::from_data(
            TensorData::new(data, pad4(shape)),
            device,
        ))
    }

    /// Uploads host booleans (as 0/1) of the given IR shape.
    pub fn from_bool(data: Vec<i32>, shape: &[u32], device: &Device) -> Value {
        let ints: Tensor<4, Int> = Tensor::from_data(TensorData::new(data, pad4(shape)), device);
        Value::B(ints.bool())
    }

    /// Uploads host f32 data of the given IR shape.
    pub fn from_f32(data: Vec<f32>, shape: &[u32], device: &Device) -> Value {
        Value::F(Tensor::from_data(
            TensorData::new(data, pad4(shape)),
            device,
        ))
    }

    /// The dims of the tensor.
    pub fn dims(&self) -> [usize; 4] {
        match self {
            Value::F(t) => t.dims(),
            Value::I(t) => t.dims(),
            Value::B(t) => t.dims(),
            Value::Q(q) => [1, 1, q.rows, q.cols],
        }
    }

    /// A copy in a buffer of its own (a handle clone shares the buffer).
    pub(crate) fn deep_copy(&self) -> Value {
        match self {
            Value::F(t) => Value::F(t.clone().add_scalar(0.0f32)),
            Value::I(t) => {
                let dtype = t.dtype();
                let copy = t.clone().add_scalar(0);
                Value::I(if copy.dtype() == dtype {
                    copy
                } else {
                    copy.cast(int_dtype(dtype))
                })
            }
            Value::B(t) => Value::B(t.clone().int().bool()),
            Value::Q(q) => Value::Q(q.clone()),
        }
    }

    /// Writes `new` (same dims and dtype) into this value's own buffer: with one owner the
    /// backend assigns in place, so the buffer — and any captured graph reading it —
    /// stays the same.
    pub(crate) fn assign(&mut self, new: Value) {
        let dims = self.dims();
        let ranges = dims.map(|d| 0..d);
        match (self, new) {
            (Value::F(t), Value::F(n)) => t.inplace(|t| t.slice_assign(ranges, n)),
            (Value::I(t), Value::I(n)) => t.inplace(|t| t.slice_assign(ranges, n)),
            (Value::B(t), Value::B(n)) => t.inplace(|t| t.slice_assign(ranges, n)),
            (t, n) => unreachable!("assign of {n:?} into {t:?}"),
        }
    }

    /// Reads an F32 value back to the host (row-major).
    pub(crate) fn read_f32(&self) -> Result<Vec<f32>, RuntimeError> {
        let t = match self {
            Value::F(t) => t.clone(),
            other => return Err(expected("f32", other)),
        };
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| RuntimeError::Internal(format!("{e:?}")))
    }

    /// Reads an integer value back to the host.
    pub(crate) fn read_i32(&self) -> Result<Vec<i32>, RuntimeError> {
        let t = match self {
            Value::I(t) => t.clone(),
            other => return Err(expected("i32", other)),
        };
        t.into_data()
            .convert::<i32>()
            .try_into_vec::<i32>()
            .map_err(|e| RuntimeError::Internal(format!("{e:?}")))
    }

    /// Reads a Bool value back to the host.
    pub(crate) fn read_bool(&self) -> Result<Vec<bool>, RuntimeError> {
        let t = match self {
            Value::B(t) => t.clone().int(),
            other => return Err(expected("bool", other)),
        };
        let v = t.into_data().convert::<i32>().try_into_vec::<i32>();
        Ok(v.map_err(|e| RuntimeError::Internal(format!("{e:?}")))?
            .into_iter()
            .map(|x| x != 0)
            .collect())
    }
}

fn expected(what: &str, found: &Value) -> RuntimeError {
    RuntimeError::Internal(format!("expected {what}, found {found:?}"))
}

fn int_dtype(d: burn::tensor::DType) -> burn::tensor::IntDType {
    match d {
        burn::tensor::DType::I8 => burn::tensor::IntDType::I8,
        _ => burn::tensor::IntDType::I32,
    }
}

/// Converts a value to an IR dtype.
pub(crate) fn cast(v: Value, to: DType) -> Value {
    use burn::tensor::{FloatDType, IntDType};
    match (v, to) {
        (Value::F(t), DType::F32) => Value::F(to_f32(t)),
        (Value::F(t), DType::F16) => Value::F(t.cast(FloatDType::F16)),
        (Value::I(t), DType::F16) => Value::F(t.float().cast(FloatDType::F16)),
        (Value::B(t), DType::F16) => Value::F(t.float().cast(FloatDType::F16)),
        (Value::F(t), DType::I32) => Value::I(t.int()),
        (Value::F(t), DType::Bool) => Value::B(t.bool()),
        (Value::I(t), DType::F32) => Value::F(t.float()),
        (Value::I(t), DType::I32) => Value::I(t.cast(IntDType::I32)),
        (Value::F(t), DType::I8) => Value::I(t.int().cast(IntDType::I8)),
        (Value::I(t), DType::I8) => Value::I(t.cast(IntDType::I8)),
        (Value::B(t), DType::I8) => Value::I(t.int().cast(IntDType::I8)),
        (Value::I(t), DType::Bool) => Value::B(t.bool()),
        (Value::B(t), DType::F32) => Value::F(t.float()),
        (Value::B(t), DType::I32) => Value::I(t.int()),
        (Value::B(t), DType::Bool) => Value::B(t),
        (v, to) => unreachable!("verified graph: no cast of {v:?} to {to:?}"),
    }
}

/// Activations are F32; weights may be stored in F16.
pub fn to_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    if t.dtype() == burn::tensor::DType::F32 {
        t
    } else {
        t.cast(burn::tensor::FloatDType::F32)
    }
}
