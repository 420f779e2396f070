//! Common-subexpression elimination: structurally identical nodes (same op, same
//! arguments after renumbering, same type) collapse into the first one. Every op is pure
//! (state is read at graph entry and written at exit), so this is always sound.

use std::collections::BTreeMap;

use crate::ir::{Graph, Node, ValueId};

pub(super) fn run(g: &mut Graph) {
    let mut remap: Vec<ValueId> = Vec::with_capacity(g.nodes.len());
    let mut seen: BTreeMap<String, ValueId> = BTreeMap::new();
    let mut nodes: Vec<Node> = Vec::with_capacity(g.nodes.len());
    for n in g.nodes.drain(..) {
        let mut op = n.op;
        op.map_args(|a| remap[a.0 as usize]);
        let key = format!("{op:?}|{:?}", n.ty);
        let id = *seen.entry(key).or_insert_with(|| {
            nodes.push(Node { op, ty: n.ty });
            ValueId(nodes.len() as u32 - 1)
        });
        remap.push(id);
    }
    g.nodes = nodes;
    for o in &mut g.outputs {
        o.value = remap[o.value.0 as usize];
    }
    for u in &mut g.updates {
        u.value = remap[u.value.0 as usize];
    }
}
