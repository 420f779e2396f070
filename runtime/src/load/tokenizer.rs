//! Tokenizer and chat template built from GGUF metadata, giving llama.cpp's token ids.
//!
//! Two vocabulary models (`tokenizer.ggml.model`):
//! - `gpt2`: byte-level BPE with merges, after one of llama.cpp's pre-tokenizers
//!   (`tokenizer.ggml.pre`): `smollm` (each digit split off, then GPT-2's regex) or
//!   `qwen2` (the Qwen2 regex). Built from the `tokenizers` crate.
//! - `llama`: SentencePiece with scores and byte fallback (see the `spm` module).
//!
//! Before either model runs, text is split on the text of special tokens as llama.cpp's
//! `tokenizer_st_partition` does: longest token text first; control and unknown tokens
//! only when the caller asks to parse special tokens, user-defined tokens always.
//!
//! Entry points: [`Tokenizer::encode`] gives the ids of a piece of text;
//! [`Tokenizer::encode_prompt`] adds the BOS/EOS the model asks for (llama.cpp's
//! `add_special`); [`Tokenizer::encode_chat`] renders the chat template and parses special
//! tokens in the template's text only, never in message contents.

mod chat;
mod spm;
mod stream;
#[cfg(test)]
mod tests;

pub use chat::{
    ChatMessage, MAX_CHAT_PROMPT_BYTES, Role, TEMPLATE_FUEL_PER_MESSAGE, TEMPLATE_RECURSION_LIMIT,
    UnknownRole,
};
pub use stream::TextStream;

use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;

use tokenizers::SplitDelimiterBehavior;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

use crate::load::gguf::{GgufError, GgufFile};

/// llama.cpp token type of ordinary vocabulary tokens.
pub const TOKEN_TYPE_NORMAL: i32 = 1;
/// llama.cpp token type of the unknown token.
pub const TOKEN_TYPE_UNKNOWN: i32 = 2;
/// llama.cpp token type of control tokens such as `<|im_start|>`.
pub const TOKEN_TYPE_CONTROL: i32 = 3;
/// llama.cpp token type of user-defined tokens (matched whole, not special).
pub const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// llama.cpp token type of unused tokens (never produced, decoded as nothing).
pub const TOKEN_TYPE_UNUSED: i32 = 5;
/// llama.cpp token type of SentencePiece byte-fallback tokens `<0xXX>`.
pub const TOKEN_TYPE_BYTE: i32 = 6;

/// llama.cpp's `qwen2` pre-tokenizer regex (Qwen2's, with the case-insensitive
/// contractions spelled out as llama.cpp does).
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token texts that end generation (llama.cpp's `special_eog_ids` rule, llama-vocab.cpp).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Special ids llama.cpp finds by token text when the GGUF does not give them: the
/// metadata key and the texts it looks for. The FIM padding, repository and file-separator
/// tokens also end generation; every one found is treated as a control token.
const DETECTED_IDS: &[(&str, &[&str])] = &[
    (
        "tokenizer.ggml.eot_token_id",
        &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "<｜end▁of▁sentence｜>",
            "<end_of_utterance>",
        ],
    ),
    ("tokenizer.ggml.eom_token_id", &["<|eom_id|>"]),
    (
        "tokenizer.ggml.fim_pre_token_id",
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
    ),
    (
        "tokenizer.ggml.fim_suf_token_id",
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
    ),
    (
        "tokenizer.ggml.fim_mid_token_id",
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
    ),
    (
        "tokenizer.ggml.fim_pad_token_id",
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    ),
    (
        "tokenizer.ggml.fim_rep_token_id",
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
    ),
    ("tokenizer.ggml.fim_sep_token_id", &["<|file_sep|>"]),
];

/// The [`DETECTED_IDS`] keys whose tokens end generation, besides EOS, EOT and EOM.
const EOG_KEYS: &[&str] = &[
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
    "tokenizer.ggml.fim_pad_token_id",
    "tokenizer.ggml.fim_rep_token_id",
    "tokenizer.ggml.fim_sep_token_id",
];

