//! What a session is asked to do: prompts with their token budgets and sampling
//! settings, refills of single rows, and what comes back; and the check that a request
//! fits the compiled shapes.

use kvc_compiler::ir::CompiledConfig;

/// One prompt and how many tokens to generate for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Tokens to generate, counting the one prefill produces (at least one).
    pub max_new_tokens: usize,
    /// How this row's tokens are chosen.
    pub sampling: Sampling,
}

/// A new prompt for one row of a running batch ([`Session::refill`](super::session::Session::refill)).
#[derive(Clone, Copy, Debug)]
pub struct Refill<'a> {
    /// The row (`< B`).
    pub row: usize,
    /// The prompt, its token budget and sampling settings.
    pub request: &'a Request,
    /// Seed of the row's uniform stream ([`uniform_draw`]).
    pub seed: u64,
}

/// Per-row sampling settings. The default is greedy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// Softmax temperature; `<= 0` means greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Keep the most likely tokens up to this probability mass; 1 keeps all.
    pub top_p: f32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

impl Sampling {
    /// Whether this asks for random sampling (not greedy).
    pub fn is_random(&self) -> bool {
        self.temperature > 0.0
    }
}

/// The uniform draw in `[0, 1)` for the token at `position + 1` under `seed`. It depends on
/// neither the row nor the batch, so a prompt samples the same text alone or batched.
pub fn uniform_draw(seed: u64, position: u64) -> f32 {
    let mut z = seed ^ position.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// Why a row stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It emitted a stop token (not included in the completion).
    Stop,
    /// It produced `max_new_tokens` tokens.
    Length,
}

/// A finished row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Generated token ids, without the stop token.
    pub ids: Vec<u32>,
    /// Why generation ended.
    pub finish: Finish,
}

/// Whether request `r` fits a program compiled with `c`; the message names what does not
/// (prompt and token budget against the cache, token ids, sampling settings).
pub fn check_request(c: &CompiledConfig, r: &Request) -> Result<(), String> {
    if r.prompt.is_empty() {
        return Err("the prompt is empty".into());
    }
    if r.max_new_tokens == 0 {
        return Err("max_new_tokens must be at least 1".into());
    }
    if let Some(&t) = r.prompt.iter().find(|&&t| t >= c.vocab_size) {
        return Err(format!(
            "token id {t} is outside the vocabulary (size {})",
            c.vocab_size
        ));
    }
    let sp = r.sampling;
    if !(sp.temperature.is_finite() && sp.temperature >= 0.0) {
        return Err(format!(
            "temperature must be a finite number >= 0, found {}",
            sp.temperature
        ));
    }
    if !(sp.top_p > 0.0 && sp.top_p <= 1.0) {
        return Err(format!("top_p must be in (0, 1], found {}", sp.top_p));
    }
    // The last generated token is never written to the cache.
    let need = r.prompt.len().saturating_add(r.max_new_tokens - 1);
    if need > c.cache_len as usize {
        let what = match c.kv.budget() {
            None => format!("{need} cache slots, but the dense cache has"),
            Some(_) => format!("{need} positions, but rows were compiled to end at"),
        };
        return Err(format!(
            "{} prompt tokens + {} new tokens need {what} {} \
             (compile with --cache-len {need} or more)",
            r.prompt.len(),
            r.max_new_tokens,
            c.cache_len
        ));
    }
    Ok(())
}
