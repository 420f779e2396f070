//! The execution plan of one graph, built once when the executor is made: a flat list of
//! steps, each a kernel with its static parameters resolved (shapes, rope tables,
//! constants, and for products and attention the [`Form`] the kernel set chose from the
//! static shapes), the slots it reads (moved at their last use, else shared), and how every
//! state update returns to the state's own buffer. Running a graph is a loop over the
//! steps; nothing is decided per step.
//!
//! State buffers never change across runs (what a captured hardware graph needs):
//! - a cache written by a chain of `kv_write`s that each consume the previous value is
//!   moved out of the state, updated in place (the backend writes a single-owner tensor in
//!   place) and put back: [`WriteBack::InPlace`];
//! - any other updated state is read as a shared handle and its new value is assigned
//!   into the state's buffer after the run: [`WriteBack::Assign`].

use std::collections::BTreeMap;

use burn::tensor::{Device, Int, Tensor, TensorData};
use kvc_compiler::ir::{BinaryOp, DType, Graph, Op, Program, StateId, ValueId};

use super::kernels::{Form, KernelSet, Rows};
use super::value::{Value, pad4};
use crate::RuntimeError;

/// Where a step reads one argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    /// The slot's value is moved out: this is its last read.
    Move(usize),
    /// The slot keeps its value (a handle is shared).
    Share(usize),
}

impl Arg {
    /// The slot read.
    pub fn slot(self) -> usize {
        match self {
            Arg::Move(s) | Arg::Share(s) => s,
        }
    }
}

/// A kernel with its static parameters resolved.
#[derive(Clone, Debug)]
pub enum Kernel {
    /// Host input `i`.
    Input(usize),
    /// Parameter `i`.
    Param(usize),
    /// State variable `id`; `take` moves it out of the state (an in-place update follows).
    State {
        /// Which variable.
        id: StateId,
        /// Move it out (the graph updates it in place) instead of sharing it.
        take: bool,
    },
    /// A constant or iota, built at load.
    Const(Value),
    /// Row lookup; output dims.
    Embed([usize; 4]),
    /// Projection; output dims, form.
    Linear([usize; 4], Form),
    /// Row lookup in a table of GGUF blocks; output dims.
    QEmbed([usize; 4]),
    /// Projection by a matrix of GGUF blocks; output dims, form.
    QLinear([usize; 4], Form),
    /// RMSNorm.
    RmsNorm(f32),
    /// Rotary embedding with its cos/sin tables.
    Rope(Tensor<2>, Tensor<2>),
    /// Fused attention; scale, form.
    Attention(f32, Form),
    /// Attention probabilities.
    AttentionProbs(f32),
    /// Probabilities times values; form.
    AttentionValues(Form),
    /// Attention mass per KV head.
    AttentionMass(usize),
    /// Cache write: in place when its cache argument is [`Arg::Move`] (a single owner).
    KvWrite,
    /// SiLU.
    Silu,
    /// GELU (tanh approximation).
    Gelu,
    /// Elementwise binary op broadcast to the output dims.
    Binary(BinaryOp, [usize; 4]),
    /// Logical not.
    Not,
    /// Membership in a set of integer constants.
    IsIn(Vec<i32>),
    /// Select broadcast to the output dims.
    Select([usize; 4]),
    /// Dtype conversion.
    Cast(DType),
    /// Reshape to the output dims.
    Reshape([usize; 4]),
    /// Axis permutation (rank-4 axes).
    Permute([usize; 4]),
    /// One row per batch entry; output dims.
    TakeRow([usize; 4]),
    /// Sampling; output dims.
    Sample([usize; 4]),
    /// Argmax over the last axis; output dims.
    Argmax([usize; 4]),
    /// Gather of whole rows (`rows`, rank-4 x) or of elements (rank-3 x).
    Gather {
        /// Rank-4 x: whole `D`-rows move.
        rows: bool,
    },
    /// Top-k over the last axis.
    TopK(usize),
    /// Sum over the last axis; output dims.
    Sum([usize; 4]),
    /// Counter hash with its seed, over the output dims.
    Hash(u32, [usize; 4]),
    /// Largest magnitude over the last axis.
    AbsMax,
    /// Int8 quantization over the output dims.
    Quantize([usize; 4]),
}