/// Errors produced while building or using a [`Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Required metadata is missing or malformed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// `tokenizer.ggml.model` names a vocabulary model this crate does not implement.
    #[error(
        "unsupported tokenizer model {0:?} (supported: \"gpt2\" byte-level BPE, \"llama\" SentencePiece)"
    )]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    #[error("unsupported pre-tokenizer {0:?} (supported: \"smollm\", \"qwen2\")")]
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
    /// The metadata asks to add a BOS or EOS token but does not say which.
    #[error("{flag} is true but {key} is not set")]
    MissingSpecialId {
        /// The flag key (`tokenizer.ggml.add_bos_token` or `add_eos_token`).
        flag: &'static str,
        /// The id key that is missing.
        key: &'static str,
    },
    /// The tokenizers library rejected the vocabulary, merges or pre-tokenizer.
    #[error("cannot build BPE tokenizer: {0}")]
    Build(String),
    /// Encoding failed inside the tokenizers library.
    #[error("cannot encode text: {0}")]
    Encode(String),
    /// A SentencePiece vocabulary has no byte-fallback token for a byte of the text.
    #[error("the vocabulary has no token for byte 0x{0:02X} (no <0x{0:02X}> byte-fallback token)")]
    NoByteToken(u8),
    /// A token id is outside the vocabulary.
    #[error("token id {id} is outside the {vocab_size}-token vocabulary")]
    UnknownId {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab_size: usize,
    },
    /// The file has no `tokenizer.chat_template`.
    #[error(
        "the model's GGUF file has no chat template (tokenizer.chat_template; base models \
         have none): give the prompt without --chat"
    )]
    NoChatTemplate,
    /// The chat template failed to parse or render.
    #[error("chat template error: {0}")]
    Template(#[from] minijinja::Error),
    /// The chat template changes message contents (beyond trimming whitespace) or
    /// branches on them, so [`Tokenizer::encode_chat`] cannot tell them from its own text.
    #[error(
        "the chat template transforms message contents, so they cannot be kept apart from its own text"
    )]
    ChatContentAltered,
}

/// Shorthand result type for this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// llama.cpp's token attributes, derived from the GGUF token types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attr(u8);

impl Attr {
    const UNDEFINED: Self = Self(0);
    const NORMAL: Self = Self(1);
    const UNKNOWN: Self = Self(2);
    const UNUSED: Self = Self(4);
    const CONTROL: Self = Self(8);
    const USER_DEFINED: Self = Self(16);
    const BYTE: Self = Self(32);

    fn from_type(ty: i32) -> Self {
        match ty {
            TOKEN_TYPE_NORMAL => Self::NORMAL,
            TOKEN_TYPE_UNKNOWN => Self::UNKNOWN,
            TOKEN_TYPE_CONTROL => Self::CONTROL,
            TOKEN_TYPE_USER_DEFINED => Self::USER_DEFINED,
            TOKEN_TYPE_UNUSED => Self::UNUSED,
            TOKEN_TYPE_BYTE => Self::BYTE,
            _ => Self::UNDEFINED,
        }
    }

