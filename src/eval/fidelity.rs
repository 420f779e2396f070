//! Teacher-forced fidelity: each document is fed one token at a time through the decode
//! graph (as StreamingLLM and H2O measure perplexity), so every prediction is made from
//! the cache the policy kept. A dense session runs in lockstep, and at every position past
//! the budget the cell's log-likelihood of the true next token, KL(dense ‖ policy) and
//! top-1 agreement with dense are accumulated.

use std::time::Instant;

use anyhow::Result;
use kvc_runtime::exec::session::{Request, Sampling, Session};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Cell, CellId, Harness, Results, argmax, bar, finished, log_softmax, mean_ci95};

/// One document's scores in a cell (means over its scored positions).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DocScore {
    /// Document name.
    pub doc: String,
    /// Positions scored (those whose context exceeds the budget; all when the budget
    /// covers the document).
    pub positions: u64,
    /// Mean negative log-likelihood of the next token under the policy (nats).
    pub nll: f64,
    /// The same under dense, at the same positions.
    pub nll_dense: f64,
    /// Mean KL(dense ‖ policy) of the next-token distributions (nats).
    pub kl: f64,
    /// Share of positions where the policy's top-1 token is dense's.
    pub top1: f64,
}

/// A fidelity cell.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FidelityCell {
    /// Policy, budget and width.
    #[serde(flatten)]
    pub id: CellId,
    /// Per document.
    pub docs: Vec<DocScore>,
    /// Perplexity under the policy over every scored position.
    pub ppl: f64,
    /// Perplexity under dense over the same positions.
    pub ppl_dense: f64,
    /// `100 · (ppl / ppl_dense − 1)`.
    pub dppl_percent: f64,
    /// Mean over documents of Δ mean NLL (policy − dense).
    pub dnll: f64,
    /// Half-width of its 95% interval over documents (Student's t; none for one
    /// document).
    pub dnll_ci95: Option<f64>,
    /// Mean KL(dense ‖ policy) over every scored position.
    pub kl: f64,
    /// Top-1 agreement with dense over every scored position.
    pub top1: f64,
    /// Wall time of the cell's own session (the dense reference excluded).
    pub seconds: f64,
}

/// Running sums of one (cell, document).
#[derive(Clone, Copy, Default)]
struct Sums {
    n: u64,
    nll: f64,
    nll_dense: f64,
    kl: f64,
    top1: u64,
}

