//! The verifier: run after lowering and after every pass, so passes and the runtime may
//! assume a valid program. It collects every problem instead of stopping at the first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::ir::typing_decls;
use crate::ir::{
    CachePart, DType, Graph, Op, Program, Scalar, StateDecl, StateRole, Type, infer_type,
};
use crate::spec::{KvPolicy, KvStorage, Sampler};

/// Highest tensor rank a program may use (the runtime pads every value to rank 4).
pub const MAX_RANK: usize = 4;

/// Largest value (declared parameter, state, input or node result) a valid program has,
/// in bytes: the spec's own cap on weights and caches.
pub const MAX_VALUE_BYTES: u64 = crate::spec::MAX_BYTES;

/// One problem found in a program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Graph name, or `program` for the tables.
    pub graph: String,
    /// The node at fault, when there is one.
    pub node: Option<u32>,
    /// What was expected and what was found.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node {
            Some(n) => write!(f, "{} %{n}: {}", self.graph, self.message),
            None => write!(f, "{}: {}", self.graph, self.message),
        }
    }
}

/// All problems of an invalid program (never empty).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct VerifyError {
    /// What was being verified (e.g. `after lowering`, `after pass cse`).
    pub stage: String,
    /// Every problem found, in graph and node order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // One line: the first few problems, then how many more.
        const SHOWN: usize = 5;
        write!(f, "invalid program {}: ", self.stage)?;
        for (i, p) in self.problems.iter().take(SHOWN).enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{p}")?;
        }
        if self.problems.len() > SHOWN {
            write!(f, "; and {} more", self.problems.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// Checks a whole program; `stage` names the point in the pipeline for the error.
pub fn verify(p: &Program, stage: &str) -> Result<(), VerifyError> {
    let mut problems = Vec::new();
    let mut tables = |graph: &str, message: String| {
        problems.push(Problem {
            graph: graph.into(),
            node: None,
            message,
        })
    };
    unique("parameter", p.params.iter().map(|x| &x.name), &mut |m| {
        tables("program", m)
    });
    unique(
        "state variable",
        p.state.iter().map(|x| &x.name),
        &mut |m| tables("program", m),
    );
    for s in &p.state {
        // An I8 state starts from an I32 constant in the int8 range, an F16 state from an
        // F32 constant that f16 holds exactly.
        let i8_init = s.ty.dtype == DType::I8
            && matches!(s.init, Scalar::I32(v) if (-128..=127).contains(&v));
        let f16_init = s.ty.dtype == DType::F16
            && matches!(s.init, Scalar::F32(v) if half::f16::from_f32(v).to_f32() == v);
        if s.init.dtype() != s.ty.dtype && !i8_init && !f16_init {
            tables(
                "program",
                format!("state {} is {} but starts as {}", s.name, s.ty, s.init),
            );
        }
    }
    for decl in p
        .params
        .iter()
        .map(|x| (&x.name, &x.ty))
        .chain(p.state.iter().map(|x| (&x.name, &x.ty)))
    {
        if decl.1.shape.contains(&0) {
            tables(
                "program",
                format!("{} has a zero-sized dim: {}", decl.0, decl.1),
            );
        }
        if decl.1.size_bytes() > MAX_VALUE_BYTES || decl.1.shape.len() > MAX_RANK {
            tables(
                "program",
                format!(
                    "{} is {}: over rank {MAX_RANK} or {MAX_VALUE_BYTES} B",
                    decl.0, decl.1
                ),
            );
        }
    }
    if p.prefill.name != "prefill" || p.decode.name != "decode" {
        tables(
            "program",
            format!(
                "expected graphs prefill and decode, found {} and {}",
                p.prefill.name, p.decode.name
            ),
        );
    }
    for g in p.graphs() {
        verify_graph(p, g, &mut problems);
    }
    verify_interface(p, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(VerifyError {
            stage: stage.to_string(),
            problems,
        })
    }
}

fn unique<'a>(what: &str, names: impl Iterator<Item = &'a String>, report: &mut dyn FnMut(String)) {
    let mut seen = BTreeSet::new();
    for n in names {
        if !seen.insert(n) {
            report(format!("{what} {n} is declared twice"));
        }
    }
}

fn verify_graph(p: &Program, g: &Graph, problems: &mut Vec<Problem>) {
    let mut report = |node: Option<u32>, message: String| {
        problems.push(Problem {
            graph: g.name.clone(),
            node,
            message,
        })
    };
    unique("input", g.inputs.iter().map(|x| &x.name), &mut |m| {
        report(None, m)
    });
    unique("output", g.outputs.iter().map(|x| &x.name), &mut |m| {
        report(None, m)
    });
    for i in &g.inputs {
        if i.ty.size_bytes() > MAX_VALUE_BYTES || i.ty.shape.len() > MAX_RANK {
            report(
                None,
                format!(
                    "input {} is {}: over rank {MAX_RANK} or {MAX_VALUE_BYTES} B",
                    i.name, i.ty
                ),
            );
        }
        if i.ty.shape.contains(&0) {
            report(
                None,
                format!("input {} has a zero-sized dim: {}", i.name, i.ty),
            );
        }
    }
    let decls = typing_decls(p, g);
    let mut reads = BTreeSet::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if n.ty.shape.len() > MAX_RANK {
            report(
                Some(i as u32),
                format!("{} has rank {} > {MAX_RANK}", n.ty, n.ty.shape.len()),
            );
        }
        if n.ty.size_bytes() > MAX_VALUE_BYTES {
            report(
                Some(i as u32),
                format!("{} is over {MAX_VALUE_BYTES} B", n.ty),
            );
        }
        let source = match &n.op {
            Op::Input(k) => Some(format!("input #{}", k.0)),
            Op::State(k) => Some(format!("state #{}", k.0)),
            Op::Param(_)
            | Op::Const { .. }
            | Op::Iota { .. }
            | Op::Embed { .. }
            | Op::Linear { .. }
            | Op::RmsNorm { .. }
            | Op::Rope { .. }
            | Op::Attention { .. }
            | Op::KvWrite { .. }
            | Op::Silu { .. }
            | Op::Gelu { .. }
            | Op::Binary { .. }
            | Op::Not { .. }
            | Op::IsIn { .. }
            | Op::Select { .. }
            | Op::Cast { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::TakeRow { .. }
            | Op::Sample { .. }
            | Op::Argmax { .. }
            | Op::AttentionProbs { .. }
            | Op::AttentionValues { .. }
            | Op::AttentionMass { .. }
            | Op::Gather { .. }
            | Op::TopK { .. }
            | Op::Sum { .. }
            | Op::Hash { .. }
            | Op::AbsMax { .. }
            | Op::Quantize { .. } => None,
        };
        if let Some(source) = source
            && !reads.insert(source.clone())
        {
            report(
                Some(i as u32),
                format!("{source} is read by more than one node"),
            );
        }
        match infer_type(&n.op, &g.nodes[..i], &decls) {
            Ok(ty) if ty == n.ty => {}
            Ok(ty) => report(
                Some(i as u32),
                format!(
                    "{} is recorded as {} but its typing rule gives {ty}",
                    n.op.name(),
                    n.ty
                ),
            ),
            Err(m) => report(Some(i as u32), format!("{}: {m}", n.op.name())),
        }
        // Quantized blocks are weight storage: parameters, read only as the weight of a
        // `linear` or the table of an `embed`.
        if n.ty.dtype.is_quantized() && !matches!(n.op, Op::Param(_)) {
            report(
                Some(i as u32),
                format!(
                    "only parameters may be {}, found {}",
                    n.ty.dtype,
                    n.op.name()
                ),
            );
        }
        let weight = if let Op::Linear { w, .. } = n.op {
            Some(w)
        } else if let Op::Embed { table, .. } = n.op {
            Some(table)
        } else {
            None
        };
        for a in n.op.args() {
            if let Some(arg) = g.nodes[..i].get(a.0 as usize)
                && arg.ty.dtype.is_quantized()
                && Some(a) != weight
            {
                report(
                    Some(i as u32),
                    format!(
                        "{} reads %{} of {}: quantized values are only linear weights and embed tables",
                        n.op.name(),
                        a.0,
                        arg.ty
                    ),
                );
            }
        }
    }
    let defined = |v: crate::ir::ValueId| (v.0 as usize) < g.nodes.len();
    for o in &g.outputs {
        if !defined(o.value) {
            report(
                None,
                format!("output {} refers to undefined %{}", o.name, o.value.0),
            );
        }
    }
    let mut updated = BTreeSet::new();
    for u in &g.updates {
        let Some(decl) = p.state.get(u.state.0 as usize) else {
            report(None, format!("update of undeclared state #{}", u.state.0));
            continue;
        };
        if !updated.insert(u.state) {
            report(None, format!("state {} is updated twice", decl.name));
        }
        if !defined(u.value) {
            report(
                None,
                format!("state {} <- undefined %{}", decl.name, u.value.0),
            );
        } else if g.ty(u.value) != &decl.ty {
            report(
                Some(u.value.0),
                format!(
                    "state {} is {} but is updated with {}",
                    decl.name,
                    decl.ty,
                    g.ty(u.value)
                ),
            );
        }
    }
}

/// The contract between a program and the runtime: graph inputs, outputs (in order) and
/// the state table by role, with the types the compiled configuration implies.
fn verify_interface(p: &Program, problems: &mut Vec<Problem>) {
    let c = &p.config;
    let (b, t, v) = (c.batch, c.prefill_len, c.vocab_size);
    let i32b = Type::new(DType::I32, [b]);
    let mut report = |graph: &str, message: String| {
        problems.push(Problem {
            graph: graph.into(),
            node: None,
            message,
        })
    };
    let want_inputs = [
        ("tokens", Type::new(DType::I32, [b, t])),
        ("len", i32b.clone()),
        ("limit", i32b.clone()),
        ("restart", Type::new(DType::Bool, [b])),
    ];
    let got: Vec<(&str, &Type)> = p
        .prefill
        .inputs
        .iter()
        .map(|i| (i.name.as_str(), &i.ty))
        .collect();
    let want: Vec<(&str, &Type)> = want_inputs.iter().map(|(n, ty)| (*n, ty)).collect();
    if got != want {
        report(
            "prefill",
            format!("expected inputs {want:?}, found {got:?}"),
        );
    }
    if !p.decode.inputs.is_empty() {
        report(
            "decode",
            format!("expected no inputs, found {}", p.decode.inputs.len()),
        );
    }
    let logits = Type::new(DType::F32, [b, v]);
    let done = Type::new(DType::Bool, [b]);
    let outputs: [(&Graph, Vec<(&str, &Type)>); 2] = [
        (&p.prefill, vec![("logits", &logits), ("token", &i32b)]),
        (
            &p.decode,
            vec![("logits", &logits), ("token", &i32b), ("done", &done)],
        ),
    ];
    for (g, want) in outputs {
        let got: Vec<(&str, &Type)> = g
            .outputs
            .iter()
            .filter(|o| (o.value.0 as usize) < g.nodes.len())
            .map(|o| (o.name.as_str(), g.ty(o.value)))
            .collect();
        if got != want {
            report(&g.name, format!("expected outputs {want:?}, found {got:?}"));
        }
    }
    let mut role_problems = 0;
    verify_roles(p, &mut |m| {
        role_problems += 1;
        report("program", m)
    });
    if role_problems == 0 && p.interface().is_none() {
        report(
            "program",
            "the state table does not give an interface by role".to_string(),
        );
    }
}

/// The state table by role ([`Program::interface`] reads it): exactly one variable per
/// control role, the sampler's four roles exactly when the sampler is `Sample`, each of
/// its fixed type; for every layer of the model, keys and values of one rank-4 type in
/// the storage dtype, and the scales, slot table and scores that the storage and the
/// layer's policy (`config.layer_kv`) imply, shaped like the keys.
fn verify_roles(p: &Program, report: &mut dyn FnMut(String)) {
    let c = &p.config;
    let b = c.batch;
    let mut by_role: BTreeMap<StateRole, Vec<&StateDecl>> = BTreeMap::new();
    for s in &p.state {
        by_role.entry(s.role).or_default().push(s);
    }
    for (role, decls) in &by_role {
        if decls.len() > 1 {
            let names: Vec<&str> = decls.iter().map(|s| s.name.as_str()).collect();
            report(format!(
                "state role {role} is held by {} variables: {}",
                names.len(),
                names.join(", ")
            ));
        }
    }
    let layers = p.spec.arch.dims().num_layers;
    if p.config.layer_kv.len() != layers as usize {
        report(format!(
            "config.layer_kv lists {} policies for a model of {layers} layers",
            p.config.layer_kv.len()
        ));
    }
    for s in &p.state {
        if let StateRole::Cache { layer, .. } = s.role
            && layer >= layers
        {
            report(format!(
                "state {} has role {}, but the model has {layers} layers",
                s.name, s.role
            ));
        }
    }
    let one = |role: StateRole| by_role.get(&role).map(|d| d[0]);
    // Reports the variable of `role` when it is missing (`wanted`), unused (not `wanted`)
    // or fails `ok`; `shown` is the type `ok` accepts, as the message shows it.
    let mut check = |role: StateRole, wanted: bool, shown: String, ok: &dyn Fn(&Type) -> bool| {
        let message = match (one(role), wanted) {
            (Some(s), true) if ok(&s.ty) => return,
            (None, false) => return,
            (Some(s), true) => format!(
                "state {} (role {role}) must be {shown}, found {}",
                s.name, s.ty
            ),
            (None, true) => format!("missing state with role {role}: {shown}"),
            (Some(s), false) => format!(
                "state {} has role {role}, which this program does not use",
                s.name
            ),
        };
        report(message)
    };
    let exact = |ty: Type| move |t: &Type| *t == ty;
    let sampling = c.sampler == Sampler::Sample;
    for (role, dtype, wanted) in [
        (StateRole::Pos, DType::I32, true),
        (StateRole::Limit, DType::I32, true),
        (StateRole::Done, DType::Bool, true),
        (StateRole::Token, DType::I32, true),
        (StateRole::Temperature, DType::F32, sampling),
        (StateRole::TopK, DType::I32, sampling),
        (StateRole::TopP, DType::F32, sampling),
    ] {
        let ty = Type::new(dtype, [b]);
        check(role, wanted, ty.to_string(), &exact(ty));
    }
    check(
        StateRole::Uniform,
        sampling,
        format!("f32[{b},_]"),
        &|t: &Type| t.dtype == DType::F32 && t.shape.len() == 2 && t.shape[0] == b,
    );

    let storage = match c.kv_storage {
        KvStorage::F32 => DType::F32,
        KvStorage::F16 => DType::F16,
        KvStorage::I8 => DType::I8,
    };
    for layer in 0..layers {
        let policy = c.layer_kv.get(layer as usize).copied().unwrap_or(c.kv);
        let (slots, scores) = match policy {
            KvPolicy::Dense => (false, false),
            KvPolicy::Window { .. } | KvPolicy::SinkWindow { .. } | KvPolicy::Random { .. } => {
                (true, false)
            }
            KvPolicy::H2o { .. } | KvPolicy::Tova { .. } | KvPolicy::SnapKv { .. } => (true, true),
        };
        let role = |part| StateRole::Cache { layer, part };
        let keys = one(role(CachePart::Keys));
        check(
            role(CachePart::Keys),
            true,
            format!("{storage}[{b},_,_,_]"),
            &|t: &Type| t.dtype == storage && t.shape.len() == 4 && t.shape[0] == b,
        );
        // The other parts are shaped like well-typed keys `[B, H, N, D]`.
        let Some(keys) = keys.filter(|k| k.ty.dtype == storage && k.ty.shape.len() == 4) else {
            continue;
        };
        let (h, n) = (keys.ty.shape[1], keys.ty.shape[2]);
        let parts = [
            (CachePart::Values, true, keys.ty.clone()),
            (
                CachePart::KeyScales,
                storage == DType::I8,
                Type::new(DType::F32, [b, h, n, 1]),
            ),
            (
                CachePart::ValueScales,
                storage == DType::I8,
                Type::new(DType::F32, [b, h, n, 1]),
            ),
            (
                CachePart::SlotPositions,
                slots,
                Type::new(DType::I32, [b, h, n]),
            ),
            (CachePart::Scores, scores, Type::new(DType::F32, [b, h, n])),
        ];
        for (part, wanted, ty) in parts {
            check(role(part), wanted, ty.to_string(), &exact(ty));
        }
    }
}