    /// Whether any flag of `other` is set.
    fn any(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    fn or(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// The vocabulary model that turns text without special tokens into ids.
#[derive(Debug, Clone)]
enum Model {
    /// Byte-level BPE: pre-tokenizer and merges only, no added tokens (special tokens are
    /// split out before).
    Bpe(Box<tokenizers::Tokenizer>),
    /// SentencePiece.
    Spm(spm::Spm),
}

/// Where control and unknown tokens may be matched in text.
#[derive(Debug, Clone, Copy)]
enum Special<'a> {
    /// Nowhere: their text is ordinary text.
    None,
    /// Anywhere.
    All,
    /// Only inside these byte ranges (sorted, disjoint).
    Within(&'a [Range<usize>]),
}

impl Special<'_> {
    fn from_flag(special: bool) -> Self {
        if special { Self::All } else { Self::None }
    }

    /// Whether a control token may be matched at `span`.
    fn allows(self, span: Range<usize>) -> bool {
        match self {
            Self::None => false,
            Self::All => true,
            Self::Within(ranges) => ranges
                .iter()
                .any(|r| r.start <= span.start && span.end <= r.end),
        }
    }
}

/// Text split on special tokens: runs of plain text and special-token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fragment {
    Text(String),
    Token(u32),
}

/// Appends text to `out`, joining it to a preceding text fragment.
fn push_text(out: &mut Vec<Fragment>, text: &str) {
    if text.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(Fragment::Text(t)) => t.push_str(text),
        _ => out.push(Fragment::Text(text.to_string())),
    }
}

