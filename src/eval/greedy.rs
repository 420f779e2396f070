//! Greedy agreement: the opening of each document as a prompt, greedy continuations under
//! the policy and under dense at the same prefill width, and the number of tokens
//! before they first differ.

use std::time::Instant;

use anyhow::Result;
use kvc_compiler::spec::KvPolicy;
use kvc_runtime::exec::session::{Request, Sampling};
use serde::{Deserialize, Serialize};

use super::{Cell, CellId, Family, Harness, Results, bar, finished};

/// A greedy-agreement cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GreedyCell {
    /// Policy, budget and width.
    #[serde(flatten)]
    pub id: CellId,
    /// Generated tokens per document.
    pub tokens: Vec<Vec<u32>>,
    /// Tokens equal to dense's before the first difference, per document.
    pub agree: Vec<u32>,
    /// Mean of `agree`.
    pub mean_agree: f64,
    /// Wall time of the cell.
    pub seconds: f64,
}

/// Runs the cells not yet in `results` (dense first at each width: it is the reference),
/// saving after each.
pub fn run(
    h: &Harness,
    prompts: &[Vec<u32>],
    new_tokens: u32,
    cells: &[Cell],
    results: &mut Results,
    save: &mut dyn FnMut(&Results) -> Result<()>,
) -> Result<usize> {
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0) as u32 + new_tokens;
    let mut widths: Vec<super::Width> = cells.iter().map(|c| c.width).collect();
    widths.dedup();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let mut todo: Vec<Cell> = vec![];
    for &t in &widths {
        let dense = Cell {
            family: Family::Dense,
            budget: None,
            width: t,
        };
        for c in std::iter::once(&dense).chain(
            cells
                .iter()
                .filter(|c| c.width == t && c.family != Family::Dense),
        ) {
            let done = results.greedy.iter().any(|r| c.is(&r.id, len));
            if !done {
                todo.push(c.clone());
            }
        }
    }
    if todo.is_empty() {
        return Ok(0);
    }
    let pb = bar(todo.len() as u64, "greedy");
    for c in &todo {
        pb.set_message(format!(
            "{} {} T={}",
            c.family,
            c.budget_label(),
            c.width.label()
        ));
        let t0 = Instant::now();
        let t = c.width.resolve(longest, len);
        let policy = c.policy(len, t);
        let mut s = h.session(prompts.len() as u32, t, len, policy)?;
        let reqs: Vec<Request> = prompts
            .iter()
            .map(|p| Request {
                prompt: p.clone(),
                max_new_tokens: new_tokens as usize,
                sampling: Sampling::default(),
            })
            .collect();
        let tokens: Vec<Vec<u32>> = s
            .generate(&reqs, &mut |_, _| {})?
            .into_iter()
            .map(|c| c.ids)
            .collect();
        let reference = match policy {
            KvPolicy::Dense => tokens.clone(),
            _ => results
                .greedy
                .iter()
                .find(|r| {
                    r.id.policy == "dense"
                        && super::width_label(&r.id.width, r.id.prefill_len) == c.width.label()
                })
                .map(|r| r.tokens.clone())
                .expect("dense runs first at every width"),
        };
        let agree: Vec<u32> = tokens
            .iter()
            .zip(&reference)
            .map(|(a, b)| a.iter().zip(b).take_while(|(x, y)| x == y).count() as u32)
            .collect();
        let cell = GreedyCell {
            id: c.id(len, t),
            mean_agree: agree.iter().map(|&a| a as f64).sum::<f64>() / agree.len().max(1) as f64,
            agree,
            tokens,
            seconds: t0.elapsed().as_secs_f64(),
        };
        finished(
            &pb,
            format!(
                "greedy   {:12} {:>6} T={:<5}: {:.1} tokens agree on average, {:?} ({:.0} s)",
                cell.id.policy,
                cell.id.budget,
                cell.id.prefill_len,
                cell.mean_agree,
                cell.agree,
                cell.seconds
            ),
        );
        results.greedy.push(cell);
        save(results)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(todo.len())
}
