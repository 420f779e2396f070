//! The memory plan: bytes of weights, state (KV cache and control, told apart by
//! [`StateRole`]) and peak activations, known before anything runs. Activation peaks come
//! from liveness over the static schedule: a value is live from the node that defines it
//! to its last use (outputs and state updates live to the end). Parameters and state are
//! counted once in their own lines; `kv_write` results update the cache in place and add
//! nothing.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ir::{Graph, Op, Program, StateRole};

/// Bytes a compiled program needs at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// Parameters in the compute dtype.
    pub weights: u64,
    /// KV cache state of every layer (role [`StateRole::Cache`]): keys, values, their
    /// int8 scales, and a budgeted policy's slot table and scores.
    pub kv_cache: u64,
    /// Control state: every other role (positions, limits, flags, tokens, sampling).
    pub control: u64,
    /// Peak live activations while prefill runs.
    pub prefill_activations: u64,
    /// Peak live activations while decode runs.
    pub decode_activations: u64,
}

impl MemoryPlan {
    /// Computes the plan of a verified program.
    pub fn of(p: &Program) -> MemoryPlan {
        let weights = p.params.iter().map(|x| x.ty.size_bytes()).sum();
        let (mut kv_cache, mut control) = (0, 0);
        for s in &p.state {
            match s.role {
                StateRole::Cache { .. } => kv_cache += s.ty.size_bytes(),
                StateRole::Pos
                | StateRole::Limit
                | StateRole::Done
                | StateRole::Token
                | StateRole::Temperature
                | StateRole::TopK
                | StateRole::TopP
                | StateRole::Uniform => control += s.ty.size_bytes(),
            }
        }
        MemoryPlan {
            weights,
            kv_cache,
            control,
            prefill_activations: peak_activations(&p.prefill),
            decode_activations: peak_activations(&p.decode),
        }
    }

    /// Everything resident during the larger of the two graphs.
    pub fn total(&self) -> u64 {
        self.weights
            + self.kv_cache
            + self.control
            + self.prefill_activations.max(self.decode_activations)
    }
}

/// Peak bytes of simultaneously live activations over the graph's schedule.
pub fn peak_activations(g: &Graph) -> u64 {
    let n = g.nodes.len();
    let last_use = g.last_uses();
    // delta[i]: bytes that become live (+) at node i and dead (-) after node i.
    let mut born = vec![0u64; n + 1];
    let mut dies = vec![0u64; n + 1];
    for (i, node) in g.nodes.iter().enumerate() {
        let counted = match node.op {
            Op::Param(_) | Op::State(_) | Op::KvWrite { .. } => false,
            Op::Input(_)
            | Op::Const { .. }
            | Op::Iota { .. }
            | Op::Embed { .. }
            | Op::Linear { .. }
            | Op::RmsNorm { .. }
            | Op::Rope { .. }
            | Op::Attention { .. }
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
            | Op::AttentionProbs { .. }
            | Op::AttentionValues { .. }
            | Op::AttentionMass { .. }
            | Op::Gather { .. }
            | Op::TopK { .. }
            | Op::Sum { .. }
            | Op::Hash { .. }
            | Op::AbsMax { .. }
            | Op::Quantize { .. } => true,
        };
        if counted {
            born[i] += node.ty.size_bytes();
            dies[last_use[i]] += node.ty.size_bytes();
        }
    }
    let (mut live, mut peak) = (0u64, 0u64);
    for i in 0..=n {
        live += born[i];
        peak = peak.max(live);
        live -= dies[i];
    }
    peak
}

fn human(b: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {} ({b} B)", UNITS[u])
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "memory plan:")?;
        writeln!(f, "  weights              {}", human(self.weights))?;
        writeln!(f, "  kv cache             {}", human(self.kv_cache))?;
        writeln!(f, "  control state        {}", human(self.control))?;
        writeln!(
            f,
            "  prefill activations  {}",
            human(self.prefill_activations)
        )?;
        writeln!(
            f,
            "  decode activations   {}",
            human(self.decode_activations)
        )?;
        write!(f, "  total (peak)         {}", human(self.total()))
    }
}
