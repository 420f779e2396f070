//! Entry points of the fuzz targets in `fuzz/` (GGUF files, tokenizers and chat templates
//! on arbitrary bytes), shared with the test that replays their regression corpus. Each
//! must return (with or without an error) on any input: a panic, hang or unbounded
//! allocation is a finding.

use super::gguf::GgufFile;
use super::tokenizer::{ChatMessage, Role, Tokenizer};
use super::weights::{gguf_weight_types, hyper_params};

/// Largest tensor dequantized per input (bytes of f32): the reader's bounds are what is
/// tested, not the allocator.
const MAX_TENSOR_BYTES: u64 = 1 << 22;

/// Parses `bytes` as a GGUF file, then reads what kvc reads from one: every small
/// tensor dequantized, the hyperparameters and weight types, and a tokenizer with its
/// chat template.
pub fn gguf(bytes: &[u8]) {
    let Ok(file) = GgufFile::from_bytes(bytes.to_vec()) else {
        return;
    };
    for t in file.tensors() {
        let values = t.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d));
        if values.saturating_mul(4) <= MAX_TENSOR_BYTES {
            let _ = file.tensor_f32(&t.name);
        }
    }
    let _ = hyper_params(&file);
    let _ = gguf_weight_types(&file);
    if let Ok(tok) = Tokenizer::from_gguf(&file) {
        if let Ok(ids) = tok.encode("Hello, world! 123 <|im_end|>", true) {
            let _ = tok.decode(&ids);
        }
        let _ = tok.chat_prompt(&[ChatMessage::new(Role::User, "hi")], true);
    }
}

/// Encodes `bytes` (as lossy UTF-8) with `tok`, as plain text and with special tokens
/// parsed, and decodes the ids back.
pub fn tokenizer(tok: &Tokenizer, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    for special in [false, true] {
        if let Ok(ids) = tok.encode(&text, special) {
            let _ = tok.decode(&ids);
        }
    }
    let ids: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let _ = tok.decode(&ids);
}

/// Renders a chat template with `tok`'s tokens: `bytes` up to the first zero byte is the
/// template, the rest one user message.
pub fn chat_template(tok: &mut Tokenizer, bytes: &[u8]) {
    let (template, content) = match bytes.iter().position(|&b| b == 0) {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &[][..]),
    };
    tok.set_chat_template(Some(String::from_utf8_lossy(template).into_owned()));
    let messages = [
        ChatMessage::new(Role::System, "s"),
        ChatMessage::new(Role::User, String::from_utf8_lossy(content).into_owned()),
    ];
    let _ = tok.encode_chat(&messages, true);
}
