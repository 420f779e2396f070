//! SentencePiece (`tokenizer.ggml.model = "llama"`) tokenization as llama.cpp does it.
//!
//! The text is split into characters, then the adjacent pair whose concatenation is the
//! highest-scoring vocabulary token is merged, again and again (ties: leftmost pair first),
//! until no adjacent pair forms a token. A character that is not a token comes out as the
//! `<0xXX>` tokens of its UTF-8 bytes (byte fallback). This is not a merge-list BPE: any
//! two adjacent pieces whose concatenation is in the vocabulary may merge, which is why it
//! is written out here rather than built from the `tokenizers` crate's BPE model.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// SentencePiece's stand-in for a space, U+2581 LOWER ONE EIGHTH BLOCK.
pub(super) const SPACE: char = '\u{2581}';

/// A score-ordered SentencePiece vocabulary.
#[derive(Debug, Clone)]
pub(super) struct Spm {
    text_to_id: HashMap<String, u32>,
    /// One score per id; none is NaN.
    scores: Vec<f32>,
    /// The byte-fallback token of each of the 256 bytes, if the vocabulary has one.
    byte_ids: Vec<Option<u32>>,
    add_space_prefix: bool,
}

impl Spm {
    /// Builds the model; `tokens` are unique and `scores` has one non-NaN entry per token.
    pub(super) fn new(tokens: &[String], scores: Vec<f32>, add_space_prefix: bool) -> Self {
        debug_assert_eq!(tokens.len(), scores.len());
        let text_to_id: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        // llama.cpp's byte_to_token: the `<0xXX>` token, else the one-character token.
        let byte_ids = (0..=255u8)
            .map(|b| {
                text_to_id
                    .get(&format!("<0x{b:02X}>"))
                    .or_else(|| {
                        b.is_ascii()
                            .then(|| text_to_id.get(&char::from(b).to_string()))
                            .flatten()
                    })
                    .copied()
            })
            .collect();
        Self {
            text_to_id,
            scores,
            byte_ids,
            add_space_prefix,
        }
    }

    /// Whether a space is put before text that starts the input or follows a special token
    /// (`tokenizer.ggml.add_space_prefix`).
    pub(super) fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Appends the ids of `text` (which holds no special-token text) to `out`. With
    /// `prefix_space` a space is put in front first. Spaces become [`SPACE`].
    ///
    /// Fails with the byte that has no byte-fallback token.
    pub(super) fn encode(
        &self,
        text: &str,
        prefix_space: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), u8> {
        let mut escaped = String::with_capacity(text.len() + 3);
        if prefix_space {
            escaped.push(SPACE);
        }
        for c in text.chars() {
            escaped.push(if c == ' ' { SPACE } else { c });
        }
        self.merge(&escaped, out)
    }

    fn merge(&self, text: &str, out: &mut Vec<u32>) -> Result<(), u8> {
        let mut symbols: Vec<Symbol> = text
            .char_indices()
            .map(|(start, c)| Symbol {
                start,
                len: c.len_utf8(),
                prev: None,
                next: None,
            })
            .collect();
        let n = symbols.len();
        for (i, s) in symbols.iter_mut().enumerate() {
            s.prev = i.checked_sub(1);
            s.next = (i + 1 < n).then_some(i + 1);
        }
        let mut queue = BinaryHeap::new();
        for i in 1..n {
            self.push_bigram(text, &symbols, i - 1, i, &mut queue);
        }
        while let Some(b) = queue.pop() {
            let (left, right) = (&symbols[b.left], &symbols[b.right]);
            // Symbols only grow, so a pair whose lengths no longer add up to the
            // candidate's was changed by an earlier merge: the candidate is stale.
            if left.len == 0 || right.len == 0 || left.len + right.len != b.len {
                continue;
            }
            let next = right.next;
            symbols[b.left].len += symbols[b.right].len;
            symbols[b.right].len = 0;
            symbols[b.left].next = next;
            if let Some(nx) = next {
                symbols[nx].prev = Some(b.left);
            }
            if let Some(p) = symbols[b.left].prev {
                self.push_bigram(text, &symbols, p, b.left, &mut queue);
            }
            if let Some(nx) = next {
                self.push_bigram(text, &symbols, b.left, nx, &mut queue);
            }
        }
        let mut at = (n > 0).then_some(0);
        while let Some(i) = at {
            let s = &symbols[i];
            let piece = &text[s.start..s.start + s.len];
            // A merged symbol is always a token; only single characters can miss.
            match self.text_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.push(self.byte_ids[usize::from(b)].ok_or(b)?);
                    }
                }
            }
            at = s.next;
        }
        Ok(())
    }

    fn push_bigram(
        &self,
        text: &str,
        symbols: &[Symbol],
        left: usize,
        right: usize,
        queue: &mut BinaryHeap<Bigram>,
    ) {
        let start = symbols[left].start;
        let end = symbols[right].start + symbols[right].len;
        if let Some(&id) = self.text_to_id.get(&text[start..end]) {
            queue.push(Bigram {
                score: self.scores[id as usize],
                left,
                right,
                len: end - start,
            });
        }
    }
}

