//! The tokenizer's unit tests: hand-built vocabularies and the real files' tokenizers.

use std::sync::OnceLock;

use super::chat::{ChatPart, MARK_CLOSE, MARK_OPEN, split_marked};
use super::*;
use crate::load::gguf::test_writer::{GgufWriter, str_array};
use crate::load::gguf::{GgufValue, GgufValueType};

fn smollm2() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = crate::load::fetch::default_smollm2_path().expect("SmolLM2 GGUF available");
        Tokenizer::from_gguf_path(path).expect("tokenizer builds")
    })
}

fn reference() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/reference/smollm2-public.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn cases(reference: &serde_json::Value) -> Vec<(String, bool, Vec<u32>)> {
    let mut all = Vec::new();
    for key in ["tokenizer", "prompts"] {
        for c in reference[key].as_array().unwrap() {
            let ids = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            all.push((
                c["text"].as_str().unwrap().to_string(),
                c["special"].as_bool().unwrap(),
                ids,
            ));
        }
    }
    all
}

#[test]
fn smollm2_encode_matches_reference() {
    let tok = smollm2();
    let reference = reference();
    let cases = cases(&reference);
    assert_eq!(cases.len(), 8);
    for (text, special, ids) in &cases {
        assert_eq!(
            &tok.encode(text, *special).unwrap(),
            ids,
            "encoding {text:?}"
        );
    }
}

#[test]
fn smollm2_decode_round_trips_reference() {
    let tok = smollm2();
    for (text, _, ids) in cases(&reference()) {
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
    assert_eq!(
        tok.decode_skip_special(&[1, 4093, 198, 2]).unwrap(),
        "user\n"
    );
    assert!(matches!(
        tok.decode(&[5, 49152]),
        Err(TokenizerError::UnknownId {
            id: 49152,
            vocab_size: 49152
        })
    ));
}

#[test]
fn smollm2_special_flag_controls_control_tokens() {
    let tok = smollm2();
    assert_eq!(tok.encode("<|im_start|>", true).unwrap(), vec![1]);
    let plain = tok.encode("<|im_start|>", false).unwrap();
    assert!(plain.len() > 1 && !plain.contains(&1), "{plain:?}");
    assert_eq!(tok.decode(&plain).unwrap(), "<|im_start|>");
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), 2);
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_text(2).as_deref(), Some("<|im_end|>"));
}

#[test]
fn smollm2_stream_never_splits_characters() {
    let tok = smollm2();
    for (text, special, _) in cases(&reference()) {
        let ids = tok.encode(&text, special).unwrap();
        let mut stream = tok.stream(false);
        let mut acc = String::new();
        for &id in &ids {
            let piece = stream.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}'), "{text:?}: piece {piece:?}");
            acc.push_str(&piece);
            assert!(
                text.starts_with(&acc),
                "{acc:?} is not a prefix of {text:?}"
            );
        }
        assert_eq!(stream.finish(), 0);
        assert_eq!(acc, text);
    }
    // The emoji 🙂 is split over two tokens; the first yields nothing.
    let ids = tok.encode("🙂", false).unwrap();
    assert_eq!(ids.len(), 2);
    let mut stream = tok.stream(false);
    assert_eq!(stream.push(ids[0]).unwrap(), "");
    assert_eq!(stream.push(ids[1]).unwrap(), "🙂");
    // A dangling partial character is dropped on finish (4 bytes, 2 of them held).
    let mut stream = tok.stream(false);
    assert_eq!(stream.push(ids[0]).unwrap(), "");
    assert!(stream.finish() > 0);
    assert_eq!(tok.decode_generated(&ids[..1]).unwrap(), "");
    assert_eq!(tok.decode(&ids[..1]).unwrap(), "\u{FFFD}");
    assert_eq!(tok.decode_generated(&ids).unwrap(), "🙂");
    // Skipping specials drops control tokens from the stream.
    let mut stream = tok.stream(true);
    let pieces: Vec<String> = [1u32, 4093, 198, 2]
        .iter()
        .map(|&id| stream.push(id).unwrap())
        .collect();
    assert_eq!(pieces.concat(), "user\n");
}

