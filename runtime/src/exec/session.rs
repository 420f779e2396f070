//! A session: one program, its weights and its device state; prefill a batch of prompts,
//! then decode steps until every row is done.
//!
//! The host decides only what it already knows before the first step (prompt lengths and
//! token budgets, uploaded once per chunk as device tensors). A decode step reads nothing
//! from the host; after it the host reads back the `[B]` token and done vectors to stream
//! text and to see whether every row has finished. The session finds its control state
//! and caches through the program's typed state table ([`Program::interface`]).
//!
//! With capture on (the default on CUDA), the first decode step of a batch is recorded
//! with `burn::tensor::capture` and later steps replay it: one hardware-graph launch per
//! token on backends that support it, a plain re-run elsewhere. The state keeps its
//! buffers across runs (see [`super::plan`]), and the warm-up runs `capture` makes are
//! undone by restoring the decode-updated state from a copy taken just before, so they
//! do not advance any row.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use burn::tensor::{Tensor, TensorData};
use kvc_compiler::ir::{DType, Interface, Program, StateId};

use super::executor::{Executor, State, Which};
use super::kernels::KernelSet;
use super::value::{Value, pad4};
use crate::blocks::QuantLayout;
use crate::load::weights::HostTensor;
use crate::{Backend, RuntimeError, device};

pub use super::memory::{available_memory, check_memory, resident_plan};
pub use super::request::{
    Completion, Finish, Refill, Request, Sampling, check_request, uniform_draw,
};

/// Binds weights to the program's parameter table by name, checking every shape.
/// On Flex all dense parameters share one huge-page-backed allocation
/// ([`super::arena`]). Quantized matrices stay GGUF blocks in host memory
/// ([`Value::Q`]): the CPU kernels read them as they are, and an executor of any other
/// kernel set (every backend but Flex) dequantizes them once when it is made.
pub fn bind_params(
    program: &Program,
    weights: &mut BTreeMap<String, HostTensor>,
    backend: Backend,
) -> Result<Vec<Value>, RuntimeError> {
    use super::arena::{self, Storage};
    let device = &device(backend)?;
    // Dense parameters with their index in the table; quantized ones already bound.
    let mut items = Vec::with_capacity(program.params.len());
    let mut bound: Vec<Option<Value>> = vec![None; program.params.len()];
    for (i, decl) in program.params.iter().enumerate() {
        let expected: Vec<usize> = decl.ty.shape.iter().map(|&d| d as usize).collect();
        let t = weights
            .get_mut(&decl.name)
            .ok_or_else(|| RuntimeError::MissingParam {
                name: decl.name.clone(),
                expected: decl.ty.to_string(),
            })?;
        if t.shape != expected {
            return Err(RuntimeError::ParamShape {
                name: decl.name.clone(),
                expected,
                found: t.shape.clone(),
            });
        }
        if let Some(q) = t.quant.take() {
            bound[i] = Some(Value::Q(q));
            continue;
        }
        let data = std::mem::take(&mut t.data);
        let storage = match decl.ty.dtype {
            kvc_compiler::ir::DType::F16 => Storage::F16,
            _ => Storage::F32,
        };
        items.push((i, (data, pad4(&decl.ty.shape), storage)));
    }
    let (index, items): (Vec<usize>, Vec<_>) = items.into_iter().unzip();
    let dense: Vec<Value> = match backend == Backend::Flex {
        true => match arena::tensors(items) {
            Ok(tensors) => tensors.into_iter().map(Value::F).collect(),
            Err(items) => upload(items, device),
        },
        false => upload(items, device),
    };
    for (i, v) in index.into_iter().zip(dense) {
        bound[i] = Some(v);
    }
    Ok(bound
        .into_iter()
        .map(|v| v.expect("every parameter is bound"))
        .collect())
}

/// Dense parameters as ordinary device tensors.
fn upload(
    items: Vec<(Vec<f32>, [usize; 4], super::arena::Storage)>,
    device: &burn::tensor::Device,
) -> Vec<Value> {
    use super::arena::Storage;
    items
        .into_iter()
        .map(|(data, shape, storage)| {
            let t = Tensor::<4>::from_data(TensorData::new(data, shape), device);
            Value::F(match storage {
                Storage::F16 => t.cast(burn::tensor::FloatDType::F16),
                Storage::F32 => t,
            })
        })
        .collect()
}

