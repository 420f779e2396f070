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

mod spm;

use std::borrow::Cow;
use std::ops::Range;
use std::path::Path;

use serde::Serialize;
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

/// Marks a message content in the template rendered by [`Tokenizer::encode_chat`]:
/// `MARK_OPEN`, the message index, `MARK_CLOSE` (private-use characters).
const MARK_OPEN: char = '\u{E000}';
const MARK_CLOSE: char = '\u{E001}';

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

/// Who speaks a chat message: OpenAI's set of roles.
///
/// A role is rendered into the chat template's own text, where special-token text is
/// parsed, so it is never free text: a role string from a client is parsed with
/// [`str::parse`], which accepts exactly these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Instructions for the whole conversation.
    System,
    /// OpenAI's newer name for a system message; templates see it as `system`, the
    /// only name chat templates know for that turn.
    Developer,
    /// The person asking.
    User,
    /// The model's earlier replies.
    Assistant,
    /// A tool's result.
    Tool,
}

impl Role {
    /// Every role, in OpenAI's order.
    pub const ALL: [Role; 5] = [
        Role::System,
        Role::Developer,
        Role::User,
        Role::Assistant,
        Role::Tool,
    ];

    /// The role's name in OpenAI's API.
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// The name a chat template sees (`developer` is rendered as `system`).
    pub fn template_name(self) -> &'static str {
        match self {
            Role::Developer => "system",
            r => r.name(),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role `{found}`: expected one of system, developer, user, assistant, tool")]
pub struct UnknownRole {
    /// The name given (at most 64 characters of it).
    pub found: String,
}

impl std::str::FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> std::result::Result<Self, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| UnknownRole {
                found: s.chars().take(64).collect(),
            })
    }
}

impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.template_name())
    }
}

/// One message of a chat conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// Speaker.
    pub role: Role,
    /// Message text.
    pub content: String,
}

impl ChatMessage {
    /// Builds a message from a role and content.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

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

    /// Renders the chat template for `messages` and encodes it as a prompt.
    ///
    /// Special-token text is parsed in the template's own text only, never in message
    /// contents: a user who writes `<|im_end|>` gets the ids of those characters, not the
    /// control token. Otherwise the ids are those of [`Self::encode_prompt`] on
    /// [`Self::chat_prompt`] with `special` (text is not cut where a content starts or
    /// ends, and user-defined tokens match anywhere). When BOS or EOS is added, a BOS
    /// text that the template writes at the start, or an EOS text at the end, is dropped
    /// first so that it is not doubled, as llama.cpp does.
    ///
    /// Fails with [`TokenizerError::ChatContentAltered`] if the template transforms
    /// contents other than by trimming whitespace, or renders differently depending on them.
    pub fn encode_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let rendered = self.chat_prompt(messages, add_generation_prompt)?;
        // An empty content is passed as is: templates test contents for emptiness.
        let marked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage {
                role: m.role,
                content: if m.content.is_empty() {
                    String::new()
                } else {
                    format!("{MARK_OPEN}{i}{MARK_CLOSE}")
                },
            })
            .collect();
        let marked = self.chat_prompt(&marked, add_generation_prompt)?;
        let (mut rendered, mut marked) = (rendered.as_str(), marked.as_str());
        if let Some(bos) = self.bos_id.filter(|_| self.add_bos) {
            let bos = self.tokens[bos as usize].as_str();
            if let (Some(r), Some(m)) = (rendered.strip_prefix(bos), marked.strip_prefix(bos)) {
                (rendered, marked) = (r, m);
            }
        }
        if self.add_eos {
            let eos = self.tokens[self.eos_id as usize].as_str();
            if let (Some(r), Some(m)) = (rendered.strip_suffix(eos), marked.strip_suffix(eos)) {
                (rendered, marked) = (r, m);
            }
        }

        // Walk the rendered text along the marked one to find where each content went.
        let parts = split_marked(marked, messages.len());
        let mut template_ranges: Vec<Range<usize>> = Vec::new();
        let mut at = 0;
        for (k, part) in parts.iter().enumerate() {
            let rest = &rendered[at..];
            let len = match *part {
                ChatPart::Template(t) if rest.starts_with(t) => t.len(),
                ChatPart::Template(_) => return Err(TokenizerError::ChatContentAltered),
                ChatPart::Content(i) => {
                    let c = messages[i].content.as_str();
                    let follows = |r: &str| match parts.get(k + 1) {
                        Some(ChatPart::Template(t)) => r.starts_with(t),
                        _ => true,
                    };
                    [c, c.trim(), c.trim_start(), c.trim_end()]
                        .into_iter()
                        .find(|x| rest.strip_prefix(x).is_some_and(follows))
                        .ok_or(TokenizerError::ChatContentAltered)?
                        .len()
                }
            };
            if matches!(part, ChatPart::Template(_)) {
                match template_ranges.last_mut() {
                    Some(r) if r.end == at => r.end = at + len,
                    _ => template_ranges.push(at..at + len),
                }
            }
            at += len;
        }
        if at != rendered.len() {
            return Err(TokenizerError::ChatContentAltered);
        }
        let fragments = self.partition(rendered, Special::Within(&template_ranges));
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

    /// Decodes generated ids as [`Self::decode`] does, except that a character left
    /// incomplete at the end (generation stopped inside it) is left out instead of
    /// becoming U+FFFD: the text a stream of the same ids delivers.
    pub fn decode_generated(&self, ids: &[u32]) -> Result<String> {
        let mut stream = self.stream(false);
        let mut text = String::new();
        for &id in ids {
            text.push_str(&stream.push(id)?);
        }
        stream.finish();
        Ok(text)
    }

    /// Starts incremental decoding; see [`TextStream`].
    pub fn stream(&self, skip_special: bool) -> TextStream<'_> {
        TextStream {
            tokenizer: self,
            skip_special,
            pending: Vec::new(),
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
        // The template comes from the weights file: a loop nest or deep recursion in it
        // ends in an error instead of hanging or overflowing the stack.
        env.set_fuel(Some(
            TEMPLATE_FUEL_PER_MESSAGE * (messages.len() as u64 + 1),
        ));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
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
        // Fuel bounds the instructions, not the output: a loop that prints a large
        // string would grow without end, so the output is capped as it is written.
        let mut out = Capped {
            bytes: Vec::new(),
            limit: MAX_CHAT_PROMPT_BYTES,
        };
        template.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_id.map_or("", |id| self.tokens[id as usize].as_str()),
                eos_token => &self.tokens[self.eos_id as usize],
            },
            &mut out,
        )?;
        String::from_utf8(out.bytes).map_err(|_| {
            TokenizerError::Template(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                "the chat template rendered bytes that are not UTF-8",
            ))
        })
    }
}