#[test]
fn smollm2_chat_template_renders_reference_prompt() {
    let tok = smollm2();
    let reference = reference();
    let want = reference["prompts"][1]["text"].as_str().unwrap();
    let user = ChatMessage::new(Role::User, "Name three primary colors.");
    // The template inserts SmolLM's default system prompt when the
    // conversation has none; the reference prompt was written without it.
    let default_system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
    let rendered = tok.chat_prompt(std::slice::from_ref(&user), true).unwrap();
    assert_eq!(rendered, format!("{default_system}{want}"));
    let without_prompt = tok.chat_prompt(std::slice::from_ref(&user), false).unwrap();
    assert_eq!(format!("{without_prompt}<|im_start|>assistant\n"), rendered);
    let with_system = tok
        .chat_prompt(&[ChatMessage::new(Role::System, "Be brief."), user], true)
        .unwrap();
    assert_eq!(
        with_system,
        format!("<|im_start|>system\nBe brief.<|im_end|>\n{want}")
    );
}

fn i32_array(items: &[i32]) -> GgufValue {
    GgufValue::Array {
        elem_type: GgufValueType::I32,
        items: items.iter().copied().map(GgufValue::I32).collect(),
    }
}

fn f32_array(items: &[f32]) -> GgufValue {
    GgufValue::Array {
        elem_type: GgufValueType::F32,
        items: items.iter().copied().map(GgufValue::F32).collect(),
    }
}

/// A byte-level BPE vocabulary: "Ġ" is the space byte.
fn tiny_file(pre: &str, template: Option<&str>) -> GgufFile {
    let tokens = [
        "<ctl>", "a", "b", "ab", "Ġ", "Ġab", "1", "2", "12", "<", "c", "t", "l", ">", "<tool>",
    ];
    let mut w = GgufWriter::new();
    w.kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", GgufValue::String(pre.into()))
        .kv("tokenizer.ggml.tokens", str_array(&tokens))
        .kv(
            "tokenizer.ggml.token_type",
            i32_array(&[3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4]),
        )
        .kv("tokenizer.ggml.merges", str_array(&["a b", "Ġ ab", "1 2"]))
        .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(0));
    if let Some(t) = template {
        w.kv("tokenizer.chat_template", GgufValue::String(t.into()));
    }
    GgufFile::from_bytes(w.build()).unwrap()
}

#[test]
fn tiny_vocab_merges_and_splits_digits() {
    for pre in ["smollm", "qwen2"] {
        let tok = Tokenizer::from_gguf(&tiny_file(pre, None)).unwrap();
        // "ab ab" -> "ab", "Ġab"; "12" never merges because digits are split first.
        assert_eq!(tok.encode("ab ab", false).unwrap(), vec![3, 5], "{pre}");
        assert_eq!(tok.encode("12", false).unwrap(), vec![6, 7], "{pre}");
        assert_eq!(tok.encode("a<ctl>b", true).unwrap(), vec![1, 0, 2]);
        assert_eq!(tok.encode("a<tool>", false).unwrap(), vec![1, 14]);
        assert_eq!(tok.bos_id(), None);
        assert!(!tok.add_bos() && !tok.add_eos());
        assert_eq!(tok.encode_prompt("ab", false).unwrap(), vec![3]);
        assert_eq!(tok.decode(&[3, 5, 0]).unwrap(), "ab ab<ctl>");
        assert_eq!(
            tok.decode_skip_special(&[3, 5, 0, 14]).unwrap(),
            "ab ab<tool>"
        );
        assert_eq!(tok.end_of_generation_ids(), [0]);
        assert!(matches!(
            tok.chat_prompt(&[], true),
            Err(TokenizerError::NoChatTemplate)
        ));
    }
}

