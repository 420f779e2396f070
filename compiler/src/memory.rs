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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// Parameters in the compute dtype.
    pub weights: u64,
    /// KV cache state of every layer (role [`StateRole::Cache`]): keys, values, their
    /// int8 scales, and a budgeted policy's slot table and scores.
    pub kv_cache: u64,
    /// `kv_cache` by cache policy, in order of first layer: the layers compiled with
    /// each policy (a sliding-window layer has its own) and their bytes.
    pub kv_by_policy: Vec<KvGroup>,
    /// Control state: every other role (positions, limits, flags, tokens, sampling).
    pub control: u64,
    /// Peak live activations while prefill runs.
    pub prefill_activations: u64,
    /// Peak live activations while decode runs.
    pub decode_activations: u64,
}

/// The layers that share one cache policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvGroup {
    /// The policy in its command-line form (`dense`, `window:512`, ...).
    pub policy: String,
    /// Its layers, ascending.
    pub layers: Vec<u32>,
    /// Bytes of their cache state.
    pub bytes: u64,
}

impl MemoryPlan {
    /// Computes the plan of a verified program.
    pub fn of(p: &Program) -> MemoryPlan {
        let weights = p.params.iter().map(|x| x.ty.size_bytes()).sum();
        let (mut kv_cache, mut control) = (0, 0);
        let mut kv_by_policy: Vec<KvGroup> = vec![];
        for (l, policy) in p.config.layer_kv.iter().enumerate() {
            let policy = policy.to_string();
            match kv_by_policy.iter_mut().find(|g| g.policy == policy) {
                Some(g) => g.layers.push(l as u32),
                None => kv_by_policy.push(KvGroup {
                    policy,
                    layers: vec![l as u32],
                    bytes: 0,
                }),
            }
        }
        for s in &p.state {
            match s.role {
                StateRole::Cache { layer, .. } => {
                    kv_cache += s.ty.size_bytes();
                    if let Some(g) = kv_by_policy.iter_mut().find(|g| g.layers.contains(&layer)) {
                        g.bytes += s.ty.size_bytes();
                    }
                }
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
            kv_by_policy,
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

/// `0-4, 6-10, 11` style list of ascending layer indices.
fn ranges(layers: &[u32]) -> String {
    let mut out: Vec<String> = vec![];
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            layers[i].to_string()
        } else {
            format!("{}-{}", layers[i], layers[j])
        });
        i = j + 1;
    }
    out.join(", ")
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
        for g in &self.kv_by_policy {
            let n = g.layers.len();
            let layers = if n == 1 { "layer" } else { "layers" };
            writeln!(
                f,
                "    {:<18} {}  ({n} {layers}: {})",
                g.policy,
                human(g.bytes),
                ranges(&g.layers)
            )?;
        }
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
