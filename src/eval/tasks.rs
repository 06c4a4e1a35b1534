//! Benchmark files in their original released formats, turned into multiple-choice items
//! with prompts byte-for-byte as lm-evaluation-harness builds them.
//!
//! | task | file | lm-eval prompt (`doc_to_text`) | choices |
//! |---|---|---|---|
//! | `medqa_4options` | MedQA US 4-option JSON lines (`question`, `options` A–D, `answer_idx`) | `Question: {q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:` | A B C D |
//! | `medqa_4options_continuation` | as `medqa_4options` | `Question: {q}\nAnswer:` | the four option texts |
//! | `pubmedqa` | PubMedQA labelled JSON keyed by PMID (`QUESTION`, `CONTEXTS`, `final_decision`) | `Abstract: {contexts joined by \n}\nQuestion: {q}\nAnswer:` | yes no maybe |
//! | `medmcqa` | MedMCQA JSON lines (`question`, `opa`..`opd`, `cop` 1-based) | `Question: {q}\nChoices:\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:` | A B C D |
//! | `mmlu_<subject>` | MMLU headerless CSV (question, A, B, C, D, answer letter) | `The following are multiple choice questions (with answers) about {subject with spaces}.\n\n{q.strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:` | A B C D |
//! | `medexqa_<specialty>` | MedExQA TSV (question, A, B, C, D, explanation 1, explanation 2, answer letter) | as MMLU, with the specialty as subject (MedExQA has no lm-eval task; this is MMLU's template) | A B C D |
//!
//! The continuation form is lm-eval's `mmlu_continuation` template applied to MedQA: the options
//! are not shown and each option's text is scored as the answer, so it measures what a model
//! knows without asking it to bind letters to options (which small models cannot do; lm-eval
//! added the continuation variants for them). It also reports lm-eval's `acc_mutual_info`,
//! which subtracts each option's log-likelihood without the question, so an option is not
//! chosen for being short or common but for what the question adds to it.
//!
//! Sources: lm-eval's `tasks/medqa/preprocess_medqa.py`, `tasks/pubmedqa/preprocess_pubmedqa.py`,
//! `tasks/medmcqa/utils_medmcqa.py` and `tasks/mmlu/default/_default_template_yaml`.

use serde_json::Value;

use crate::error::{Error, Result};

/// The MMLU subjects that make up "MMLU-medical".
pub const MMLU_MEDICAL: [&str; 6] = [
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
];

/// One multiple-choice question as lm-eval scores it.
#[derive(Debug, Clone)]
pub struct Item {
    /// The record as the file has it (written back in the samples file).
    pub doc: Value,
    /// The prompt; each choice is scored as the continuation `" " + choice`.
    pub context: String,
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
    /// Also score each choice alone after the end-of-text token and report lm-eval's
    /// `acc_mutual_info` (the argmax of log P(choice | context) − log P(choice)).
    pub mutual_info: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    MedQa4,
    MedQa4Continuation,
    PubMedQa,
    MedMcqa,
    Mmlu(String),
    MedExQa(String),
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self> {
        match name {
            "medqa_4options" => Ok(Task::MedQa4),
            "medqa_4options_continuation" => Ok(Task::MedQa4Continuation),
            "pubmedqa" => Ok(Task::PubMedQa),
            "medmcqa" => Ok(Task::MedMcqa),
            _ => {
                if let Some(subject) = name.strip_prefix("mmlu_") {
                    if MMLU_MEDICAL.contains(&subject) {
                        return Ok(Task::Mmlu(subject.to_string()));
                    }
                }
                if let Some(specialty) = name.strip_prefix("medexqa_") {
                    if !specialty.is_empty()
                        && specialty
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Ok(Task::MedExQa(specialty.to_string()));
                    }
                }
                Err(Error::input(format!(
                    "unknown task {name:?}; known: medqa_4options, medqa_4options_continuation, pubmedqa, medmcqa, {}, medexqa_<specialty>",
                    MMLU_MEDICAL.map(|s| format!("mmlu_{s}")).join(", ")
                )))
            }
        }
    }
}

