//! Replays a verified graph over Burn tensors.
//!
//! Every value is held as a rank-4 tensor: an IR shape of rank `r < 4` is padded with
//! leading 1s, so one code path serves every rank (broadcasting, matmul batching and
//! permutations all act on the trailing dims).
//!
//! Ownership: a value is moved into its last consumer and cloned for earlier ones, and a
//! state variable the graph updates is moved out of the store when read. The KV caches
//! therefore have exactly one owner when `kv_write` runs, so the backend updates them in
//! place instead of copying (a live clone would force a full copy every step).
//! Constants and iotas are built once at load, not per step.

use burn::tensor::{Bool, Device, FloatDType, Int, IntDType, Tensor, TensorData};
use kvc_compiler::ir::{BinaryOp, DType, Graph, Op, Program, Scalar, StateId};

use crate::RuntimeError;
use crate::kernels::{
    attention, attention_mass, attention_probs, gather_rows, hash_uniform, host_kv_write, kv_write,
    linear, rms_norm, rope, sample, silu, to_f32, top_k,
};

/// A tensor of any dtype, rank 4 (IR shape padded with leading 1s).
#[derive(Clone, Debug)]
pub enum Value {
    /// F32 tensor.
    F(Tensor<4>),
    /// I32 tensor.
    I(Tensor<4, Int>),
    /// Bool tensor.
    B(Tensor<4, Bool>),
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
    fn f(self) -> Tensor<4> {
        match self {
            Value::F(t) => t,
            other => unreachable!("verified graph: expected f32, found {other:?}"),
        }
    }
    fn i(self) -> Tensor<4, Int> {
        match self {
            Value::I(t) => t,
            other => unreachable!("verified graph: expected i32, found {other:?}"),
        }
    }
    fn b(self) -> Tensor<4, Bool> {
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

    /// Uploads host data of the given IR type.
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

    /// Reads an F32 value back to the host (row-major).
    pub fn to_f32(&self) -> Result<Vec<f32>, RuntimeError> {
        let t = match self {
            Value::F(t) => t.clone(),
            other => {
                return Err(RuntimeError::Internal(format!(
                    "expected f32, found {other:?}"
                )));
            }
        };
        t.into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| RuntimeError::Internal(format!("{e:?}")))
    }

    /// Reads an I32 value back to the host.
    pub fn to_i32(&self) -> Result<Vec<i32>, RuntimeError> {
        let t = match self {
            Value::I(t) => t.clone(),
            other => {
                return Err(RuntimeError::Internal(format!(
                    "expected i32, found {other:?}"
                )));
            }
        };
        t.into_data()
            .convert::<i32>()
            .try_into_vec::<i32>()
            .map_err(|e| RuntimeError::Internal(format!("{e:?}")))
    }

    /// Reads a Bool value back to the host.
    pub fn to_bool(&self) -> Result<Vec<bool>, RuntimeError> {
        let t = match self {
            Value::B(t) => t.clone().int(),
            other => {
                return Err(RuntimeError::Internal(format!(
                    "expected bool, found {other:?}"
                )));
            }
        };
        let v = t.into_data().convert::<i32>().try_into_vec::<i32>();
        Ok(v.map_err(|e| RuntimeError::Internal(format!("{e:?}")))?
            .into_iter()
            .map(|x| x != 0)
            .collect())
    }
}

/// The device-resident state of a program: one value per state variable.
pub struct State {
    values: Vec<Option<Value>>,
}

impl State {
    /// Fresh state with every variable at its declared initial value.
    pub fn new(p: &Program, device: &Device) -> State {
        State {
            values: p
                .state
                .iter()
                .map(|s| {
                    let v = cast(Value::full(s.init, &s.ty.shape, device), s.ty.dtype);
                    Some(touch(v))
                })
                .collect(),
        }
    }

    /// Drops every value (the state must be rebuilt with [`State::new`] before a run).
    pub fn clear(&mut self) {
        self.values.clear();
    }

    /// The current value of a state variable.
    pub fn get(&self, id: StateId) -> &Value {
        self.values[id.0 as usize]
            .as_ref()
            .expect("state is restored after every run")
    }

