//! Lowering: a model spec becomes a [`Program`] with exactly two graphs.
//!
//! The family file (one per architecture, [`crate::family`]: `llama.rs`, `qwen2.rs`,
//! `gemma3.rs`) builds the transformer's blocks; `decoder.rs` is the prefill/decode skeleton they share; this
//! file owns the control state that lives on the device and the per-row rules for
//! positions, stop limits and done flags.
//!
//! Control state, all `[B]` (each with its [`StateRole`]):
//! - `pos` I32: tokens of the row in the cache = position of the next token to write;
//! - `limit` I32: the row is done once `pos >= limit` (host sets prompt + max_new - 1);
//! - `done` Bool: the row emits no more tokens (initially true: an idle row);
//! - `token` I32: the row's last emitted token, the input of the next decode step.
//!
//! Prefill (inputs `tokens [B,T]`, `len [B]`, `limit [B]`) appends `len[b]` tokens at
//! `pos[b]`, so running it again continues a prompt (chunked prefill). Decode (no inputs)
//! feeds `token` at `pos` for every row that is not done. Neither graph reads a host
//! scalar, and no shape depends on data.

pub(crate) mod decoder;

use crate::family::{gemma3, llama, qwen2};

use crate::ir::{
    BinaryOp, BuildError, DType, GraphBuilder, InputDecl, Op, Program, Scalar, StateDecl,
    StateRole, Type, ValueId,
};
use crate::spec::{Arch, ModelSpec, Sampler};

/// The storage type a weights file has for each parameter, by checkpoint name (what a
/// `Native` weight dtype compiles to: quantized blocks, f16 or f32).
pub type WeightTypes = std::collections::BTreeMap<String, DType>;

/// Lowers a validated spec into an (unverified) program; `types` gives the weight
/// storage for `weight_dtype: Native`.
pub fn lower(spec: &ModelSpec, types: &WeightTypes) -> Result<Program, BuildError> {
    match &spec.arch {
        Arch::Llama(c) => decoder::lower(spec, types, &llama::Llama { c, qkv_bias: false }),
        Arch::Qwen2(c) => decoder::lower(spec, types, &qwen2::family(c)),
        Arch::Gemma3(c) => decoder::lower(spec, types, &gemma3::Gemma3 { c }),
    }
}

/// Names of the control state variables: how the lowering reads them and how the text
/// form shows them. The runtime and the verifier find them by [`StateRole`].
pub mod names {
    /// Position of the next token per row.
    pub const POS: &str = "pos";
    /// Stop position per row.
    pub const LIMIT: &str = "limit";
    /// Done flag per row.
    pub const DONE: &str = "done";
    /// Last emitted token per row.
    pub const TOKEN: &str = "token";
    /// Sampling temperature per row (sampler `Sample` only).
    pub const TEMPERATURE: &str = "temperature";
    /// Top-k cut per row (sampler `Sample` only).
    pub const TOP_K: &str = "top_k";
    /// Top-p cut per row (sampler `Sample` only).
    pub const TOP_P: &str = "top_p";
    /// Uniform draw per row and position (sampler `Sample` only).
    pub const UNIFORM: &str = "uniform";
}

/// The control state every program carries (plus the sampler's settings).
/// `context` is the longest row (positions `0..context`).
pub(crate) fn control_state(batch: u32, context: u32, sampler: Sampler) -> Vec<StateDecl> {
    let i32b = Type::new(DType::I32, [batch]);
    let f32b = Type::new(DType::F32, [batch]);
    let sampling = match sampler {
        Sampler::Greedy => vec![],
        Sampler::Sample => vec![
            StateDecl {
                name: names::TEMPERATURE.into(),
                ty: f32b.clone(),
                init: Scalar::F32(0.0),
                doc: "softmax temperature per row; <= 0 is greedy".into(),
                role: StateRole::Temperature,
            },
            StateDecl {
                name: names::TOP_K.into(),
                ty: i32b.clone(),
                init: Scalar::I32(0),
                doc: "keep the k most likely tokens; 0 keeps all".into(),
                role: StateRole::TopK,
            },
            StateDecl {
                name: names::TOP_P.into(),
                ty: f32b,
                init: Scalar::F32(1.0),
                doc: "keep the most likely tokens up to this mass".into(),
                role: StateRole::TopP,
            },
            StateDecl {
                name: names::UNIFORM.into(),
                ty: Type::new(DType::F32, [batch, context]),
                init: Scalar::F32(0.0),
                doc: "uniform draw for the token at position p + 1, from the seed".into(),
                role: StateRole::Uniform,
            },
        ],
    };
    let mut state = vec![
        StateDecl {
            name: names::POS.into(),
            ty: i32b.clone(),
            init: Scalar::I32(0),
            doc: "tokens in the cache per row = position of the next token".into(),
            role: StateRole::Pos,
        },
        StateDecl {
            name: names::LIMIT.into(),
            ty: i32b.clone(),
            init: Scalar::I32(0),
            doc: "a row is done once pos >= limit".into(),
            role: StateRole::Limit,
        },
        StateDecl {
            name: names::DONE.into(),
            ty: Type::new(DType::Bool, [batch]),
            init: Scalar::Bool(true),
            doc: "row emits no more tokens".into(),
            role: StateRole::Done,
        },
        StateDecl {
            name: names::TOKEN.into(),
            ty: i32b,
            init: Scalar::I32(0),
            doc: "last emitted token per row; the next decode input".into(),
            role: StateRole::Token,
        },
    ];
    state.extend(sampling);
    state
}