impl Task {
    pub fn name(&self) -> String {
        match self {
            Task::MedQa4 => "medqa_4options".into(),
            Task::MedQa4Continuation => "medqa_4options_continuation".into(),
            Task::PubMedQa => "pubmedqa".into(),
            Task::MedMcqa => "medmcqa".into(),
            Task::Mmlu(s) => format!("mmlu_{s}"),
            Task::MedExQa(s) => format!("medexqa_{s}"),
        }
    }

    /// Parses a benchmark file of this task's format; `file` names it in errors.
    pub fn load(&self, text: &str, file: &str) -> Result<Vec<Item>> {
        let items = match self {
            Task::MedQa4 => json_lines(text, file, medqa_item)?,
            Task::MedQa4Continuation => json_lines(text, file, medqa_continuation_item)?,
            Task::MedMcqa => json_lines(text, file, medmcqa_item)?,
            Task::PubMedQa => pubmedqa(text, file)?,
            Task::Mmlu(subject) => delimited(text, file, b',', 6, |r| {
                mcq_row(r, 5, &subject.replace('_', " "))
            })?,
            Task::MedExQa(specialty) => delimited(text, file, b'\t', 8, |r| {
                mcq_row(r, 7, &specialty.replace('_', " "))
            })?,
        };
        if items.is_empty() {
            return Err(Error::file(file, "contains no questions"));
        }
        Ok(items)
    }
}

fn field<'a>(v: &'a Value, key: &str) -> std::result::Result<&'a str, String> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string field `{key}`"))
}

fn json_lines(
    text: &str,
    file: &str,
    parse: fn(Value) -> std::result::Result<Item, String>,
) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |msg: String| Error::file(format!("{file}:{}", i + 1), msg);
        let value: Value =
            serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        items.push(parse(value).map_err(at)?);
    }
    Ok(items)
}

fn letter_index(letter: &str) -> std::result::Result<usize, String> {
    LETTERS
        .iter()
        .position(|l| *l == letter.trim())
        .ok_or_else(|| format!("answer {letter:?} is not one of A, B, C, D"))
}

/// The question and its four options in letter order.
fn medqa_fields(doc: &Value) -> std::result::Result<(&str, [&str; 4]), String> {
    let question = field(doc, "question")?;
    let options = doc.get("options").ok_or("missing object field `options`")?;
    let mut texts = [""; 4];
    for (text, l) in texts.iter_mut().zip(LETTERS) {
        *text = field(options, l).map_err(|e| format!("options: {e}"))?;
    }
    Ok((question, texts))
}

fn medqa_item(doc: Value) -> std::result::Result<Item, String> {
    let (question, options) = medqa_fields(&doc)?;
    let mut context = format!("Question: {question}\n");
    for (l, text) in LETTERS.iter().zip(options) {
        context.push_str(&format!("{l}. {text}\n"));
    }
    context.push_str("Answer:");
    let gold = letter_index(field(&doc, "answer_idx")?)?;
    Ok(Item {
        context,
        choices: LETTERS.map(String::from).to_vec(),
        gold,
        doc,
        mutual_info: false,
    })
}

fn medqa_continuation_item(doc: Value) -> std::result::Result<Item, String> {
    let (question, options) = medqa_fields(&doc)?;
    let context = format!("Question: {question}\nAnswer:");
    let choices = options.map(String::from).to_vec();
    let gold = letter_index(field(&doc, "answer_idx")?)?;
    Ok(Item {
        context,
        choices,
        gold,
        doc,
        mutual_info: true,
    })
}

