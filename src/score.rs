//! `kvc score`: teacher-force a text and print each position's top-K logits and
//! log-sum-exp.

use std::path::Path;

use anyhow::{Context, Result};

use crate::args::{ExecArgs, ShapeArgs};
use crate::emit;
use crate::pipeline::load;

pub(crate) fn score(
    model: &Path,
    text: &str,
    special: bool,
    top_k: usize,
    shapes: ShapeArgs,
    exec: ExecArgs,
) -> Result<()> {
    let mut m = load(model, shapes, 1, exec)?;
    let tok = m
        .tokenizer
        .as_ref()
        .context("this model has no tokenizer (random weights): kvc score needs one")?;
    let ids = tok.encode_prompt(text, special)?;
    let logits = m.session.score(&ids)?;
    let positions: Vec<serde_json::Value> = logits
        .iter()
        .map(|row| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            order.truncate(top_k);
            let lse = crate::eval::log_sum_exp(row);
            serde_json::json!({
                "top_ids": order,
                "top_logits": order.iter().map(|&i| row[i]).collect::<Vec<_>>(),
                "logsumexp": lse,
            })
        })
        .collect();
    emit(format_args!(
        "{}\n",
        serde_json::json!({ "text": text, "ids": ids, "positions": positions })
    ))
}
