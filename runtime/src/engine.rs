//! The embedding API: [`Engine::load`] turns a model spec into a running model (weights
//! fetched on first use, tokenizer, chat template, compiled program), and a scheduler
//! thread keeps its batch full by slot refill: a request is prefilled into whichever row
//! is free ([`Session::refill`]) while the other rows go on decoding, and each request's
//! tokens and text stream back as [`Event`]s.
//!
//! ```no_run
//! use kvc_runtime::engine::{Engine, GenerationRequest, Prompt};
//!
//! let engine = Engine::load("models/smollm2-135m.ron")?;
//! let out = engine.generate(GenerationRequest::new(Prompt::Text("The capital of France is".into())))?;
//! println!("{}", out.text);
//! # Ok::<(), kvc_runtime::engine::EngineError>(())
//! ```
//!
//! Scheduling: requests wait in a bounded FIFO queue ([`EngineOptions::queue_capacity`];
//! a full queue refuses with [`EngineError::QueueFull`]). Before every decode step the
//! scheduler drops requests whose receiver went away (a cancelled request or a client
//! that disconnected frees its row at once), gives every free row to a waiting request,
//! and runs one prefill of at most `T` real tokens: the next chunk of the admitted
//! prompts, oldest first (a refill costs its own tokens: the kernels skip padding). A
//! running row therefore waits at most one decode step plus one such prefill between two
//! tokens. A row that finishes is free at the next step. Each row samples with its own
//! settings and seed, so a request generates the same text whatever else shares the
//! batch, and the same text as `kvc run` with that seed.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvc_compiler::ir::CompiledConfig;
use kvc_compiler::spec::{Overrides, Sampler};

use crate::Backend;
use crate::exec::session::{Request, Sampling, Session, SessionOptions, check_request};
use crate::load::fetch::Progress;
use crate::load::tokenizer::{ChatMessage, Tokenizer, TokenizerError};
use crate::model::{LoadError, LoadedModel, compile_spec_file};

mod scheduler;

use scheduler::Scheduler;

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The spec did not load or compile.
    #[error(transparent)]
    Compile(#[from] kvc_compiler::CompileError),
    /// Loading weights or the tokenizer failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Encoding the prompt failed (e.g. the chat template refused the messages).
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The request does not fit the compiled shapes or its settings are invalid.
    #[error("{0}")]
    Invalid(String),
    /// Every row is busy and the queue holds [`EngineOptions::queue_capacity`] requests.
    #[error("every row is busy and the queue is full ({0} requests waiting); try again later")]
    QueueFull(usize),
    /// The model has no tokenizer (random weights).
    #[error("this model has no tokenizer (random weights): the engine needs one")]
    NoTokenizer,
    /// The scheduler stopped (a runtime error in a step; the message says which).
    #[error("the engine stopped: {0}")]
    Stopped(String),
}

/// When the scheduler admits waiting requests into rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// Continuous batching: any free row is refilled before the next step.
    #[default]
    Refill,
    /// Batch at a time: waiting requests are admitted only when every row is free (the
    /// behaviour without slot refill, kept to measure what refill gains).
    WholeBatch,
}

/// How to load a model and run its scheduler.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// The backend that runs the graphs.
    pub backend: Backend,
    /// Session options (kernel set, capture, memory limit); `None`: the backend's
    /// defaults.
    pub session: Option<SessionOptions>,
    /// Replaces fields of the spec's compile section (batch, widths, KV policy, …). The
    /// sampler defaults to `Sample`, so that requests may ask for temperature > 0.
    pub overrides: Overrides,
    /// Requests that may wait while every row is busy; more are refused with
    /// [`EngineError::QueueFull`].
    pub queue_capacity: usize,
    /// When waiting requests get rows.
    pub schedule: Schedule,
    /// Whether a prompt that begins with a free row's last prompt goes to that row and
    /// prefills only the rest (dense caches only; on by default).
    pub prompt_reuse: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            backend: Backend::Flex,
            session: None,
            overrides: Overrides::default(),
            queue_capacity: 64,
            schedule: Schedule::Refill,
            prompt_reuse: true,
        }
    }
}