#[test]
fn tiny_template_errors_and_raise_exception() {
    let t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}\
             {% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}";
    let tok = Tokenizer::from_gguf(&tiny_file("smollm", Some(t))).unwrap();
    assert_eq!(
        tok.chat_prompt(&[ChatMessage::new(Role::User, "hi")], false)
            .unwrap(),
        "[user]hi<ctl>"
    );
    let err = tok
        .chat_prompt(&[ChatMessage::new(Role::Assistant, "x")], false)
        .unwrap_err();
    assert!(err.to_string().contains("user first"), "{err}");
    let broken = Tokenizer::from_gguf(&tiny_file("smollm", Some("{% for %}"))).unwrap();
    assert!(matches!(
        broken.chat_prompt(&[], false),
        Err(TokenizerError::Template(_))
    ));
    assert!(matches!(
        Tokenizer::from_gguf(&tiny_file("llama3", None)),
        Err(TokenizerError::UnsupportedPreTokenizer(p)) if p == "llama3"
    ));
}

/// A template that loops without end in practice, recurses without end, or prints
/// without end is an error within the fuel, recursion and output limits.
#[test]
fn runaway_chat_templates_are_errors() {
    let nested =
        "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
    let recursive = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}";
    // Few instructions, 10 GB of output.
    let wide = "{% for a in range(100) %}{{ 'x' * 100000000 }}{% endfor %}";
    for t in [nested, recursive, wide] {
        let tok = Tokenizer::from_gguf(&tiny_file("smollm", Some(t))).unwrap();
        let err = tok
            .chat_prompt(&[ChatMessage::new(Role::User, "hi")], false)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::Template(_)), "{t}: {err}");
    }
}

#[test]
fn chat_contents_are_plain_text_and_template_text_is_special() {
    let t = "{% for m in messages %}<ctl>{{ m.content | trim }}<ctl>{% endfor %}";
    let tok = Tokenizer::from_gguf(&tiny_file("smollm", Some(t))).unwrap();
    let messages = [ChatMessage::new(Role::User, " ab<ctl> ")];
    assert_eq!(
        tok.chat_prompt(&messages, false).unwrap(),
        "<ctl>ab<ctl><ctl>"
    );
    // The content's "<ctl>" is spelled out; the template's are control tokens.
    assert_eq!(
        tok.encode_chat(&messages, false).unwrap(),
        vec![0, 3, 9, 10, 11, 12, 13, 0]
    );
    assert_eq!(
        tok.encode_prompt("<ctl>ab<ctl><ctl>", true).unwrap(),
        vec![0, 3, 0, 0]
    );
    // User-defined tokens are matched in contents too, as in any text.
    let messages = [
        ChatMessage::new(Role::User, "<tool>"),
        ChatMessage::new(Role::User, ""),
    ];
    assert_eq!(
        tok.encode_chat(&messages, false).unwrap(),
        vec![0, 14, 0, 0, 0]
    );
    // Across a template/content boundary, user-defined tokens match, control ones not.
    let t = "<to{{ messages[0].content }}<ct{{ messages[1].content }}";
    let tok = Tokenizer::from_gguf(&tiny_file("smollm", Some(t))).unwrap();
    let messages = [
        ChatMessage::new(Role::User, "ol>"),
        ChatMessage::new(Role::User, "l>"),
    ];
    assert_eq!(tok.chat_prompt(&messages, false).unwrap(), "<tool><ctl>");
    assert_eq!(tok.encode_prompt("<tool><ctl>", true).unwrap(), vec![14, 0]);
    assert_eq!(
        tok.encode_chat(&messages, false).unwrap(),
        vec![14, 9, 10, 11, 12, 13]
    );
    // Template text and content join into one run of text for the pre-tokenizer.
    let t = "{% for m in messages %}a{{ m.content }}{% endfor %}";
    let tok = Tokenizer::from_gguf(&tiny_file("smollm", Some(t))).unwrap();
    assert_eq!(
        tok.encode_chat(&[ChatMessage::new(Role::User, "b")], false)
            .unwrap(),
        vec![3]
    );
}

#[test]
fn chat_templates_that_transform_contents_are_refused() {
    for t in [
        "{{ messages[0].content | upper }}",
        "{% if messages[0].content == 'ab' %}a{% endif %}",
    ] {
        let tok = Tokenizer::from_gguf(&tiny_file("smollm", Some(t))).unwrap();
        assert!(
            matches!(
                tok.encode_chat(&[ChatMessage::new(Role::User, "ab")], false),
                Err(TokenizerError::ChatContentAltered)
            ),
            "{t}"
        );
    }
}