/// How a session runs its graphs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionOptions {
    /// The kernel set of the plans.
    pub kernels: KernelSet,
    /// Record the decode step once per batch and replay it ([`burn::tensor::capture`]).
    pub capture: bool,
    /// Most bytes the compiled memory plan may need; `None`: on the CPU backend, the
    /// memory the system reports available ([`available_memory`]), elsewhere no limit.
    /// Checked before anything is allocated.
    pub max_memory: Option<u64>,
    /// Skip padding where the kernel set can (the CPU set): the kernels compute only each
    /// row's real tokens, so a refill of one row costs that row's tokens and a decode step
    /// its rows that are not done. Off, every padding position is computed; real tokens'
    /// results are the same bit for bit either way.
    pub skip_padding: bool,
}

impl SessionOptions {
    /// What a backend runs by default: its kernel set, and capture where a hardware graph
    /// can replay a step (CUDA).
    pub fn for_backend(backend: Backend) -> SessionOptions {
        SessionOptions {
            kernels: KernelSet::for_backend(backend),
            capture: backend.replays_graphs(),
            max_memory: None,
            skip_padding: true,
        }
    }

    /// The layout a session of `program` keeps its block matrices in: the kernel set's
    /// choice ([`KernelSet::weight_layout`]) for the program's batch.
    pub fn weight_layout(&self, program: &Program) -> QuantLayout {
        self.kernels.weight_layout(program.config.batch as usize)
    }
}

/// One row's chunk of a prefill run.
struct Piece<'a> {
    row: usize,
    request: &'a Request,
    /// Prompt tokens the row's cache holds already.
    kept: usize,
    /// Which chunk of `T` tokens after them.
    chunk: usize,
}

/// One row's part of a chunked refill ([`Session::refill_chunk`]).
#[derive(Clone, Copy, Debug)]
pub struct RefillChunk<'a> {
    /// The row, its request and seed.
    pub refill: Refill<'a>,
    /// Prompt tokens the row's cache holds already: positions `0..kept` were written by
    /// the prefill of an earlier prompt that began with the same tokens (the caller's
    /// bookkeeping), so the refill starts after them. 0 restarts the row; more needs a
    /// dense cache in every layer ([`Session::keeps_every_position`]) and leaves at least
    /// one token to prefill.
    pub kept: usize,
    /// Which chunk of `T` tokens of the prompt after the kept ones.
    pub chunk: usize,
}

/// The recorded decode step.
type DecodeStep = burn::tensor::Graph<Vec<Value>, Box<dyn FnMut() -> Vec<Value>>>;

/// A loaded program with its device state.
pub struct Session {
    backend: Backend,
    exec: Arc<Executor>,
    state: Arc<Mutex<State>>,
    iface: Interface,
    seed: u64,
    /// Each row's sampling settings and seed as last uploaded (host mirror of the
    /// sampler state, so that a refill rewrites one row without reading the others).
    row_sampling: Vec<(Sampling, u64)>,
    capture: bool,
    /// The options the session was made with.
    options: SessionOptions,
    /// The captured decode step of the current batch (dropped before its state is).
    decode_step: Option<DecodeStep>,
}

/// What one graph run returned, read back to the host.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// Token of each row after the run (`state token`).
    pub tokens: Vec<u32>,
    /// Done flag of each row after the run.
    pub done: Vec<bool>,
}

impl Session {
    /// A session over a verified program and its bound parameters, with the backend's
    /// default options.
    pub fn new(
        program: Program,
        params: Vec<Value>,
        backend: Backend,
    ) -> Result<Session, RuntimeError> {
        Session::with_options(
            program,
            params,
            backend,
            SessionOptions::for_backend(backend),
        )
    }