    /// Replaces a state variable (host write, outside the replayed step).
    pub fn set(&mut self, id: StateId, v: Value) {
        self.values[id.0 as usize] = Some(v);
    }
}

/// Per-graph data computed once at load.
struct Plan {
    /// Index of the last node reading each value (`nodes.len()` for outputs/updates).
    last_use: Vec<usize>,
    /// Whether the graph writes each state variable (then reading it moves it).
    updates_state: Vec<bool>,
    /// Constants and iotas, built at load.
    consts: Vec<Option<Value>>,
    /// For each `rope`: cos and sin tables `[P, D/2]`.
    rope: Vec<Option<(Tensor<2>, Tensor<2>)>>,
    /// For each `attention_mass`: the earlier `attention` over the same queries, keys,
    /// mask and scale, whose probabilities it reuses.
    mass_source: Vec<Option<usize>>,
    /// Attentions whose probabilities an `attention_mass` reuses.
    keep_probs: Vec<bool>,
}

/// Writes every element of a fresh value. A zero-filled buffer may come from the OS as
/// untouched pages, which would then be faulted in one cache slot at a time as decode fills
/// the cache (measured: resident memory grew ≈ 43 KB per step, exactly one slot of every
/// layer's keys and values). Touching the state once at allocation makes the cache
/// resident up front, as the memory plan counts it, and keeps resident memory flat while
/// decoding.
fn touch(v: Value) -> Value {
    match v {
        Value::F(t) => Value::F(t.add_scalar(0.0f32)),
        Value::I(t) => Value::I(t.add_scalar(0)),
        Value::B(t) => Value::B(t),
    }
}

/// Executes the graphs of one program on one device.
pub struct Executor {
    program: Program,
    device: Device,
    params: Vec<Value>,
    prefill: Plan,
    decode: Plan,
    /// Per-op wall time, when `KVC_PROFILE` is set (Flex runs ops eagerly, so the time
    /// of an op is the time of its call).
    profile: Option<std::sync::Mutex<std::collections::BTreeMap<String, (u64, f64)>>>,
}

/// Which graph to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// The padded prefill graph.
    Prefill,
    /// The one-token decode graph.
    Decode,
}

/// Largest position a rope table covers: every position a graph can form
/// (cache slots plus one prefill chunk of padding beyond them).
fn rope_positions(p: &Program) -> usize {
    (p.config.cache_len + p.config.prefill_len + 1) as usize
}