/// One step: a kernel, its arguments and the slot it defines (the IR node's index).
#[derive(Clone, Debug)]
pub struct Step {
    /// The kernel.
    pub kernel: Kernel,
    /// Arguments in the op's order.
    pub args: Vec<Arg>,
    /// Profile key (`graph op` or `graph linear <type>`).
    pub label: String,
    /// Where the value's batch and token axes are, when it is laid out by the graph's
    /// token ids (see [`Plan::lengths`]): a kernel that skips padding may compute only the
    /// real tokens' elements.
    pub rows: Option<Rows>,
}

/// How an updated state variable gets its new value after a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteBack {
    /// The value is the state's own buffer, updated in place: it is put back.
    InPlace {
        /// The state.
        state: StateId,
        /// The slot holding it.
        slot: usize,
    },
    /// The value is assigned into the state's buffer.
    Assign {
        /// The state.
        state: StateId,
        /// The slot holding the new value.
        slot: usize,
    },
}

/// The plan of one graph.
pub struct Plan {
    /// Steps in schedule order; step `i` defines slot `i`.
    pub steps: Vec<Step>,
    /// Slots returned as outputs, in declaration order.
    pub outputs: Vec<usize>,
    /// State write-backs.
    pub writebacks: Vec<WriteBack>,
    /// Where a run finds each batch row's real-token count: with it, the steps with
    /// [`Step::rows`] may skip padding.
    pub lengths: Option<Lengths>,
}

/// Where a run finds each batch row's count of real tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lengths {
    /// The prefill's `len` input.
    Input(usize),
    /// A decode step: one token for a row whose `done` state is false, none for a parked
    /// row. A decode step leaves a parked row as it is (its cache write has length 0, its
    /// token, position and flags are selected back), so every value laid out by rows is
    /// padding there, and so is the parked row's logits output.
    NotDone(StateId),
}

/// Largest position a rope table covers: every position a graph can form
/// (cache slots plus one prefill chunk of padding beyond them).
fn rope_positions(p: &Program) -> usize {
    (p.config.cache_len + p.config.prefill_len + 1) as usize
}

/// Rows of `top_k` the portable set can rank exactly: its sort key is below `n²`.
const PORTABLE_TOP_K_MAX: usize = 46_340;

