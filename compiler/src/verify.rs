//! The verifier: run after lowering and after every pass, so passes and the runtime may
//! assume a valid program. It collects every problem instead of stopping at the first.

use std::collections::BTreeSet;
use std::fmt;

use crate::ir::typing_decls;
use crate::ir::{Graph, Program, infer_type};

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
        write!(
            f,
            "invalid program {} ({} problems)",
            self.stage,
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
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
        if s.init.dtype() != s.ty.dtype {
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
        if i.ty.shape.contains(&0) {
            report(
                None,
                format!("input {} has a zero-sized dim: {}", i.name, i.ty),
            );
        }
    }
    let decls = typing_decls(p, g);
    for (i, n) in g.nodes.iter().enumerate() {
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
