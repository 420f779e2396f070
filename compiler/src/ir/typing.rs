//! The typing rule of every op: one function shared by the builder (shapes are checked
//! when a node is built) and the verifier (and re-checked after every pass).

use super::{BinaryOp, DType, InputDecl, Node, Op, ParamDecl, StateDecl, Type, ValueId};

/// The declarations a node's type may depend on.
pub struct Decls<'a> {
    /// The graph's inputs.
    pub inputs: &'a [InputDecl],
    /// The program's parameters.
    pub params: &'a [ParamDecl],
    /// The program's state variables.
    pub state: &'a [StateDecl],
}

/// Computes the type of `op` given the nodes defined before it. The error says what was
/// expected and what was found; the caller prefixes the node's name.
pub fn infer_type(op: &Op, before: &[Node], decls: &Decls<'_>) -> Result<Type, String> {
    let arg = |v: ValueId, role: &str| -> Result<&Type, String> {
        before
            .get(v.0 as usize)
            .map(|n| &n.ty)
            .ok_or_else(|| format!("{role} %{} is used before it is defined", v.0))
    };
    let ty = match op {
        Op::Input(i) => decls
            .inputs
            .get(i.0 as usize)
            .map(|d| d.ty.clone())
            .ok_or_else(|| format!("input #{} does not exist", i.0))?,
        Op::Param(p) => decls
            .params
            .get(p.0 as usize)
            .map(|d| d.ty.clone())
            .ok_or_else(|| format!("param #{} does not exist", p.0))?,
        Op::State(s) => decls
            .state
            .get(s.0 as usize)
            .map(|d| d.ty.clone())
            .ok_or_else(|| format!("state #{} does not exist", s.0))?,
        Op::Const { value, shape } => Type::new(value.dtype(), shape.clone()),
        Op::Iota { shape, dim } => {
            if *dim as usize >= shape.len() {
                return Err(format!("dim {dim} out of range for rank {}", shape.len()));
            }
            Type::new(DType::I32, shape.clone())
        }
        Op::Embed { table, ids } => {
            let t = arg(*table, "table")?;
            let i = arg(*ids, "ids")?;
            expect_weight("table", t)?;
            expect_rank("table", t, 2)?;
            expect_dtype("ids", i, DType::I32)?;
            let mut shape = i.shape.clone();
            shape.push(t.shape[1]);
            Type::new(DType::F32, shape)
        }
        Op::Linear { x, w } => {
            let x = arg(*x, "x")?;
            let w = arg(*w, "w")?;
            expect_dtype("x", x, DType::F32)?;
            expect_weight("w", w)?;
            expect_rank("w", w, 2)?;
            let k = last(x, "x")?;
            if w.shape[1] != k {
                return Err(format!(
                    "expected w [_, {k}] to match x {}, found w {}",
                    fmt_ty(x),
                    fmt_ty(w)
                ));
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("rank checked") = w.shape[0];
            Type::new(DType::F32, shape)
        }
        Op::RmsNorm { x, w, eps } => {
            let x = arg(*x, "x")?;
            let w = arg(*w, "w")?;
            expect_dtype("x", x, DType::F32)?;
            let h = last(x, "x")?;
            expect_shape("w", w, DType::F32, &[h])?;
            if !(eps.is_finite() && *eps > 0.0) {
                return Err(format!("expected eps > 0, found {eps}"));
            }
            x.clone()
        }
        Op::Rope { x, pos, theta } => {
            let x = arg(*x, "x")?;
            let p = arg(*pos, "pos")?;
            expect_dtype("x", x, DType::F32)?;
            expect_rank("x", x, 4)?;
            if x.shape[3] % 2 != 0 {
                return Err(format!("expected an even head dim, found x {}", fmt_ty(x)));
            }
            expect_shape("pos", p, DType::I32, &x.shape[..2])?;
            if !(theta.is_finite() && *theta > 1.0) {
                return Err(format!("expected theta > 1, found {theta}"));
            }
            x.clone()
        }
        Op::Attention {
            q,
            k,
            v,
            mask,
            scale,
        } => {
            let q = arg(*q, "q")?;
            let k = arg(*k, "k")?;
            let [b, hkv, _, s, d] = grouped_qk(q, k, arg(*mask, "mask")?, *scale)?;
            expect_shape("v", arg(*v, "v")?, k.dtype, &[b, hkv, s, d])?;
            q.clone()
        }
        Op::AttentionProbs { q, k, mask, scale } => {
            let q = arg(*q, "q")?;
            let [b, _, t, s, _] = grouped_qk(q, arg(*k, "k")?, arg(*mask, "mask")?, *scale)?;
            Type::new(DType::F32, [b, q.shape[1], t, s])
        }
        Op::AttentionValues { probs, v } => {
            let p = arg(*probs, "probs")?;
            let v = arg(*v, "v")?;
            expect_dtype("probs", p, DType::F32)?;
            expect_rank("probs", p, 4)?;
            expect_cache_dtype("v", v)?;
            expect_rank("v", v, 4)?;
            let (b, hq, t, s) = (p.shape[0], p.shape[1], p.shape[2], p.shape[3]);
            let (hkv, d) = (v.shape[1], v.shape[3]);
            expect_shape("v", v, v.dtype, &[b, hkv, s, d])?;
            grouped(hq, hkv)?;
            Type::new(DType::F32, [b, hq, t, d])
        }
        Op::AttentionMass {
            probs,
            weight,
            kv_heads,
        } => {
            let p = arg(*probs, "probs")?;
            expect_dtype("probs", p, DType::F32)?;
            expect_rank("probs", p, 4)?;
            let (b, hq, t, s) = (p.shape[0], p.shape[1], p.shape[2], p.shape[3]);
            if *kv_heads == 0 {
                return Err("expected kv_heads > 0, found 0".to_string());
            }
            grouped(hq, *kv_heads)?;
            expect_shape("weight", arg(*weight, "weight")?, DType::F32, &[b, t])?;
            Type::new(DType::F32, [b, *kv_heads, s])
        }
        Op::Gather { x, index } => {
            let x = arg(*x, "x")?;
            let i = arg(*index, "index")?;
            if !(3..=4).contains(&x.shape.len()) {
                return Err(format!("expected x of rank 3 or 4, found {}", fmt_ty(x)));
            }
            if x.shape.len() == 4 && !matches!(x.dtype, DType::F32 | DType::F16 | DType::I8) {
                return Err(format!(
                    "expected rank-4 x of dtype f32, f16 or i8, found {}",
                    fmt_ty(x)
                ));
            }
            expect_dtype("index", i, DType::I32)?;
            expect_rank("index", i, 3)?;
            if i.shape[..2] != x.shape[..2] {
                return Err(format!(
                    "expected index [{}, {}, _], found {}",
                    x.shape[0],
                    x.shape[1],
                    fmt_ty(i)
                ));
            }
            let mut shape = x.shape.clone();
            shape[2] = i.shape[2];
            Type::new(x.dtype, shape)
        }
        Op::TopK { x, tiebreak, k } => {
            let x = arg(*x, "x")?;
            expect_dtype("x", x, DType::F32)?;
            let n = last(x, "x")?;
            expect_shape(
                "tiebreak",
                arg(*tiebreak, "tiebreak")?,
                DType::I32,
                &x.shape,
            )?;
            if *k == 0 || *k > n {
                return Err(format!("expected 1 <= k <= {n}, found k = {k}"));
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("rank checked") = *k;
            Type::new(DType::I32, shape)
        }
        Op::AbsMax { x } => {
            let x = arg(*x, "x")?;
            expect_dtype("x", x, DType::F32)?;
            last(x, "x")?;
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("rank checked") = 1;
            Type::new(DType::F32, shape)
        }
        Op::Quantize { x, scale } => {
            let x = arg(*x, "x")?;
            let s = arg(*scale, "scale")?;
            expect_dtype("x", x, DType::F32)?;
            expect_dtype("scale", s, DType::F32)?;
            if broadcast(&x.shape, &s.shape).as_deref() != Some(&x.shape[..]) {
                return Err(format!(
                    "scale {} does not broadcast to x {}",
                    fmt_ty(s),
                    fmt_ty(x)
                ));
            }
            Type::new(DType::I8, x.shape.clone())
        }
        Op::Sum { x } => {
            let x = arg(*x, "x")?;
            expect_dtype("x", x, DType::F32)?;
            if x.shape.len() < 2 {
                return Err(format!("expected rank >= 2, found {}", fmt_ty(x)));
            }
            Type::new(DType::F32, &x.shape[..x.shape.len() - 1])
        }
        Op::Hash { a, b, .. } => {
            let a = arg(*a, "a")?;
            let b = arg(*b, "b")?;
            expect_dtype("a", a, DType::I32)?;
            expect_dtype("b", b, DType::I32)?;
            let shape = broadcast(&a.shape, &b.shape).ok_or_else(|| {
                format!("shapes do not broadcast: a {}, b {}", fmt_ty(a), fmt_ty(b))
            })?;
            Type::new(DType::F32, shape)
        }
        Op::KvWrite {
            cache,
            new,
            start,
            len,
        } => {
            let c = arg(*cache, "cache")?;
            let n = arg(*new, "new")?;
            if !matches!(c.dtype, DType::F32 | DType::F16 | DType::I8) {
                return Err(format!(
                    "expected cache of dtype f32, f16 or i8, found {}",
                    fmt_ty(c)
                ));
            }
            expect_rank("cache", c, 4)?;
            let (b, h, s, d) = (c.shape[0], c.shape[1], c.shape[2], c.shape[3]);
            expect_rank("new", n, 4)?;
            let t = n.shape[2];
            expect_shape("new", n, c.dtype, &[b, h, t, d])?;
            if t > s {
                return Err(format!("writes {t} entries into a cache of {s} slots"));
            }
            let st = arg(*start, "start")?;
            if st.shape != [b] {
                expect_shape("start", st, DType::I32, &[b, h])?;
            }
            expect_dtype("start", st, DType::I32)?;
            expect_shape("len", arg(*len, "len")?, DType::I32, &[b])?;
            c.clone()
        }
        Op::Silu { x } | Op::Gelu { x } => {
            let x = arg(*x, "x")?;
            expect_dtype("x", x, DType::F32)?;
            x.clone()
        }
        Op::Binary { op, a, b } => {
            let a = arg(*a, "a")?;
            let b = arg(*b, "b")?;
            if a.dtype != b.dtype {
                return Err(format!(
                    "operand dtypes differ: a {}, b {}",
                    fmt_ty(a),
                    fmt_ty(b)
                ));
            }
            let shape = broadcast(&a.shape, &b.shape).ok_or_else(|| {
                format!("shapes do not broadcast: a {}, b {}", fmt_ty(a), fmt_ty(b))
            })?;
            let dtype = match op {
                BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Min | BinaryOp::Max => {
                    if a.dtype == DType::Bool {
                        return Err(format!("expected numeric operands, found {}", fmt_ty(a)));
                    }
                    a.dtype
                }
                BinaryOp::Div => {
                    expect_dtype("a", a, DType::F32)?;
                    DType::F32
                }
                BinaryOp::Lt | BinaryOp::Le => {
                    if a.dtype == DType::Bool {
                        return Err(format!("expected numeric operands, found {}", fmt_ty(a)));
                    }
                    DType::Bool
                }
                BinaryOp::Eq => DType::Bool,
                BinaryOp::And | BinaryOp::Or => {
                    expect_dtype("a", a, DType::Bool)?;
                    DType::Bool
                }
            };
            Type::new(dtype, shape)
        }
        Op::Not { x } => {
            let x = arg(*x, "x")?;
            expect_dtype("x", x, DType::Bool)?;
            x.clone()
        }
        Op::IsIn { x, values } => {
            let x = arg(*x, "x")?;
            expect_dtype("x", x, DType::I32)?;
            if values.len() > super::MAX_IS_IN_VALUES {
                return Err(format!(
                    "expected at most {} values, found {}",
                    super::MAX_IS_IN_VALUES,
                    values.len()
                ));
            }
            Type::new(DType::Bool, x.shape.clone())
        }
        Op::Select { cond, a, b } => {
            let c = arg(*cond, "cond")?;
            let a = arg(*a, "a")?;
            let b = arg(*b, "b")?;
            expect_dtype("cond", c, DType::Bool)?;
            if a.dtype != b.dtype {
                return Err(format!(
                    "branch dtypes differ: a {}, b {}",
                    fmt_ty(a),
                    fmt_ty(b)
                ));
            }
            let ab = broadcast(&a.shape, &b.shape).ok_or_else(|| {
                format!("shapes do not broadcast: a {}, b {}", fmt_ty(a), fmt_ty(b))
            })?;
            let shape = broadcast(&c.shape, &ab).ok_or_else(|| {
                format!(
                    "shapes do not broadcast: cond {}, a {}, b {}",
                    fmt_ty(c),
                    fmt_ty(a),
                    fmt_ty(b)
                )
            })?;
            Type::new(a.dtype, shape)
        }
        Op::Cast { x, dtype } => {
            if dtype.is_quantized() {
                return Err(format!("cannot cast to the block type {dtype}"));
            }
            Type::new(*dtype, arg(*x, "x")?.shape.clone())
        }
        Op::Reshape { x, shape } => {
            let x = arg(*x, "x")?;
            let to = Type::new(x.dtype, shape.clone());
            if to.numel() != x.numel() {
                return Err(format!("cannot reshape {} to {}", fmt_ty(x), fmt_ty(&to)));
            }
            to
        }
        Op::Permute { x, perm } => {
            let x = arg(*x, "x")?;
            let mut seen = vec![false; x.shape.len()];
            for &p in perm {
                match seen.get_mut(p as usize) {
                    Some(s) if !*s => *s = true,
                    _ => {
                        return Err(format!(
                            "{perm:?} is not a permutation of the dims of {}",
                            fmt_ty(x)
                        ));
                    }
                }
            }
            if perm.len() != x.shape.len() {
                return Err(format!(
                    "{perm:?} is not a permutation of the dims of {}",
                    fmt_ty(x)
                ));
            }
            Type::new(
                x.dtype,
                perm.iter()
                    .map(|&p| x.shape[p as usize])
                    .collect::<Vec<_>>(),
            )
        }
        Op::TakeRow { x, index } => {
            let x = arg(*x, "x")?;
            expect_rank("x", x, 3)?;
            expect_shape("index", arg(*index, "index")?, DType::I32, &x.shape[..1])?;
            Type::new(x.dtype, [x.shape[0], x.shape[2]])
        }
        Op::Sample {
            logits,
            temperature,
            top_k,
            top_p,
            uniform,
        } => {
            let l = arg(*logits, "logits")?;
            expect_dtype("logits", l, DType::F32)?;
            expect_rank("logits", l, 2)?;
            let b = &l.shape[..1];
            expect_shape(
                "temperature",
                arg(*temperature, "temperature")?,
                DType::F32,
                b,
            )?;
            expect_shape("top_k", arg(*top_k, "top_k")?, DType::I32, b)?;
            expect_shape("top_p", arg(*top_p, "top_p")?, DType::F32, b)?;
            expect_shape("uniform", arg(*uniform, "uniform")?, DType::F32, b)?;
            Type::new(DType::I32, b)
        }
        Op::Argmax { x } => {
            let x = arg(*x, "x")?;
            expect_dtype("x", x, DType::F32)?;
            if x.shape.len() < 2 {
                return Err(format!("expected rank >= 2, found {}", fmt_ty(x)));
            }
            Type::new(DType::I32, &x.shape[..x.shape.len() - 1])
        }
    };
    if let Some(pos) = ty.shape.iter().position(|&d| d == 0) {
        return Err(format!("result {} has a zero-sized dim {pos}", fmt_ty(&ty)));
    }
    Ok(ty)
}

/// Formats a type as in the text form, e.g. `f32[1,64,576]`.
pub fn fmt_ty(t: &Type) -> String {
    t.to_string()
}

fn expect_dtype(role: &str, t: &Type, want: DType) -> Result<(), String> {
    if t.dtype != want {
        return Err(format!(
            "expected {role} of dtype {want}, found {}",
            fmt_ty(t)
        ));
    }
    Ok(())
}

/// Weight matrices may be stored in F32 or F16.
fn expect_weight(role: &str, t: &Type) -> Result<(), String> {
    if !(matches!(t.dtype, DType::F32 | DType::F16) || t.dtype.is_quantized()) {
        return Err(format!(
            "expected {role} of dtype f32, f16 or a quantized block type, found {}",
            fmt_ty(t)
        ));
    }
    if let (Some((values, _)), Some(&last)) = (t.dtype.block(), t.shape.last())
        && last % values != 0
    {
        return Err(format!(
            "expected {role}'s rows to be whole blocks of {values}, found {}",
            fmt_ty(t)
        ));
    }
    Ok(())
}

/// Checks grouped-query attention operands: q `[B, Hq, T, D]`, k `[B, Hkv, S, D]` F32 with
/// `Hq % Hkv = 0`, a mask `[B, 1 | Hkv, T, S]` and a finite scale. Returns `[B, Hkv, T, S,
/// D]`.
fn grouped_qk(q: &Type, k: &Type, mask: &Type, scale: f32) -> Result<[u32; 5], String> {
    expect_dtype("q", q, DType::F32)?;
    expect_rank("q", q, 4)?;
    expect_cache_dtype("k", k)?;
    expect_rank("k", k, 4)?;
    let (b, hq, t, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (hkv, s) = (k.shape[1], k.shape[2]);
    expect_shape("k", k, k.dtype, &[b, hkv, s, d])?;
    grouped(hq, hkv)?;
    expect_mask(mask, b, hkv, t, s)?;
    if !scale.is_finite() {
        return Err(format!("expected a finite scale, found {scale}"));
    }
    Ok([b, hkv, t, s, d])
}

/// Keys and values that attention reads: F32, or F16 (widened as they are read).
fn expect_cache_dtype(what: &str, x: &Type) -> Result<(), String> {
    if !matches!(x.dtype, DType::F32 | DType::F16) {
        return Err(format!(
            "expected {what} of dtype f32 or f16, found {}",
            fmt_ty(x)
        ));
    }
    Ok(())
}

/// Query heads `hq` share KV heads `hkv` in equal groups.
fn grouped(hq: u32, hkv: u32) -> Result<(), String> {
    if hkv == 0 || !hq.is_multiple_of(hkv) {
        return Err(format!(
            "query heads {hq} are not a multiple of kv heads {hkv}"
        ));
    }
    Ok(())
}

/// An attention mask `[B, 1 | Hkv, T, S]` Bool.
fn expect_mask(m: &Type, b: u32, hkv: u32, t: u32, s: u32) -> Result<(), String> {
    let heads = m.shape.get(1).copied().unwrap_or(1);
    let heads = if heads == hkv { hkv } else { 1 };
    expect_shape("mask", m, DType::Bool, &[b, heads, t, s])
}

fn expect_rank(role: &str, t: &Type, rank: usize) -> Result<(), String> {
    if t.shape.len() != rank {
        return Err(format!(
            "expected {role} of rank {rank}, found {}",
            fmt_ty(t)
        ));
    }
    Ok(())
}

fn expect_shape(role: &str, t: &Type, dtype: DType, shape: &[u32]) -> Result<(), String> {
    if t.dtype != dtype || t.shape != shape {
        let want = Type::new(dtype, shape);
        return Err(format!(
            "expected {role} {}, found {}",
            fmt_ty(&want),
            fmt_ty(t)
        ));
    }
    Ok(())
}

fn last(t: &Type, role: &str) -> Result<u32, String> {
    t.shape
        .last()
        .copied()
        .ok_or_else(|| format!("expected {role} of rank >= 1, found a scalar"))
}

/// Equal-rank broadcasting: each pair of dims is equal or one of them is 1.
fn broadcast(a: &[u32], b: &[u32]) -> Option<Vec<u32>> {
    if a.len() != b.len() {
        return None;
    }
    a.iter()
        .zip(b)
        .map(|(&x, &y)| match (x, y) {
            _ if x == y => Some(x),
            (1, y) => Some(y),
            (x, 1) => Some(x),
            _ => None,
        })
        .collect()
}