impl Plan {
    /// Plans graph `g` of the verified program `p` for `set` on `device`.
    pub fn new(
        p: &Program,
        g: &Graph,
        set: KernelSet,
        device: &Device,
        params: &[Value],
    ) -> Result<Plan, RuntimeError> {
        // A weight bound as GGUF blocks takes the quantized form of its op.
        let blocks = |v: ValueId| match g.nodes[v.0 as usize].op {
            Op::Param(q) => match params.get(q.0 as usize) {
                Some(Value::Q(w)) => Some(w),
                _ => None,
            },
            _ => None,
        };
        let kernels = set.kernels();
        // Rows of a product: every dimension of x but the last.
        let rows = |x: ValueId| {
            let s = &g.ty(x).shape;
            s[..s.len() - 1]
                .iter()
                .map(|&d| d as usize)
                .product::<usize>()
        };
        // Query rows per KV head of an attention: `g · T` from q `[B, Hq, T, D]` (or probs
        // `[B, Hq, T, S]`) and k or v `[B, Hkv, S, D]`.
        let attention_rows = |q: ValueId, kv: ValueId| {
            let (q, kv) = (&g.ty(q).shape, &g.ty(kv).shape);
            (q[1] / kv[1]) as usize * q[2] as usize
        };
        let last_use = g.last_uses();
        let n = g.nodes.len();
        let mut writebacks = Vec::with_capacity(g.updates.len());
        // States moved into the graph: updated in place by a chain of consuming kv_writes.
        let mut take = vec![false; p.state.len()];
        for u in &g.updates {
            let slot = u.value.0 as usize;
            match in_place_root(g, &last_use, u.value) {
                Some(s) if s == u.state => {
                    take[s.0 as usize] = true;
                    writebacks.push(WriteBack::InPlace {
                        state: u.state,
                        slot,
                    });
                }
                _ => {
                    let unchanged = matches!(g.nodes[slot].op, Op::State(s) if s == u.state);
                    if !unchanged {
                        writebacks.push(WriteBack::Assign {
                            state: u.state,
                            slot,
                        });
                    }
                }
            }
        }
        let real = real_tokens(p, g);
        let layouts = match real {
            Some((_, seed)) => row_layouts(g, seed),
            None => vec![None; n],
        };
        let mut tables: BTreeMap<(usize, u32), (Tensor<2>, Tensor<2>)> = BTreeMap::new();
        let mut steps = Vec::with_capacity(n);
        for (i, node) in g.nodes.iter().enumerate() {
            let dims = pad4(&node.ty.shape);
            let args: Vec<Arg> = {
                let reads = node.op.args();
                reads
                    .iter()
                    .enumerate()
                    .map(|(j, &v)| {
                        // An op may read one value twice (`or x, x`): only its last read
                        // of it moves it.
                        let later = reads[j + 1..].contains(&v);
                        if last_use[v.0 as usize] == i && !later {
                            Arg::Move(v.0 as usize)
                        } else {
                            Arg::Share(v.0 as usize)
                        }
                    })
                    .collect()
            };
            let kernel = match &node.op {
                Op::Input(k) => Kernel::Input(k.0 as usize),
                Op::Param(q) => Kernel::Param(q.0 as usize),
                Op::State(s) => Kernel::State {
                    id: *s,
                    take: take[s.0 as usize],
                },
                Op::Const { value, shape } => Kernel::Const(Value::full(*value, shape, device)),
                Op::Iota { shape, dim } => Kernel::Const(iota(shape, *dim as usize, device)),
                Op::Embed { table, .. } if blocks(*table).is_some() => Kernel::QEmbed(dims),
                Op::Embed { .. } => Kernel::Embed(dims),
                Op::Linear { x, w } => match blocks(*w) {
                    Some(q) => Kernel::QLinear(dims, kernels.qlinear_form(rows(*x), q)),
                    None => Kernel::Linear(dims, kernels.linear_form(rows(*x))),
                },
                Op::RmsNorm { eps, .. } => Kernel::RmsNorm(*eps),
                Op::Rope { x, theta, .. } => {
                    let d = g.ty(*x).shape[3] as usize;
                    let (cos, sin) = tables
                        .entry((d, theta.to_bits()))
                        .or_insert_with(|| rope_tables(rope_positions(p), d, *theta, device))
                        .clone();
                    Kernel::Rope(cos, sin)
                }
                Op::Attention { scale, q, k, .. } => {
                    Kernel::Attention(*scale, kernels.attention_form(attention_rows(*q, *k)))
                }
                Op::AttentionProbs { scale, .. } => Kernel::AttentionProbs(*scale),
                Op::AttentionValues { probs, v } => {
                    Kernel::AttentionValues(kernels.attention_form(attention_rows(*probs, *v)))
                }
                Op::AttentionMass { kv_heads, .. } => Kernel::AttentionMass(*kv_heads as usize),
                Op::KvWrite { .. } => Kernel::KvWrite,
                Op::Silu { .. } => Kernel::Silu,
                Op::Gelu { .. } => Kernel::Gelu,
                Op::Binary { op, .. } => Kernel::Binary(*op, dims),
                Op::Not { .. } => Kernel::Not,
                Op::IsIn { values, .. } => Kernel::IsIn(values.clone()),
                Op::Select { .. } => Kernel::Select(dims),
                Op::Cast { dtype, .. } => Kernel::Cast(*dtype),
                Op::Reshape { .. } => Kernel::Reshape(dims),
                Op::Permute { perm, .. } => {
                    let off = 4 - perm.len();
                    let mut axes = [0usize, 1, 2, 3];
                    for (j, &q) in perm.iter().enumerate() {
                        axes[off + j] = off + q as usize;
                    }
                    Kernel::Permute(axes)
                }
                Op::TakeRow { .. } => Kernel::TakeRow(dims),
                Op::Sample { .. } => Kernel::Sample(dims),
                Op::Argmax { .. } => Kernel::Argmax(dims),
                Op::Gather { .. } => Kernel::Gather {
                    rows: node.ty.shape.len() == 4,
                },
                Op::TopK { x, k, .. } => {
                    let row = *g.ty(*x).shape.last().expect("verified: rank >= 1") as usize;
                    if set == KernelSet::Portable && row > PORTABLE_TOP_K_MAX {
                        return Err(RuntimeError::Unsupported(format!(
                            "{} %{i}: top_k over rows of {row} slots; the portable kernels \
                             rank at most {PORTABLE_TOP_K_MAX}",
                            g.name
                        )));
                    }
                    Kernel::TopK(*k as usize)
                }
                Op::Sum { .. } => Kernel::Sum(dims),
                Op::Hash { seed, .. } => Kernel::Hash(*seed, dims),
                Op::AbsMax { .. } => Kernel::AbsMax,
                Op::Quantize { .. } => Kernel::Quantize(dims),
            };
            let label = match (&node.op, &kernel) {
                (Op::Linear { w, .. }, Kernel::Linear(_, f) | Kernel::QLinear(_, f)) => {
                    format!("{} linear {} {}", g.name, g.ty(*w), f.name())
                }
                (op, Kernel::Attention(_, f) | Kernel::AttentionValues(f)) => {
                    format!("{} {} {}", g.name, op.name(), f.name())
                }
                (op, _) => format!("{} {}", g.name, op.name()),
            };
            steps.push(Step {
                kernel,
                args,
                label,
                rows: layouts[i],
            });
        }
        Ok(Plan {
            steps,
            outputs: g.outputs.iter().map(|o| o.value.0 as usize).collect(),
            writebacks,
            lengths: real.map(|(lengths, _)| lengths),
        })
    }
}