    /// A session with chosen options (e.g. the portable kernels on Flex, to test them).
    pub fn with_options(
        program: Program,
        params: Vec<Value>,
        backend: Backend,
        options: SessionOptions,
    ) -> Result<Session, RuntimeError> {
        if !options.kernels.supports(backend) {
            return Err(RuntimeError::Unsupported(format!(
                "the {} kernels do not run on {backend:?}",
                options.kernels.name()
            )));
        }
        // KV storage the backend cannot hold: (dtype, held, why not).
        for (dtype, held, why) in [
            (
                DType::I8,
                backend.has_i8(),
                "has no 8-bit integer tensors (WGSL has no i8)",
            ),
            (
                DType::F16,
                backend.has_f16(),
                "does not run f16 tensors in kvc",
            ),
        ] {
            if !held && let Some(s) = program.state.iter().find(|s| s.ty.dtype == dtype) {
                return Err(RuntimeError::Unsupported(format!(
                    "state {} is {dtype} (--kv-storage {dtype}), and {backend:?} {why}; \
                     use --kv-storage f32",
                    s.name
                )));
            }
        }
        // The parameters are bound (resident) by now; the state is allocated next.
        check_memory(&program, backend, &options, true)?;
        let iface = program.interface().ok_or_else(|| {
            RuntimeError::Internal("the program's state table has no valid interface".into())
        })?;
        let device = device(backend)?;
        let state = State::new(&program, &device);
        let rows = program.config.batch as usize;
        let exec = Executor::new(program, params, device, options.kernels)?;
        exec.set_skip_padding(options.skip_padding);
        Ok(Session {
            backend,
            exec: Arc::new(exec),
            state: Arc::new(Mutex::new(state)),
            iface,
            seed: 0,
            row_sampling: vec![(Sampling::default(), 0); rows],
            capture: options.capture,
            options,
            decode_step: None,
        })
    }

    /// A session over another program of the same model (another policy, batch or width)
    /// that shares this session's parameters instead of loading them again: only its own
    /// state is allocated. The two parameter tables must be equal.
    pub fn with_program(&self, program: Program) -> Result<Session, RuntimeError> {
        let mine = &self.program().params;
        if program.params.len() != mine.len()
            || program
                .params
                .iter()
                .zip(mine)
                .any(|(a, b)| a.name != b.name || a.ty != b.ty)
        {
            return Err(RuntimeError::Request(format!(
                "program {} does not have the parameter table of {} (another model or \
                 weight storage)",
                program.spec.name,
                self.program().spec.name
            )));
        }
        Session::with_options(
            program,
            self.exec.params().to_vec(),
            self.backend,
            self.options,
        )
    }

    /// The backend the session runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The kernel set the session's plans use.
    pub fn kernel_set(&self) -> KernelSet {
        self.exec.kernel_set()
    }

    /// The text form of both graphs' execution plans (`kvc inspect --plan`): each step's
    /// kernel, which arguments it moves, and how each state update gets back.
    pub fn plan_text(&self) -> String {
        let p = self.program();
        let set = self.kernel_set();
        format!(
            "{}\n{}",
            self.exec.plan(Which::Prefill).text(p, &p.prefill, set),
            self.exec.plan(Which::Decode).text(p, &p.decode, set)
        )
    }

    /// Device→host reads so far (a decode step makes two: its token and done vectors).
    pub fn host_reads(&self) -> u64 {
        self.exec.host_reads()
    }

    /// Prints the per-op times since the last report under `phase` when `KVC_PROFILE` is
    /// set ([`Executor::report_profile`]).
    pub fn report_profile(&self, phase: &str) {
        self.exec.report_profile(phase)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("state lock")
    }

    /// The compiled program.
    pub fn program(&self) -> &Program {
        self.exec.program()
    }

    /// Rows per batch (`B`).
    pub fn batch(&self) -> usize {
        self.program().config.batch as usize
    }

    /// Sets the seed of the sampler's uniform stream for the next batches.
    pub fn set_seed(&mut self, seed: u64) {
        self.seed = seed;
    }

    /// Uploads each row's sampling settings and the uniform stream (once per batch).
    fn upload_sampling(&mut self, reqs: &[Request]) -> Result<(), RuntimeError> {
        let rows: Vec<(usize, Sampling, u64)> = (0..self.batch())
            .map(|i| {
                let sp = reqs.get(i).map(|r| r.sampling).unwrap_or_default();
                (i, sp, self.seed)
            })
            .collect();
        self.upload_rows(&rows)
    }

