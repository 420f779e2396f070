//! Tokenizer and chat template built from GGUF metadata.
//!
//! Supports byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`)
//! with llama.cpp's `smollm` pre-tokenizer: each digit is split off, then
//! GPT-2's byte-level regex applies. Control tokens (token type 3) become
//! special added tokens. No BOS token is prepended.

use std::path::Path;

use serde::Serialize;
use tokenizers::AddedToken;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;

use crate::load::gguf::{GgufError, GgufFile};

/// llama.cpp token type of control tokens such as `<|im_start|>`.
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp token type of user-defined tokens (matched whole, not special).
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Errors produced while building or using a [`Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Required metadata is missing or malformed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `tokenizer.ggml.model` is not the byte-level BPE model.
    #[error("unsupported tokenizer model {0:?} (only \"gpt2\" byte-level BPE is supported)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    #[error("unsupported pre-tokenizer {0:?} (only \"smollm\" is supported)")]
    UnsupportedPreTokenizer(String),
    /// The token table is inconsistent.
    #[error("invalid token table: {0}")]
    BadVocab(String),
    /// A special-token id in the metadata is outside the vocabulary.
    #[error("{key} = {id} is outside the {vocab_size}-token vocabulary")]
    SpecialIdOutOfRange {
        /// The metadata key.
        key: &'static str,
        /// The id found.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// The tokenizers library rejected the vocabulary or merges.
    #[error("cannot build BPE tokenizer: {0}")]
    Build(String),
    /// Encoding failed inside the tokenizers library.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// Decoding failed inside the tokenizers library.
    #[error("cannot decode ids: {0}")]
    Decode(String),
    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the {vocab_size}-token vocabulary")]
    UnknownId {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// The file has no `tokenizer.chat_template`.
    #[error("the model has no chat template")]
    NoChatTemplate,
    /// The chat template failed to parse or render.
    #[error("chat template error: {0}")]
    Template(#[from] minijinja::Error),
}

/// Shorthand result type for this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// Speaker: `system`, `user` or `assistant`.
    pub role: String,
    /// Message text.
    pub content: String,
}

impl ChatMessage {
    /// Builds a message from a role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A byte-level BPE tokenizer with the model's chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// Splits control tokens out of the text before BPE.
    special: tokenizers::Tokenizer,
    /// Same vocabulary, but control-token text is tokenized as plain text.
    plain: tokenizers::Tokenizer,
    vocab_size: usize,
    bos_id: Option<u32>,
    eos_id: u32,
    bos_token: Option<String>,
    eos_token: String,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Reads a GGUF file and builds its tokenizer.
    pub fn from_gguf_path(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_gguf(&GgufFile::open(path)?)
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = file.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let pre = file.get_str("tokenizer.ggml.pre")?;
        if pre != "smollm" {
            return Err(TokenizerError::UnsupportedPreTokenizer(pre.to_string()));
        }
        let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
        let vocab_size = tokens.len();
        if u32::try_from(vocab_size).is_err() {
            return Err(TokenizerError::BadVocab(format!("{vocab_size} tokens")));
        }
        let types = match file.metadata().get("tokenizer.ggml.token_type") {
            Some(_) => file.get_i32_array("tokenizer.ggml.token_type")?,
            None => vec![1; vocab_size],
        };
        if types.len() != vocab_size {
            return Err(TokenizerError::BadVocab(format!(
                "{} token types for {vocab_size} tokens",
                types.len()
            )));
        }
        let merges = file
            .get_str_array("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError::BadVocab(format!("merge {m:?} has no space")))
            })
            .collect::<Result<Vec<_>>>()?;

        let mut vocab = Vocab::default();
        for (id, tok) in tokens.iter().enumerate() {
            if vocab.insert((*tok).to_string(), id as u32).is_some() {
                return Err(TokenizerError::BadVocab(format!(
                    "token {tok:?} appears twice"
                )));
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError::Build(e.to_string()))?;

        let mut tk = tokenizers::Tokenizer::new(bpe);
        tk.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tk.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        let added_of_type = |wanted: i32, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|&(_, &ty)| ty == wanted)
                .map(|(tok, _)| AddedToken::from(tok.to_string(), special).normalized(false))
                .collect()
        };
        tk.add_special_tokens(&added_of_type(TOKEN_TYPE_CONTROL, true));
        tk.add_tokens(&added_of_type(TOKEN_TYPE_USER_DEFINED, false));
        let mut plain = tk.clone();
        plain.set_encode_special_tokens(true);

        let special_id = |key: &'static str| -> Result<Option<u32>> {
            if file.metadata().get(key).is_none() {
                return Ok(None);
            }
            let id = file.get_u32(key)?;
            if id as usize >= vocab_size {
                return Err(TokenizerError::SpecialIdOutOfRange {
                    key,
                    id,
                    vocab_size,
                });
            }
            Ok(Some(id))
        };
        let bos_id = special_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = special_id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| GgufError::MissingKey("tokenizer.ggml.eos_token_id".into()))?;
        let chat_template = match file.metadata().get("tokenizer.chat_template") {
            Some(_) => Some(file.get_str("tokenizer.chat_template")?.to_string()),
            None => None,
        };
        Ok(Self {
            special: tk,
            plain,
            vocab_size,
            bos_id,
            eos_id,
            bos_token: bos_id.map(|id| tokens[id as usize].to_string()),
            eos_token: tokens[eos_id as usize].to_string(),
            chat_template,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Beginning-of-sequence id, if the model declares one (never added by [`Self::encode`]).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The raw Jinja chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The vocabulary string of a token (byte-level form), if `id` is in range.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.special.id_to_token(id)
    }

    /// Encodes text to token ids.
    ///
    /// With `special`, control-token text such as `<|im_start|>` becomes its
    /// single id; without, it is tokenized as ordinary text.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let tk = if special { &self.special } else { &self.plain };
        let enc = tk
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            Some(&id) => Err(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size,
            }),
            None => Ok(()),
        }
    }

    fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        self.special
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Decodes ids to text, writing control tokens out as their text.
    ///
    /// Byte sequences that are not valid UTF-8 decode to U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Decodes ids to text, leaving control tokens out.
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    /// Starts incremental decoding; see [`TextStream`].
    pub fn stream(&self, skip_special: bool) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            skip_special,
            ids: Vec::new(),
            read: 0,
        }
    }

    /// Renders the model's chat template for `messages`.
    ///
    /// The template sees `messages`, `add_generation_prompt`, `bos_token` and
    /// `eos_token`, with Jinja's `trim_blocks` and `lstrip_blocks` on (as
    /// Hugging Face renders chat templates) and a `raise_exception(msg)`
    /// function that fails rendering with `msg`.
    pub fn chat_prompt(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let source = self
            .chat_template
            .as_deref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let template = env.template_from_str(source)?;
        Ok(template.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => &self.eos_token,
        })?)
    }
}

/// Incremental decoder for generated tokens.
///
/// [`TextStream::push`] returns only the text that the new id completes:
/// bytes of a UTF-8 character split across tokens are held back until the
/// character is whole, so concatenating the returned pieces (plus
/// [`TextStream::finish`]) equals decoding all ids at once.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    /// Ids since the last character boundary; `ids[..read]` were emitted.
    ids: Vec<u32>,
    read: usize,
}

impl TextStream<'_> {
    /// Appends one id and returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tokenizer.check_ids(&[id])?;
        self.ids.push(id);
        let done = self
            .tokenizer
            .decode_with(&self.ids[..self.read], self.skip_special)?;
        let all = self.tokenizer.decode_with(&self.ids, self.skip_special)?;
        if all.ends_with('\u{FFFD}') || all.len() <= done.len() {
            return Ok(String::new());
        }
        let Some(new) = all.strip_prefix(done.as_str()) else {
            return Ok(String::new());
        };
        let new = new.to_string();
        // `ids[..read]` decoded to complete characters, so `read` is a
        // character boundary: later decodes can start there.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(new)
    }

    /// Returns any held-back text (with U+FFFD for incomplete characters) and resets.
    pub fn finish(&mut self) -> Result<String> {
        let done = self
            .tokenizer
            .decode_with(&self.ids[..self.read], self.skip_special)?;
        let all = self.tokenizer.decode_with(&self.ids, self.skip_special)?;
        self.ids.clear();
        self.read = 0;
        Ok(all
            .strip_prefix(done.as_str())
            .unwrap_or_default()
            .to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::load::gguf::GgufValue;
    use crate::load::gguf::test_writer::{GgufWriter, str_array};

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
            acc.push_str(&stream.finish().unwrap());
            assert_eq!(acc, text);
        }
        // The emoji 🙂 is split over two tokens; the first yields nothing.
        let ids = tok.encode("🙂", false).unwrap();
        assert_eq!(ids.len(), 2);
        let mut stream = tok.stream(false);
        assert_eq!(stream.push(ids[0]).unwrap(), "");
        assert_eq!(stream.push(ids[1]).unwrap(), "🙂");
        // A dangling partial character comes out on finish as U+FFFD.
        let mut stream = tok.stream(false);
        assert_eq!(stream.push(ids[0]).unwrap(), "");
        assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
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
        let user = ChatMessage::new("user", "Name three primary colors.");
        // The template inserts SmolLM's default system prompt when the
        // conversation has none; the reference prompt was written without it.
        let default_system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
        let rendered = tok.chat_prompt(std::slice::from_ref(&user), true).unwrap();
        assert_eq!(rendered, format!("{default_system}{want}"));
        let without_prompt = tok.chat_prompt(std::slice::from_ref(&user), false).unwrap();
        assert_eq!(format!("{without_prompt}<|im_start|>assistant\n"), rendered);
        let with_system = tok
            .chat_prompt(&[ChatMessage::new("system", "Be brief."), user], true)
            .unwrap();
        assert_eq!(
            with_system,
            format!("<|im_start|>system\nBe brief.<|im_end|>\n{want}")
        );
    }

    fn tiny_file(pre: &str, template: Option<&str>) -> GgufFile {
        // Byte-level symbols: "Ġ" is the space byte.
        let tokens = ["<ctl>", "a", "b", "ab", "Ġ", "Ġab", "1", "2", "12"];
        let mut w = GgufWriter::new();
        w.kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
            .kv("tokenizer.ggml.pre", GgufValue::String(pre.into()))
            .kv("tokenizer.ggml.tokens", str_array(&tokens))
            .kv(
                "tokenizer.ggml.token_type",
                GgufValue::Array {
                    elem_type: crate::load::gguf::GgufValueType::I32,
                    items: [3, 1, 1, 1, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec(),
                },
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
        let tok = Tokenizer::from_gguf(&tiny_file("smollm", None)).unwrap();
        // "ab ab" -> "ab", "Ġab"; "12" never merges because digits are split first.
        assert_eq!(tok.encode("ab ab", false).unwrap(), vec![3, 5]);
        assert_eq!(tok.encode("12", false).unwrap(), vec![6, 7]);
        assert_eq!(tok.encode("a<ctl>b", true).unwrap(), vec![1, 0, 2]);
        assert_eq!(tok.bos_id(), None);
        assert_eq!(tok.decode(&[3, 5, 0]).unwrap(), "ab ab<ctl>");
        assert!(matches!(
            tok.chat_prompt(&[], true),
            Err(TokenizerError::NoChatTemplate)
        ));
    }

    #[test]
    fn tiny_template_errors_and_raise_exception() {
        let t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}\
                 {% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ eos_token }}";
        let tok = Tokenizer::from_gguf(&tiny_file("smollm", Some(t))).unwrap();
        assert_eq!(
            tok.chat_prompt(&[ChatMessage::new("user", "hi")], false)
                .unwrap(),
            "[user]hi<ctl>"
        );
        let err = tok
            .chat_prompt(&[ChatMessage::new("assistant", "x")], false)
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
}