/// A tokenizer that reproduces llama.cpp's token ids, with the model's chat template.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    model: Model,
    tokens: Vec<String>,
    attrs: Vec<Attr>,
    /// Control, unknown and user-defined ids, longest text first (equal lengths: lower id
    /// first): the order in which they are split out of text.
    special_tokens: Vec<u32>,
    bos_id: Option<u32>,
    eos_id: u32,
    add_bos: bool,
    add_eos: bool,
    /// Sorted, unique.
    end_of_generation: Vec<u32>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Reads a GGUF file and builds its tokenizer.
    pub fn from_gguf_path(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_gguf(&GgufFile::open(path)?)
    }

    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model_name = file.get_str("tokenizer.ggml.model")?;
        let is_spm = match model_name {
            "gpt2" => false,
            "llama" => true,
            other => return Err(TokenizerError::UnsupportedModel(other.to_string())),
        };
        let has = |key: &str| file.metadata().get(key).is_some();
        let tokens: Vec<String> = file
            .get_str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .enumerate()
            // llama.cpp renames empty tokens so that none matches everywhere.
            .map(|(i, t)| match t {
                "" => format!("[EMPTY_{i}]"),
                t => t.to_string(),
            })
            .collect();
        let vocab_size = tokens.len();
        if u32::try_from(vocab_size).is_err() {
            return Err(TokenizerError::BadVocab(format!("{vocab_size} tokens")));
        }
        let mut text_to_id = std::collections::HashMap::with_capacity(vocab_size);
        for (id, tok) in tokens.iter().enumerate() {
            if text_to_id.insert(tok.as_str(), id as u32).is_some() {
                return Err(TokenizerError::BadVocab(format!(
                    "token {tok:?} appears twice"
                )));
            }
        }
        let types = if has("tokenizer.ggml.token_type") {
            file.get_i32_array("tokenizer.ggml.token_type")?
        } else {
            vec![TOKEN_TYPE_NORMAL; vocab_size]
        };
        if types.len() != vocab_size {
            return Err(TokenizerError::BadVocab(format!(
                "{} token types for {vocab_size} tokens",
                types.len()
            )));
        }
        let mut attrs: Vec<Attr> = types.into_iter().map(Attr::from_type).collect();

        let special_id = |key: &'static str| -> Result<Option<u32>> {
            if !has(key) {
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
        let flag = |key: &'static str, default: bool| -> Result<bool> {
            Ok(if has(key) {
                file.get_bool(key)?
            } else {
                default
            })
        };
        let add_bos = flag("tokenizer.ggml.add_bos_token", is_spm)?;
        let add_eos = flag("tokenizer.ggml.add_eos_token", false)?;
        if add_bos && bos_id.is_none() {
            return Err(TokenizerError::MissingSpecialId {
                flag: "tokenizer.ggml.add_bos_token",
                key: "tokenizer.ggml.bos_token_id",
            });
        }

        // End of generation, as llama.cpp decides it; every such token becomes control.
        let mut end_of_generation = vec![eos_id];
        for &(key, texts) in DETECTED_IDS {
            let id = match special_id(key)? {
                Some(id) => Some(id),
                None => {
                    // llama.cpp takes the first match in hash-map order; vocabularies
                    // hold at most one of these texts, so the lowest id is taken.
                    let found = texts
                        .iter()
                        .filter_map(|t| text_to_id.get(t))
                        .min()
                        .copied();
                    if let Some(id) = found {
                        attrs[id as usize] = attrs[id as usize].or(Attr::CONTROL);
                    }
                    found
                }
            };
            if let Some(id) = id.filter(|_| EOG_KEYS.contains(&key)) {
                end_of_generation.push(id);
            }
        }
        for text in EOG_TEXTS {
            if let Some(&id) = text_to_id.get(text) {
                attrs[id as usize] = attrs[id as usize].or(Attr::CONTROL);
                end_of_generation.push(id);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();
        drop(text_to_id);

        let mut special_tokens: Vec<u32> = (0..vocab_size as u32)
            .filter(|&id| {
                attrs[id as usize].any(Attr::CONTROL.or(Attr::USER_DEFINED).or(Attr::UNKNOWN))
            })
            .collect();
        special_tokens.sort_by_key(|&id| std::cmp::Reverse(tokens[id as usize].len()));

        let model = if is_spm {
            Model::Spm(spm_model(file, &tokens)?)
        } else {
            Model::Bpe(Box::new(bpe_model(file, &tokens)?))
        };
        let chat_template = if has("tokenizer.chat_template") {
            Some(file.get_str("tokenizer.chat_template")?.to_string())
        } else {
            None
        };
        Ok(Self {
            model,
            tokens,
            attrs,
            special_tokens,
            bos_id,
            eos_id,
            add_bos,
            add_eos,
            end_of_generation,
            chat_template,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Beginning-of-sequence id, if the model declares one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Whether [`Self::encode_prompt`] and [`Self::encode_chat`] start with BOS:
    /// `tokenizer.ggml.add_bos_token`, or when absent llama.cpp's default (true for
    /// SentencePiece, false for byte-level BPE).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether [`Self::encode_prompt`] and [`Self::encode_chat`] end with EOS:
    /// `tokenizer.ggml.add_eos_token`, false when absent.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The ids llama.cpp stops generating at, sorted: EOS, the end-of-turn and
    /// end-of-message tokens, the FIM padding, repository and file-separator tokens, and
    /// every token whose text is a known end marker (`<|im_end|>`, `<end_of_turn>`,
    /// `<|endoftext|>`, `</s>`, `<|eot_id|>`, ...).
    pub fn end_of_generation_ids(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// Whether generation stops at `id` (see [`Self::end_of_generation_ids`]).
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// The raw Jinja chat template, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Replaces the weights file's chat template (`None`: no template).
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    /// The vocabulary string of a token (byte-level or `▁` form), if `id` is in range.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.tokens.get(id as usize).cloned()
    }

    /// Encodes text to token ids, without BOS or EOS.
    ///
    /// With `special`, the text of control tokens such as `<|im_start|>` becomes their
    /// single id; without, it is tokenized as ordinary text. User-defined tokens (Qwen's
    /// `<tool_call>`, Gemma's runs of newlines) are matched either way, as llama.cpp does.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let fragments = self.partition(text, Special::from_flag(special));
        let mut ids = Vec::new();
        self.encode_fragments(&fragments, &mut ids)?;
        Ok(ids)
    }

    /// Encodes a prompt: [`Self::encode`] with BOS in front when [`Self::add_bos`] and EOS
    /// at the end when [`Self::add_eos`] (llama.cpp's `tokenize` with `add_special`).
    pub fn encode_prompt(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let fragments = self.partition(text, Special::from_flag(special));
        self.encode_with_specials(&fragments)
    }

    /// Splits `text` on special-token text as llama.cpp's `tokenizer_st_partition` does:
    /// token by token, longest text first, every occurrence in the text not yet split
    /// out. User-defined tokens match anywhere; control and unknown tokens as `special`
    /// allows. Adjacent text is joined into one fragment.
    fn partition(&self, text: &str, special: Special<'_>) -> Vec<Fragment> {
        enum Piece {
            Text(Range<usize>),
            Token(u32),
        }
        let mut pieces = vec![Piece::Text(0..text.len())];
        for &id in &self.special_tokens {
            let control = self.attrs[id as usize].any(Attr::CONTROL.or(Attr::UNKNOWN));
            if control && matches!(special, Special::None) {
                continue;
            }
            let tok = self.tokens[id as usize].as_str();
            if !pieces
                .iter()
                .any(|p| matches!(p, Piece::Text(r) if text[r.clone()].contains(tok)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(pieces.len() + 2);
            for p in pieces {
                let Piece::Text(range) = p else {
                    next.push(p);
                    continue;
                };
                let hay = &text[range.clone()];
                let (mut from, mut last) = (0, 0);
                while let Some(found) = hay[from..].find(tok) {
                    let at = from + found;
                    let (start, end) = (range.start + at, range.start + at + tok.len());
                    if control && !special.allows(start..end) {
                        from = at + hay[at..].chars().next().map_or(1, char::len_utf8);
                        continue;
                    }
                    if at > last {
                        next.push(Piece::Text(range.start + last..start));
                    }
                    next.push(Piece::Token(id));
                    (from, last) = (at + tok.len(), at + tok.len());
                }
                if last < hay.len() {
                    next.push(Piece::Text(range.start + last..range.end));
                }
            }
            pieces = next;
        }
        let mut fragments = Vec::new();
        for p in pieces {
            match p {
                Piece::Text(r) => push_text(&mut fragments, &text[r]),
                Piece::Token(id) => fragments.push(Fragment::Token(id)),
            }
        }
        fragments
    }

    /// Appends the ids of `fragments` to `out`.
    fn encode_fragments(&self, fragments: &[Fragment], out: &mut Vec<u32>) -> Result<()> {
        // SentencePiece's space prefix goes before text at the start or after a token.
        let mut after_token = true;
        for f in fragments {
            match f {
                Fragment::Token(id) => {
                    out.push(*id);
                    after_token = true;
                }
                Fragment::Text(text) => {
                    match &self.model {
                        Model::Bpe(tk) => {
                            let enc = tk
                                .encode(text.as_str(), false)
                                .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                            out.extend_from_slice(enc.get_ids());
                        }
                        Model::Spm(spm) => spm
                            .encode(text, spm.add_space_prefix() && after_token, out)
                            .map_err(TokenizerError::NoByteToken)?,
                    }
                    after_token = false;
                }
            }
        }
        Ok(())
    }

    /// [`Self::encode_fragments`] between BOS and EOS as the model asks.
    fn encode_with_specials(&self, fragments: &[Fragment]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let Some(bos) = self.bos_id.filter(|_| self.add_bos) {
            ids.push(bos);
        }
        self.encode_fragments(fragments, &mut ids)?;
        if self.add_eos {
            ids.push(self.eos_id);
        }
        Ok(ids)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.tokens.len()) {
            Some(&id) => Err(TokenizerError::UnknownId {
                id,
                vocab_size: self.tokens.len(),
            }),
            None => Ok(()),
        }
    }

    /// The bytes a token stands for, as llama.cpp's `token_to_piece` gives them; control
    /// and unknown tokens give their text only with `special`. `id` must be in range.
    fn piece(&self, id: u32, special: bool) -> Cow<'_, [u8]> {
        let text = self.tokens[id as usize].as_str();
        let attr = self.attrs[id as usize];
        if attr.any(Attr::CONTROL.or(Attr::UNKNOWN)) {
            return if special {
                Cow::Borrowed(text.as_bytes())
            } else {
                Cow::Borrowed(&[])
            };
        }
        if attr.any(Attr::USER_DEFINED) {
            return Cow::Borrowed(text.as_bytes());
        }
        if attr.any(Attr::NORMAL) {
            return match self.model {
                Model::Bpe(_) => Cow::Owned(byte_level_decode(text)),
                Model::Spm(_) if text.contains(spm::SPACE) => {
                    Cow::Owned(text.replace(spm::SPACE, " ").into_bytes())
                }
                Model::Spm(_) => Cow::Borrowed(text.as_bytes()),
            };
        }
        if attr.any(Attr::BYTE) {
            let byte = text
                .strip_prefix("<0x")
                .and_then(|t| t.strip_suffix('>'))
                .and_then(|hex| u8::from_str_radix(hex, 16).ok());
            if let Some(b) = byte {
                return Cow::Owned(vec![b]);
            }
        }
        Cow::Borrowed(&[])
    }

    fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.check_ids(ids)?;
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.piece(id, !skip_special).into_owned())
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Decodes ids to text: each token's piece as llama.cpp renders it, concatenated, with
    /// control tokens written out as their text. SentencePiece `▁` becomes a space and no
    /// leading space is removed.
    ///
    /// Byte sequences that are not valid UTF-8 decode to U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Decodes ids to text, leaving control and unknown tokens out.
    pub fn decode_skip_special(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }
}

/// The byte-level BPE model of a `gpt2` vocabulary.
fn bpe_model(file: &GgufFile, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    let pre = file.get_str("tokenizer.ggml.pre")?;
    let pre_tokenizer = match pre {
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ]),
        "qwen2" => Sequence::new(vec![
            Split::new(
                SplitPattern::Regex(QWEN2_REGEX.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Build(e.to_string()))?
            .into(),
            ByteLevel::new(false, true, false).into(),
        ]),
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    };
    let merges = file
        .get_str_array("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TokenizerError::BadVocab(format!("merge {m:?} has no space")))
        })
        .collect::<Result<Vec<_>>>()?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Build(e.to_string()))?;
    let mut tk = tokenizers::Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(pre_tokenizer));
    Ok(tk)
}