    /// Sets the sampling settings and seed of the given rows, keeps the others', and
    /// uploads the sampler state. Greedy programs have none (and refuse random settings).
    fn upload_rows(&mut self, rows: &[(usize, Sampling, u64)]) -> Result<(), RuntimeError> {
        let c = self.program().config.clone();
        if c.sampler == kvc_compiler::spec::Sampler::Greedy {
            if rows.iter().any(|r| r.1.is_random()) {
                return Err(RuntimeError::Request(
                    "this program was compiled with the greedy sampler; compile with sampler Sample \
                     (kvc run does so when --temperature > 0)"
                        .into(),
                ));
            }
            return Ok(());
        }
        let Some(ids) = self.iface.sampling else {
            return Err(RuntimeError::Internal(
                "a sampling program without sampler state".into(),
            ));
        };
        for &(i, sp, seed) in rows {
            self.row_sampling[i] = (sp, seed);
        }
        let s = c.cache_len as usize;
        let mirror = &self.row_sampling;
        let device = self.exec.device().clone();
        let temperature = mirror.iter().map(|r| r.0.temperature).collect();
        let top_k = mirror
            .iter()
            .map(|r| r.0.top_k.min(i32::MAX as u32) as i32)
            .collect();
        let top_p = mirror.iter().map(|r| r.0.top_p).collect();
        let uniform = mirror
            .iter()
            .flat_map(|r| (0..s).map(|p| uniform_draw(r.1, p as u64)))
            .collect();
        // The state is written in place (a recorded decode step reads the same buffers),
        // but the sampler's path changes with the all-greedy flag: record again then.
        let all_greedy = mirror.iter().all(|r| !r.0.is_random());
        if self.exec.set_all_greedy(all_greedy) != all_greedy {
            self.decode_step = None;
        }
        let mut state = self.state();
        state.write(
            ids.temperature,
            Value::from_f32(temperature, &[c.batch], &device),
        );
        state.write(ids.top_k, Value::from_i32(top_k, &[c.batch], &device));
        state.write(ids.top_p, Value::from_f32(top_p, &[c.batch], &device));
        state.write(
            ids.uniform,
            Value::from_f32(uniform, &[c.batch, c.cache_len], &device),
        );
        Ok(())
    }

    /// The positions held by layer `layer`'s cache slots, `[B, kv_heads, N]` row-major
    /// (−1 = free), for a budgeted KV policy; `None` for the dense cache (slot =
    /// position).
    pub fn slot_positions(&self, layer: u32) -> Result<Option<Vec<i32>>, RuntimeError> {
        let id = self
            .iface
            .layers
            .get(layer as usize)
            .and_then(|l| l.slot_positions);
        match id {
            None => Ok(None),
            Some(id) => Ok(Some(self.exec.read_i32(self.state().get(id))?)),
        }
    }

    /// Returns every state variable to its initial value (a new batch).
    pub fn reset(&mut self) {
        // The recorded step reads the old buffers: it goes first.
        self.decode_step = None;
        // Free the old caches before allocating: both sets resident at once would double
        // the KV memory at every new batch.
        let mut state = self.state();
        state.clear();
        *state = State::new(self.exec.program(), self.exec.device());
    }

    fn check(&self, reqs: &[Request]) -> Result<(), RuntimeError> {
        let c = &self.program().config;
        if reqs.len() > self.batch() {
            return Err(RuntimeError::Request(format!(
                "{} prompts do not fit the compiled batch of {} rows (compile with --batch {})",
                reqs.len(),
                c.batch,
                reqs.len()
            )));
        }
        for (i, r) in reqs.iter().enumerate() {
            self.check_request(r)
                .map_err(|e| RuntimeError::Request(format!("prompt {i}: {e}")))?;
        }
        Ok(())
    }

    /// Whether one request fits the compiled shapes; the message names what does not.
    pub fn check_request(&self, r: &Request) -> Result<(), String> {
        check_request(&self.program().config, r)
    }

    /// Prefills up to `B` prompts as one padded batch (in chunks of `T` tokens), starting
    /// from a fresh state. Rows beyond `reqs.len()` stay idle. Returns, per request, the
    /// logits at its last prompt position when `want_logits` is set.
    pub fn prefill(
        &mut self,
        reqs: &[Request],
        want_logits: bool,
    ) -> Result<(StepOutput, Vec<Vec<f32>>), RuntimeError> {
        self.check(reqs)?;
        self.reset();
        self.upload_sampling(reqs)?;
        let rows: Vec<(usize, &Request)> = reqs.iter().enumerate().collect();
        self.run_prefill(&rows, want_logits)
    }