fn medmcqa_item(doc: Value) -> std::result::Result<Item, String> {
    let mut context = format!("Question: {}\nChoices:\n", field(&doc, "question")?);
    for (l, key) in LETTERS.iter().zip(["opa", "opb", "opc", "opd"]) {
        context.push_str(&format!("{l}. {}\n", field(&doc, key)?));
    }
    context.push_str("Answer:");
    // The released files number the correct option from 1 (1 = opa).
    let cop = doc
        .get("cop")
        .and_then(Value::as_u64)
        .ok_or("missing integer field `cop`")?;
    if !(1..=4).contains(&cop) {
        return Err(format!("cop {cop} is not in 1..=4"));
    }
    Ok(Item {
        context,
        choices: LETTERS.map(String::from).to_vec(),
        gold: cop as usize - 1,
        doc,
        mutual_info: false,
    })
}

fn pubmedqa(text: &str, file: &str) -> Result<Vec<Item>> {
    let all: serde_json::Map<String, Value> = serde_json::from_str(text)
        .map_err(|e| Error::file(file, format!("not a PubMedQA JSON object: {e}")))?;
    let choices = ["yes", "no", "maybe"];
    all.into_iter()
        .map(|(pmid, doc)| {
            let at = |msg: String| Error::file(format!("{file} (PMID {pmid})"), msg);
            let question = field(&doc, "QUESTION").map_err(at)?;
            let contexts = doc
                .get("CONTEXTS")
                .and_then(Value::as_array)
                .ok_or_else(|| at("missing array field `CONTEXTS`".into()))?
                .iter()
                .map(|c| {
                    c.as_str()
                        .ok_or_else(|| at("CONTEXTS holds a non-string".into()))
                })
                .collect::<Result<Vec<_>>>()?;
            let decision = field(&doc, "final_decision").map_err(at)?;
            let gold = choices.iter().position(|c| *c == decision).ok_or_else(|| {
                at(format!(
                    "final_decision {decision:?} is not yes, no or maybe"
                ))
            })?;
            let context = format!(
                "Abstract: {}\nQuestion: {question}\nAnswer:",
                contexts.join("\n")
            );
            let mut doc = doc.clone();
            doc["PMID"] = Value::String(pmid.clone());
            Ok(Item {
                doc,
                context,
                choices: choices.map(String::from).to_vec(),
                gold,
                mutual_info: false,
            })
        })
        .collect()
}

fn delimited(
    text: &str,
    file: &str,
    delimiter: u8,
    columns: usize,
    parse: impl Fn(&csv::StringRecord) -> std::result::Result<Item, String>,
) -> Result<Vec<Item>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .delimiter(delimiter)
        .flexible(true)
        .quoting(delimiter == b',')
        .from_reader(text.as_bytes());
    let mut items = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            Error::file(format!("{file}:{line}"), format!("malformed row: {e}"))
        })?;
        let line = record.position().map_or(0, |p| p.line());
        if record.len() != columns {
            return Err(Error::file(
                format!("{file}:{line}"),
                format!("expected {columns} columns, found {}", record.len()),
            ));
        }
        items.push(parse(&record).map_err(|e| Error::file(format!("{file}:{line}"), e))?);
    }
    Ok(items)
}

/// MMLU's template: question, four options in columns 1..=4, answer letter at `answer_col`
/// (MedExQA keeps its two explanations in between).
fn mcq_row(
    r: &csv::StringRecord,
    answer_col: usize,
    subject: &str,
) -> std::result::Result<Item, String> {
    let question = &r[0];
    let options: Vec<&str> = (1..=4).map(|i| &r[i]).collect();
    let context = format!(
        "The following are multiple choice questions (with answers) about {subject}.\n\n{}\nA. {}\nB. {}\nC. {}\nD. {}\nAnswer:",
        question.trim(),
        options[0],
        options[1],
        options[2],
        options[3]
    );
    let gold = letter_index(&r[answer_col])?;
    let doc = serde_json::json!({
        "question": question,
        "choices": options,
        "answer": gold,
        "explanations": r.iter().skip(5).take(answer_col - 5).collect::<Vec<_>>(),
    });
    Ok(Item {
        doc,
        context,
        choices: LETTERS.map(String::from).to_vec(),
        gold,
        mutual_info: false,
    })
}
