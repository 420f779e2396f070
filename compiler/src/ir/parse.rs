//! The text form read back: one graph as [`GraphDisplay`] prints it becomes a [`Module`]
//! (the graph with the parameter and state tables its nodes declare). It exists so that
//! each pass can be tested on its own, from a small graph written by hand to the graph it
//! must produce (`compiler/tests/filetests/`), and printing then parsing any graph gives it
//! back unchanged.
//!
//! What the text leaves implicit is recovered from the node's type: a constant's, iota's
//! and reshape's shape, a cast's dtype, an input's, parameter's or state variable's type.
//! Every node is typed by the same rule as the builder's ([`infer_type`]) and must agree
//! with the type written; values are numbered in order (`%0`, `%1`, …) and used after they
//! are defined. State variables get the role their name gives them in lowered programs
//! (`pos`, `k.0`, `slot_pos.3`, …), an initial value of zero and no doc.

use super::display::{GraphDisplay, Tables};
use super::typing::{Decls, infer_type};
use super::{
    BinaryOp, CachePart, DType, Graph, InputDecl, InputId, Node, Op, Output, ParamDecl, ParamId,
    Scalar, StateDecl, StateId, StateRole, StateUpdate, Type, ValueId,
};

/// A graph with the tables its `param` and `state` nodes declare.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    /// Parameters, in order of first use.
    pub params: Vec<ParamDecl>,
    /// State variables, in order of first use (a read or an update).
    pub state: Vec<StateDecl>,
    /// The graph.
    pub graph: Graph,
}

impl Tables for Module {
    fn params(&self) -> &[ParamDecl] {
        &self.params
    }

    fn state(&self) -> &[StateDecl] {
        &self.state
    }
}

impl Module {
    /// The text form of the graph.
    pub fn display(&self) -> GraphDisplay<'_> {
        GraphDisplay::new(self, &self.graph)
    }
}

/// Text that is not a well-typed graph: where, and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// Expected vs found.
    pub message: String,
}

type Parsed<T> = Result<T, String>;

/// Parses one graph in the text form (blank lines and `;` comments are skipped).
pub fn parse_graph(text: &str) -> Result<Module, ParseError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with(';'));
    let (first, header) = lines.next().ok_or(ParseError {
        line: 1,
        message: "expected `graph NAME(...) -> (...) {`, found nothing".into(),
    })?;
    let at = |line: usize| move |message: String| ParseError { line, message };
    let sig = header_parts(header).map_err(at(first))?;
    let mut m = Module {
        params: vec![],
        state: vec![],
        graph: Graph::new(&sig.name, sig.inputs.clone()),
    };
    let mut closed = false;
    for (n, line) in lines {
        if closed {
            return Err(at(n)(format!("text after the graph's `}}`: {line}")));
        }
        if line == "}" {
            closed = true;
        } else if let Some(rest) = line.strip_prefix("out ") {
            let (name, v) = rest
                .split_once(" = ")
                .ok_or_else(|| format!("expected `out NAME = %N`, found {line}"))
                .map_err(at(n))?;
            let value = m.value(v).map_err(at(n))?;
            m.graph.outputs.push(Output {
                name: name.to_string(),
                value,
            });
        } else if let Some(rest) = line.strip_prefix("state ") {
            let (name, v) = rest
                .split_once(" <- ")
                .ok_or_else(|| format!("expected `state NAME <- %N`, found {line}"))
                .map_err(at(n))?;
            let value = m.value(v).map_err(at(n))?;
            let ty = m.graph.ty(value).clone();
            let state = m.state_id(name, &ty).map_err(at(n))?;
            m.graph.updates.push(StateUpdate { state, value });
        } else {
            m.node(line).map_err(at(n))?;
        }
    }
    if !closed {
        return Err(at(text.lines().count())(
            "expected `}` to close the graph".into(),
        ));
    }
    m.check_signature(&sig).map_err(at(first))?;
    Ok(m)
}

/// What the header line declares.
struct Signature {
    name: String,
    inputs: Vec<InputDecl>,
    outputs: Vec<(String, Type)>,
    updates: Vec<String>,
}