/// Runs the cells not yet in `results` in lockstep with one dense reference (each step's
/// reference logits serve every cell), saving when they are done. Returns the cells
/// computed.
pub fn run(
    h: &Harness,
    names: &[&str],
    docs: &[Vec<u32>],
    cells: &[Cell],
    results: &mut Results,
    save: &mut dyn FnMut(&Results) -> Result<()>,
) -> Result<usize> {
    let len = docs.iter().map(Vec::len).min().unwrap_or(0) as u32;
    let rows = docs.len() as u32;
    let todo: Vec<&Cell> = cells
        .iter()
        .filter(|c| !results.fidelity.iter().any(|r| c.is(&r.id, len)))
        .collect();
    if todo.is_empty() {
        return Ok(0);
    }
    let pb = bar(len.saturating_sub(1) as u64, "fidelity");
    let group = todo;
    // The prompt is each document's first token.
    let t = group[0].width.resolve(1, len);
    let mut reference = h.session(rows, t, len, kvc_compiler::spec::KvPolicy::Dense)?;
    let mut sessions: Vec<Session> = group
        .iter()
        .map(|c| h.session(rows, t, len, c.policy(len, t)))
        .collect::<Result<_>>()?;
    let budgets: Vec<u32> = group
        .iter()
        .map(|c| c.budget.as_ref().map_or(0, |b| b.tokens(len)))
        .collect();
    // Positions whose context exceeds the budget are scored; when the budget covers
    // the whole document nothing is evicted and every position is.
    let first_scored: Vec<usize> = budgets
        .iter()
        .map(|&b| if b >= len { 0 } else { b as usize })
        .collect();
    let mut sums = vec![vec![Sums::default(); docs.len()]; group.len()];
    let mut secs = vec![0.0f64; group.len()];
    pb.set_message(format!("{} cells", group.len()));

    // Position 0 comes out of prefill (one token per row); each later position out
    // of a decode step fed the document's token.
    let reqs: Vec<Request> = docs
        .iter()
        .map(|d| Request {
            prompt: vec![d[0]],
            max_new_tokens: len as usize - 1,
            sampling: Sampling::default(),
        })
        .collect();
    let (_, mut ref_logits) = reference.prefill(&reqs, true)?;
    let mut cell_logits = vec![];
    for (k, s) in sessions.iter_mut().enumerate() {
        let t0 = Instant::now();
        cell_logits.push(s.prefill(&reqs, true)?.1);
        secs[k] += t0.elapsed().as_secs_f64();
    }
    for pos in 0..len as usize - 1 {
        if pos > 0 {
            let forced: Vec<u32> = docs.iter().map(|d| d[pos]).collect();
            reference.force_tokens(&forced)?;
            ref_logits = reference.step_logits()?.1;
            for (k, s) in sessions.iter_mut().enumerate() {
                let t0 = Instant::now();
                s.force_tokens(&forced)?;
                cell_logits[k] = s.step_logits()?.1;
                secs[k] += t0.elapsed().as_secs_f64();
            }
        }
        let ref_lp: Vec<Vec<f64>> = ref_logits[..docs.len()]
            .par_iter()
            .map(|l| log_softmax(l))
            .collect();
        let ref_p: Vec<Vec<f64>> = ref_lp
            .par_iter()
            .map(|lp| lp.iter().map(|x| x.exp()).collect())
            .collect();
        let ref_top: Vec<usize> = ref_logits.iter().map(|l| argmax(l)).collect();
        // The context at this prediction holds pos + 1 tokens.
        let scored: Vec<(usize, usize)> = (0..group.len())
            .filter(|&k| pos + 1 > first_scored[k])
            .flat_map(|k| (0..docs.len()).map(move |d| (k, d)))
            .collect();
        let updates: Vec<(usize, usize, f64, f64, f64, bool)> = scored
            .par_iter()
            .map(|&(k, d)| {
                let target = docs[d][pos + 1] as usize;
                let lp = log_softmax(&cell_logits[k][d]);
                let kl: f64 = ref_p[d]
                    .iter()
                    .zip(&ref_lp[d])
                    .zip(&lp)
                    .map(|((&p, &lp_ref), &q)| p * (lp_ref - q))
                    .sum();
                let same = argmax(&cell_logits[k][d]) == ref_top[d];
                (k, d, -lp[target], -ref_lp[d][target], kl, same)
            })
            .collect();
        for (k, d, nll, nll_dense, kl, same) in updates {
            let s = &mut sums[k][d];
            s.n += 1;
            s.nll += nll;
            s.nll_dense += nll_dense;
            s.kl += kl;
            s.top1 += u64::from(same);
        }
        pb.inc(1);
        // Without a terminal the bar is hidden: a line per tenth instead.
        let tenth = (len as usize / 10).max(1);
        if pb.is_hidden() && (pos + 1) % tenth == 0 {
            eprintln!(
                "fidelity ({} cells): {}/{} positions",
                group.len(),
                pos + 1,
                len - 1
            );
        }
    }

    for (k, c) in group.iter().enumerate() {
        let cell = summarize(c, names, &sums[k], secs[k], len, t);
        finished(
            &pb,
            format!(
                "fidelity {:12} {:>6}: Δppl {:+.2}%  KL {:.4}  top-1 {:.1}%  ({:.0} s)",
                cell.id.policy,
                cell.id.budget,
                cell.dppl_percent,
                cell.kl,
                100.0 * cell.top1,
                cell.seconds
            ),
        );
        results.fidelity.push(cell);
    }
    save(results)?;
    pb.finish_and_clear();
    Ok(group.len())
}

fn summarize(
    c: &Cell,
    names: &[&str],
    sums: &[Sums],
    seconds: f64,
    len: u32,
    t: u32,
) -> FidelityCell {
    let per: Vec<DocScore> = sums
        .iter()
        .zip(names)
        .map(|(s, name)| {
            let n = s.n.max(1) as f64;
            DocScore {
                doc: name.to_string(),
                positions: s.n,
                nll: s.nll / n,
                nll_dense: s.nll_dense / n,
                kl: s.kl / n,
                top1: s.top1 as f64 / n,
            }
        })
        .collect();
    let n: u64 = sums.iter().map(|s| s.n).sum();
    let nf = n.max(1) as f64;
    let nll: f64 = sums.iter().map(|s| s.nll).sum::<f64>() / nf;
    let nll_dense: f64 = sums.iter().map(|s| s.nll_dense).sum::<f64>() / nf;
    let (dnll, dnll_ci95) = mean_ci95(
        &per.iter()
            .filter(|d| d.positions > 0)
            .map(|d| d.nll - d.nll_dense)
            .collect::<Vec<_>>(),
    );
    FidelityCell {
        id: c.id(len, t),
        docs: per,
        ppl: nll.exp(),
        ppl_dense: nll_dense.exp(),
        dppl_percent: 100.0 * ((nll - nll_dense).exp() - 1.0),
        dnll,
        dnll_ci95,
        kl: sums.iter().map(|s| s.kl).sum::<f64>() / nf,
        top1: sums.iter().map(|s| s.top1).sum::<u64>() as f64 / nf,
        seconds,
    }
}
