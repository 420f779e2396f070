//! `kvc serve`: an OpenAI-compatible HTTP server over the engine's continuous batching.
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (whole responses, or
//! server-sent events with `"stream": true`), `GET /v1/models`, `GET /health` and `GET
//! /metrics` (Prometheus text). Every request is validated before it is queued
//! ([`kvc_runtime::api`]); errors are JSON bodies in OpenAI's shape (`{"error": {"message",
//! "type", "param", "code"}}`) with a 4xx status: 400 for a bad body or setting, 404 for
//! another model's name, 408 for a body that does not arrive in time, 413 for a body over
//! `--max-body` (refused from its declared length, before it is read), 429 when the queue
//! is full, 503 past `--max-connections`. A client that disconnects drops its event
//! channel, and the scheduler frees its row before the next step.
//!
//! Connections are bounded in number and time ([`Limits`]): headers must arrive within
//! `--header-timeout` (also the longest a kept-alive connection may sit idle), a body
//! within `--body-timeout`, and a shutdown waits at most `--shutdown-grace` for the
//! requests in flight.
//!
//! The server keeps no state between requests (each carries its whole prompt), so
//! replicas can run behind any HTTP load balancer (`docs/serving.md`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use kvc_runtime::api;
use kvc_runtime::engine::{
    Engine, EngineError, Event, EventSink, FinishReason, GenerationRequest, Usage,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// How much a connection may ask of the server: sizes, time and numbers.
#[derive(Clone, Copy, Debug, clap::Args)]
pub(crate) struct Limits {
    /// Largest request body, e.g. `1MiB`: a larger declared `Content-Length` is answered
    /// 413 before the body is read.
    #[arg(long, value_parser = crate::parse_size, default_value = "1MiB")]
    pub max_body: u64,
    /// Seconds a client has to send a request's headers; also the longest a kept-alive
    /// connection may wait for its next request. The connection is then closed.
    #[arg(long, value_parser = parse_seconds, default_value = "10")]
    pub header_timeout: Duration,
    /// Seconds a client has to send a request's body (answered 408 after).
    #[arg(long, value_parser = parse_seconds, default_value = "30")]
    pub body_timeout: Duration,
    /// Most open connections; more are answered 503 and closed.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Seconds a shutdown (Ctrl-C, SIGTERM) waits for the requests in flight before it
    /// closes their connections.
    #[arg(long, value_parser = parse_seconds, default_value = "30")]
    pub shutdown_grace: Duration,
}

/// A number of seconds (fractions allowed), from 1 ms to one day.
fn parse_seconds(s: &str) -> std::result::Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("expected a number of seconds, found `{s}`"))?;
    if !(0.001..=86_400.0).contains(&secs) {
        return Err(format!("expected 0.001 to 86400 seconds, found {s}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// What the handlers share.
struct App {
    engine: Engine,
    limits: Limits,
    /// Seconds since the epoch when the server started (response ids and `created`).
    started: u64,
    next_id: AtomicU64,
}

/// Runs the server until Ctrl-C (or SIGTERM). Prints `listening on http://HOST:PORT` to
/// stderr once the socket is bound (port 0 picks a free port).
pub(crate) fn serve(engine: Engine, host: &str, port: u16, limits: Limits) -> Result<()> {
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
            limits,
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
            .with_state(app);
        accept(listener, router, limits).await;
        Ok(())
    })
}

/// Accepts connections until a shutdown signal, each under the header timeout and within
/// the connection cap; then waits for those open, at most the shutdown grace.
async fn accept(listener: tokio::net::TcpListener, router: Router, limits: Limits) {
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections as usize));
    let graceful = GracefulShutdown::new();
    let signal = shutdown();
    tokio::pin!(signal);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                // Out of file descriptors or a connection reset before it was accepted:
                // the listener stays up.
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            tokio::spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that goes away mid-request is its own business.
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    eprintln!(
        "shutting down: finishing the requests in flight, at most {} s (Ctrl-C again to stop now)",
        limits.shutdown_grace.as_secs_f64()
    );
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("stopped");
        std::process::exit(130);
    });
    tokio::select! {
        () = graceful.shutdown() => eprintln!("stopped"),
        () = tokio::time::sleep(limits.shutdown_grace) => {
            eprintln!("stopped: closed the connections still open after the grace period")
        }
    }
}

/// Answers a connection over the cap with 503 and closes it.
async fn refuse(mut stream: tokio::net::TcpStream, max: u32) {
    let body = error_body(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the server has {max} open connections, its limit (kvc serve --max-connections)"),
        None,
    )
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Resolves on Ctrl-C or SIGTERM.
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
}

/// A refusal from [`api`], as a response.
struct ApiError(api::ApiError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        error(status, self.0.message, self.0.param)
    }
}

/// The request's body, refused (413) from its declared length when that is over the limit,
/// read within the body timeout (408) and the limit.
async fn read_body(limits: &Limits, req: Request) -> std::result::Result<Bytes, Response> {
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the server's limit of {} bytes (kvc serve --max-body)",
                limits.max_body
            ),
            None,
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body) {
        return Err(too_large());
    }
    let mut body = req.into_body().into_data_stream();
    let read = async {
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                error(
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body: {e}"),
                    None,
                )
            })?;
            if (bytes.len() + chunk.len()) as u64 > limits.max_body {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(bytes))
    };
    match tokio::time::timeout(limits.body_timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} s (kvc serve --body-timeout)",
                limits.body_timeout.as_secs_f64()
            ),
            None,
        )),
    }
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
    (status, axum::Json(error_body(status, message, param))).into_response()
}

/// The JSON of an OpenAI-shaped error.
fn error_body(status: StatusCode, message: impl Into<String>, param: Option<&str>) -> Value {
    let kind = match status {
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        s if s.is_server_error() => "server_error",
        StatusCode::NOT_FOUND => "not_found_error",
        _ => "invalid_request_error",
    };
    json!({ "error": { "message": message.into(), "type": kind, "param": param, "code": null } })
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
            "kvc_prompt_tokens_reused_total",
            "counter",
            "Prompt tokens not prefilled: their row's cache held them from an earlier prompt.",
            get(&m.prompt_tokens_reused).to_string(),
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

async fn completions(State(app): State<Arc<App>>, req: Request) -> Response {
    handle(app, Kind::Completion, req).await
}

async fn chat_completions(State(app): State<Arc<App>>, req: Request) -> Response {
    handle(app, Kind::Chat, req).await
}

/// Reads, parses and queues one completion request.
async fn handle(app: Arc<App>, kind: Kind, req: Request) -> Response {
    let body = match read_body(&app.limits, req).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let parse = match kind {
        Kind::Completion => api::parse_completion,
        Kind::Chat => api::parse_chat,
    };
    match parse(&body, app.engine.name(), fresh_seed()) {
        Ok(p) => respond(app, kind, p.request, p.stream, p.include_usage).await,
        Err(e) => ApiError(e).into_response(),
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
                    let err = error_body(StatusCode::INTERNAL_SERVER_ERROR, e, None);
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