    /// Continuous batching: prefills new prompts into the given rows of the running
    /// batch, through the same prefill graph, while every other row keeps its cache,
    /// position, policy state and sampling settings bit for bit (they pass `len = 0`).
    /// Each refilled row restarts at position 0 with a fresh policy state and samples
    /// with its own seed. A row may be refilled whether or not it is done (cancelling
    /// a request is refilling its row). Returns the control state after the prefill:
    /// a refilled row's token is its first generated token.
    pub fn refill(&mut self, rows: &[Refill<'_>]) -> Result<StepOutput, RuntimeError> {
        self.check_refills(rows.iter().map(|r| (r, 0, 0)), None)?;
        self.upload_refills(rows.iter())?;
        let rows: Vec<(usize, &Request)> = rows.iter().map(|r| (r.row, r.request)).collect();
        Ok(self.run_prefill(&rows, false)?.0)
    }

    /// [`Session::refill`] one chunk at a time, so that decode steps of the other rows can
    /// run between a long prompt's chunks, and optionally after a prefix the row's cache
    /// already holds: prefills one chunk of `T` tokens of each given row's prompt (after
    /// its [`RefillChunk::kept`] tokens) in one run of the prefill graph. Chunk 0 restarts
    /// the row at position `kept` and uploads its sampling settings; until its last chunk
    /// the row is parked (done: decode steps leave it as it is) and its token means
    /// nothing. After its last chunk a row is where [`Session::refill`] leaves it, bit for
    /// bit (with `kept > 0`: as a refill of the whole prompt, whose prefix the row's cache
    /// held), and its token is its first generated one. Rows not given are untouched.
    pub fn refill_chunk(&mut self, rows: &[RefillChunk<'_>]) -> Result<StepOutput, RuntimeError> {
        // Each row's position, read once when a prefix is kept: checked, then moved.
        let pos = if rows.iter().any(|r| r.kept > 0) {
            Some(self.positions()?)
        } else {
            None
        };
        let checked = rows.iter().map(|r| (&r.refill, r.kept, r.chunk));
        self.check_refills(checked, pos.as_deref())?;
        self.upload_refills(rows.iter().filter(|r| r.chunk == 0).map(|r| &r.refill))?;
        let resumed: Vec<(usize, usize)> = rows
            .iter()
            .filter(|r| r.chunk == 0 && r.kept > 0)
            .map(|r| (r.refill.row, r.kept))
            .collect();
        if let Some(mut pos) = pos.filter(|_| !resumed.is_empty()) {
            // The row continues after its kept prefix: its position is the prefix's end
            // (no restart), and the prefill writes from there.
            for &(row, kept) in &resumed {
                pos[row] = kept as i32;
            }
            let device = self.exec.device().clone();
            let b = self.program().config.batch;
            self.state()
                .write(self.iface.pos, Value::from_i32(pos, &[b], &device));
        }
        let pieces: Vec<Piece<'_>> = rows
            .iter()
            .map(|r| Piece {
                row: r.refill.row,
                request: r.refill.request,
                kept: r.kept,
                chunk: r.chunk,
            })
            .collect();
        self.run_chunk(&pieces);
        self.read_control()
    }

    /// Whether every layer's cache keeps every position (dense, no budget or sliding
    /// window: no slot table), so that a row's cache still holds its whole prompt after
    /// generating, as a kept prefix ([`RefillChunk::kept`]) needs.
    pub fn keeps_every_position(&self) -> bool {
        self.iface.layers.iter().all(|l| l.slot_positions.is_none())
    }

    /// Chunks of `T` tokens a prompt of `tokens` takes (at least one).
    pub fn chunks(&self, tokens: usize) -> usize {
        tokens
            .div_ceil(self.program().config.prefill_len as usize)
            .max(1)
    }

    /// The prompt tokens that chunk `chunk` of a refill prefills, for a prompt of
    /// `tokens` whose first `kept` the row's cache holds ([`RefillChunk`]).
    pub fn chunk_tokens(&self, tokens: usize, kept: usize, chunk: usize) -> Range<usize> {
        let t = self.program().config.prefill_len as usize;
        (kept + chunk * t).min(tokens)..(kept + (chunk + 1) * t).min(tokens)
    }

    /// Checks refills (with the prompt tokens each keeps and the chunk it prefills): rows
    /// in the batch, each once, the request fitting the shapes, a kept prefix only with
    /// the dense cache, within the row's cache (`pos`, each row's position, given when a
    /// prefix is kept) and short of the whole prompt, the chunk within the rest of the
    /// prompt.
    fn check_refills<'r, 'a: 'r>(
        &self,
        rows: impl Iterator<Item = (&'r Refill<'a>, usize, usize)>,
        pos: Option<&[i32]>,
    ) -> Result<(), RuntimeError> {
        let b = self.batch();
        let mut seen = vec![false; b];
        for (r, kept, chunk) in rows {
            if r.row >= b {
                return Err(RuntimeError::Request(format!(
                    "row {} is outside the compiled batch of {b} rows",
                    r.row
                )));
            }
            if std::mem::replace(&mut seen[r.row], true) {
                return Err(RuntimeError::Request(format!(
                    "row {} is refilled twice in one call",
                    r.row
                )));
            }
            self.check_request(r.request)
                .map_err(|e| RuntimeError::Request(format!("row {}: {e}", r.row)))?;
            if kept > 0 {
                if !self.keeps_every_position() {
                    return Err(RuntimeError::Request(format!(
                        "row {}: a kept prefix needs a dense cache in every layer; this \
                         program keeps a budget or a sliding window of slots (--kv {})",
                        r.row,
                        self.program().config.kv
                    )));
                }
                let held = pos.map_or(0, |p| p[r.row].max(0) as usize);
                if kept >= r.request.prompt.len() || kept > held {
                    return Err(RuntimeError::Request(format!(
                        "row {}: a kept prefix of {kept} tokens, for a prompt of {} tokens in \
                         a row whose cache holds {held} (at least one prompt token must be \
                         prefilled)",
                        r.row,
                        r.request.prompt.len()
                    )));
                }
            }
            let chunks = self.chunks(r.request.prompt.len() - kept);
            if chunk >= chunks {
                return Err(RuntimeError::Request(format!(
                    "row {}: chunk {chunk} of a prompt of {chunks} chunks",
                    r.row
                )));
            }
        }
        Ok(())
    }

    /// Uploads the sampling settings and seeds of rows being refilled.
    fn upload_refills<'r, 'a: 'r>(
        &mut self,
        rows: impl Iterator<Item = &'r Refill<'a>>,
    ) -> Result<(), RuntimeError> {
        let settings: Vec<(usize, Sampling, u64)> =
            rows.map(|r| (r.row, r.request.sampling, r.seed)).collect();
        self.upload_rows(&settings)
    }

