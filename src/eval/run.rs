//! An evaluation run that survives interruption: each item's line of
//! `samples_<task>.jsonl` is appended and flushed as soon as the item is scored, so a run
//! killed after hours keeps what it did, and a resumed run reads those lines back, scores
//! only the rest and reports the same `results.json` as an uninterrupted run. The metrics
//! come from the lines alone, so both paths aggregate exactly the same numbers.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use super::{evaluate_item, extract_choice, mean_stderr, sample_json, Item};
use crate::backend::Backend;
use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::generate::{GenerateOptions, Session};
use crate::tokenizer::PhiTokenizer;

/// How items are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// lm-eval's multiple_choice: each choice's log-likelihood after the context (from the
    /// context's KV cache when `share_prefix`, else from scratch as lm-eval does).
    Loglikelihood { share_prefix: bool },
    /// A greedy free-text answer, with the option read out of it (`exact_match`).
    Generate { max_new_tokens: usize },
}

/// The per-item metrics a samples line can carry (1.0 right, 0.0 wrong), in the order
/// lm-eval lists them in `results.json`.
const METRICS: [&str; 4] = ["acc", "acc_norm", "acc_mutual_info", "exact_match"];

/// The lines already in `path` that belong to `items`: the longest run of whole, valid lines
/// whose `doc_id`, `doc` and `target` are those of `items` in order. The file is cut back to
/// exactly those lines (a line half-written by a kill goes), so appending can continue.
pub fn resume_samples(path: &Path, items: &[Item]) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::file(path.display(), e)),
    };
    if text.lines().count() > items.len() {
        return Err(Error::file(
            path.display(),
            format!(
                "holds more lines than the {} items asked for: resume with the same --limit",
                items.len()
            ),
        ));
    }
    let mut kept = Vec::new();
    let mut bytes = 0;
    for (line, item) in text.split_inclusive('\n').zip(items) {
        let Some(body) = line.strip_suffix('\n') else {
            break;
        };
        let Ok(v) = serde_json::from_str::<Value>(body) else {
            break;
        };
        if v["doc_id"] != json!(kept.len()) {
            break;
        }
        if v["doc"] != item.doc || v["target"] != json!(item.gold) {
            return Err(Error::file(
                path.display(),
                format!(
                    "line {} is another question than item {} of this data: resume with the same task, data file and --limit",
                    kept.len() + 1,
                    kept.len()
                ),
            ));
        }
        bytes += line.len();
        kept.push(v);
    }
    if bytes < text.len() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| Error::file(path.display(), e))?;
        file.set_len(bytes as u64)
            .and_then(|_| file.sync_all())
            .map_err(|e| Error::file(path.display(), e))?;
    }
    Ok(kept)
}

/// Scores `items` after the `lines` already done, appending each new line to `path` (and to
/// `lines`) as it is scored. Stops early, keeping what is written, when `cancel` is raised;
/// `on_item` is called after each item.
#[allow(clippy::too_many_arguments)]
pub async fn score_items<B: Backend>(
    session: &mut Session<B>,
    tokenizer: &PhiTokenizer,
    items: &[Item],
    mode: Mode,
    path: &Path,
    lines: &mut Vec<Value>,
    cancel: &Cancel,
    on_item: &mut dyn FnMut(),
) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::file(path.display(), e))?;
    for (doc_id, item) in items.iter().enumerate().skip(lines.len()) {
        if cancel.is_cancelled() {
            break;
        }
        let line = match mode {
            Mode::Loglikelihood { share_prefix } => {
                let b = session.backend_mut();
                sample_json(
                    item,
                    &evaluate_item(b, tokenizer, doc_id, item, share_prefix).await?,
                )
            }
            Mode::Generate { max_new_tokens } => {
                generate_item(session, tokenizer, doc_id, item, max_new_tokens).await?
            }
        };
        // One write per line, flushed: a kill leaves whole lines and at most one partial.
        file.write_all(format!("{line}\n").as_bytes())
            .and_then(|_| file.flush())
            .map_err(|e| Error::file(path.display(), e))?;
        lines.push(line);
        on_item();
    }
    file.sync_all().map_err(|e| Error::file(path.display(), e))
}

/// One chat-style answer as a samples line.
async fn generate_item<B: Backend>(
    session: &mut Session<B>,
    tokenizer: &PhiTokenizer,
    doc_id: usize,
    item: &Item,
    max_new_tokens: usize,
) -> Result<Value> {
    let opts = GenerateOptions {
        max_new_tokens,
        stop: vec!["\n".into()],
        ..Default::default()
    };
    let ids = tokenizer.encode(&item.context)?;
    let g = session
        .generate(tokenizer, &ids, &opts, &mut |_| true)
        .await?;
    let extracted = extract_choice(&g.text, item);
    Ok(json!({
        "doc_id": doc_id, "doc": item.doc, "target": item.gold,
        "arguments": [[item.context, {"until": ["\n"], "max_gen_toks": max_new_tokens, "do_sample": false}]],
        "resps": [[g.text]],
        "filtered_resps": [extracted.map(|i| item.choices[i].clone())],
        "exact_match": f64::from(u8::from(extracted == Some(item.gold))),
    }))
}

/// The `results[task]` entry of lm-eval's results.json: the mean and standard error of each
/// metric the samples lines carry.
pub fn task_results(task: &str, lines: &[Value]) -> Value {
    let mut metrics = json!({ "alias": task });
    for name in METRICS {
        let values: Vec<f64> = lines.iter().filter_map(|l| l[name].as_f64()).collect();
        if values.is_empty() {
            continue;
        }
        let (mean, se) = mean_stderr(&values);
        metrics[format!("{name},none")] = json!(mean);
        metrics[format!("{name}_stderr,none")] = se.map_or(json!("N/A"), |v| json!(v));
    }
    metrics
}