#[test]
fn split_marked_finds_only_valid_markers() {
    let m = |i: &str| format!("{MARK_OPEN}{i}{MARK_CLOSE}");
    let text = format!("a{}b{}{}{}", m("0"), m("x"), m("1"), m("2"));
    let bad = format!("b{}", m("x"));
    let last = m("2");
    assert_eq!(
        split_marked(&text, 2),
        vec![
            ChatPart::Template("a"),
            ChatPart::Content(0),
            ChatPart::Template(&bad),
            ChatPart::Content(1),
            ChatPart::Template(&last),
        ]
    );
    assert_eq!(split_marked("", 1), vec![]);
}

#[test]
fn byte_level_decode_inverts_gpt2_table() {
    // GPT-2's bytes_to_unicode: printable bytes keep their code point, the others
    // take U+0100, U+0101, ... in byte order.
    let printable: Vec<u32> = (0x21..=0x7E)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut next = 0x100;
    for b in 0..=255u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            next += 1;
            next - 1
        };
        let c = char::from_u32(c).unwrap();
        assert_eq!(byte_level_decode(&c.to_string()), [b as u8], "{c:?}");
    }
    assert_eq!(next, 0x144);
    // Characters outside the table stand for their own UTF-8.
    assert_eq!(byte_level_decode("\u{144}"), "\u{144}".as_bytes());
}

/// A SentencePiece vocabulary: (text, type, score).
const SPM_VOCAB: &[(&str, i32, f32)] = &[
    ("<pad>", 3, 0.0),
    ("<eos>", 3, 0.0),
    ("<bos>", 3, 0.0),
    ("<unk>", 2, 0.0),
    ("<0x0A>", 6, 0.0),
    ("<0xC3>", 6, 0.0),
    ("<0xA9>", 6, 0.0),
    ("▁", 1, -1.0),
    ("a", 1, -2.0),
    ("b", 1, -3.0),
    ("ab", 1, -4.0),
    ("▁ab", 1, -5.0),
    ("<ctl>", 3, 0.0),
    ("<ctl>b", 4, 0.0),
    ("\n\n", 4, 0.0),
    ("<end_of_turn>", 3, 0.0),
    ("<unused0>", 5, 0.0),
    ("</s>", 4, 0.0),
];

/// A GGUF with [`SPM_VOCAB`] and `extra` metadata (which may repeat a key to replace it).
fn spm_file(extra: &[(&str, GgufValue)]) -> GgufFile {
    let texts: Vec<&str> = SPM_VOCAB.iter().map(|v| v.0).collect();
    let types: Vec<i32> = SPM_VOCAB.iter().map(|v| v.1).collect();
    let scores: Vec<f32> = SPM_VOCAB.iter().map(|v| v.2).collect();
    let mut kv: Vec<(&str, GgufValue)> = vec![
        ("tokenizer.ggml.model", GgufValue::String("llama".into())),
        ("tokenizer.ggml.pre", GgufValue::String("default".into())),
        ("tokenizer.ggml.tokens", str_array(&texts)),
        ("tokenizer.ggml.token_type", i32_array(&types)),
        ("tokenizer.ggml.scores", f32_array(&scores)),
        ("tokenizer.ggml.bos_token_id", GgufValue::U32(2)),
        ("tokenizer.ggml.eos_token_id", GgufValue::U32(1)),
        ("tokenizer.ggml.add_space_prefix", GgufValue::Bool(false)),
    ];
    for (key, value) in extra {
        kv.retain(|(k, _)| k != key);
        kv.push((key, value.clone()));
    }
    let mut w = GgufWriter::new();
    for (k, v) in kv {
        w.kv(k, v);
    }
    GgufFile::from_bytes(w.build()).unwrap()
}

fn spm(extra: &[(&str, GgufValue)]) -> Tokenizer {
    Tokenizer::from_gguf(&spm_file(extra)).unwrap()
}

