//! Shares attention probabilities: every `attention q, k, v, mask, scale` whose graph also
//! computes `attention_probs q, k, mask, scale` (the same `q`, `k`, `mask` and a
//! bit-identical scale) becomes `attention_values probs, v` reading those probabilities.
//!
//! Why: a scored KV policy (H2O, TOVA, SnapKV) needs the softmax of `q·kᵀ` for its
//! `attention_mass` as well as the attention output, so the lowered graph computes it
//! twice per layer. After this pass `softmax(q·kᵀ)` runs once per layer and the executor
//! runs the graph as written: it no longer pairs an `attention` with an `attention_mass`
//! itself. Runs after `cse`, which makes equal operands the same value.
//!
//! Lowering emits the probabilities after the attention (the policy scores the slots once
//! the output is known), so the pass also reorders: a probabilities node moves to just
//! before the first attention that reads it (its operands are that attention's, so they
//! are defined there) and every use, output and state update is renumbered. Nodes keep
//! their relative order otherwise, so the result is still a valid schedule.

use std::collections::BTreeMap;

use crate::ir::{Graph, Node, Op, ValueId};

/// What identifies the probabilities of an attention: q, k, mask and the scale's bits.
type Key = (ValueId, ValueId, ValueId, u32);

pub(super) fn run(g: &mut Graph) {
    // The first probabilities node of each key.
    let mut probs: BTreeMap<Key, usize> = BTreeMap::new();
    for (i, n) in g.nodes.iter().enumerate() {
        if let Op::AttentionProbs { q, k, mask, scale } = n.op {
            probs.entry((q, k, mask, scale.to_bits())).or_insert(i);
        }
    }
    if probs.is_empty() {
        return;
    }
    // For each attention that has probabilities: which node it reads. A probabilities node
    // defined after its first reader moves to just before it (`moved_to[attention]`).
    let mut reads: BTreeMap<usize, usize> = BTreeMap::new();
    let mut moved_to: BTreeMap<usize, usize> = BTreeMap::new();
    let mut moved = vec![false; g.nodes.len()];
    for (i, n) in g.nodes.iter().enumerate() {
        if let Op::Attention {
            q, k, mask, scale, ..
        } = n.op
            && let Some(&p) = probs.get(&(q, k, mask, scale.to_bits()))
        {
            reads.insert(i, p);
            if p > i && !moved[p] {
                moved[p] = true;
                moved_to.insert(i, p);
            }
        }
    }
    if reads.is_empty() {
        return;
    }
    let old = std::mem::take(&mut g.nodes);
    let mut remap = vec![ValueId(u32::MAX); old.len()];
    let mut nodes: Vec<Node> = Vec::with_capacity(old.len());
    // Appends old node `i` (as `n`), its arguments renumbered.
    fn emit(i: usize, n: &Node, nodes: &mut Vec<Node>, remap: &mut [ValueId]) {
        let mut n = n.clone();
        n.op.map_args(|a| remap[a.0 as usize]);
        remap[i] = ValueId(nodes.len() as u32);
        nodes.push(n);
    }
    for (i, n) in old.iter().enumerate() {
        if moved[i] {
            continue;
        }
        if let Some(&p) = moved_to.get(&i) {
            emit(p, &old[p], &mut nodes, &mut remap);
        }
        match (&n.op, reads.get(&i)) {
            (Op::Attention { v, .. }, Some(&p)) => {
                let rewritten = Node {
                    op: Op::AttentionValues {
                        probs: ValueId(p as u32),
                        v: *v,
                    },
                    ty: n.ty.clone(),
                };
                emit(i, &rewritten, &mut nodes, &mut remap);
            }
            _ => emit(i, n, &mut nodes, &mut remap),
        }
    }
    g.nodes = nodes;
    for o in &mut g.outputs {
        o.value = remap[o.value.0 as usize];
    }
    for u in &mut g.updates {
        u.value = remap[u.value.0 as usize];
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::ir::{
        BinaryOp, DType, Decls, Graph, InputDecl, InputId, Node, Op, Output, Program, Scalar, Type,
        ValueId, infer_type,
    };
    use crate::spec::{KvPolicy, Overrides};

    fn tiny(kv: KvPolicy) -> Program {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-llama.ron");
        let o = Overrides {
            kv: Some(kv),
            cache_len: Some(64),
            ..Overrides::default()
        };
        crate::compile_file(&path, &o).unwrap_or_else(|e| panic!("{kv}: {e}"))
    }

    fn count(g: &Graph, name: &str) -> usize {
        g.nodes.iter().filter(|n| n.op.name() == name).count()
    }

    #[test]
    fn scored_policies_compute_the_softmax_once_per_layer() {
        let scored = [
            KvPolicy::H2o {
                budget: 16,
                recent: 4,
            },
            KvPolicy::Tova { budget: 16 },
            KvPolicy::SnapKv {
                budget: 16,
                window: 4,
                pool: 3,
            },
        ];
        for kv in scored {
            let p = tiny(kv);
            let layers = p.interface().expect("verified").layers.len();
            assert_eq!(layers, 2, "tiny-llama has two layers");
            for g in p.graphs() {
                let at = format!("{kv} {}", g.name);
                assert_eq!(count(g, "attention"), 0, "{at}");
                assert_eq!(count(g, "attention_probs"), layers, "{at}");
                assert_eq!(count(g, "attention_values"), layers, "{at}");
                assert_eq!(count(g, "attention_mass"), layers, "{at}");
                // Each attention_values reads the probabilities defined just before it.
                for (i, n) in g.nodes.iter().enumerate() {
                    if let Op::AttentionValues { probs, .. } = n.op {
                        assert_eq!(probs.0 as usize, i - 1, "{at} %{i}");
                    }
                }
            }
        }
    }

    #[test]
    fn unscored_policies_keep_their_attention() {
        for kv in [KvPolicy::Dense, KvPolicy::Window { size: 16 }] {
            let p = tiny(kv);
            for g in p.graphs() {
                assert_eq!(count(g, "attention"), 2, "{kv} {}", g.name);
                assert_eq!(count(g, "attention_probs"), 0, "{kv} {}", g.name);
                assert_eq!(count(g, "attention_values"), 0, "{kv} {}", g.name);
            }
        }
    }

    /// A graph with two attentions over the same q, k and mask (one with another scale)
    /// and the probabilities defined after both.
    fn hand_built() -> Graph {
        let f32t = |s: &[u32]| Type::new(DType::F32, s);
        let node = |op, ty| Node { op, ty };
        let mut g = Graph::new(
            "decode",
            vec![InputDecl {
                name: "x".into(),
                ty: f32t(&[1, 2, 1, 4]),
            }],
        );
        g.nodes = vec![
            // %0 q = k = v, %1 mask, %2 weight
            node(Op::Input(InputId(0)), f32t(&[1, 2, 1, 4])),
            node(
                Op::Const {
                    value: Scalar::Bool(true),
                    shape: vec![1, 1, 1, 1],
                },
                Type::new(DType::Bool, [1, 1, 1, 1]),
            ),
            node(
                Op::Const {
                    value: Scalar::F32(1.0),
                    shape: vec![1, 1],
                },
                f32t(&[1, 1]),
            ),
            // %3: shared with %6; %4: another scale, kept.
            node(
                Op::Attention {
                    q: ValueId(0),
                    k: ValueId(0),
                    v: ValueId(0),
                    mask: ValueId(1),
                    scale: 0.5,
                },
                f32t(&[1, 2, 1, 4]),
            ),
            node(
                Op::Attention {
                    q: ValueId(0),
                    k: ValueId(0),
                    v: ValueId(0),
                    mask: ValueId(1),
                    scale: 0.25,
                },
                f32t(&[1, 2, 1, 4]),
            ),
            node(
                Op::Binary {
                    op: BinaryOp::Add,
                    a: ValueId(3),
                    b: ValueId(4),
                },
                f32t(&[1, 2, 1, 4]),
            ),
            node(
                Op::AttentionProbs {
                    q: ValueId(0),
                    k: ValueId(0),
                    mask: ValueId(1),
                    scale: 0.5,
                },
                f32t(&[1, 2, 1, 1]),
            ),
            node(
                Op::AttentionMass {
                    probs: ValueId(6),
                    weight: ValueId(2),
                    kv_heads: 2,
                },
                f32t(&[1, 2, 1]),
            ),
        ];
        g.outputs = vec![
            Output {
                name: "sum".into(),
                value: ValueId(5),
            },
            Output {
                name: "mass".into(),
                value: ValueId(7),
            },
        ];
        g
    }

    #[test]
    fn probabilities_move_before_the_attention_they_replace() {
        let mut g = hand_built();
        super::run(&mut g);
        let ops: Vec<Op> = g.nodes.iter().map(|n| n.op.clone()).collect();
        assert_eq!(ops.len(), 8);
        assert_eq!(
            ops[3],
            Op::AttentionProbs {
                q: ValueId(0),
                k: ValueId(0),
                mask: ValueId(1),
                scale: 0.5,
            }
        );
        assert_eq!(
            ops[4],
            Op::AttentionValues {
                probs: ValueId(3),
                v: ValueId(0),
            }
        );
        assert!(matches!(ops[5], Op::Attention { scale: 0.25, .. }));
        assert_eq!(
            ops[6],
            Op::Binary {
                op: BinaryOp::Add,
                a: ValueId(4),
                b: ValueId(5),
            }
        );
        assert_eq!(
            ops[7],
            Op::AttentionMass {
                probs: ValueId(3),
                weight: ValueId(2),
                kv_heads: 2,
            }
        );
        assert_eq!(g.nodes[3].ty.shape, [1, 2, 1, 1]);
        assert_eq!(g.nodes[4].ty.shape, [1, 2, 1, 4]);
        let outs: Vec<u32> = g.outputs.iter().map(|o| o.value.0).collect();
        assert_eq!(outs, [6, 7]);
        // Every node still has the type its typing rule gives, from the nodes before it.
        let decls = Decls {
            inputs: &g.inputs,
            params: &[],
            state: &[],
        };
        for (i, n) in g.nodes.iter().enumerate() {
            assert_eq!(
                infer_type(&n.op, &g.nodes[..i], &decls),
                Ok(n.ty.clone()),
                "%{i}"
            );
        }
        // Running it again changes nothing.
        let once = g.clone();
        super::run(&mut g);
        assert_eq!(g, once);
    }
}
