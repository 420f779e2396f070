//! Builds a graph node by node, typing each node as it is added.

use super::typing::{Decls, infer_type};
use super::{
    BinaryOp, DType, Graph, InputDecl, InputId, Node, Op, Output, ParamDecl, ParamId, Scalar,
    StateDecl, StateId, StateUpdate, Type, ValueId,
};

/// A node that could not be built: names the graph, the node and what was expected.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{graph} %{node} ({op}): {message}")]
pub struct BuildError {
    /// Graph being built.
    pub graph: String,
    /// Index the node would have had.
    pub node: u32,
    /// Op name.
    pub op: String,
    /// Expected vs found.
    pub message: String,
}

/// Appends typed nodes to a graph; every node's shape is checked on insertion.
/// Each input and state variable is read by at most one node (the verifier checks it):
/// repeated reads return the first one.
pub struct GraphBuilder<'a> {
    graph: Graph,
    params: &'a [ParamDecl],
    state: &'a [StateDecl],
    reads: std::collections::BTreeMap<String, ValueId>,
}

impl<'a> GraphBuilder<'a> {
    /// Starts a graph with the given inputs over a program's parameter and state tables.
    pub fn new(
        name: &str,
        inputs: Vec<InputDecl>,
        params: &'a [ParamDecl],
        state: &'a [StateDecl],
    ) -> Self {
        GraphBuilder {
            graph: Graph::new(name, inputs),
            params,
            state,
            reads: Default::default(),
        }
    }

    fn err(&self, op: &str, message: String) -> BuildError {
        BuildError {
            graph: self.graph.name.clone(),
            node: self.graph.nodes.len() as u32,
            op: op.to_string(),
            message,
        }
    }

    /// Adds a node, typing it against the nodes already present.
    pub fn push(&mut self, op: Op) -> Result<ValueId, BuildError> {
        let decls = Decls {
            inputs: &self.graph.inputs,
            params: self.params,
            state: self.state,
        };
        let ty = infer_type(&op, &self.graph.nodes, &decls).map_err(|m| self.err(op.name(), m))?;
        let id = ValueId(self.graph.nodes.len() as u32);
        self.graph.nodes.push(Node { op, ty });
        Ok(id)
    }

    /// The type of a value already built.
    pub fn ty(&self, v: ValueId) -> &Type {
        self.graph.ty(v)
    }

    /// Reads the graph input called `name`.
    pub fn input(&mut self, name: &str) -> Result<ValueId, BuildError> {
        let i = self.graph.inputs.iter().position(|d| d.name == name);
        let i = i.ok_or_else(|| self.err("input", format!("no input named {name}")))?;
        self.read(format!("input {name}"), Op::Input(InputId(i as u32)))
    }

    fn read(&mut self, key: String, op: Op) -> Result<ValueId, BuildError> {
        if let Some(&v) = self.reads.get(&key) {
            return Ok(v);
        }
        let v = self.push(op)?;
        self.reads.insert(key, v);
        Ok(v)
    }

    /// Reads the parameter called `name`.
    pub fn param(&mut self, name: &str) -> Result<ValueId, BuildError> {
        let i = self.params.iter().position(|d| d.name == name);
        let i = i.ok_or_else(|| self.err("param", format!("no parameter named {name}")))?;
        self.push(Op::Param(ParamId(i as u32)))
    }

    fn state_id(&self, name: &str) -> Result<StateId, BuildError> {
        let i = self.state.iter().position(|d| d.name == name);
        let i = i.ok_or_else(|| self.err("state", format!("no state variable named {name}")))?;
        Ok(StateId(i as u32))
    }

    /// Reads the state variable called `name`.
    pub fn state(&mut self, name: &str) -> Result<ValueId, BuildError> {
        let id = self.state_id(name)?;
        self.read(format!("state {name}"), Op::State(id))
    }

    /// Writes `v` back to the state variable `name` when the graph finishes.
    pub fn update(&mut self, name: &str, v: ValueId) -> Result<(), BuildError> {
        let id = self.state_id(name)?;
        let want = &self.state[id.0 as usize].ty;
        if self.graph.ty(v) != want {
            let msg = format!("state {name} expects {want}, found {}", self.graph.ty(v));
            return Err(self.err("update", msg));
        }
        self.graph.updates.push(StateUpdate {
            state: id,
            value: v,
        });
        Ok(())
    }

    /// Returns `v` to the host as output `name`.
    pub fn output(&mut self, name: &str, v: ValueId) {
        self.graph.outputs.push(Output {
            name: name.to_string(),
            value: v,
        });
    }

    /// A constant tensor.
    pub fn constant(&mut self, value: Scalar, shape: &[u32]) -> Result<ValueId, BuildError> {
        self.push(Op::Const {
            value,
            shape: shape.to_vec(),
        })
    }

    /// A binary element-wise op.
    pub fn binary(&mut self, op: BinaryOp, a: ValueId, b: ValueId) -> Result<ValueId, BuildError> {
        self.push(Op::Binary { op, a, b })
    }

    /// `x` with a new shape.
    pub fn reshape(&mut self, x: ValueId, shape: &[u32]) -> Result<ValueId, BuildError> {
        self.push(Op::Reshape {
            x,
            shape: shape.to_vec(),
        })
    }

    /// `x` with its dims reordered.
    pub fn permute(&mut self, x: ValueId, perm: &[u32]) -> Result<ValueId, BuildError> {
        self.push(Op::Permute {
            x,
            perm: perm.to_vec(),
        })
    }

    /// `cond ? a : b` element-wise.
    pub fn select(&mut self, cond: ValueId, a: ValueId, b: ValueId) -> Result<ValueId, BuildError> {
        self.push(Op::Select { cond, a, b })
    }

    /// `x` converted to `dtype`.
    pub fn cast(&mut self, x: ValueId, dtype: DType) -> Result<ValueId, BuildError> {
        self.push(Op::Cast { x, dtype })
    }

    /// The finished graph.
    pub fn finish(self) -> Graph {
        self.graph
    }
}
