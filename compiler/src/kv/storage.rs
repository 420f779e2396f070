//! How one layer's keys and values are stored (`compile.kv_storage`), shared by every
//! policy.
//!
//! - `F32`: `k.l`, `v.l` `[B, Hkv, N, D]` F32, read as they are.
//! - `F16`: `k.l`, `v.l` `[B, Hkv, N, D]` F16: new entries are cast (rounded to nearest)
//!   when they enter the cache, and attention reads the F16 cache directly (kernels widen
//!   each element as they load it, so no F32 copy of the cache exists).
//! - `I8`: `k.l`, `v.l` `[B, Hkv, N, D]` I8 plus `k_scale.l`, `v_scale.l` `[B, Hkv, N, 1]`
//!   F32: each token of each KV head is quantized symmetrically with its own scale
//!   (`max |x| / 127`, at least 1e-30) when it enters the cache, and the layer's cache is
//!   dequantized (`cast · scale`) when attention reads it. Keys are quantized after RoPE.
//!   The scale tables are caches with D = 1, so `kv_write` and `gather` move them with
//!   their tokens.

use super::{CacheShape, cache_role, k_name, v_name};
use crate::ir::{
    BinaryOp, BuildError, CachePart, DType, GraphBuilder, Op, Scalar, StateDecl, Type, ValueId,
};
use crate::spec::KvStorage;

/// Name of layer `l`'s key scales (`I8` storage).
pub fn k_scale_name(l: u32) -> String {
    format!("k_scale.{l}")
}

/// Name of layer `l`'s value scales (`I8` storage).
pub fn v_scale_name(l: u32) -> String {
    format!("v_scale.{l}")
}

/// One layer's stored keys and values (`[B, Hkv, N, D]`), with their scales for `I8`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stored {
    /// Keys.
    pub k: ValueId,
    /// Values.
    pub v: ValueId,
    /// Key and value scales `[B, Hkv, N, 1]` (`I8` only).
    pub scales: Option<(ValueId, ValueId)>,
}

/// The state variables of layer `l`'s storage.
pub(super) fn declare(storage: KvStorage, l: u32, c: CacheShape, what: &str) -> Vec<StateDecl> {
    let (dtype, init) = match storage {
        KvStorage::F32 => (DType::F32, Scalar::F32(0.0)),
        KvStorage::F16 => (DType::F16, Scalar::F32(0.0)),
        KvStorage::I8 => (DType::I8, Scalar::I32(0)),
    };
    let kv = Type::new(dtype, [c.batch, c.kv_heads, c.slots, c.head_dim]);
    let mut out = vec![
        StateDecl {
            name: k_name(l),
            ty: kv.clone(),
            init,
            doc: format!("layer {l} keys after RoPE; {what}"),
            role: cache_role(l, CachePart::Keys),
        },
        StateDecl {
            name: v_name(l),
            ty: kv,
            init,
            doc: format!("layer {l} values; {what}"),
            role: cache_role(l, CachePart::Values),
        },
    ];
    if storage == KvStorage::I8 {
        let ty = Type::new(DType::F32, [c.batch, c.kv_heads, c.slots, 1]);
        for (name, which, part) in [
            (k_scale_name(l), "key", CachePart::KeyScales),
            (v_scale_name(l), "value", CachePart::ValueScales),
        ] {
            out.push(StateDecl {
                name,
                ty: ty.clone(),
                init: Scalar::F32(1.0),
                doc: format!("layer {l} int8 {which} scale per slot"),
                role: cache_role(l, part),
            });
        }
    }
    out
}

/// Reads layer `l`'s stored caches.
pub(super) fn load(
    g: &mut GraphBuilder<'_>,
    storage: KvStorage,
    l: u32,
) -> Result<Stored, BuildError> {
    let k = g.state(&k_name(l))?;
    let v = g.state(&v_name(l))?;
    let scales = match storage {
        KvStorage::F32 | KvStorage::F16 => None,
        KvStorage::I8 => Some((g.state(&k_scale_name(l))?, g.state(&v_scale_name(l))?)),
    };
    Ok(Stored { k, v, scales })
}

