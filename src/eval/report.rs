//! lm-eval's `results.json` for a run, and comparing runs: each `results.json` (ours or
//! lm-eval's) becomes one row of accuracies on the columns medical-LLM papers report, beside
//! published reference rows.

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One task of a run: its samples lines and how many items its file had.
pub struct TaskSummary<'a> {
    pub name: &'a str,
    pub original: usize,
    pub lines: &'a [Value],
}

/// lm-eval's `results.json` object: per-task metrics (means and standard errors of the
/// samples lines), sample counts, and the run's `config`.
pub fn results_json(tasks: &[TaskSummary], config: Value, seconds: f64) -> Value {
    let per_task = |f: &dyn Fn(&TaskSummary) -> Value| -> Value {
        tasks
            .iter()
            .map(|t| (t.name.to_string(), f(t)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let results = per_task(&|t| super::task_results(t.name, t.lines));
    // Every metric a task reports is an accuracy: higher is better.
    let higher: serde_json::Map<String, Value> = results
        .as_object()
        .into_iter()
        .flatten()
        .map(|(task, metrics)| {
            let names = metrics
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_suffix(",none"))
                .filter(|k| !k.contains("stderr"))
                .map(|k| (k.to_string(), json!(true)))
                .collect::<serde_json::Map<_, _>>();
            (task.clone(), Value::Object(names))
        })
        .collect();
    json!({
        "results": results,
        "n-samples": per_task(&|t| json!({"original": t.original, "effective": t.lines.len()})),
        "n-shot": per_task(&|_| json!(0)),
        "higher_is_better": higher,
        "config": config,
        "total_evaluation_time_seconds": format!("{seconds}"),
        "medphi_version": env!("CARGO_PKG_VERSION"),
    })
}

/// The columns of the MedPhi-2 table: PubMedQA, MedQA, MedMCQA, MMLU-medical.
pub const COLUMNS: [&str; 4] = ["pubmedqa", "medqa", "medmcqa", "mmlu_medical"];

#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    /// Accuracy in percent per column of [`COLUMNS`], where the run has it.
    pub scores: [Option<f64>; 4],
    pub published: bool,
}

impl Row {
    /// Mean over the columns present.
    pub fn average(&self) -> Option<f64> {
        let present: Vec<f64> = self.scores.iter().flatten().copied().collect();
        (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
    }
}

/// One run's row: `acc` per task, MMLU subjects pooled by item count (as one 1,089-item set).
pub fn run_row(label: &str, results_json: &str, source: &str) -> Result<Row> {
    let v: Value = serde_json::from_str(results_json)
        .map_err(|e| Error::file(source, format!("not JSON: {e}")))?;
    let results = v.get("results").and_then(Value::as_object).ok_or_else(|| {
        Error::file(
            source,
            "no \"results\" object (not an lm-eval results.json?)",
        )
    })?;
    let acc = |task: &str| {
        results
            .get(task)
            .and_then(|r| r.get("acc,none"))
            .and_then(Value::as_f64)
    };
    let n = |task: &str| {
        v.pointer(&format!("/n-samples/{task}/effective"))
            .and_then(Value::as_f64)
            .unwrap_or(1.0)
    };
    let (mut sum, mut count) = (0.0, 0.0);
    for (task, r) in results {
        if let (true, Some(a)) = (
            task.starts_with("mmlu_"),
            r.get("acc,none").and_then(Value::as_f64),
        ) {
            sum += a * n(task);
            count += n(task);
        }
    }
    let mmlu = (count > 0.0).then(|| sum / count);
    let pct = |x: Option<f64>| x.map(|v| v * 100.0);
    Ok(Row {
        label: label.to_string(),
        scores: [
            pct(acc("pubmedqa")),
            pct(acc("medqa_4options")),
            pct(acc("medmcqa")),
            pct(mmlu),
        ],
        published: false,
    })
}

/// Published rows from a CSV with header `model,size,pubmedqa,medqa,medmcqa,mmlu_medical,…`
/// (percentages).
pub fn published_rows(csv_text: &str, source: &str) -> Result<Vec<Row>> {
    let mut reader = csv::Reader::from_reader(csv_text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| Error::file(source, format!("bad header: {e}")))?
        .clone();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| Error::file(source, format!("no column {name:?}")))
    };
    let model = col("model")?;
    let size = header.iter().position(|h| h == "size");
    let cols = COLUMNS.map(col);
    let mut rows = Vec::new();
    for rec in reader.records() {
        let rec = rec.map_err(|e| Error::file(source, format!("malformed row: {e}")))?;
        let mut scores = [None; 4];
        for (slot, c) in scores.iter_mut().zip(&cols) {
            let c = *c.as_ref().map_err(|e| Error::file(source, e.to_string()))?;
            *slot = rec.get(c).and_then(|s| s.trim().parse::<f64>().ok());
        }
        let size = size
            .and_then(|i| rec.get(i))
            .map(|s| format!(" {s}"))
            .unwrap_or_default();
        rows.push(Row {
            label: format!("{}{size} (published)", rec.get(model).unwrap_or("?")),
            scores,
            published: true,
        });
    }
    Ok(rows)
}

/// A Markdown table of the rows.
pub fn markdown(rows: &[Row]) -> String {
    let cell = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
    let mut out = String::from("| model | PubMedQA | MedQA | MedMCQA | MMLU-medical | average |\n|---|---:|---:|---:|---:|---:|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.label,
            cell(r.scores[0]),
            cell(r.scores[1]),
            cell(r.scores[2]),
            cell(r.scores[3]),
            cell(r.average())
        ));
    }
    out
}