fn header_parts(line: &str) -> Parsed<Signature> {
    let bad =
        || format!("expected `graph NAME(INPUTS) -> (OUTPUTS) [updates {{...}}] {{`, found {line}");
    let rest = line.strip_prefix("graph ").ok_or_else(bad)?;
    let rest = rest.strip_suffix('{').ok_or_else(bad)?.trim_end();
    let (name, rest) = rest.split_once('(').ok_or_else(bad)?;
    let (ins, rest) = rest.split_once(") -> (").ok_or_else(bad)?;
    let (outs, rest) = rest.split_once(')').ok_or_else(bad)?;
    let updates = match rest.trim() {
        "" => vec![],
        u => u
            .strip_prefix("updates {")
            .and_then(|u| u.strip_suffix('}'))
            .ok_or_else(bad)?
            .split(", ")
            .map(str::to_string)
            .collect(),
    };
    let typed = |list: &str| -> Parsed<Vec<(String, Type)>> {
        if list.is_empty() {
            return Ok(vec![]);
        }
        list.split(", ")
            .map(|item| {
                let (n, t) = item
                    .split_once(": ")
                    .ok_or_else(|| format!("expected `NAME: TYPE`, found {item}"))?;
                Ok((n.to_string(), parse_type(t)?))
            })
            .collect()
    };
    Ok(Signature {
        name: name.to_string(),
        inputs: typed(ins)?
            .into_iter()
            .map(|(name, ty)| InputDecl { name, ty })
            .collect(),
        outputs: typed(outs)?,
        updates,
    })
}

/// `f32[3,1,64]`.
pub fn parse_type(text: &str) -> Parsed<Type> {
    let (d, dims) = text
        .strip_suffix(']')
        .and_then(|t| t.split_once('['))
        .ok_or_else(|| format!("expected a type such as f32[3,64], found {text}"))?;
    Ok(Type {
        dtype: parse_dtype(d)?,
        shape: list(dims)?,
    })
}

fn parse_dtype(text: &str) -> Parsed<DType> {
    [DType::F32, DType::F16, DType::I32, DType::I8, DType::Bool]
        .into_iter()
        .chain(DType::QUANTIZED)
        .find(|d| d.to_string() == text)
        .ok_or_else(|| format!("unknown dtype {text}"))
}

/// `1,2,3` (the inside of `[...]`).
fn list<T: std::str::FromStr>(text: &str) -> Parsed<Vec<T>> {
    if text.is_empty() {
        return Ok(vec![]);
    }
    text.split(',')
        .map(|x| {
            x.parse()
                .map_err(|_| format!("expected a number, found {x}"))
        })
        .collect()
}

fn number<T: std::str::FromStr>(what: &str, text: &str) -> Parsed<T> {
    text.parse()
        .map_err(|_| format!("{what}: expected a number, found {text}"))
}

/// The state role a lowered program gives the variable called `name`.
fn role_of(name: &str) -> Parsed<StateRole> {
    let fixed = [
        ("pos", StateRole::Pos),
        ("limit", StateRole::Limit),
        ("done", StateRole::Done),
        ("token", StateRole::Token),
        ("temperature", StateRole::Temperature),
        ("top_k", StateRole::TopK),
        ("top_p", StateRole::TopP),
        ("uniform", StateRole::Uniform),
    ];
    if let Some((_, r)) = fixed.iter().find(|(n, _)| *n == name) {
        return Ok(*r);
    }
    let parts = [
        ("k", CachePart::Keys),
        ("v", CachePart::Values),
        ("k_scale", CachePart::KeyScales),
        ("v_scale", CachePart::ValueScales),
        ("slot_pos", CachePart::SlotPositions),
        ("score", CachePart::Scores),
    ];
    name.rsplit_once('.')
        .and_then(|(p, l)| {
            let part = parts.iter().find(|(n, _)| *n == p)?.1;
            Some(StateRole::Cache {
                layer: l.parse().ok()?,
                part,
            })
        })
        .ok_or_else(|| {
            format!(
                "unknown state variable {name}: expected pos, limit, done, token, temperature, \
                 top_k, top_p, uniform or a cache part (k.L, v.L, k_scale.L, v_scale.L, \
                 slot_pos.L, score.L)"
            )
        })
}

/// One node's operands: `%N` positionally, `key=value` by name.
struct Operands<'a> {
    positional: Vec<&'a str>,
    named: Vec<(&'a str, &'a str)>,
    used: usize,
}