/// Largest rendered chat prompt (bytes), the message contents included: far more text
/// than any context holds.
pub const MAX_CHAT_PROMPT_BYTES: usize = 64 << 20;

/// A writer that refuses to grow past `limit` bytes.
struct Capped {
    bytes: Vec<u8>,
    limit: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            return Err(std::io::Error::other(format!(
                "the rendered chat prompt exceeds {} bytes",
                self.limit
            )));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Template instructions allowed per chat message (minijinja fuel): the real models'
/// templates spend a few hundred per message.
pub const TEMPLATE_FUEL_PER_MESSAGE: u64 = 100_000;

/// Nesting depth allowed in a chat template (macros, includes, recursive loops).
pub const TEMPLATE_RECURSION_LIMIT: usize = 64;

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

/// A rendered chat template cut at message-content markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChatPart<'a> {
    Template(&'a str),
    Content(usize),
}

/// Cuts `rendered` at the markers of message indices below `n`; anything else that looks
/// like a marker stays template text.
fn split_marked(rendered: &str, n: usize) -> Vec<ChatPart<'_>> {
    let mut parts = Vec::new();
    let mut rest = rendered;
    let mut scan = 0;
    while let Some(at) = rest[scan..].find(MARK_OPEN).map(|p| p + scan) {
        let after = &rest[at + MARK_OPEN.len_utf8()..];
        let marker = after.find(MARK_CLOSE).and_then(|end| {
            let i: usize = after[..end].parse().ok()?;
            (i < n).then_some((i, end))
        });
        let Some((i, end)) = marker else {
            scan = at + MARK_OPEN.len_utf8();
            continue;
        };
        if at > 0 {
            parts.push(ChatPart::Template(&rest[..at]));
        }
        parts.push(ChatPart::Content(i));
        rest = &after[end + MARK_CLOSE.len_utf8()..];
        scan = 0;
    }
    if !rest.is_empty() {
        parts.push(ChatPart::Template(rest));
    }
    parts
}

/// Incremental decoder for generated tokens.
///
/// [`TextStream::push`] returns only the text that the new id completes:
/// bytes of a UTF-8 character split across tokens are held back until the
/// character is whole, so concatenating the returned pieces equals decoding all
/// ids at once ([`Tokenizer::decode_generated`]), except that a character still
/// incomplete at the end is left out.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    /// Bytes of an incomplete UTF-8 character at the end of the text so far.
    pending: Vec<u8>,
}

impl TextStream<'_> {
    /// Appends one id and returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.tokenizer.check_ids(&[id])?;
        self.pending
            .extend_from_slice(&self.tokenizer.piece(id, !self.skip_special));
        let mut out = String::new();
        let mut done = 0;
        loop {
            match std::str::from_utf8(&self.pending[done..]) {
                Ok(s) => {
                    out.push_str(s);
                    done = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = done + e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.pending[done..valid]));
                    match e.error_len() {
                        // Invalid whatever follows: one U+FFFD, as a lossy decode gives.
                        Some(len) => {
                            out.push('\u{FFFD}');
                            done = valid + len;
                        }
                        // An incomplete character at the end: wait for more bytes.
                        None => {
                            done = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..done);
        Ok(out)
    }

    /// Ends the stream and resets it: the bytes of a character left incomplete (a
    /// generation cut inside it) are dropped, not replaced by U+FFFD, since no token made
    /// that character. Returns how many bytes were dropped.
    pub fn finish(&mut self) -> usize {
        let dropped = self.pending.len();
        self.pending.clear();
        dropped
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

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
}