#[test]
fn spm_encodes_by_score_with_byte_fallback() {
    let tok = spm(&[]);
    // "ab▁ab": both "ab" merge (leftmost first), then "▁" + "ab".
    assert_eq!(tok.encode("ab ab", false).unwrap(), vec![10, 11]);
    assert_eq!(tok.encode("é\n\n\n", false).unwrap(), vec![5, 6, 14, 4]);
    assert_eq!(
        tok.encode("q", false).unwrap_err().to_string(),
        "the vocabulary has no token for byte 0x71 (no <0x71> byte-fallback token)"
    );
    // BOS by default for SentencePiece, added by encode_prompt only.
    assert!(tok.add_bos() && !tok.add_eos());
    assert_eq!(tok.encode_prompt("ab", false).unwrap(), vec![2, 10]);
    assert_eq!(tok.encode_prompt("", false).unwrap(), vec![2]);
    let tok = spm(&[("tokenizer.ggml.add_bos_token", GgufValue::Bool(false))]);
    assert_eq!(tok.encode_prompt("ab", false).unwrap(), vec![10]);
    let tok = spm(&[("tokenizer.ggml.add_eos_token", GgufValue::Bool(true))]);
    assert_eq!(tok.encode_prompt("ab", false).unwrap(), vec![2, 10, 1]);
}

#[test]
fn spm_space_prefix_goes_at_the_start_and_after_special_tokens() {
    // llama.cpp's default for SentencePiece when the key is absent.
    let file = spm_file(&[]);
    let mut w = GgufWriter::new();
    for (k, v) in file.metadata().iter() {
        if k != "tokenizer.ggml.add_space_prefix" {
            w.kv(k, v.clone());
        }
    }
    let tok = Tokenizer::from_gguf(&GgufFile::from_bytes(w.build()).unwrap()).unwrap();
    assert_eq!(tok.encode("ab", false).unwrap(), vec![11]);
    assert_eq!(tok.encode("ab<ctl>ab", true).unwrap(), vec![11, 12, 11]);
    // Decoding keeps the space (no leading space is stripped).
    assert_eq!(tok.decode(&[11]).unwrap(), " ab");
}

#[test]
fn spm_special_tokens_split_longest_first() {
    let tok = spm(&[]);
    // "<ctl>b" is user-defined: matched without `special`, and before the shorter
    // control token "<ctl>" with it.
    assert_eq!(tok.encode("a<ctl>b", false).unwrap(), vec![8, 13]);
    assert_eq!(tok.encode("<ctl><ctl>ba", true).unwrap(), vec![12, 13, 8]);
    assert_eq!(tok.encode("<end_of_turn>", true).unwrap(), vec![15]);
    assert_eq!(tok.encode("<unk>", true).unwrap(), vec![3]);
    assert!(matches!(
        tok.encode("<ctl>", false),
        Err(TokenizerError::NoByteToken(b'<'))
    ));
    // "</s>" ends generation, so it is control: parsed only with `special`.
    assert_eq!(tok.encode("</s>", true).unwrap(), vec![17]);
    assert!(tok.encode("</s>", false).is_err());
    assert_eq!(tok.end_of_generation_ids(), [1, 15, 17]);
}

#[test]
fn spm_decodes_pieces_as_llama_cpp() {
    let tok = spm(&[]);
    let ids = [2, 11, 9, 5, 6, 12, 14, 13, 3, 16, 4];
    assert_eq!(
        tok.decode(&ids).unwrap(),
        "<bos> abbé<ctl>\n\n<ctl>b<unk>\n"
    );
    assert_eq!(tok.decode_skip_special(&ids).unwrap(), " abbé\n\n<ctl>b\n");
    let mut stream = tok.stream(true);
    let pieces: Vec<String> = ids.iter().map(|&id| stream.push(id).unwrap()).collect();
    assert_eq!(
        pieces,
        ["", " ab", "b", "", "é", "", "\n\n", "<ctl>b", "", "", "\n"]
    );
    assert_eq!(stream.finish(), 0);
    // An invalid byte is replaced at once; a dangling lead byte is dropped on finish.
    assert_eq!(stream.push(6).unwrap(), "\u{FFFD}");
    assert_eq!(stream.push(5).unwrap(), "");
    assert_eq!(stream.finish(), 1);
    assert_eq!(tok.decode_generated(&[6, 5]).unwrap(), "\u{FFFD}");
    assert_eq!(tok.decode(&[6, 5]).unwrap(), "\u{FFFD}\u{FFFD}");
}