/// What to generate from.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Raw text, encoded as `kvc run` does without `--chat` (BOS when the model adds one).
    Text(String),
    /// Chat messages, rendered by the model's chat template with the assistant's turn
    /// opened (`kvc run --chat`).
    Chat(Vec<ChatMessage>),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// One generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Most tokens to generate; `None`: as many as the cache has room for.
    pub max_tokens: Option<usize>,
    /// Sampling settings (greedy by default).
    pub sampling: Sampling,
    /// Seed of the sampler's uniform stream (as `kvc run --seed`).
    pub seed: u64,
    /// Texts that end generation when they appear; the text returned stops before them.
    pub stop: Vec<String>,
}

impl GenerationRequest {
    /// A greedy request with no token limit but the cache and no stop strings.
    pub fn new(prompt: Prompt) -> GenerationRequest {
        GenerationRequest {
            prompt,
            max_tokens: None,
            sampling: Sampling::default(),
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` (or the cache's end).
    Length,
}

impl FinishReason {
    /// The OpenAI name (`stop`, `length`).
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a request streams back.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A generated token and the text it completes (empty when it ends inside a UTF-8
    /// character or might begin a stop string; that text follows later).
    Token {
        /// Token id.
        id: u32,
        /// New text.
        text: String,
    },
    /// Text released without a new token: what was held back as the possible start of a
    /// stop string, when the request ends without it.
    Text(String),
    /// The request finished; nothing follows.
    Done(Usage, FinishReason),
    /// The request failed; nothing follows.
    Failed(String),
}

/// Token counts of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (stop token excluded).
    pub completion_tokens: usize,
}

/// A finished request (from [`Engine::generate`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Output {
    /// Generated text (up to a stop string).
    pub text: String,
    /// Generated token ids.
    pub ids: Vec<u32>,
    /// Token counts.
    pub usage: Usage,
    /// Why it ended.
    pub finish: FinishReason,
}

/// Where a request's events go. `send` returning `false`, or `is_closed`, cancels the
/// request and frees its row.
pub trait EventSink: Send {
    /// Delivers one event; `false` when the receiver is gone.
    fn send(&mut self, event: Event) -> bool;
    /// Whether the receiver is gone (checked before every step).
    fn is_closed(&self) -> bool;
}

/// The sink of [`Engine::submit`]: a channel plus the handle's cancel flag.
struct ChannelSink {
    tx: Sender<Event>,
    cancelled: Arc<AtomicBool>,
}

impl EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        !self.is_closed() && self.tx.send(event).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

/// A submitted request: iterate its events; dropping it (or [`Handle::cancel`]) cancels
/// the request.
pub struct Handle {
    events: Receiver<Event>,
    cancelled: Arc<AtomicBool>,
}

impl Handle {
    /// Cancels the request: its row is freed before the next step.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// The next event; `None` after the last one.
    pub fn next_event(&self) -> Option<Event> {
        self.events.recv().ok()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Iterator for Handle {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.next_event()
    }
}

/// Counters of the scheduler (monotonic unless said otherwise), for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests accepted.
    pub requests: AtomicU64,
    /// Requests refused because the queue was full.
    pub rejected: AtomicU64,
    /// Requests that finished (stop or length).
    pub finished: AtomicU64,
    /// Requests cancelled or disconnected before finishing.
    pub cancelled: AtomicU64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens not prefilled because the row's cache held them already (a prompt
    /// that begins with the previous prompt of its row, dense cache only).
    pub prompt_tokens_reused: AtomicU64,
    /// Tokens generated.
    pub generated_tokens: AtomicU64,
    /// Decode steps run.
    pub steps: AtomicU64,
    /// Time in decode steps, microseconds.
    pub step_micros: AtomicU64,
    /// Refill prefills run (each may fill several rows).
    pub refills: AtomicU64,
    /// Rows filled by refills.
    pub rows_filled: AtomicU64,
    /// Rows filled while other rows of the batch were generating (continuous batching
    /// at work: without refill they would have waited for the whole batch).
    pub rows_filled_running: AtomicU64,
    /// Time in refill prefills, microseconds.
    pub refill_micros: AtomicU64,
    /// Sum over decode steps of the rows generating in it (`busy_row_steps / (steps · B)`
    /// is the batch's occupancy).
    pub busy_row_steps: AtomicU64,
    /// Requests accepted and not yet finished, waiting or in a row (a gauge; a request
    /// is refused once it reaches `B` + the queue capacity).
    pub in_flight: AtomicU64,
    /// Requests waiting for a row now (a gauge).
    pub queued: AtomicU64,
    /// Rows generating now (a gauge).
    pub active: AtomicU64,
}

impl Metrics {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the scheduler thread receives.
struct Job {
    ids: Vec<u32>,
    request: Request,
    seed: u64,
    stop: Vec<String>,
    sink: Box<dyn EventSink>,
}

/// Makes the scheduler's session and the model's tokenizer, on the scheduler thread;
/// the argument hears about downloads.
pub type MakeSession =
    Box<dyn FnOnce(&mut dyn FnMut(Progress)) -> Result<(Session, Tokenizer), EngineError> + Send>;

/// A loaded model with its scheduler thread.
pub struct Engine {
    name: String,
    config: CompiledConfig,
    tokenizer: Arc<Tokenizer>,
    jobs: Option<Sender<Job>>,
    metrics: Arc<Metrics>,
    /// Set by the scheduler when it stops on an error.
    failure: Arc<Mutex<Option<String>>>,
    queue_capacity: usize,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    /// Loads a model spec (`models/x.ron`) with the default options: CPU backend, the
    /// spec's shapes, a sampling program, a queue of 64.
    pub fn load(spec: impl AsRef<Path>) -> Result<Engine, EngineError> {
        Engine::load_with(spec, EngineOptions::default(), &mut |_| {})
    }

    /// Loads a model spec with chosen options; `progress` hears about downloads.
    pub fn load_with(
        spec: impl AsRef<Path>,
        options: EngineOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Engine, EngineError> {
        let path = spec.as_ref().to_path_buf();
        let make = move |progress: &mut dyn FnMut(Progress)| {
            let c = compile_spec_file(
                &path,
                options.overrides,
                options.backend,
                |_, o| o.sampler = o.sampler.or(Some(Sampler::Sample)),
                progress,
            )?;
            let session_options = options
                .session
                .unwrap_or_else(|| SessionOptions::for_backend(options.backend));
            let loaded = LoadedModel::load_with(
                c.program,
                &c.base,
                options.backend,
                session_options,
                progress,
            )?;
            let tokenizer = loaded.tokenizer.ok_or(EngineError::NoTokenizer)?;
            Ok((loaded.session, tokenizer))
        };
        Engine::start(
            Box::new(make),
            options.queue_capacity,
            (options.schedule, options.prompt_reuse),
            progress,
        )
    }

    /// Starts the scheduler thread, which makes its session with `make` (a session
    /// stays on the thread that runs it: a recorded decode step is not `Send`) and then
    /// serves requests with the schedule and prompt reuse given (see [`EngineOptions`]).
    /// `progress` hears `make`'s downloads; returns once the model is loaded, or with
    /// `make`'s error.
    pub fn start(
        make: MakeSession,
        queue_capacity: usize,
        (schedule, prompt_reuse): (Schedule, bool),
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Engine, EngineError> {
        let metrics = Arc::new(Metrics::default());
        let failure = Arc::new(Mutex::new(None));
        let (tx, rx) = mpsc::channel();
        let (progress_tx, progress_rx) = mpsc::channel::<Progress>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let worker = {
            let (metrics, failure) = (Arc::clone(&metrics), Arc::clone(&failure));
            std::thread::Builder::new()
                .name("kvc-scheduler".into())
                .spawn(move || {
                    let made = make(&mut |p| {
                        let _ = progress_tx.send(p);
                    });
                    drop(progress_tx);
                    let (session, tok) = match made {
                        Ok((session, tok)) => (session, Arc::new(tok)),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let c = session.program().config.clone();
                    let name = session.program().spec.name.clone();
                    if ready_tx.send(Ok((c, name, Arc::clone(&tok)))).is_err() {
                        return;
                    }
                    let mut s = Scheduler::new(session, &tok, &metrics, schedule);
                    s.set_prompt_reuse(prompt_reuse);
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.run(&rx)));
                    let why = match ran {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => e.to_string(),
                        Err(panic) => format!(
                            "the scheduler panicked: {}",
                            panic
                                .downcast_ref::<String>()
                                .map(String::as_str)
                                .or_else(|| panic.downcast_ref::<&str>().copied())
                                .unwrap_or("(no message)")
                        ),
                    };
                    *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
                    s.fail_all(&why, &rx);
                })
                .map_err(|e| EngineError::Stopped(format!("cannot start the scheduler: {e}")))?
        };
        for p in progress_rx {
            progress(p);
        }
        let (config, name, tokenizer) = match ready_rx.recv() {
            Ok(r) => r?,
            Err(_) => {
                let _ = worker.join();
                return Err(EngineError::Stopped(
                    "the scheduler thread ended while loading".into(),
                ));
            }
        };
        Ok(Engine {
            name,
            config,
            tokenizer,
            jobs: Some(tx),
            metrics,
            failure,
            queue_capacity,
            worker: Some(worker),
        })
    }

    /// The model's name (from its spec).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The compiled shapes (batch, widths, cache length, …).
    pub fn config(&self) -> &CompiledConfig {
        &self.config
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Why the scheduler stopped, if it did (a runtime error in a step).
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("failure lock").clone()
    }

    /// The scheduler's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Encodes a prompt as the request would be (to count or inspect its tokens).
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        Ok(match prompt {
            Prompt::Text(t) => self.tokenizer.encode_prompt(t, false)?,
            Prompt::Chat(m) => self.tokenizer.encode_chat(m, true)?,
            Prompt::Tokens(ids) => ids.clone(),
        })
    }

    /// Validates and queues a request; its events go to `sink`. Fails at once, without
    /// queueing, when the request does not fit the compiled shapes or the queue is full.
    pub fn submit_to(
        &self,
        req: GenerationRequest,
        sink: Box<dyn EventSink>,
    ) -> Result<Usage, EngineError> {
        if let Some(e) = self.failure.lock().expect("failure lock").clone() {
            return Err(EngineError::Stopped(e));
        }
        let ids = self.encode(&req.prompt)?;
        let c = &self.config;
        let room = (c.cache_len as usize + 1).saturating_sub(ids.len());
        let request = Request {
            prompt: ids.clone(),
            max_new_tokens: req.max_tokens.unwrap_or(room.max(1)),
            sampling: req.sampling,
        };
        check_request(c, &request).map_err(EngineError::Invalid)?;
        if c.sampler == Sampler::Greedy && req.sampling.is_random() {
            return Err(EngineError::Invalid(
                "this engine's program has the greedy sampler: temperature must be 0".into(),
            ));
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(EngineError::Invalid("a stop string is empty".into()));
        }
        // Requests in rows plus waiting ones: the rows take `B`, the queue the rest.
        let room = self.config.batch as u64 + self.queue_capacity as u64;
        if self.metrics.in_flight.fetch_add(1, Ordering::Relaxed) >= room {
            self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            Metrics::add(&self.metrics.rejected, 1);
            return Err(EngineError::QueueFull(self.queue_capacity));
        }
        self.metrics.queued.fetch_add(1, Ordering::Relaxed);
        let usage = Usage {
            prompt_tokens: ids.len(),
            completion_tokens: 0,
        };
        let job = Job {
            ids,
            request,
            seed: req.seed,
            stop: req.stop,
            sink,
        };
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !sent {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Stopped("the scheduler is not running".into()));
        }
        Metrics::add(&self.metrics.requests, 1);
        Ok(usage)
    }

    /// Queues a request and returns a handle that yields its events.
    pub fn submit(&self, req: GenerationRequest) -> Result<Handle, EngineError> {
        let (tx, rx) = mpsc::channel();
        let cancelled = Arc::new(AtomicBool::new(false));
        let sink = ChannelSink {
            tx,
            cancelled: Arc::clone(&cancelled),
        };
        self.submit_to(req, Box::new(sink))?;
        Ok(Handle {
            events: rx,
            cancelled,
        })
    }

    /// Generates a whole completion (blocking).
    pub fn generate(&self, req: GenerationRequest) -> Result<Output, EngineError> {
        let handle = self.submit(req)?;
        let (mut text, mut ids) = (String::new(), Vec::new());
        for ev in handle {
            match ev {
                Event::Token { id, text: piece } => {
                    ids.push(id);
                    text.push_str(&piece);
                }
                Event::Text(piece) => text.push_str(&piece),
                Event::Done(usage, finish) => {
                    return Ok(Output {
                        text,
                        ids,
                        usage,
                        finish,
                    });
                }
                Event::Failed(e) => return Err(EngineError::Stopped(e)),
            }
        }
        Err(EngineError::Stopped(
            self.failure
                .lock()
                .expect("failure lock")
                .clone()
                .unwrap_or_else(|| "the scheduler ended the request".into()),
        ))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel ends the scheduler once its rows are done.
        self.jobs = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