impl Kernel {
    /// The kernel's name in the plan's text form, with its static parameters.
    pub fn name(&self) -> String {
        let d = |dims: &[usize; 4]| {
            let v: Vec<String> = dims.iter().map(usize::to_string).collect();
            format!("[{}]", v.join(","))
        };
        match self {
            Kernel::Input(i) => format!("input #{i}"),
            Kernel::Param(i) => format!("param #{i}"),
            Kernel::State { id, take } => {
                format!("state #{}{}", id.0, if *take { " (taken)" } else { "" })
            }
            Kernel::Const(_) => "const (built at load)".into(),
            Kernel::Embed(o) => format!("embed -> {}", d(o)),
            Kernel::Linear(o, f) => format!("linear {} -> {}", f.name(), d(o)),
            Kernel::QEmbed(o) => format!("q_embed -> {}", d(o)),
            Kernel::QLinear(o, f) => format!("q_linear {} -> {}", f.name(), d(o)),
            Kernel::RmsNorm(eps) => format!("rms_norm eps={eps:?}"),
            Kernel::Rope(cos, _) => format!("rope (tables of {} positions)", cos.dims()[0]),
            Kernel::Attention(scale, f) => format!("attention {} scale={scale:?}", f.name()),
            Kernel::AttentionProbs(scale) => format!("attention_probs scale={scale:?}"),
            Kernel::AttentionValues(f) => format!("attention_values {}", f.name()),
            Kernel::AttentionMass(h) => format!("attention_mass kv_heads={h}"),
            Kernel::KvWrite => "kv_write".into(),
            Kernel::Silu => "silu".into(),
            Kernel::Gelu => "gelu".into(),
            Kernel::Binary(op, o) => format!("{} -> {}", op.name(), d(o)),
            Kernel::Not => "not".into(),
            Kernel::IsIn(v) => format!("is_in ({} values)", v.len()),
            Kernel::Select(o) => format!("select -> {}", d(o)),
            Kernel::Cast(t) => format!("cast {t}"),
            Kernel::Reshape(o) => format!("reshape -> {}", d(o)),
            Kernel::Permute(a) => format!("permute {}", d(a)),
            Kernel::TakeRow(o) => format!("take_row -> {}", d(o)),
            Kernel::Sample(o) => format!("sample -> {}", d(o)),
            Kernel::Argmax(o) => format!("argmax -> {}", d(o)),
            Kernel::Gather { rows } => {
                format!("gather {}", if *rows { "rows" } else { "elements" })
            }
            Kernel::TopK(k) => format!("top_k k={k}"),
            Kernel::Sum(o) => format!("sum -> {}", d(o)),
            Kernel::Hash(seed, o) => format!("hash seed={seed} -> {}", d(o)),
            Kernel::AbsMax => "abs_max".into(),
            Kernel::Quantize(o) => format!("quantize -> {}", d(o)),
        }
    }
}

