//! The text form: the contract and the snapshot format. Deterministic: nodes print in
//! arena order with their index as the name (`%12`), floats in shortest round-trip form.

use std::fmt::{self, Display, Formatter};

use super::{
    BinaryOp, CachePart, DType, Graph, Op, ParamDecl, Program, Scalar, StateDecl, StateRole, Type,
    ValueId,
};

impl Display for DType {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let name = match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::I8 => "i8",
            DType::Bool => "bool",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q8_0 => "q8_0",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
        };
        f.write_str(name)
    }
}

impl Display for Type {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

impl Display for ValueId {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

impl Display for Scalar {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::F32(v) => write!(f, "{v:?}"),
            Scalar::I32(v) => write!(f, "{v}"),
            Scalar::Bool(v) => write!(f, "{v}"),
        }
    }
}

impl CachePart {
    /// Name in the text form.
    pub fn name(self) -> &'static str {
        match self {
            CachePart::Keys => "keys",
            CachePart::Values => "values",
            CachePart::KeyScales => "key_scales",
            CachePart::ValueScales => "value_scales",
            CachePart::SlotPositions => "slot_positions",
            CachePart::Scores => "scores",
        }
    }
}

/// `pos`, `top_k`, ... for control roles; `cache(LAYER,PART)` for cache parts, e.g.
/// `cache(0,keys)`.
impl Display for StateRole {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let name = match self {
            StateRole::Pos => "pos",
            StateRole::Limit => "limit",
            StateRole::Done => "done",
            StateRole::Token => "token",
            StateRole::Temperature => "temperature",
            StateRole::TopK => "top_k",
            StateRole::TopP => "top_p",
            StateRole::Uniform => "uniform",
            StateRole::Cache { layer, part } => {
                return write!(f, "cache({layer},{})", part.name());
            }
        };
        f.write_str(name)
    }
}

impl BinaryOp {
    /// Name in the text form.
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Min => "min",
            BinaryOp::Max => "max",
            BinaryOp::Div => "div",
            BinaryOp::Eq => "eq",
            BinaryOp::Lt => "lt",
            BinaryOp::Le => "le",
            BinaryOp::And => "and",
            BinaryOp::Or => "or",
        }
    }
}

impl Op {
    /// Name of the op in the text form and in error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input(_) => "input",
            Op::Param(_) => "param",
            Op::State(_) => "state",
            Op::Const { .. } => "const",
            Op::Iota { .. } => "iota",
            Op::Embed { .. } => "embed",
            Op::Linear { .. } => "linear",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::KvWrite { .. } => "kv_write",
            Op::Silu { .. } => "silu",
            Op::Gelu { .. } => "gelu",
            Op::Binary { op, .. } => op.name(),
            Op::Not { .. } => "not",
            Op::IsIn { .. } => "is_in",
            Op::Select { .. } => "select",
            Op::Cast { .. } => "cast",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::TakeRow { .. } => "take_row",
            Op::Sample { .. } => "sample",
            Op::Argmax { .. } => "argmax",
            Op::AttentionProbs { .. } => "attention_probs",
            Op::AttentionValues { .. } => "attention_values",
            Op::AttentionMass { .. } => "attention_mass",
            Op::Gather { .. } => "gather",
            Op::TopK { .. } => "top_k",
            Op::Sum { .. } => "sum",
            Op::Hash { .. } => "hash",
            Op::AbsMax { .. } => "abs_max",
            Op::Quantize { .. } => "quantize",
        }
    }
}

fn dims(d: &[u32]) -> String {
    let parts: Vec<String> = d.iter().map(u32::to_string).collect();
    format!("[{}]", parts.join(","))
}

/// The parameter and state tables a graph's `param` and `state` nodes index: a
/// [`Program`]'s, or those a parsed [`super::parse::Module`] declares.
pub trait Tables {
    /// The parameter table.
    fn params(&self) -> &[ParamDecl];
    /// The state table.
    fn state(&self) -> &[StateDecl];

    /// One-line signature of a graph: inputs, outputs and the state it updates.
    fn signature(&self, g: &Graph) -> String {
        signature(self.state(), g)
    }
}

impl Tables for Program {
    fn params(&self) -> &[ParamDecl] {
        &self.params
    }

    fn state(&self) -> &[StateDecl] {
        &self.state
    }
}

/// Displays one graph (names of params and state come from its tables).
pub struct GraphDisplay<'a> {
    tables: &'a dyn Tables,
    graph: &'a Graph,
}

impl<'a> GraphDisplay<'a> {
    /// The text form of `graph` over `tables`.
    pub fn new(tables: &'a dyn Tables, graph: &'a Graph) -> Self {
        GraphDisplay { tables, graph }
    }
}

impl Program {
    /// The text form of one of this program's graphs.
    pub fn display_graph<'a>(&'a self, graph: &'a Graph) -> GraphDisplay<'a> {
        GraphDisplay::new(self, graph)
    }

    /// One-line signature of a graph: inputs, outputs and the state it updates.
    pub fn signature(&self, g: &Graph) -> String {
        signature(&self.state, g)
    }
}

fn signature(state: &[StateDecl], g: &Graph) -> String {
    let ins: Vec<String> = g
        .inputs
        .iter()
        .map(|i| format!("{}: {}", i.name, i.ty))
        .collect();
    let outs: Vec<String> = g
        .outputs
        .iter()
        .map(|o| format!("{}: {}", o.name, g.ty(o.value)))
        .collect();
    let mut s = format!("{}({}) -> ({})", g.name, ins.join(", "), outs.join(", "));
    if !g.updates.is_empty() {
        let names: Vec<&str> = g
            .updates
            .iter()
            .map(|u| state[u.state.0 as usize].name.as_str())
            .collect();
        s.push_str(&format!(" updates {{{}}}", names.join(", ")));
    }
    s
}