/// New keys and values (`[B, Hkv, T, D]` F32) in the storage format.
pub(super) fn encode(
    g: &mut GraphBuilder<'_>,
    storage: KvStorage,
    k: ValueId,
    v: ValueId,
) -> Result<Stored, BuildError> {
    match storage {
        KvStorage::F32 => Ok(Stored { k, v, scales: None }),
        KvStorage::F16 => Ok(Stored {
            k: g.cast(k, DType::F16)?,
            v: g.cast(v, DType::F16)?,
            scales: None,
        }),
        KvStorage::I8 => {
            let mut quantize = |x: ValueId| -> Result<(ValueId, ValueId), BuildError> {
                let m = g.push(Op::AbsMax { x })?;
                let tiny = g.constant(Scalar::F32(1e-30), &[1, 1, 1, 1])?;
                let m = g.binary(BinaryOp::Max, m, tiny)?;
                let step = g.constant(Scalar::F32(1.0 / 127.0), &[1, 1, 1, 1])?;
                let scale = g.binary(BinaryOp::Mul, m, step)?;
                Ok((g.push(Op::Quantize { x, scale })?, scale))
            };
            let (kq, ks) = quantize(k)?;
            let (vq, vs) = quantize(v)?;
            Ok(Stored {
                k: kq,
                v: vq,
                scales: Some((ks, vs)),
            })
        }
    }
}

/// Writes `new` (encoded, `[B, Hkv, T, ..]`) into `cache` at `start` (`[B]` or
/// `[B, Hkv]`) for `len` (`[B]`) entries per row.
pub(super) fn write(
    g: &mut GraphBuilder<'_>,
    cache: Stored,
    new: Stored,
    start: ValueId,
    len: ValueId,
) -> Result<Stored, BuildError> {
    let mut one = |cache: ValueId, new: ValueId| {
        g.push(Op::KvWrite {
            cache,
            new,
            start,
            len,
        })
    };
    let k = one(cache.k, new.k)?;
    let v = one(cache.v, new.v)?;
    let scales = match (cache.scales, new.scales) {
        (Some((ck, cv)), Some((nk, nv))) => Some((one(ck, nk)?, one(cv, nv)?)),
        _ => None,
    };
    Ok(Stored { k, v, scales })
}

/// Slot `index[b, h, m]` of every stored tensor.
pub(super) fn gather(
    g: &mut GraphBuilder<'_>,
    s: Stored,
    index: ValueId,
) -> Result<Stored, BuildError> {
    let mut one = |x: ValueId| g.push(Op::Gather { x, index });
    let k = one(s.k)?;
    let v = one(s.v)?;
    let scales = match s.scales {
        Some((a, b)) => Some((one(a)?, one(b)?)),
        None => None,
    };
    Ok(Stored { k, v, scales })
}

/// Keys and values as attention reads them: F32, or F16 as stored.
pub(super) fn read(g: &mut GraphBuilder<'_>, s: Stored) -> Result<(ValueId, ValueId), BuildError> {
    match s.scales {
        None => Ok((s.k, s.v)),
        Some((ks, vs)) => {
            let mut deq = |x: ValueId, scale: ValueId| -> Result<ValueId, BuildError> {
                let f = g.cast(x, DType::F32)?;
                g.binary(BinaryOp::Mul, f, scale)
            };
            Ok((deq(s.k, ks)?, deq(s.v, vs)?))
        }
    }
}

/// Writes the stored tensors back to layer `l`'s state.
pub(super) fn store(g: &mut GraphBuilder<'_>, l: u32, s: Stored) -> Result<(), BuildError> {
    g.update(&k_name(l), s.k)?;
    g.update(&v_name(l), s.v)?;
    if let Some((ks, vs)) = s.scales {
        g.update(&k_scale_name(l), ks)?;
        g.update(&v_scale_name(l), vs)?;
    }
    Ok(())
}
