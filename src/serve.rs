//! `kvc serve`: an OpenAI-compatible HTTP server over the engine's continuous batching.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (whole responses, or
//! server-sent events with `"stream": true`), `GET /v1/models`, `GET /health` and `GET
//! /metrics` (Prometheus text). Every request is validated before it is queued; errors
//! are JSON bodies in OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`)
//! with a 4xx status: 400 for a bad body or setting, 404 for another model's name, 413
//! for a body over `--max-body`, 429 when the queue is full. A client that disconnects
//! drops its event channel, and the scheduler frees its row before the next step.
//!
//! The server keeps no state between requests (each carries its whole prompt), so
//! replicas can run behind any HTTP load balancer (`docs/serving.md`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use kvc_runtime::engine::{
    Engine, EngineError, Event, EventSink, FinishReason, GenerationRequest, Prompt, Usage,
};
use kvc_runtime::exec::session::Sampling;
use kvc_runtime::load::tokenizer::ChatMessage;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Most stop strings a request may give (OpenAI's limit).
const MAX_STOP: usize = 4;

/// What the handlers share.
struct App {
    engine: Engine,
    /// Seconds since the epoch when the server started (response ids and `created`).
    started: u64,
    next_id: AtomicU64,
}

/// Runs the server until Ctrl-C (or SIGTERM). Prints `listening on http://HOST:PORT` to
/// stderr once the socket is bound (port 0 picks a free port).
pub(crate) fn serve(engine: Engine, host: &str, port: u16, max_body: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .with_context(|| format!("binding {host}:{port}"))?;
        let addr = listener.local_addr()?;
        let app = Arc::new(App {
            engine,
            started: now(),
            next_id: AtomicU64::new(0),
        });
        let c = app.engine.config();
        eprintln!(
            "serving {} (batch {}, cache {} tokens, prefill width {})",
            app.engine.name(),
            c.batch,
            c.cache_len,
            c.prefill_len
        );
        eprintln!("listening on http://{addr}");
        let router = Router::new()
            .route("/v1/completions", post(completions))
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(metrics))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(DefaultBodyLimit::max(max_body))
            .with_state(app);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown())
            .await
            .context("serving")
    })
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    eprintln!("shutting down: finishing the requests in flight (Ctrl-C again to stop now)");
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("stopped");
        std::process::exit(130);
    });
}

/// A seed from the clock and a process-wide counter.
fn fresh_seed() -> u64 {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNT
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An OpenAI-shaped error response.
fn error(status: StatusCode, message: impl Into<String>, param: Option<&str>) -> Response {
    let kind = match status {
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        s if s.is_server_error() => "server_error",
        StatusCode::NOT_FOUND => "not_found_error",
        _ => "invalid_request_error",
    };
    let body = json!({
        "error": { "message": message.into(), "type": kind, "param": param, "code": null }
    });
    (status, axum::Json(body)).into_response()
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such endpoint: kvc serves /v1/completions, /v1/chat/completions, /v1/models, \
         /health and /metrics",
        None,
    )
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed: the /v1 completion endpoints take POST, the others GET",
        None,
    )
}

async fn models(State(app): State<Arc<App>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": app.engine.name(),
            "object": "model",
            "created": app.started,
            "owned_by": "kvc",
        }]
    }))
    .into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.engine.failure() {
        None => axum::Json(json!({ "status": "ok" })).into_response(),
        Some(e) => error(StatusCode::SERVICE_UNAVAILABLE, e, None),
    }
}