fn plan(p: &Program, g: &Graph, device: &Device) -> Plan {
    let n = g.nodes.len();
    let last_use = g.last_uses();
    let mut updates_state = vec![false; p.state.len()];
    for u in &g.updates {
        updates_state[u.state.0 as usize] = true;
    }
    let mut consts = vec![None; n];
    let mut rope = vec![None; n];
    // One table per (head dim, theta), shared by every layer.
    let mut tables: std::collections::BTreeMap<(usize, u32), (Tensor<2>, Tensor<2>)> =
        Default::default();
    for (i, node) in g.nodes.iter().enumerate() {
        match &node.op {
            Op::Const { value, shape } => consts[i] = Some(Value::full(*value, shape, device)),
            Op::Iota { shape, dim } => consts[i] = Some(iota(shape, *dim as usize, device)),
            Op::Rope { x, theta, .. } => {
                let d = g.ty(*x).shape[3] as usize;
                let t = tables
                    .entry((d, theta.to_bits()))
                    .or_insert_with(|| rope_tables(rope_positions(p), d, *theta, device));
                rope[i] = Some(t.clone());
            }
            Op::Input(_)
            | Op::Param(_)
            | Op::State(_)
            | Op::Embed { .. }
            | Op::Linear { .. }
            | Op::RmsNorm { .. }
            | Op::Attention { .. }
            | Op::KvWrite { .. }
            | Op::Silu { .. }
            | Op::Binary { .. }
            | Op::Not { .. }
            | Op::Select { .. }
            | Op::Cast { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::TakeRow { .. }
            | Op::Sample { .. }
            | Op::Argmax { .. }
            | Op::AttentionMass { .. }
            | Op::Gather { .. }
            | Op::TopK { .. }
            | Op::Sum { .. }
            | Op::Hash { .. }
            | Op::AbsMax { .. }
            | Op::Quantize { .. } => {}
        }
    }
    let mut mass_source = vec![None; n];
    let mut keep_probs = vec![false; n];
    for (i, node) in g.nodes.iter().enumerate() {
        if let Op::AttentionMass {
            q, k, mask, scale, ..
        } = node.op
        {
            let same = |op: &Op| {
                matches!(*op, Op::Attention { q: q2, k: k2, mask: m2, scale: s2, .. }
                    if (q2, k2, m2) == (q, k, mask) && s2.to_bits() == scale.to_bits())
            };
            if let Some(j) = g.nodes[..i].iter().rposition(|x| same(&x.op)) {
                mass_source[i] = Some(j);
                keep_probs[j] = true;
            }
        }
    }
    Plan {
        last_use,
        updates_state,
        consts,
        rope,
        mass_source,
        keep_probs,
    }
}

fn iota(shape: &[u32], dim: usize, device: &Device) -> Value {
    let dims = pad4(shape);
    let axis = 4 - shape.len() + dim;
    let n = dims[axis];
    let mut line = [1usize; 4];
    line[axis] = n;
    let t = Tensor::<1, Int>::arange(0..n as i64, device).reshape(line);
    Value::I(t.expand(dims))
}

/// cos/sin of `pos · theta^(-2i/D)` for every position, computed in f64.
fn rope_tables(positions: usize, d: usize, theta: f32, device: &Device) -> (Tensor<2>, Tensor<2>) {
    let half = d / 2;
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for i in 0..half {
            let freq = (theta as f64).powf(-2.0 * i as f64 / d as f64);
            let a = p as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    (
        Tensor::from_data(TensorData::new(cos, [positions, half]), device),
        Tensor::from_data(TensorData::new(sin, [positions, half]), device),
    )
}

impl Executor {
    /// Prepares a verified program with its parameters (in parameter-table order).
    pub fn new(program: Program, params: Vec<Value>, device: Device) -> Executor {
        let prefill = plan(&program, &program.prefill, &device);
        let decode = plan(&program, &program.decode, &device);
        let profile = std::env::var_os("KVC_PROFILE").map(|_| Default::default());
        Executor {
            program,
            device,
            params,
            prefill,
            decode,
            profile,
        }
    }

    /// The program being executed.
    pub fn program(&self) -> &Program {
        &self.program
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one graph: reads `inputs` (in declaration order) and the state, writes the
    /// state back, and returns the outputs in declaration order.
    pub fn run(&self, which: Which, inputs: Vec<Value>, state: &mut State) -> Vec<Value> {
        // On the CPU the graph runs on a worker of rayon's pool: a parallel kernel then
        // starts on this thread at once and the other workers join it, instead of the
        // caller handing every kernel to the pool and sleeping until it is done.
        if rayon::current_thread_index().is_none() && rayon::current_num_threads() > 1 {
            return rayon::scope(|_| self.run_here(which, inputs, state));
        }
        self.run_here(which, inputs, state)
    }

    fn run_here(&self, which: Which, inputs: Vec<Value>, state: &mut State) -> Vec<Value> {
        let (g, plan) = match which {
            Which::Prefill => (&self.program.prefill, &self.prefill),
            Which::Decode => (&self.program.decode, &self.decode),
        };
        let mut inputs: Vec<Option<Value>> = inputs.into_iter().map(Some).collect();
        let mut env: Vec<Option<Value>> = vec![None; g.nodes.len()];
        // Probabilities of explicit-path attentions that an attention_mass reuses.
        let mut probs: Vec<Option<Tensor<4>>> = vec![None; g.nodes.len()];
        for (i, node) in g.nodes.iter().enumerate() {
            let started = self.profile.as_ref().map(|_| std::time::Instant::now());
            // An op may read one value twice (`or x, x`): only its last read moves it.
            let mut reads = node.op.args();
            let mut take = |v: kvc_compiler::ir::ValueId| -> Value {
                let at = reads
                    .iter()
                    .position(|&a| a == v)
                    .expect("reads an argument");
                reads.swap_remove(at);
                let slot = &mut env[v.0 as usize];
                if plan.last_use[v.0 as usize] == i && !reads.contains(&v) {
                    slot.take().expect("value consumed once")
                } else {
                    slot.clone().expect("value defined before use")
                }
            };
            let out = match &node.op {
                Op::Input(k) => inputs[k.0 as usize]
                    .take()
                    .expect("each input read once after CSE"),
                Op::Param(p) => self.params[p.0 as usize].clone(),
                Op::State(s) => {
                    let slot = &mut state.values[s.0 as usize];
                    if plan.updates_state[s.0 as usize] {
                        slot.take().expect("state read once per graph")
                    } else {
                        slot.clone().expect("state present")
                    }
                }
                Op::Const { .. } | Op::Iota { .. } => {
                    plan.consts[i].clone().expect("built at load")
                }
                Op::Embed { table, ids } => {
                    let t = take(*table).f();
                    let ids = take(*ids).i();
                    let [_, _, v, h] = t.dims();
                    let n = ids.shape().num_elements();
                    let rows = t.reshape([v, h]).select(0, ids.reshape([n]));
                    Value::F(to_f32(rows).reshape(pad4(&node.ty.shape)))
                }
                Op::Linear { x, w } => {
                    let x = take(*x).f();
                    let w = take(*w).f();
                    let [_, _, n, k] = w.dims();
                    let m = x.shape().num_elements() / k;
                    let y = linear(x.reshape([m, k]), w.reshape([n, k]));
                    Value::F(y.reshape(pad4(&node.ty.shape)))
                }
                Op::RmsNorm { x, w, eps } => Value::F(rms_norm(take(*x).f(), take(*w).f(), *eps)),
                Op::Rope { x, pos, .. } => {
                    let x = take(*x).f();
                    let pos = take(*pos).i();
                    let (cos, sin) = plan.rope[i].clone().expect("built at load");
                    Value::F(rope(x, pos, cos, sin))
                }
                Op::Attention {
                    q,
                    k,
                    v,
                    mask,
                    scale,
                } => {
                    let (q, k, v) = (take(*q).f(), take(*k).f(), take(*v).f());
                    let mask = take(*mask).b();
                    let (out, p) = attention(q, k, v, mask, *scale, plan.keep_probs[i]);
                    probs[i] = p;
                    Value::F(out)
                }
                Op::KvWrite {
                    cache,
                    new,
                    start,
                    len,
                } => {
                    let (start, len) = (take(*start).i(), take(*len).i());
                    match (take(*cache), take(*new)) {
                        (Value::F(c), Value::F(n)) => Value::F(
                            host_kv_write(c, &n, &start, &len)
                                .unwrap_or_else(|c| kv_write(*c, n, start, len)),
                        ),
                        (Value::I(c), Value::I(n)) => Value::I(kv_write(c, n, start, len)),
                        (c, n) => unreachable!("verified kv_write: {c:?} and {n:?}"),
                    }
                }
                Op::Silu { x } => Value::F(silu(take(*x).f())),
                Op::Binary { op, a, b } => {
                    let (a, b) = (take(*a), take(*b));
                    binary(*op, a, b, pad4(&node.ty.shape))
                }
                Op::Not { x } => Value::B(take(*x).b().bool_not()),
                Op::Select { cond, a, b } => {
                    let dims = pad4(&node.ty.shape);
                    let c = take(*cond).b().expand(dims);
                    match (take(*a), take(*b)) {
                        (Value::F(a), Value::F(b)) => {
                            Value::F(b.expand(dims).mask_where(c, a.expand(dims)))
                        }
                        (Value::I(a), Value::I(b)) => {
                            Value::I(b.expand(dims).mask_where(c, a.expand(dims)))
                        }
                        (Value::B(a), Value::B(b)) => {
                            Value::B(b.expand(dims).mask_where(c, a.expand(dims)))
                        }
                        (a, b) => unreachable!("verified select: {a:?} vs {b:?}"),
                    }
                }
                Op::Cast { x, dtype } => cast(take(*x), *dtype),
                Op::Reshape { x, .. } => reshape(take(*x), pad4(&node.ty.shape)),
                Op::Permute { x, perm } => {
                    let off = 4 - perm.len();
                    let mut axes = [0usize, 1, 2, 3];
                    for (j, &p) in perm.iter().enumerate() {
                        axes[off + j] = off + p as usize;
                    }
                    match take(*x) {
                        Value::F(t) => Value::F(t.permute(axes)),
                        Value::I(t) => Value::I(t.permute(axes)),
                        Value::B(t) => Value::B(t.permute(axes)),
                    }
                }
                Op::TakeRow { x, index } => {
                    let x = take(*x).f();
                    let [_, b, t, h] = x.dims();
                    let idx = take(*index)
                        .i()
                        .reshape([1, b, 1, 1])
                        .clamp(0, t as i32 - 1);
                    let rows = x.gather(2, idx.expand([1, b, 1, h]));
                    Value::F(rows.reshape(pad4(&node.ty.shape)))
                }
                Op::Sample {
                    logits,
                    temperature,
                    top_k,
                    top_p,
                    uniform,
                } => {
                    let (l, t) = (take(*logits).f(), take(*temperature).f());
                    let (k, p, u) = (take(*top_k).i(), take(*top_p).f(), take(*uniform).f());
                    Value::I(sample(l, t, k, p, u).reshape(pad4(&node.ty.shape)))
                }
                Op::Argmax { x } => {
                    let idx = take(*x).f().argmax(3);
                    Value::I(idx.reshape(pad4(&node.ty.shape)))
                }
                Op::AttentionMass {
                    q,
                    k,
                    mask,
                    weight,
                    scale,
                } => {
                    let (q, k) = (take(*q).f(), take(*k).f());
                    let (mask, w) = (take(*mask).b(), take(*weight).f());
                    let g = q.dims()[1] / k.dims()[1];
                    let p = match plan.mass_source[i] {
                        Some(j) => probs[j].take(),
                        None => None,
                    };
                    let p = p.unwrap_or_else(|| attention_probs(q, k, mask, *scale));
                    Value::F(attention_mass(p, w, g))
                }
                Op::Gather { x, index } => {
                    let index = take(*index).i();
                    let x = take(*x);
                    if node.ty.shape.len() == 4 {
                        match x {
                            Value::F(t) => Value::F(gather_rows(t, index)),
                            Value::I(t) => Value::I(gather_rows(t, index)),
                            Value::B(t) => Value::B(gather_rows(t, index)),
                        }
                    } else {
                        match x {
                            Value::F(t) => Value::F(t.gather(3, index)),
                            Value::I(t) => Value::I(t.gather(3, index)),
                            Value::B(t) => Value::B(t.int().gather(3, index).bool()),
                        }
                    }
                }
                Op::TopK { x, tiebreak, k } => {
                    let (x, tb) = (take(*x), take(*tiebreak));
                    let x = x.to_f32().expect("verified f32");
                    let tb = tb.to_i32().expect("verified i32");
                    let n = *g.ty(node.op.args()[0]).shape.last().expect("rank >= 1") as usize;
                    let idx = top_k(&x, &tb, n, *k as usize);
                    Value::from_i32(idx, &node.ty.shape, &self.device)
                }
                Op::AbsMax { x } => Value::F(take(*x).f().abs().max_dim(3)),
                Op::Quantize { x, scale } => {
                    let dims = pad4(&node.ty.shape);
                    let x = take(*x).f();
                    let scale = take(*scale).f().expand(dims);
                    let q = x.div(scale).round().clamp(-127.0, 127.0);
                    Value::I(q.int().cast(IntDType::I8))
                }
                Op::Sum { x } => {
                    let s = take(*x).f().sum_dim(3);
                    Value::F(s.reshape(pad4(&node.ty.shape)))
                }
                Op::Hash { a, b, seed } => {
                    let dims = pad4(&node.ty.shape);
                    let a = take(*a).i().expand(dims);
                    let b = take(*b).i().expand(dims);
                    let a = Value::I(a).to_i32().expect("verified i32");
                    let b = Value::I(b).to_i32().expect("verified i32");
                    let u = a.iter().zip(&b).map(|(&a, &b)| hash_uniform(*seed, a, b));
                    Value::from_f32(u.collect(), &node.ty.shape, &self.device)
                }
            };
            if let (Some(p), Some(t)) = (&self.profile, started) {
                let mut p = p.lock().expect("profile lock");
                let graph = match which {
                    Which::Prefill => "prefill",
                    Which::Decode => "decode",
                };
                let key = match &node.op {
                    Op::Linear { w, .. } => format!("{graph} linear {}", g.ty(*w)),
                    op => format!("{graph} {}", op.name()),
                };
                let e = p.entry(key).or_default();
                e.0 += 1;
                e.1 += t.elapsed().as_secs_f64();
            }
            env[i] = Some(out);
        }
        for u in &g.updates {
            state.values[u.state.0 as usize] = env[u.value.0 as usize].clone();
        }
        for (k, slot) in state.values.iter().enumerate() {
            debug_assert!(slot.is_some(), "state {} lost", self.program.state[k].name);
        }
        g.outputs
            .iter()
            .map(|o| env[o.value.0 as usize].clone().expect("output defined"))
            .collect()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            let p = p.lock().expect("profile lock");
            let total: f64 = p.values().map(|v| v.1).sum();
            eprintln!("kvc profile (KVC_PROFILE): {total:.3} s in ops");
            let mut rows: Vec<_> = p.iter().collect();
            rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
            for (name, (calls, secs)) in rows {
                eprintln!(
                    "  {name:<32} {calls:>8} calls {:>9.3} s {:>5.1}%",
                    secs,
                    100.0 * secs / total.max(1e-12)
                );
            }
        }
    }
}

fn reshape(v: Value, dims: [usize; 4]) -> Value {
    match v {
        Value::F(t) => Value::F(t.reshape(dims)),
        Value::I(t) => Value::I(t.reshape(dims)),
        Value::B(t) => Value::B(t.reshape(dims)),
    }
}

fn cast(v: Value, to: DType) -> Value {
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
    }
}

fn binary(op: BinaryOp, a: Value, b: Value, dims: [usize; 4]) -> Value {
    match (a, b) {
        (Value::F(a), Value::F(b)) => {
            let (a, b) = (a.expand(dims), b.expand(dims));
            match op {
                BinaryOp::Add => Value::F(a.add(b)),
                BinaryOp::Sub => Value::F(a.sub(b)),
                BinaryOp::Mul => Value::F(a.mul(b)),
                BinaryOp::Min => Value::F(a.min_pair(b)),
                BinaryOp::Max => Value::F(a.max_pair(b)),
                BinaryOp::Eq => Value::B(a.equal(b)),
                BinaryOp::Lt => Value::B(a.lower(b)),
                BinaryOp::Le => Value::B(a.lower_equal(b)),
                BinaryOp::And | BinaryOp::Or => unreachable!("verified: logic on f32"),
            }
        }
        (Value::I(a), Value::I(b)) => {
            let (a, b) = (a.expand(dims), b.expand(dims));
            match op {
                BinaryOp::Add => Value::I(a.add(b)),
                BinaryOp::Sub => Value::I(a.sub(b)),
                BinaryOp::Mul => Value::I(a.mul(b)),
                BinaryOp::Min => Value::I(a.min_pair(b)),
                BinaryOp::Max => Value::I(a.max_pair(b)),
                BinaryOp::Eq => Value::B(a.equal(b)),
                BinaryOp::Lt => Value::B(a.lower(b)),
                BinaryOp::Le => Value::B(a.lower_equal(b)),
                BinaryOp::And | BinaryOp::Or => unreachable!("verified: logic on i32"),
            }
        }
        (Value::B(a), Value::B(b)) => {
            let (a, b) = (a.expand(dims), b.expand(dims));
            match op {
                BinaryOp::And => Value::B(a.bool_and(b)),
                BinaryOp::Or => Value::B(a.bool_or(b)),
                BinaryOp::Eq => Value::B(a.equal(b)),
                BinaryOp::Add
                | BinaryOp::Sub
                | BinaryOp::Mul
                | BinaryOp::Min
                | BinaryOp::Max
                | BinaryOp::Lt
                | BinaryOp::Le => unreachable!("verified: arithmetic on bool"),
            }
        }
        (a, b) => unreachable!("verified binary: {a:?} vs {b:?}"),
    }
}