impl Plan {
    /// The plan's text form: one line per step (`%i = kernel args`, an argument read for
    /// the last time marked `~`: it is moved, so an in-place kernel may write it), then
    /// the outputs and every state write-back (`in place` or `assign`), with the
    /// program's names for parameters and state. Deterministic: snapshot-tested.
    pub fn text(&self, p: &Program, g: &Graph, set: KernelSet) -> String {
        use std::fmt::Write;
        let mut out = format!(
            "plan {} (kernel set {}): {} steps, {} write-backs\n",
            g.name,
            set.name(),
            self.steps.len(),
            self.writebacks.len()
        );
        if let Some(lengths) = self.lengths {
            let skip = match set.kernels().skips_padding() {
                true => "skip",
                false => "compute",
            };
            let source = match lengths {
                Lengths::Input(len) => format!("input {}", g.inputs[len].name),
                Lengths::NotDone(s) => format!("1 unless state {}", p.state[s.0 as usize].name),
            };
            writeln!(
                out,
                "  real tokens per row: {source}; steps marked [rows b t] {skip} padding"
            )
            .expect("writing to a String");
        }
        for (i, step) in self.steps.iter().enumerate() {
            let kernel = match &step.kernel {
                Kernel::Input(k) => format!("input {}", g.inputs[*k].name),
                Kernel::Param(q) => format!("param {}", p.params[*q].name),
                Kernel::State { id, take } => format!(
                    "state {}{}",
                    p.state[id.0 as usize].name,
                    if *take { " (taken)" } else { "" }
                ),
                k => k.name(),
            };
            let args: Vec<String> = step
                .args
                .iter()
                .map(|a| match a {
                    Arg::Move(s) => format!("%{s}~"),
                    Arg::Share(s) => format!("%{s}"),
                })
                .collect();
            let rows = match step.rows {
                Some(Rows {
                    batch,
                    token: Some(t),
                    ..
                }) => format!("  [rows b{batch} t{t}]"),
                Some(Rows {
                    batch, token: None, ..
                }) => format!("  [rows b{batch}]"),
                None => String::new(),
            };
            match args.is_empty() {
                true => writeln!(out, "  %{i} = {kernel}{rows}"),
                false => writeln!(out, "  %{i} = {kernel} {}{rows}", args.join(", ")),
            }
            .expect("writing to a String");
        }
        for (o, slot) in g.outputs.iter().zip(&self.outputs) {
            writeln!(out, "  out {} = %{slot}", o.name).expect("writing to a String");
        }
        for w in &self.writebacks {
            let (state, slot, how) = match w {
                WriteBack::InPlace { state, slot } => (state, slot, "in place"),
                WriteBack::Assign { state, slot } => (state, slot, "assign"),
            };
            writeln!(
                out,
                "  {} <- %{slot} ({how})",
                p.state[state.0 as usize].name
            )
            .expect("writing to a String");
        }
        out
    }
}