/// Prometheus text exposition of the scheduler's counters.
async fn metrics(State(app): State<Arc<App>>) -> Response {
    let m = app.engine.metrics();
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let secs = |c: &AtomicU64| get(c) as f64 / 1e6;
    let busy = secs(&m.step_micros) + secs(&m.refill_micros);
    let rows: Vec<(&str, &str, &str, String)> = vec![
        (
            "kvc_requests_total",
            "counter",
            "Requests accepted.",
            get(&m.requests).to_string(),
        ),
        (
            "kvc_requests_rejected_total",
            "counter",
            "Requests refused with 429 (queue full).",
            get(&m.rejected).to_string(),
        ),
        (
            "kvc_requests_finished_total",
            "counter",
            "Requests that finished (stop or length).",
            get(&m.finished).to_string(),
        ),
        (
            "kvc_requests_cancelled_total",
            "counter",
            "Requests cancelled or disconnected before finishing.",
            get(&m.cancelled).to_string(),
        ),
        (
            "kvc_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            get(&m.prompt_tokens).to_string(),
        ),
        (
            "kvc_generated_tokens_total",
            "counter",
            "Tokens generated.",
            get(&m.generated_tokens).to_string(),
        ),
        (
            "kvc_decode_steps_total",
            "counter",
            "Decode steps run.",
            get(&m.steps).to_string(),
        ),
        (
            "kvc_decode_step_seconds_total",
            "counter",
            "Time in decode steps.",
            secs(&m.step_micros).to_string(),
        ),
        (
            "kvc_refills_total",
            "counter",
            "Refill prefills run (each may fill several rows).",
            get(&m.refills).to_string(),
        ),
        (
            "kvc_refill_rows_total",
            "counter",
            "Rows filled by refills.",
            get(&m.rows_filled).to_string(),
        ),
        (
            "kvc_refill_rows_running_total",
            "counter",
            "Rows filled while other rows were generating.",
            get(&m.rows_filled_running).to_string(),
        ),
        (
            "kvc_busy_row_steps_total",
            "counter",
            "Sum over decode steps of the rows generating (occupancy = this / (steps * batch)).",
            get(&m.busy_row_steps).to_string(),
        ),
        (
            "kvc_refill_seconds_total",
            "counter",
            "Time in refill prefills.",
            secs(&m.refill_micros).to_string(),
        ),
        (
            "kvc_requests_in_flight",
            "gauge",
            "Requests accepted and not finished (waiting or in a row).",
            get(&m.in_flight).to_string(),
        ),
        (
            "kvc_queue_depth",
            "gauge",
            "Requests waiting for a row.",
            get(&m.queued).to_string(),
        ),
        (
            "kvc_active_rows",
            "gauge",
            "Rows generating.",
            get(&m.active).to_string(),
        ),
        (
            "kvc_batch_rows",
            "gauge",
            "Rows of the compiled batch.",
            app.engine.config().batch.to_string(),
        ),
        (
            "kvc_generated_tokens_per_second",
            "gauge",
            "Tokens generated per second of prefill and decode time, since start.",
            (get(&m.generated_tokens) as f64 / busy.max(1e-9)).to_string(),
        ),
        (
            "kvc_decode_step_seconds_mean",
            "gauge",
            "Mean decode step time since start.",
            (secs(&m.step_micros) / get(&m.steps).max(1) as f64).to_string(),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in rows {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Settings both endpoints accept. Unknown fields are ignored, as OpenAI's clients send
/// fields kvc has no use for (`user`, `logit_bias` left empty, …).
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not in OpenAI's API; as llama.cpp's and vLLM's servers accept it.
    top_k: Option<u32>,
    seed: Option<u64>,
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<u64>,
    /// Log probabilities are not computed: only `null`, `false` or 0 is accepted.
    logprobs: Option<Value>,
    /// Echoing the prompt is not supported: only `false`.
    #[serde(default)]
    echo: bool,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: Value,
    max_tokens: Option<u64>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<MessageBody>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct MessageBody {
    role: String,
    content: Value,
}

/// Why a request is refused before it is queued.
struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error(self.status, self.message, self.param)
    }
}

/// A request turned into the engine's terms, or why it is refused.
type Parsed<T> = std::result::Result<T, ApiError>;

fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
        param: Some(param),
    }
}

fn read_body<T: for<'de> Deserialize<'de>>(
    body: std::result::Result<Bytes, BytesRejection>,
) -> Parsed<T> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "the request body is larger than the server's \
                                              limit (kvc serve --max-body)"
                .to_string(),
            _ => r.body_text(),
        };
        ApiError {
            status,
            message,
            param: None,
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        bad(
            format!("the request body is not valid JSON for this endpoint: {e}"),
            "body",
        )
    })
}