    /// Prefills `rows` (row index, request) in chunks of `T`, restarting each at position
    /// 0; other rows pass `len = 0`. Returns the control state and, with `want_logits`,
    /// the logits at each given row's last prompt position (in the order of `rows`).
    fn run_prefill(
        &mut self,
        rows: &[(usize, &Request)],
        want_logits: bool,
    ) -> Result<(StepOutput, Vec<Vec<f32>>), RuntimeError> {
        let longest = rows.iter().map(|r| r.1.prompt.len()).max().unwrap_or(0);
        let chunks = self.chunks(longest);
        let v = self.program().config.vocab_size as usize;
        let mut last_logits = vec![Vec::new(); rows.len()];
        for chunk in 0..chunks {
            // Every given row is in the first run (it restarts there, even when empty).
            let pieces: Vec<Piece<'_>> = rows
                .iter()
                .filter(|(_, r)| chunk < self.chunks(r.prompt.len()))
                .map(|&(row, request)| Piece {
                    row,
                    request,
                    kept: 0,
                    chunk,
                })
                .collect();
            let out = self.run_chunk(&pieces);
            if want_logits {
                let finishing: Vec<usize> = (0..rows.len())
                    .filter(|&k| self.chunks(rows[k].1.prompt.len()) == chunk + 1)
                    .collect();
                if !finishing.is_empty() {
                    let all = self.exec.read_f32(&out[0])?;
                    for k in finishing {
                        let i = rows[k].0;
                        last_logits[k] = all[i * v..(i + 1) * v].to_vec();
                    }
                }
            }
        }
        Ok((self.read_control()?, last_logits))
    }