impl GraphDisplay<'_> {
    fn fmt_op(&self, op: &Op, f: &mut Formatter<'_>) -> fmt::Result {
        let (g, t) = (self.graph, self.tables);
        let name = op.name();
        match op {
            Op::Input(i) => write!(f, "{name} {}", g.inputs[i.0 as usize].name),
            Op::Param(p) => write!(f, "{name} {}", t.params()[p.0 as usize].name),
            Op::State(s) => write!(f, "{name} {}", t.state()[s.0 as usize].name),
            Op::Const { value, shape: _ } => write!(f, "{name} {value}"),
            Op::Iota { shape: _, dim } => write!(f, "{name} dim={dim}"),
            Op::Embed { table, ids } => write!(f, "{name} {table}, {ids}"),
            Op::Linear { x, w } => write!(f, "{name} {x}, {w}"),
            Op::RmsNorm { x, w, eps } => write!(f, "{name} {x}, {w}, eps={eps:?}"),
            Op::Rope { x, pos, theta } => write!(f, "{name} {x}, pos={pos}, theta={theta:?}"),
            Op::Attention {
                q,
                k,
                v,
                mask,
                scale,
            } => {
                write!(f, "{name} {q}, {k}, {v}, mask={mask}, scale={scale:?}")
            }
            Op::KvWrite {
                cache,
                new,
                start,
                len,
            } => {
                write!(f, "{name} {cache}, {new}, start={start}, len={len}")
            }
            Op::Silu { x }
            | Op::Gelu { x }
            | Op::Not { x }
            | Op::Argmax { x }
            | Op::Sum { x }
            | Op::AbsMax { x } => {
                write!(f, "{name} {x}")
            }
            Op::AttentionProbs { q, k, mask, scale } => {
                write!(f, "{name} {q}, {k}, mask={mask}, scale={scale:?}")
            }
            Op::AttentionValues { probs, v } => write!(f, "{name} {probs}, {v}"),
            Op::AttentionMass {
                probs,
                weight,
                kv_heads,
            } => write!(f, "{name} {probs}, weight={weight}, kv_heads={kv_heads}"),
            Op::Gather { x, index } => write!(f, "{name} {x}, {index}"),
            Op::Quantize { x, scale } => write!(f, "{name} {x}, scale={scale}"),
            Op::TopK { x, tiebreak, k } => write!(f, "{name} {x}, tiebreak={tiebreak}, k={k}"),
            Op::Hash { a, b, seed } => write!(f, "{name} {a}, {b}, seed={seed}"),
            Op::Binary { op: _, a, b } => write!(f, "{name} {a}, {b}"),
            Op::Select { cond, a, b } => write!(f, "{name} {cond}, {a}, {b}"),
            Op::Cast { x, dtype: _ } => write!(f, "{name} {x}"),
            Op::IsIn { x, values } => {
                let set: Vec<String> = values.iter().map(i32::to_string).collect();
                write!(f, "{name} {x}, values=[{}]", set.join(","))
            }
            Op::Reshape { x, shape: _ } => write!(f, "{name} {x}"),
            Op::Permute { x, perm } => write!(f, "{name} {x}, perm={}", dims(perm)),
            Op::TakeRow { x, index } => write!(f, "{name} {x}, {index}"),
            Op::Sample {
                logits,
                temperature,
                top_k,
                top_p,
                uniform,
            } => write!(
                f,
                "{name} {logits}, temperature={temperature}, top_k={top_k}, top_p={top_p}, uniform={uniform}"
            ),
        }
    }
}

impl Display for GraphDisplay<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let (t, g) = (self.tables, self.graph);
        writeln!(f, "graph {} {{", t.signature(g))?;
        for (i, n) in g.nodes.iter().enumerate() {
            write!(f, "  %{i}: {} = ", n.ty)?;
            self.fmt_op(&n.op, f)?;
            writeln!(f)?;
        }
        for o in &g.outputs {
            writeln!(f, "  out {} = {}", o.name, o.value)?;
        }
        for u in &g.updates {
            writeln!(
                f,
                "  state {} <- {}",
                t.state()[u.state.0 as usize].name,
                u.value
            )?;
        }
        writeln!(f, "}}")
    }
}

impl Display for Program {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "program {} ({} v{})",
            self.spec.name, self.format, self.version
        )?;
        writeln!(
            f,
            "config batch={} prefill_len={} cache_len={} vocab={} kv={:?} sampler={:?} weights={} stop_tokens={:?}",
            c.batch,
            c.prefill_len,
            c.cache_len,
            c.vocab_size,
            c.kv,
            c.sampler,
            c.weight_dtype,
            c.stop_tokens
        )?;
        writeln!(f, "params {}:", self.params.len())?;
        for prm in &self.params {
            writeln!(f, "  {}: {}", prm.name, prm.ty)?;
        }
        writeln!(f, "state {}:", self.state.len())?;
        for s in &self.state {
            writeln!(
                f,
                "  {}: {} = {} role={}  # {}",
                s.name, s.ty, s.init, s.role, s.doc
            )?;
        }
        for g in self.graphs() {
            writeln!(f)?;
            write!(f, "{}", self.display_graph(g))?;
        }
        Ok(())
    }
}