impl<'a> Operands<'a> {
    fn new(text: &'a str) -> Self {
        let mut o = Operands {
            positional: vec![],
            named: vec![],
            used: 0,
        };
        for item in text.split(", ").filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some((k, v)) => o.named.push((k, v)),
                None => o.positional.push(item),
            }
        }
        o
    }

    fn count(&self) -> usize {
        self.positional.len() + self.named.len()
    }

    fn at(&mut self, i: usize) -> Parsed<&'a str> {
        self.used += 1;
        self.positional
            .get(i)
            .copied()
            .ok_or_else(|| format!("expected operand {}", i + 1))
    }

    fn key(&mut self, k: &str) -> Parsed<&'a str> {
        self.used += 1;
        self.named
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| *v)
            .ok_or_else(|| format!("expected {k}=..."))
    }
}

impl Module {
    fn value(&self, text: &str) -> Parsed<ValueId> {
        let n: u32 = text
            .strip_prefix('%')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("expected a value %N, found {text}"))?;
        if n as usize >= self.graph.nodes.len() {
            return Err(format!("%{n} is used before it is defined"));
        }
        Ok(ValueId(n))
    }

    /// The state variable `name`, declared with type `ty` on first use.
    fn state_id(&mut self, name: &str, ty: &Type) -> Parsed<StateId> {
        if let Some(i) = self.state.iter().position(|s| s.name == name) {
            return Ok(StateId(i as u32));
        }
        let init = match ty.dtype {
            DType::I32 => Scalar::I32(0),
            DType::Bool => Scalar::Bool(false),
            _ => Scalar::F32(0.0),
        };
        self.state.push(StateDecl {
            name: name.to_string(),
            ty: ty.clone(),
            init,
            doc: String::new(),
            role: role_of(name)?,
        });
        Ok(StateId(self.state.len() as u32 - 1))
    }

    /// `%N: TYPE = OP OPERANDS`.
    fn node(&mut self, line: &str) -> Parsed<()> {
        let bad = || format!("expected `%N: TYPE = OP ...`, `out`, `state` or `}}`, found {line}");
        let (id, rest) = line.split_once(": ").ok_or_else(bad)?;
        let (ty, rest) = rest.split_once(" = ").ok_or_else(bad)?;
        let want = format!("%{}", self.graph.nodes.len());
        if id != want {
            return Err(format!(
                "expected {want} (values are numbered in order), found {id}"
            ));
        }
        let ty = parse_type(ty)?;
        let (name, operands) = rest.split_once(' ').unwrap_or((rest, ""));
        let op = self.op(name, operands, &ty)?;
        let decls = Decls {
            inputs: &self.graph.inputs,
            params: &self.params,
            state: &self.state,
        };
        let inferred = infer_type(&op, &self.graph.nodes, &decls)
            .map_err(|e| format!("{id} ({name}): {e}"))?;
        if inferred != ty {
            return Err(format!(
                "{id} ({name}): written {ty}, its typing rule gives {inferred}"
            ));
        }
        self.graph.nodes.push(Node { op, ty });
        Ok(())
    }

    fn op(&mut self, name: &str, operands: &str, ty: &Type) -> Parsed<Op> {
        let binary = [
            BinaryOp::Add,
            BinaryOp::Sub,
            BinaryOp::Mul,
            BinaryOp::Min,
            BinaryOp::Max,
            BinaryOp::Div,
            BinaryOp::Eq,
            BinaryOp::Lt,
            BinaryOp::Le,
            BinaryOp::And,
            BinaryOp::Or,
        ];
        // Ops that name a table entry rather than take values.
        match name {
            "input" => {
                let i = self
                    .graph
                    .inputs
                    .iter()
                    .position(|d| d.name == operands)
                    .ok_or_else(|| format!("no input named {operands} in the signature"))?;
                return Ok(Op::Input(InputId(i as u32)));
            }
            "param" => {
                let i = match self.params.iter().position(|p| p.name == operands) {
                    Some(i) => i,
                    None => {
                        self.params.push(ParamDecl {
                            name: operands.to_string(),
                            ty: ty.clone(),
                        });
                        self.params.len() - 1
                    }
                };
                return Ok(Op::Param(ParamId(i as u32)));
            }
            "state" => return Ok(Op::State(self.state_id(operands, ty)?)),
            "const" => {
                let value = match ty.dtype {
                    DType::F32 => Scalar::F32(number("const", operands)?),
                    DType::I32 => Scalar::I32(number("const", operands)?),
                    DType::Bool => Scalar::Bool(number("const", operands)?),
                    d => return Err(format!("a constant is f32, i32 or bool, found {d}")),
                };
                return Ok(Op::Const {
                    value,
                    shape: ty.shape.clone(),
                });
            }
            _ => {}
        }
        let mut o = Operands::new(operands);
        let v = |m: &Module, o: &mut Operands, i: usize| m.value(o.at(i)?);
        let k = |m: &Module, o: &mut Operands, key: &str| m.value(o.key(key)?);
        let op = match name {
            "iota" => Op::Iota {
                shape: ty.shape.clone(),
                dim: number("dim", o.key("dim")?)?,
            },
            "embed" => Op::Embed {
                table: v(self, &mut o, 0)?,
                ids: v(self, &mut o, 1)?,
            },
            "linear" => Op::Linear {
                x: v(self, &mut o, 0)?,
                w: v(self, &mut o, 1)?,
            },
            "rms_norm" => Op::RmsNorm {
                x: v(self, &mut o, 0)?,
                w: v(self, &mut o, 1)?,
                eps: number("eps", o.key("eps")?)?,
            },
            "rope" => Op::Rope {
                x: v(self, &mut o, 0)?,
                pos: k(self, &mut o, "pos")?,
                theta: number("theta", o.key("theta")?)?,
            },
            "attention" => Op::Attention {
                q: v(self, &mut o, 0)?,
                k: v(self, &mut o, 1)?,
                v: v(self, &mut o, 2)?,
                mask: k(self, &mut o, "mask")?,
                scale: number("scale", o.key("scale")?)?,
            },
            "kv_write" => Op::KvWrite {
                cache: v(self, &mut o, 0)?,
                new: v(self, &mut o, 1)?,
                start: k(self, &mut o, "start")?,
                len: k(self, &mut o, "len")?,
            },
            "silu" => Op::Silu {
                x: v(self, &mut o, 0)?,
            },
            "gelu" => Op::Gelu {
                x: v(self, &mut o, 0)?,
            },
            "not" => Op::Not {
                x: v(self, &mut o, 0)?,
            },
            "argmax" => Op::Argmax {
                x: v(self, &mut o, 0)?,
            },
            "sum" => Op::Sum {
                x: v(self, &mut o, 0)?,
            },
            "abs_max" => Op::AbsMax {
                x: v(self, &mut o, 0)?,
            },
            "is_in" => Op::IsIn {
                x: v(self, &mut o, 0)?,
                values: bracketed(o.key("values")?)?,
            },
            "select" => Op::Select {
                cond: v(self, &mut o, 0)?,
                a: v(self, &mut o, 1)?,
                b: v(self, &mut o, 2)?,
            },
            "cast" => Op::Cast {
                x: v(self, &mut o, 0)?,
                dtype: ty.dtype,
            },
            "reshape" => Op::Reshape {
                x: v(self, &mut o, 0)?,
                shape: ty.shape.clone(),
            },
            "permute" => Op::Permute {
                x: v(self, &mut o, 0)?,
                perm: bracketed(o.key("perm")?)?,
            },
            "take_row" => Op::TakeRow {
                x: v(self, &mut o, 0)?,
                index: v(self, &mut o, 1)?,
            },
            "sample" => Op::Sample {
                logits: v(self, &mut o, 0)?,
                temperature: k(self, &mut o, "temperature")?,
                top_k: k(self, &mut o, "top_k")?,
                top_p: k(self, &mut o, "top_p")?,
                uniform: k(self, &mut o, "uniform")?,
            },
            "attention_probs" => Op::AttentionProbs {
                q: v(self, &mut o, 0)?,
                k: v(self, &mut o, 1)?,
                mask: k(self, &mut o, "mask")?,
                scale: number("scale", o.key("scale")?)?,
            },
            "attention_values" => Op::AttentionValues {
                probs: v(self, &mut o, 0)?,
                v: v(self, &mut o, 1)?,
            },
            "attention_mass" => Op::AttentionMass {
                probs: v(self, &mut o, 0)?,
                weight: k(self, &mut o, "weight")?,
                kv_heads: number("kv_heads", o.key("kv_heads")?)?,
            },
            "gather" => Op::Gather {
                x: v(self, &mut o, 0)?,
                index: v(self, &mut o, 1)?,
            },
            "top_k" => Op::TopK {
                x: v(self, &mut o, 0)?,
                tiebreak: k(self, &mut o, "tiebreak")?,
                k: number("k", o.key("k")?)?,
            },
            "hash" => Op::Hash {
                a: v(self, &mut o, 0)?,
                b: v(self, &mut o, 1)?,
                seed: number("seed", o.key("seed")?)?,
            },
            "quantize" => Op::Quantize {
                x: v(self, &mut o, 0)?,
                scale: k(self, &mut o, "scale")?,
            },
            other => match binary.into_iter().find(|b| b.name() == other) {
                Some(op) => Op::Binary {
                    op,
                    a: v(self, &mut o, 0)?,
                    b: v(self, &mut o, 1)?,
                },
                None => return Err(format!("unknown op {other}")),
            },
        };
        if o.used != o.count() {
            return Err(format!(
                "{name} takes {} operands, found {}: {operands}",
                o.used,
                o.count()
            ));
        }
        Ok(op)
    }

    fn check_signature(&self, sig: &Signature) -> Parsed<()> {
        let g = &self.graph;
        let outs: Vec<(String, Type)> = g
            .outputs
            .iter()
            .map(|o| (o.name.clone(), g.ty(o.value).clone()))
            .collect();
        if outs != sig.outputs {
            return Err(format!(
                "the signature's outputs differ from the `out` lines ({})",
                outs.iter()
                    .map(|(n, t)| format!("{n}: {t}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let updated: Vec<&str> = g
            .updates
            .iter()
            .map(|u| self.state[u.state.0 as usize].name.as_str())
            .collect();
        if updated != sig.updates {
            return Err(format!(
                "the signature updates {{{}}}, the `state` lines {{{}}}",
                sig.updates.join(", "),
                updated.join(", ")
            ));
        }
        Ok(())
    }
}

/// `[1,2,3]`.
fn bracketed<T: std::str::FromStr>(text: &str) -> Parsed<Vec<T>> {
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or_else(|| format!("expected [..], found {text}"))?;
    list(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = "
; a comment
graph g(x: f32[2,4]) -> (y: f32[2,4]) updates {pos} {
  %0: f32[2,4] = input x
  %1: f32[2,4] = silu %0
  %2: f32[2,4] = add %0, %1
  %3: i32[2] = state pos
  %4: i32[1] = const 1
  %5: i32[2] = add %3, %4
  out y = %2
  state pos <- %5
}
";

    #[test]
    fn a_graph_reads_back_as_it_prints() {
        let m = parse_graph(SMALL).unwrap();
        assert_eq!(m.graph.nodes.len(), 6);
        assert_eq!(m.state[0].role, StateRole::Pos);
        let printed = m.display().to_string();
        let body: Vec<&str> = SMALL
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with(';'))
            .collect();
        assert_eq!(printed.lines().collect::<Vec<_>>(), body);
        assert_eq!(parse_graph(&printed).unwrap(), m);
    }

    #[test]
    fn errors_name_the_line_and_what_was_expected() {
        let cases = [
            (
                "  %1: f32[2,4] = silu %0",
                "  %1: f32[2,8] = silu %0",
                "line 5: %1 (silu): written f32[2,8], its typing rule gives f32[2,4]",
            ),
            (
                "  %1: f32[2,4] = silu %0",
                "  %2: f32[2,4] = silu %0",
                "line 5: expected %1 (values are numbered in order), found %2",
            ),
            (
                "  %1: f32[2,4] = silu %0",
                "  %1: f32[2,4] = silu %7",
                "line 5: %7 is used before it is defined",
            ),
            (
                "  %1: f32[2,4] = silu %0",
                "  %1: f32[2,4] = swish %0",
                "line 5: unknown op swish",
            ),
            (
                "  %1: f32[2,4] = silu %0",
                "  %1: f32[2,4] = silu %0, %0",
                "line 5: silu takes 1 operands, found 2: %0, %0",
            ),
            (
                "  %3: i32[2] = state pos",
                "  %3: i32[2] = state position",
                "line 7: unknown state variable position: expected pos, limit, done, token, temperature, top_k, top_p, uniform or a cache part (k.L, v.L, k_scale.L, v_scale.L, slot_pos.L, score.L)",
            ),
            (
                "  out y = %2",
                "  out z = %2",
                "line 3: the signature's outputs differ from the `out` lines (z: f32[2,4])",
            ),
            ("}\n", "", "line 11: expected `}` to close the graph"),
        ];
        for (from, to, want) in cases {
            let text = SMALL.replacen(from, to, 1);
            assert_eq!(parse_graph(&text).unwrap_err().to_string(), want, "{to}");
        }
    }
}
