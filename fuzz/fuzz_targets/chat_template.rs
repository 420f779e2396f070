//! Arbitrary chat templates and message contents, rendered and encoded with the real
//! SmolLM2 tokenizer (template up to the first zero byte, then the content).
#![no_main]
use std::sync::{LazyLock, Mutex};

use kvc_runtime::load::tokenizer::Tokenizer;

static TOKENIZER: LazyLock<Mutex<Tokenizer>> = LazyLock::new(|| {
    let path = kvc_runtime::load::fetch::default_smollm2_path().expect("SmolLM2 weights");
    Mutex::new(Tokenizer::from_gguf_path(path).expect("SmolLM2 tokenizer"))
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut tok = TOKENIZER.lock().unwrap_or_else(|e| e.into_inner());
    kvc_runtime::load::fuzzing::chat_template(&mut tok, data);
});
