//! Arbitrary text through the real SmolLM2 tokenizer (`$KVC_TEST_GGUF`, or the cached
//! weights file, fetched on first use).
#![no_main]
use std::sync::LazyLock;

use kvc_runtime::load::tokenizer::Tokenizer;

static TOKENIZER: LazyLock<Tokenizer> = LazyLock::new(|| {
    let path = kvc_runtime::load::fetch::default_smollm2_path().expect("SmolLM2 weights");
    Tokenizer::from_gguf_path(path).expect("SmolLM2 tokenizer")
});

libfuzzer_sys::fuzz_target!(|data: &[u8]| kvc_runtime::load::fuzzing::tokenizer(&TOKENIZER, data));