    /// One run of the prefill graph over one chunk of each piece's prompt; rows without a
    /// piece pass `len = 0`. A piece's first chunk restarts its row; a row whose prompt
    /// goes on after this chunk gets the chunk's end as its limit, so the graph marks it
    /// done until its next chunk. Returns the graph's outputs.
    fn run_chunk(&mut self, pieces: &[Piece<'_>]) -> Vec<Value> {
        let c = self.program().config.clone();
        let (b, t) = (c.batch as usize, c.prefill_len as usize);
        let mut tokens = vec![0i32; b * t];
        let mut len = vec![0i32; b];
        // Rows not prefilled keep their limit (the graph selects per row).
        let mut limit = vec![0i32; b];
        let mut restart = vec![0i32; b];
        for p in pieces {
            let (i, prompt) = (p.row, &p.request.prompt);
            let Range {
                start: from,
                end: to,
            } = self.chunk_tokens(prompt.len(), p.kept, p.chunk);
            for (j, &id) in prompt[from..to].iter().enumerate() {
                tokens[i * t + j] = id as i32;
            }
            len[i] = (to - from) as i32;
            restart[i] = (p.chunk == 0 && p.kept == 0) as i32;
            // `check_request` bounded prompt + max_new - 1 by the cache length, an i32.
            limit[i] = match to < prompt.len() {
                true => to as i32,
                false => (prompt.len() + p.request.max_new_tokens - 1) as i32,
            };
        }
        let device = self.exec.device().clone();
        let inputs = vec![
            Value::from_i32(tokens, &[c.batch, c.prefill_len], &device),
            Value::from_i32(len, &[c.batch], &device),
            Value::from_i32(limit, &[c.batch], &device),
            Value::from_bool(restart, &[c.batch], &device),
        ];
        self.exec.run(Which::Prefill, inputs, &mut self.state())
    }

    /// Runs one decode step for every row that is not done.
    pub fn step(&mut self) -> Result<StepOutput, RuntimeError> {
        self.run_decode();
        self.read_control()
    }

    /// Runs one decode step and returns the logits of every row (`[B][V]`); empty for a
    /// row that was done before the step (the step leaves it as it is and computes
    /// nothing for it: its logits are padding).
    pub fn step_logits(&mut self) -> Result<(StepOutput, Vec<Vec<f32>>), RuntimeError> {
        let parked = self.exec.read_bool(self.state().get(self.iface.done))?;
        let out = self.run_decode();
        let v = self.program().config.vocab_size as usize;
        let all = self.exec.read_f32(&out[0])?;
        let logits = all
            .chunks(v)
            .zip(parked)
            .map(|(l, parked)| if parked { vec![] } else { l.to_vec() })
            .collect();
        Ok((self.read_control()?, logits))
    }

    /// Teacher forcing: overwrites the token each row feeds to the next decode step and
    /// marks every row active again (a stop token the model predicted does not end a
    /// forced row). A host write outside the replayed step; generation never needs it.
    pub fn force_tokens(&mut self, tokens: &[u32]) -> Result<(), RuntimeError> {
        let c = self.program().config.clone();
        if tokens.len() != c.batch as usize {
            return Err(RuntimeError::Request(format!(
                "expected {} tokens, found {}",
                c.batch,
                tokens.len()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t >= c.vocab_size) {
            return Err(RuntimeError::Request(format!(
                "token id {t} is outside the vocabulary (size {})",
                c.vocab_size
            )));
        }
        // A row may continue only while it has room: below its limit and the cache end.
        let (pos, limit) = (self.positions()?, self.limits()?);
        let done: Vec<i32> = pos
            .iter()
            .zip(&limit)
            .map(|(&p, &l)| i32::from(p >= l || p >= c.cache_len as i32))
            .collect();
        let device = self.exec.device().clone();
        let data = tokens.iter().map(|&t| t as i32).collect();
        let mut state = self.state();
        state.write(self.iface.token, Value::from_i32(data, &[c.batch], &device));
        state.write(self.iface.done, Value::from_bool(done, &[c.batch], &device));
        Ok(())
    }

    /// One decode step: the recorded one when capture is on (recording it first if
    /// this batch has none yet), else a plain run. Returns the graph's outputs.
    fn run_decode(&mut self) -> Vec<Value> {
        if !self.capture {
            return self.exec.run(Which::Decode, vec![], &mut self.state());
        }
        if self.decode_step.is_none() {
            let updated: Vec<StateId> = self
                .program()
                .decode
                .updates
                .iter()
                .map(|u| u.state)
                .collect();
            let saved = self.state().snapshot(&updated);
            let (exec, state) = (Arc::clone(&self.exec), Arc::clone(&self.state));
            let step: Box<dyn FnMut() -> Vec<Value>> = Box::new(move || {
                exec.run(
                    Which::Decode,
                    vec![],
                    &mut state.lock().expect("state lock"),
                )
            });
            let recorded = burn::tensor::capture(self.exec.device(), step);
            // `capture` ran the step (warm-up and recording): undo what it did to the rows.
            self.state().restore(saved);
            self.decode_step = Some(recorded);
        }
        let step = self.decode_step.as_mut().expect("recorded above");
        // SAFETY: the recorded step reads and writes the state's buffers, which keep their
        // identity until `reset` (which drops the recording first), and the executor's
        // parameters and constants, owned by the closure; the output is owned by the
        // recording. Every run and host read is issued from this thread, after the
        // previous one returned.
        unsafe { step.replay() }.clone()
    }

    fn read_control(&self) -> Result<StepOutput, RuntimeError> {
        let state = self.state();
        let tokens = self
            .exec
            .read_i32(state.get(self.iface.token))?
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let done = self.exec.read_bool(state.get(self.iface.done))?;
        Ok(StepOutput { tokens, done })
    }

    /// Positions (tokens in the cache) of every row.
    pub fn positions(&self) -> Result<Vec<i32>, RuntimeError> {
        self.exec.read_i32(self.state().get(self.iface.pos))
    }

    /// State variable `id` read back as one 32-bit word per element, row-major: the bits
    /// of floats (f16 widened to f32, which is exact), integers and bools as `i32`. For
    /// bit-for-bit comparisons of state (e.g. rows a refill must not touch).
    pub fn state_bits(&self, id: StateId) -> Result<Vec<u32>, RuntimeError> {
        let state = self.state();
        let v = state.get(id);
        Ok(match v {
            Value::F(_) => self
                .exec
                .read_f32(v)?
                .into_iter()
                .map(f32::to_bits)
                .collect(),
            Value::I(_) => self
                .exec
                .read_i32(v)?
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            Value::B(_) => self.exec.read_bool(v)?.into_iter().map(u32::from).collect(),
            Value::Q(_) => {
                return Err(RuntimeError::Internal(
                    "a state variable holds quantized blocks".into(),
                ));
            }
        })
    }

    /// Per-row stop positions.
    pub fn limits(&self) -> Result<Vec<i32>, RuntimeError> {
        self.exec.read_i32(self.state().get(self.iface.limit))
    }

    /// The address of every state variable's buffer on Flex, in state-table order: equal
    /// lists before and after runs show that the state was updated in place (what a
    /// captured step needs). `None` off Flex.
    pub fn state_buffers(&self) -> Option<Vec<usize>> {
        let state = self.state();
        let ids = (0..self.program().state.len()).map(|i| StateId(i as u32));
        ids.map(|id| state.get(id).flex_buffer_address()).collect()
    }

    /// Teacher-forces `ids` through row 0: prefill of the first token, then one decode
    /// step per further token. Returns the logits after every position (`[L][V]`).
    pub fn score(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>, RuntimeError> {
        let Some(&first) = ids.first() else {
            return Err(RuntimeError::Request(
                "nothing to score: the text has no tokens".into(),
            ));
        };
        let c = &self.program().config;
        if ids.len() > c.cache_len as usize {
            return Err(RuntimeError::Request(format!(
                "the text is {} tokens, but the cache was compiled for {} positions \
                 (compile with --cache-len {} or more)",
                ids.len(),
                c.cache_len,
                ids.len()
            )));
        }
        let req = Request {
            prompt: vec![first],
            max_new_tokens: ids.len(),
            sampling: Sampling::default(),
        };
        let (_, mut logits) = self.prefill(std::slice::from_ref(&req), true)?;
        let mut forced = vec![0u32; self.batch()];
        for &id in &ids[1..] {
            forced[0] = id;
            self.force_tokens(&forced)?;
            let (_, rows) = self.step_logits()?;
            logits.push(rows.into_iter().next().unwrap_or_default());
        }
        Ok(logits)
    }

    /// Generates completions for up to `B` requests as one batch. `on_token(row, id)` is
    /// called for every generated token as soon as it is known (stop tokens excluded).
    pub fn generate(
        &mut self,
        reqs: &[Request],
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Completion>, RuntimeError> {
        let stops = self.program().config.stop_tokens.clone();
        let (mut out, _) = self.prefill(reqs, false)?;
        let mut done_rows: Vec<Option<Finish>> = vec![None; reqs.len()];
        let mut ids: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
        loop {
            for (i, slot) in done_rows.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let tok = out.tokens[i];
                if stops.contains(&tok) {
                    *slot = Some(Finish::Stop);
                    continue;
                }
                ids[i].push(tok);
                on_token(i, tok);
                // The graph's `done` flag ends a row at its limit; the host count is the
                // same limit, kept in case a graph never raises the flag.
                if out.done[i] || ids[i].len() >= reqs[i].max_new_tokens {
                    *slot = Some(Finish::Length);
                }
            }
            if done_rows.iter().all(Option::is_some) {
                break;
            }
            out = self.step()?;
        }
        Ok(ids
            .into_iter()
            .zip(done_rows)
            .map(|(ids, f)| Completion {
                ids,
                finish: f.unwrap_or(Finish::Length),
            })
            .collect())
    }
}