/// Where a graph's real tokens are: the prefill's padding contract (docs/ir.md), inputs
/// `tokens` `[B, T]` and `len` `[B]` where positions `t >= len[b]` of row `b` are padding
/// that never reaches a real result; or a decode step's token ids `[B, 1]` (the
/// embedding's), real unless the row is done. Returns where the lengths come from and the
/// node of the ids the row layout starts at.
fn real_tokens(p: &Program, g: &Graph) -> Option<(Lengths, usize)> {
    let find = |name: &str| g.inputs.iter().position(|i| i.name == name);
    if let (Some(len), Some(tokens)) = (find("len"), find("tokens")) {
        let (ls, ts) = (&g.inputs[len].ty.shape, &g.inputs[tokens].ty.shape);
        if !(ls.len() == 1 && ts.len() == 2 && ls[0] == ts[0]) {
            return None;
        }
        let seed = g
            .nodes
            .iter()
            .position(|n| matches!(n.op, Op::Input(k) if k.0 as usize == tokens))?;
        return Some((Lengths::Input(len), seed));
    }
    // A decode step: its token ids `[B, 1]` (the embedding's), real unless the row is done.
    let done = p.interface()?.done;
    let ids = g.nodes.iter().find_map(|n| match n.op {
        Op::Embed { ids, .. } => Some(ids),
        _ => None,
    })?;
    (g.ty(ids).shape == [p.config.batch, 1]).then_some((Lengths::NotDone(done), ids.0 as usize))
}

/// Batch and token axes in an IR shape (unpadded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Axes {
    batch: usize,
    token: Option<usize>,
}

impl Axes {
    /// The last axis the layout names.
    fn last(self) -> usize {
        self.token.unwrap_or(self.batch)
    }
}