/// Sampling, seed, stop strings and the model name, checked.
fn settings(
    app: &App,
    c: &Common,
    max_tokens: Option<u64>,
    default_max: Option<usize>,
) -> Parsed<GenerationRequest> {
    if let Some(m) = &c.model
        && m != app.engine.name()
    {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "the model `{m}` is not served here; this server serves `{}`",
                app.engine.name()
            ),
            param: Some("model"),
        });
    }
    if !matches!(
        c.logprobs,
        None | Some(Value::Null) | Some(Value::Bool(false))
    ) && c.logprobs != Some(json!(0))
    {
        return Err(bad("logprobs are not supported by kvc serve", "logprobs"));
    }
    if c.echo {
        return Err(bad("echo is not supported by kvc serve", "echo"));
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(bad("only n = 1 is supported", "n"));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(bad(
            format!("temperature must be in [0, 2], found {temperature}"),
            "temperature",
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            format!("top_p must be in (0, 1], found {top_p}"),
            "top_p",
        ));
    }
    let max_tokens = match max_tokens {
        Some(0) => return Err(bad("max_tokens must be at least 1", "max_tokens")),
        Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        None => default_max,
    };
    let stop: Vec<String> = match &c.stop {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("stop must be a string or an array of strings", "stop"))?,
        Some(_) => return Err(bad("stop must be a string or an array of strings", "stop")),
    };
    if stop.len() > MAX_STOP {
        return Err(bad(
            format!("at most {MAX_STOP} stop strings, found {}", stop.len()),
            "stop",
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(bad("a stop string is empty", "stop"));
    }
    Ok(GenerationRequest {
        prompt: Prompt::Tokens(vec![]),
        max_tokens,
        sampling: Sampling {
            temperature,
            top_k: c.top_k.unwrap_or(0),
            top_p,
        },
        // No seed: a fresh one per request, as OpenAI's sampling is not repeatable
        // without one.
        seed: c.seed.unwrap_or_else(fresh_seed),
        stop,
    })
}

/// The engine's sink on a tokio channel: the handler (or the response stream) holds the
/// receiver; when the client goes, the receiver is dropped and the row is freed.
struct Channel(UnboundedSender<Event>);

impl EventSink for Channel {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// Which endpoint a response is shaped for.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(
    State(app): State<Arc<App>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Parsed<(GenerationRequest, bool, bool)> {
        let b: CompletionBody = read_body(body)?;
        // OpenAI's default for the completions endpoint.
        let mut req = settings(&app, &b.common, b.max_tokens, Some(16))?;
        req.prompt = match b.prompt {
            Value::String(s) => Prompt::Text(s),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                Prompt::Text(a[0].as_str().unwrap_or_default().to_string())
            }
            Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_u64) => Prompt::Tokens(
                a.iter()
                    .map(|v| u32::try_from(v.as_u64().unwrap_or(u64::MAX)).unwrap_or(u32::MAX))
                    .collect(),
            ),
            _ => {
                return Err(bad(
                    "prompt must be a string, an array of one string, or an array of token ids",
                    "prompt",
                ));
            }
        };
        let usage = b.common.stream_options.is_some_and(|o| o.include_usage);
        Ok((req, b.common.stream, usage))
    };
    match run() {
        Ok((req, stream, usage)) => respond(app, Kind::Completion, req, stream, usage).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(
    State(app): State<Arc<App>>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let run = || -> Parsed<(GenerationRequest, bool, bool)> {
        let b: ChatBody = read_body(body)?;
        if b.messages.is_empty() {
            return Err(bad("messages must not be empty", "messages"));
        }
        let max = b.max_completion_tokens.or(b.max_tokens);
        let mut req = settings(&app, &b.common, max, None)?;
        let mut messages = Vec::with_capacity(b.messages.len());
        for (i, m) in b.messages.into_iter().enumerate() {
            let content = match m.content {
                Value::String(s) => s,
                // Content parts: only text parts, joined.
                Value::Array(parts) => {
                    let mut text = String::new();
                    for p in &parts {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(bad(
                                    format!("messages[{i}].content: only text parts are supported"),
                                    "messages",
                                ));
                            }
                        }
                    }
                    text
                }
                Value::Null => String::new(),
                _ => {
                    return Err(bad(
                        format!("messages[{i}].content must be a string or an array of text parts"),
                        "messages",
                    ));
                }
            };
            messages.push(ChatMessage::new(m.role, content));
        }
        req.prompt = Prompt::Chat(messages);
        let usage = b.common.stream_options.is_some_and(|o| o.include_usage);
        Ok((req, b.common.stream, usage))
    };
    match run() {
        Ok((req, stream, usage)) => respond(app, Kind::Chat, req, stream, usage).await,
        Err(e) => e.into_response(),
    }
}

fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// Queues the request and answers with the whole completion or an event stream.
async fn respond(
    app: Arc<App>,
    kind: Kind,
    req: GenerationRequest,
    stream: bool,
    include_usage: bool,
) -> Response {
    let (tx, rx) = unbounded_channel();
    // Tokenizing a long prompt or rendering a chat template takes a while: off the
    // async workers.
    let engine = Arc::clone(&app);
    let submitted =
        tokio::task::spawn_blocking(move || engine.engine.submit_to(req, Box::new(Channel(tx))))
            .await
            .unwrap_or_else(|e| Err(EngineError::Stopped(e.to_string())));
    if let Err(e) = submitted {
        let status = match &e {
            EngineError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
            EngineError::Invalid(_) | EngineError::Tokenizer(_) => StatusCode::BAD_REQUEST,
            EngineError::Stopped(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        return error(status, e.to_string(), None);
    }
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Completion => format!("cmpl-{:x}-{n}", app.started),
        Kind::Chat => format!("chatcmpl-{:x}-{n}", app.started),
    };
    let meta = Meta {
        id,
        created: now(),
        model: app.engine.name().to_string(),
        kind,
    };
    if stream {
        sse(meta, rx, include_usage)
    } else {
        whole(meta, rx).await
    }
}

/// What every response object repeats.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// One choice carrying `text` (a delta when streaming).
    fn choice(&self, text: Option<&str>, finish: Option<FinishReason>, chunk: bool) -> Value {
        let finish = finish.map(FinishReason::name);
        match (self.kind, chunk) {
            (Kind::Completion, _) => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": { "role": "assistant", "content": text.unwrap_or("") },
                "logprobs": null,
                "finish_reason": finish,
            }),
            (Kind::Chat, true) => {
                let delta = match text {
                    Some(t) => json!({ "content": t }),
                    None => json!({}),
                };
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
        }
    }

    fn object_with(&self, choices: Value, chunk: bool) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}

async fn whole(meta: Meta, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { text: t, .. } | Event::Text(t) => text.push_str(&t),
            Event::Done(usage, finish) => {
                let mut obj = meta.object_with(
                    json!([meta.choice(Some(&text), Some(finish), false)]),
                    false,
                );
                obj["usage"] = usage_json(usage);
                return axum::Json(obj).into_response();
            }
            Event::Failed(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e, None),
        }
    }
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the engine ended the request",
        None,
    )
}

fn data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Server-sent events: one `data:` chunk per piece of text, a last chunk with the finish
/// reason (and usage when asked), then `data: [DONE]`.
fn sse(meta: Meta, rx: UnboundedReceiver<Event>, include_usage: bool) -> Response {
    let first = match meta.kind {
        // Chat streams open with the assistant's role.
        Kind::Chat => {
            let choice = json!({ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null });
            Some(data(&meta.object_with(json!([choice]), true)))
        }
        Kind::Completion => None,
    };
    let state = Some((meta, rx));
    let events = futures_util::stream::unfold(state, move |state| async move {
        let (meta, mut rx) = state?;
        loop {
            match rx.recv().await {
                Some(Event::Token { text, .. } | Event::Text(text)) => {
                    if text.is_empty() {
                        continue;
                    }
                    let chunk =
                        meta.object_with(json!([meta.choice(Some(&text), None, true)]), true);
                    return Some((Ok::<Bytes, Infallible>(data(&chunk)), Some((meta, rx))));
                }
                Some(Event::Done(usage, finish)) => {
                    let last =
                        meta.object_with(json!([meta.choice(None, Some(finish), true)]), true);
                    let mut out = format!("data: {last}\n\n");
                    if include_usage {
                        // As OpenAI sends it: a last chunk with no choices and the usage.
                        let mut u = meta.object_with(json!([]), true);
                        u["usage"] = usage_json(usage);
                        out.push_str(&format!("data: {u}\n\n"));
                    }
                    out.push_str("data: [DONE]\n\n");
                    return Some((Ok(Bytes::from(out)), None));
                }
                Some(Event::Failed(e)) => {
                    let err = json!({ "error": { "message": e, "type": "server_error", "param": null, "code": null } });
                    return Some((Ok(data(&err)), None));
                }
                None => return None,
            }
        }
    });
    let body = futures_util::stream::iter(first.map(Ok::<Bytes, Infallible>)).chain(events);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), None))
}