/// A run of the text, linked to its neighbours; `len == 0` once merged into its left.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of two adjacent symbols into a `len`-byte token.
#[derive(Debug, Clone, Copy)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Ord for Bigram {
    /// Greatest first in the max-heap: higher score, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm(vocab: &[(&str, f32)], add_space_prefix: bool) -> Spm {
        let tokens: Vec<String> = vocab.iter().map(|(t, _)| t.to_string()).collect();
        Spm::new(
            &tokens,
            vocab.iter().map(|&(_, s)| s).collect(),
            add_space_prefix,
        )
    }

    fn ids(m: &Spm, text: &str, prefix: bool) -> Result<Vec<u32>, u8> {
        let mut out = Vec::new();
        m.encode(text, prefix, &mut out)?;
        Ok(out)
    }

    #[test]
    fn highest_score_merges_first() {
        // " ab": "▁a" and "ab" compete for the "a"; the higher score wins.
        let ab_first = spm(
            &[
                ("▁", -1.0),
                ("a", -1.0),
                ("b", -1.0),
                ("▁a", -3.0),
                ("ab", -2.0),
            ],
            false,
        );
        assert_eq!(ids(&ab_first, " ab", false), Ok(vec![0, 4]));
        let a_first = spm(
            &[
                ("▁", -1.0),
                ("a", -1.0),
                ("b", -1.0),
                ("▁a", -2.0),
                ("ab", -3.0),
            ],
            false,
        );
        assert_eq!(ids(&a_first, " ab", false), Ok(vec![3, 2]));
    }

    #[test]
    fn any_adjacent_pair_can_merge_and_ties_go_left() {
        // No merge list: "ab" merges first (higher score), then "ab" + "c" forms "abc".
        let m = spm(
            &[
                ("a", 0.0),
                ("b", 0.0),
                ("c", 0.0),
                ("ab", -1.0),
                ("bc", -2.0),
                ("abc", -3.0),
            ],
            false,
        );
        assert_eq!(ids(&m, "abc", false), Ok(vec![5]));
        // Equal scores: the leftmost pair merges first.
        let m = spm(&[("a", 0.0), ("aa", -1.0)], false);
        assert_eq!(ids(&m, "aaa", false), Ok(vec![1, 0]));
    }

    #[test]
    fn byte_fallback_and_space_prefix() {
        let m = spm(
            &[
                ("<0xC3>", 0.0),
                ("<0xA9>", 0.0),
                ("▁", -1.0),
                ("x", -1.0),
                ("▁x", -2.0),
            ],
            true,
        );
        assert_eq!(ids(&m, "é", false), Ok(vec![0, 1]));
        assert_eq!(ids(&m, "x", true), Ok(vec![4]));
        assert_eq!(ids(&m, "", false), Ok(vec![]));
        assert_eq!(ids(&m, "q", false), Err(b'q'));
        assert!(m.add_space_prefix());
        // Without `<0xXX>` tokens, an ASCII byte falls back to its one-character token.
        let m = spm(&[("x", 0.0)], false);
        assert_eq!(m.byte_ids[usize::from(b'x')], Some(0));
    }
}
