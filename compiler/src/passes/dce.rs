//! Dead-code elimination: drops nodes that no output or state update depends on, and
//! renumbers the rest in their original order.

use crate::ir::{Graph, ValueId};

pub(super) fn run(g: &mut Graph) {
    let mut live = vec![false; g.nodes.len()];
    for v in g
        .outputs
        .iter()
        .map(|o| o.value)
        .chain(g.updates.iter().map(|u| u.value))
    {
        live[v.0 as usize] = true;
    }
    for i in (0..g.nodes.len()).rev() {
        if live[i] {
            for a in g.nodes[i].op.args() {
                live[a.0 as usize] = true;
            }
        }
    }
    let mut remap = vec![ValueId(u32::MAX); g.nodes.len()];
    let mut kept = Vec::with_capacity(g.nodes.len());
    for (i, mut n) in std::mem::take(&mut g.nodes).into_iter().enumerate() {
        if live[i] {
            n.op.map_args(|a| remap[a.0 as usize]);
            remap[i] = ValueId(kept.len() as u32);
            kept.push(n);
        }
    }
    g.nodes = kept;
    for o in &mut g.outputs {
        o.value = remap[o.value.0 as usize];
    }
    for u in &mut g.updates {
        u.value = remap[u.value.0 as usize];
    }
}
