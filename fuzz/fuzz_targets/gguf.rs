//! GGUF files on arbitrary bytes: header, metadata, tensors, tokenizer.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kvc_runtime::load::fuzzing::gguf(data));
