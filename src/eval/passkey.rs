//! Passkey retrieval: a 5-digit key hidden at a depth of a filler text, asked for at the
//! end. One row per depth; the prompt is prefilled in chunks of the cell's width (so a
//! budgeted policy evicts as a user's run would), then the answer is decoded greedily.

use std::time::Instant;

use anyhow::{Result, bail};
use kvc_runtime::exec::session::{Request, Sampling};
use serde::{Deserialize, Serialize};

use super::corpus::{self, passkey_key, passkey_prompt};
use super::{Cell, CellId, Harness, Results, bar, finished};

/// One row (depth) of a passkey cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PasskeyRow {
    /// Percent of the filler before the needle.
    pub depth: u32,
    /// Prompt tokens.
    pub tokens: u32,
    /// The key.
    pub key: u32,
    /// Whether the first number in the greedy answer (after the prompt's trailing space)
    /// is the key.
    pub found: bool,
    /// Rank of the key's first digit in the logits after the prompt (0 = top-1; the
    /// prompt ends with the answer's tokens before the digits, e.g. the space).
    pub rank: u32,
    /// The decoded answer.
    pub answer: String,
}

/// A passkey cell: one policy, budget, width and length over every depth.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PasskeyCell {
    /// Policy, budget and width.
    #[serde(flatten)]
    pub id: CellId,
    /// Target prompt length in tokens.
    pub length: u32,
    /// Per depth.
    pub rows: Vec<PasskeyRow>,
    /// Share of depths whose key was retrieved.
    pub retrieved: f64,
    /// Wall time of the cell.
    pub seconds: f64,
}

impl PasskeyCell {
    fn is(&self, c: &Cell, length: u32, depths: &[u32]) -> bool {
        c.is(&self.id, length)
            && self.length == length
            && self.rows.iter().map(|r| r.depth).eq(depths.iter().copied())
    }
}

/// The prompts of one length: (depth, key, prompt ids, answer ids).
struct Prompt {
    depth: u32,
    key: u32,
    ids: Vec<u32>,
    answer: Vec<u32>,
}

/// Tokens of an answer before its first digit (the space): they join the prompt, so the
/// first prediction is the key's first digit and its rank says how close the policy came.
fn lead_in(h: &Harness, answer: &[u32]) -> Result<usize> {
    let mut lead = 0;
    while lead + 1 < answer.len()
        && !h
            .tok
            .decode(&answer[lead..=lead])?
            .contains(|c: char| c.is_ascii_digit())
    {
        lead += 1;
    }
    Ok(lead)
}

fn prompts(h: &Harness, length: u32, depths: &[u32]) -> Result<Vec<Prompt>> {
    depths
        .iter()
        .map(|&depth| {
            let key = passkey_key(length, depth);
            // The answer's lead-in joins the prompt: count it within the length.
            let alone = h.tok.encode_prompt(&format!(" {key}"), false)?;
            let lead = lead_in(h, &alone)?;
            let text = passkey_prompt(length, depth, lead, &|s| h.count(s))?;
            let mut ids = h.tok.encode_prompt(&text, false)?;
            let full = h.tok.encode_prompt(&format!("{text} {key}"), false)?;
            // The answer's tokens follow the prompt's when the tokenizer keeps the prompt
            // as a prefix (a space before the digits starts a new token).
            let mut answer = match full.strip_prefix(ids.as_slice()) {
                Some(rest) if !rest.is_empty() => rest.to_vec(),
                _ => alone,
            };
            let lead = lead_in(h, &answer)?;
            ids.extend(answer.drain(..lead));
            Ok(Prompt {
                depth,
                key,
                ids,
                answer,
            })
        })
        .collect()
}

