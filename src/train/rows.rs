//! Training rows (prompt/response pairs, or prompt/chosen/rejected) from a JSON-lines or CSV
//! file or from values handed over by the page, each row knowing where it came from, so a
//! malformed one is named in its error ("data.csv:7: missing field `response`").

use serde_json::{Map, Value};

use crate::error::{Error, Result};

pub struct Row {
    /// "FILE:LINE", or "WHAT row N" for handed-over values.
    pub at: String,
    fields: Map<String, Value>,
}

impl Row {
    /// The string field `key`.
    pub fn text(&self, key: &str) -> Result<&str> {
        self.fields
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| Error::file(&self.at, format!("missing string field `{key}`")))
    }
}

/// The rows of `text`: CSV with a header row when `file` ends in `.csv`, otherwise one JSON
/// object per line (blank lines skipped).
pub fn rows_from_text(text: &str, file: &str) -> Result<Vec<Row>> {
    if file.to_ascii_lowercase().ends_with(".csv") {
        return csv_rows(text, file);
    }
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{file}:{}", i + 1);
        let value: Value = serde_json::from_str(line).map_err(|e| Error::file(&at, e))?;
        rows.push(object(value, at)?);
    }
    Ok(rows)
}

/// Rows handed over as values (the page's `[{prompt, response}]`); `what` names them.
pub fn rows_from_values(values: Vec<Value>, what: &str) -> Result<Vec<Row>> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| object(v, format!("{what} row {}", i + 1)))
        .collect()
}

fn object(value: Value, at: String) -> Result<Row> {
    match value {
        Value::Object(fields) => Ok(Row { at, fields }),
        other => Err(Error::file(
            &at,
            format!("expected an object with string fields, found {other}"),
        )),
    }
}

fn csv_rows(text: &str, file: &str) -> Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| Error::file(file, format!("CSV header: {e}")))?
        .clone();
    let mut rows = Vec::new();
    for record in reader.records() {
        // csv names the line of a row with the wrong number of fields or bad UTF-8.
        let record = record.map_err(|e| Error::file(file, e))?;
        let line = record.position().map_or(0, |p| p.line());
        let fields = header
            .iter()
            .zip(record.iter())
            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
            .collect();
        rows.push(Row {
            at: format!("{file}:{line}"),
            fields,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_and_json_lines_give_the_same_rows_and_name_bad_ones() {
        let csv = "prompt,response\n\"Instruct: a, b?\nOutput:\", yes\nq2,r2\n";
        let jsonl = "{\"prompt\": \"Instruct: a, b?\\nOutput:\", \"response\": \" yes\"}\n\n{\"prompt\": \"q2\", \"response\": \"r2\"}\n";
        let (c, j) = (
            rows_from_text(csv, "d.csv").unwrap(),
            rows_from_text(jsonl, "d.jsonl").unwrap(),
        );
        assert_eq!(c.len(), 2);
        for (c, j) in c.iter().zip(&j) {
            assert_eq!(c.text("prompt").unwrap(), j.text("prompt").unwrap());
            assert_eq!(c.text("response").unwrap(), j.text("response").unwrap());
        }
        assert_eq!(
            (c[1].at.as_str(), j[1].at.as_str()),
            ("d.csv:4", "d.jsonl:3")
        );
        let short = rows_from_text("prompt,response\na,b\nc\n", "s.csv")
            .err()
            .unwrap();
        assert!(short.to_string().contains("s.csv"), "{short}");
        let missing = rows_from_text("prompt,answer\na,b\n", "m.csv").unwrap();
        let e = missing[0].text("response").err().unwrap().to_string();
        assert!(e.contains("m.csv:2") && e.contains("`response`"), "{e}");
        let bad = rows_from_text("{\"prompt\": 1}\n[1]\n", "b.jsonl")
            .err()
            .unwrap()
            .to_string();
        assert!(bad.contains("b.jsonl:2"), "{bad}");
        let v = rows_from_values(
            vec![serde_json::json!({"prompt": "p"}), serde_json::json!(3)],
            "data",
        );
        assert!(v.err().unwrap().to_string().contains("data row 2"));
    }
}
