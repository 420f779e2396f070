//! Chat messages and the chat template: rendering a conversation with the model's own
//! template, and encoding it so that only the template's text is parsed for control
//! tokens (message contents stay plain text).

use std::ops::Range;

use serde::Serialize;

use super::{Result, Special, Tokenizer, TokenizerError};

/// Marks a message content in the template rendered by [`Tokenizer::encode_chat`]:
/// `MARK_OPEN`, the message index, `MARK_CLOSE` (private-use characters).
pub(super) const MARK_OPEN: char = '\u{E000}';
pub(super) const MARK_CLOSE: char = '\u{E001}';

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

/// A rendered chat template cut at message-content markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ChatPart<'a> {
    Template(&'a str),
    Content(usize),
}

/// Cuts `rendered` at the markers of message indices below `n`; anything else that looks
/// like a marker stays template text.
pub(super) fn split_marked(rendered: &str, n: usize) -> Vec<ChatPart<'_>> {
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

impl Tokenizer {
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