/// The row layout of every node of `g`: from the token ids `seed` (`[B, T]`: the prefill's
/// `tokens` input, a decode step's ids) through the ops that
/// compute each (batch row, position) from the same (batch row, position) of their laid
/// out arguments and from arguments broadcast over both axes, and the attention ops
/// (query rows). Any other op ends the layout: it may mix positions (a reduction over
/// the token axis, a gather) and so must see what the graph defines for padding.
fn row_layouts(g: &Graph, seed: usize) -> Vec<Option<Rows>> {
    let n = g.nodes.len();
    let mut ax: Vec<Option<Axes>> = vec![None; n];
    let shape = |v: ValueId| &g.ty(v).shape;
    for (i, node) in g.nodes.iter().enumerate() {
        let out = &node.ty.shape;
        let at = |v: ValueId| ax[v.0 as usize];
        // Reductions and products over the last axis keep the layout when it does not
        // name the last axis.
        let rowwise = |x: ValueId| at(x).filter(|a| a.last() + 1 < shape(x).len());
        // Each (batch row, position) from the same of every laid out argument, the
        // others broadcast over both axes.
        let pointwise = |args: &[ValueId]| {
            let mut found: Option<Axes> = None;
            for &v in args {
                if let Some(a) = at(v) {
                    if found.is_some_and(|f| f != a) || shape(v).len() != out.len() {
                        return None;
                    }
                    found = Some(a);
                }
            }
            let a = found?;
            let axes = [Some(a.batch), a.token];
            let ok = args.iter().all(|&v| {
                let s = shape(v);
                axes.iter().flatten().all(|&x| match at(v) {
                    Some(_) => s[x] == out[x],
                    // Right-aligned broadcast: the axis is absent or 1.
                    None => {
                        let off = out.len() - s.len();
                        x < off || s[x - off] == 1
                    }
                })
            });
            ok.then_some(a)
        };
        // The attention ops' query rows: q or probs `[B, H, T, _]`.
        let queries = |q: ValueId| {
            at(q).filter(|a| {
                *a == Axes {
                    batch: 0,
                    token: Some(2),
                }
            })
        };
        if i == seed {
            ax[i] = Some(Axes {
                batch: 0,
                token: Some(1),
            });
            continue;
        }
        ax[i] =
            match &node.op {
                Op::Input(_)
                | Op::Param(_)
                | Op::State(_)
                | Op::Const { .. }
                | Op::Iota { .. }
                | Op::KvWrite { .. }
                | Op::AttentionMass { .. }
                | Op::Gather { .. }
                | Op::TopK { .. }
                | Op::Hash { .. }
                | Op::Sample { .. } => None,
                Op::Embed { ids, .. } => at(*ids),
                Op::Linear { x, .. }
                | Op::RmsNorm { x, .. }
                | Op::Rope { x, .. }
                | Op::Sum { x }
                | Op::AbsMax { x }
                | Op::Argmax { x } => rowwise(*x),
                Op::Silu { x }
                | Op::Gelu { x }
                | Op::Not { x }
                | Op::IsIn { x, .. }
                | Op::Cast { x, .. } => at(*x),
                Op::Quantize { x, scale } => pointwise(&[*x, *scale]),
                Op::Binary { a, b, .. } => pointwise(&[*a, *b]),
                Op::Select { cond, a, b } => pointwise(&[*cond, *a, *b]),
                Op::Reshape { x, .. } => at(*x).and_then(|a| {
                    let s = shape(*x);
                    if out.len() > a.last() && out[..=a.last()] == s[..=a.last()] {
                        return Some(a);
                    }
                    // A token axis of one position dropped (a decode step's `[B, 1, H]`
                    // to `[B, H]`): one entry per batch row.
                    let t = a.token?;
                    (s[t] == 1 && out[..t] == s[..t] && out[t..] == s[t + 1..]).then_some(Axes {
                        batch: a.batch,
                        token: None,
                    })
                }),
                Op::Permute { x, perm } => at(*x).and_then(|a| {
                    let to = |axis: usize| perm.iter().position(|&p| p as usize == axis);
                    let batch = to(a.batch)?;
                    match a.token {
                        None => Some(Axes { batch, token: None }),
                        Some(t) => {
                            let token = to(t)?;
                            (batch < token).then_some(Axes {
                                batch,
                                token: Some(token),
                            })
                        }
                    }
                }),
                Op::TakeRow { x, .. } => at(*x)
                    .filter(|a| a.token == Some(shape(*x).len() - 2))
                    .map(|a| Axes {
                        batch: a.batch,
                        token: None,
                    }),
                Op::Attention { q, .. } | Op::AttentionProbs { q, .. } => queries(*q),
                Op::AttentionValues { probs, .. } => queries(*probs),
            };
    }
    g.nodes
        .iter()
        .zip(ax)
        .map(|(node, a)| {
            let off = 4 - node.ty.shape.len();
            a.map(|a| Rows {
                dims: pad4(&node.ty.shape),
                batch: off + a.batch,
                token: a.token.map(|t| off + t),
            })
        })
        .collect()
}

/// The state a value is an in-place update of: the value is `State(s)` itself, or a
/// `kv_write` whose cache argument is consumed there (its last read) and is itself such
/// a value.
fn in_place_root(g: &Graph, last_use: &[usize], v: ValueId) -> Option<StateId> {
    let mut at = v.0 as usize;
    let mut first = true;
    loop {
        match g.nodes[at].op {
            Op::State(s) => return (!first).then_some(s),
            Op::KvWrite { cache, .. } => {
                let c = cache.0 as usize;
                if last_use[c] != at {
                    return None;
                }
                at = c;
                first = false;
            }
            _ => return None,
        }
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