/// The first run of ASCII digits in `text`.
fn first_number(text: &str) -> Option<&str> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let rest = &text[start..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// Tokens a passkey cell generates beyond its prompt, at most: the answer (a space and five
/// digits) and three more.
pub const MAX_ANSWER_TOKENS: u32 = 16;

/// Refuses lengths that cannot hold a key, a filler group, its question and the answer's
/// lead-in: such prompts would test nothing (the key right before its question).
pub fn check_lengths(h: &Harness, lengths: &[u32], depths: &[u32]) -> Result<()> {
    if depths.is_empty() || lengths.is_empty() {
        bail!("--passkey-lengths and --passkey-depths need at least one value each");
    }
    for &length in lengths {
        for &depth in depths {
            let key = passkey_key(length, depth);
            let lead = lead_in(h, &h.tok.encode_prompt(&format!(" {key}"), false)?)?;
            let min = corpus::passkey_min_length(length, depth, &|s| h.count(s))? + lead;
            if (length as usize) < min {
                bail!(
                    "--passkey-lengths: {length} tokens cannot hold the passkey, its question \
                     and one group of filler; the shortest length is {min}"
                );
            }
        }
    }
    Ok(())
}

/// Runs the cells not yet in `results` at every length, saving after each.
pub fn run(
    h: &Harness,
    lengths: &[u32],
    depths: &[u32],
    cells: &[Cell],
    results: &mut Results,
    save: &mut dyn FnMut(&Results) -> Result<()>,
) -> Result<usize> {
    check_lengths(h, lengths, depths)?;
    let mut todo = vec![];
    for &length in lengths {
        for c in cells {
            if !results.passkey.iter().any(|r| r.is(c, length, depths)) {
                todo.push((length, c));
            }
        }
    }
    if todo.is_empty() {
        return Ok(0);
    }
    let pb = bar(todo.len() as u64, "passkey");
    let mut current: Option<(u32, Vec<Prompt>)> = None;
    for &(length, c) in &todo {
        if current.as_ref().is_none_or(|(l, _)| *l != length) {
            current = Some((length, prompts(h, length, depths)?));
        }
        let ps = &current.as_ref().expect("set above").1;
        pb.set_message(format!(
            "{} {} T={} L={length}",
            c.family,
            c.budget_label(),
            c.width.label()
        ));
        let t0 = Instant::now();
        let new_tokens = ps.iter().map(|p| p.answer.len()).max().unwrap_or(1) + 3;
        let longest = ps.iter().map(|p| p.ids.len()).max().unwrap_or(1);
        let cache_len = (longest + new_tokens) as u32;
        let t = c.width.resolve(longest, cache_len);
        let policy = c.policy(length, t);
        let mut s = h.session(depths.len() as u32, t, cache_len, policy)?;
        let reqs: Vec<Request> = ps
            .iter()
            .map(|p| Request {
                prompt: p.ids.clone(),
                max_new_tokens: new_tokens,
                sampling: Sampling::default(),
            })
            .collect();
        let (mut out, logits) = s.prefill(&reqs, true)?;
        let stops = s.program().config.stop_tokens.clone();
        let mut generated: Vec<Vec<u32>> = vec![vec![]; ps.len()];
        let mut stopped = vec![false; ps.len()];
        for step in 0..new_tokens {
            for (i, g) in generated.iter_mut().enumerate() {
                if stopped[i] {
                    continue;
                }
                if stops.contains(&out.tokens[i]) {
                    stopped[i] = true;
                } else {
                    g.push(out.tokens[i]);
                    stopped[i] = out.done[i];
                }
            }
            if step + 1 == new_tokens || stopped.iter().all(|&d| d) {
                break;
            }
            out = s.step()?;
        }
        let rows: Vec<PasskeyRow> = ps
            .iter()
            .zip(&generated)
            .zip(&logits)
            .map(|((p, g), l)| {
                let answer = h.tok.decode(g)?;
                let a = l[p.answer[0] as usize];
                let rank = l.iter().filter(|&&x| x > a).count() as u32;
                Ok(PasskeyRow {
                    depth: p.depth,
                    tokens: p.ids.len() as u32,
                    key: p.key,
                    found: first_number(&answer) == Some(p.key.to_string().as_str()),
                    rank,
                    answer,
                })
            })
            .collect::<Result<_>>()?;
        let retrieved = rows.iter().filter(|r| r.found).count() as f64 / rows.len() as f64;
        let cell = PasskeyCell {
            id: c.id(length, t),
            length,
            rows,
            retrieved,
            seconds: t0.elapsed().as_secs_f64(),
        };
        finished(
            &pb,
            format!(
                "passkey  {:12} {:>6} T={:<5} L={:<5}: {:3.0}% retrieved, ranks {:?} ({:.0} s)",
                cell.id.policy,
                cell.id.budget,
                t,
                length,
                100.0 * cell.retrieved,
                cell.rows.iter().map(|r| r.rank).collect::<Vec<_>>(),
                cell.seconds
            ),
        );
        results.passkey.push(cell);
        save(results)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(todo.len())
}