/// Chooses each row's next token from `logits [B, V]`; `pos_after [B]` is the position
/// the new token will occupy (it selects the row's uniform draw).
pub(crate) fn pick_token(
    g: &mut GraphBuilder<'_>,
    sampler: Sampler,
    logits: ValueId,
    pos_after: ValueId,
) -> Result<ValueId, BuildError> {
    match sampler {
        Sampler::Greedy => g.push(Op::Argmax { x: logits }),
        Sampler::Sample => {
            let temperature = g.state(names::TEMPERATURE)?;
            let top_k = g.state(names::TOP_K)?;
            let top_p = g.state(names::TOP_P)?;
            let stream = g.state(names::UNIFORM)?;
            let shape = g.ty(stream).shape.clone();
            let stream = g.reshape(stream, &[shape[0], shape[1], 1])?;
            // The new token's position is 1..=S; its draw is `uniform[b, position - 1]`.
            let one = g.constant(Scalar::I32(1), &[shape[0]])?;
            let index = g.binary(BinaryOp::Sub, pos_after, one)?;
            let u = g.push(Op::TakeRow { x: stream, index })?;
            let uniform = g.reshape(u, &[shape[0]])?;
            g.push(Op::Sample {
                logits,
                temperature,
                top_k,
                top_p,
                uniform,
            })
        }
    }
}

/// Inputs of the prefill graph.
pub(crate) fn prefill_inputs(batch: u32, width: u32) -> Vec<InputDecl> {
    vec![
        InputDecl {
            name: "tokens".into(),
            ty: Type::new(DType::I32, [batch, width]),
        },
        InputDecl {
            name: "len".into(),
            ty: Type::new(DType::I32, [batch]),
        },
        InputDecl {
            name: "limit".into(),
            ty: Type::new(DType::I32, [batch]),
        },
        InputDecl {
            name: "restart".into(),
            ty: Type::new(DType::Bool, [batch]),
        },
    ]
}

/// `true` where `token` is one of the stop tokens (one membership op however many).
fn is_stop(g: &mut GraphBuilder<'_>, token: ValueId, stops: &[u32]) -> Result<ValueId, BuildError> {
    let values = stops.iter().map(|&s| s as i32).collect();
    g.push(Op::IsIn { x: token, values })
}

/// `pos >= limit || pos >= context || token is a stop token`.
fn reached_end(
    g: &mut GraphBuilder<'_>,
    pos: ValueId,
    limit: ValueId,
    token: ValueId,
    context: u32,
    stops: &[u32],
) -> Result<ValueId, BuildError> {
    let shape = g.ty(pos).shape.clone();
    let at_limit = g.binary(BinaryOp::Le, limit, pos)?;
    let cap = g.constant(Scalar::I32(context as i32), &shape)?;
    let full = g.binary(BinaryOp::Le, cap, pos)?;
    let stop = is_stop(g, token, stops)?;
    let end = g.binary(BinaryOp::Or, at_limit, full)?;
    g.binary(BinaryOp::Or, end, stop)
}

/// Prefill's control epilogue: given the chunk's `len`, `limit`, the position after the
/// chunk (`pos_after = start + len`) and the chosen token of each row's last real
/// position, updates `pos`, `limit`, `token` and `done`.
/// Rows with `len = 0` keep their token, limit and done flag (their logits are not
/// meaningful): a row that is decoding is untouched by a prefill that refills another.
pub(crate) fn prefill_control(
    g: &mut GraphBuilder<'_>,
    pos_after: ValueId,
    len: ValueId,
    limit: ValueId,
    next: ValueId,
    context: u32,
    stops: &[u32],
) -> Result<ValueId, BuildError> {
    let shape = g.ty(len).shape.clone();
    let zero = g.constant(Scalar::I32(0), &shape)?;
    let has_tokens = g.binary(BinaryOp::Lt, zero, len)?;
    let old = g.state(names::TOKEN)?;
    let token = g.select(has_tokens, next, old)?;
    let old_limit = g.state(names::LIMIT)?;
    let limit = g.select(has_tokens, limit, old_limit)?;
    let end = reached_end(g, pos_after, limit, token, context, stops)?;
    let old_done = g.state(names::DONE)?;
    let done = g.select(has_tokens, end, old_done)?;
    g.update(names::POS, pos_after)?;
    g.update(names::LIMIT, limit)?;
    g.update(names::TOKEN, token)?;
    g.update(names::DONE, done)?;
    Ok(token)
}

/// Decode's control epilogue: active rows take the new token and advance; a row becomes
/// done when it emits a stop token or reaches its limit or the context end. `pos_after` is
/// `pos + 1` for active rows and `pos` for the others.
/// Returns `(token, done)` after the step.
pub(crate) fn decode_control(
    g: &mut GraphBuilder<'_>,
    active: ValueId,
    pos_after: ValueId,
    next: ValueId,
    context: u32,
    stops: &[u32],
) -> Result<(ValueId, ValueId), BuildError> {
    let old = g.state(names::TOKEN)?;
    let done = g.state(names::DONE)?;
    let limit = g.state(names::LIMIT)?;
    let token = g.push(Op::Select {
        cond: active,
        a: next,
        b: old,
    })?;
    let end = reached_end(g, pos_after, limit, token, context, stops)?;
    let finished = g.binary(BinaryOp::And, active, end)?;
    let done = g.binary(BinaryOp::Or, done, finished)?;
    g.update(names::POS, pos_after)?;
    g.update(names::TOKEN, token)?;
    g.update(names::DONE, done)?;
    Ok((token, done))
}