#[test]
fn spm_chat_does_not_double_bos() {
    let t = "{{ bos_token }}{% for m in messages %}{{ m.content }}<ctl>{% endfor %}";
    let tok = spm(&[("tokenizer.chat_template", GgufValue::String(t.into()))]);
    let messages = [ChatMessage::new(Role::User, "ab<ctl>b")];
    assert_eq!(
        tok.chat_prompt(&messages, false).unwrap(),
        "<bos>ab<ctl>b<ctl>"
    );
    assert_eq!(
        tok.encode_chat(&messages, false).unwrap(),
        vec![2, 10, 13, 12]
    );
}

#[test]
fn malformed_metadata_gives_typed_errors() {
    let err = |extra: &[(&str, GgufValue)]| Tokenizer::from_gguf(&spm_file(extra)).unwrap_err();
    assert!(matches!(
        err(&[("tokenizer.ggml.model", GgufValue::String("bert".into()))]),
        TokenizerError::UnsupportedModel(m) if m == "bert"
    ));
    assert!(matches!(
        err(&[("tokenizer.ggml.scores", f32_array(&[0.0; 3]))]),
        TokenizerError::BadVocab(m) if m == "3 scores for 18 tokens"
    ));
    let mut nan = vec![0.0; SPM_VOCAB.len()];
    nan[4] = f32::NAN;
    assert!(matches!(
        err(&[("tokenizer.ggml.scores", f32_array(&nan))]),
        TokenizerError::BadVocab(m) if m == "score of token 4 is NaN"
    ));
    assert!(matches!(
        err(&[("tokenizer.ggml.scores", str_array(&["x"; 18]))]),
        TokenizerError::BadVocab(_)
    ));
    assert!(matches!(
        err(&[("tokenizer.ggml.token_type", i32_array(&[1; 4]))]),
        TokenizerError::BadVocab(m) if m == "4 token types for 18 tokens"
    ));
    assert!(matches!(
        err(&[("tokenizer.ggml.bos_token_id", GgufValue::U32(18))]),
        TokenizerError::SpecialIdOutOfRange {
            id: 18,
            vocab_size: 18,
            ..
        }
    ));
    assert!(matches!(
        err(&[("tokenizer.ggml.eot_token_id", GgufValue::I32(-1))]),
        TokenizerError::Gguf(_)
    ));
    assert!(matches!(
        err(&[("tokenizer.ggml.add_bos_token", GgufValue::U32(1))]),
        TokenizerError::Gguf(_)
    ));
    let mut dup: Vec<&str> = SPM_VOCAB.iter().map(|v| v.0).collect();
    dup[9] = "a";
    assert!(matches!(
        err(&[("tokenizer.ggml.tokens", str_array(&dup))]),
        TokenizerError::BadVocab(m) if m.contains("appears twice")
    ));
    // Metadata that is missing.
    let without = |key: &str| {
        let file = spm_file(&[]);
        let mut w = GgufWriter::new();
        for (k, v) in file.metadata().iter() {
            if k != key {
                w.kv(k, v.clone());
            }
        }
        Tokenizer::from_gguf(&GgufFile::from_bytes(w.build()).unwrap()).unwrap_err()
    };
    assert!(matches!(
        without("tokenizer.ggml.scores"),
        TokenizerError::Gguf(GgufError::MissingKey(k)) if k == "tokenizer.ggml.scores"
    ));
    assert!(matches!(
        without("tokenizer.ggml.eos_token_id"),
        TokenizerError::Gguf(GgufError::MissingKey(_))
    ));
    assert!(matches!(
        without("tokenizer.ggml.bos_token_id"),
        TokenizerError::MissingSpecialId { .. }
    ));
    assert!(matches!(
        without("tokenizer.ggml.tokens"),
        TokenizerError::Gguf(GgufError::MissingKey(_))
    ));
}
