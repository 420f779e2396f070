//! Incremental decoding of generated tokens: text as soon as each character is whole.

use super::{Result, Tokenizer};

impl Tokenizer {
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