/// The SentencePiece model of a `llama` vocabulary.
fn spm_model(file: &GgufFile, tokens: &[String]) -> Result<spm::Spm> {
    let key = "tokenizer.ggml.scores";
    let scores = file
        .get_array(key)?
        .iter()
        .map(|v| v.as_float().map(|f| f as f32))
        .collect::<Option<Vec<f32>>>()
        .ok_or_else(|| TokenizerError::BadVocab(format!("{key} holds a non-number")))?;
    if scores.len() != tokens.len() {
        return Err(TokenizerError::BadVocab(format!(
            "{} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    if let Some(id) = scores.iter().position(|s| s.is_nan()) {
        return Err(TokenizerError::BadVocab(format!(
            "score of token {id} is NaN"
        )));
    }
    let prefix_key = "tokenizer.ggml.add_space_prefix";
    let add_space_prefix = match file.metadata().get(prefix_key) {
        Some(_) => file.get_bool(prefix_key)?,
        None => true,
    };
    Ok(spm::Spm::new(tokens, scores, add_space_prefix))
}

/// The bytes of a byte-level BPE token: each character stands for one byte (GPT-2's
/// `bytes_to_unicode`); a character outside that table stands for its own UTF-8.
fn byte_level_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        let byte = match u32::from(c) {
            // Printable Latin-1 characters stand for themselves.
            cp @ (0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF) => Some(cp as u8),
            // The other 68 bytes map to U+0100.. in ascending byte order.
            cp @ 0x100..=0x120 => Some((cp - 0x100) as u8),
            cp @ 0x121..=0x142 => Some((cp - 0x121 + 0x7F) as u8),
            0x143 => Some(0xAD),
            _ => None,
        };
        match byte {
            Some(b) => out.push(b),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}
