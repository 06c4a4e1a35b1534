//! The workshop set: a small instruction set that teaches the bundled model facts it was
//! never taught (held-out terms of its test split), and two quizzes to show whether a
//! fine-tune learned them: one on the taught terms, and a control on other held-out terms
//! (did it learn those facts, or only get better at quizzes?).

use serde_json::{json, Value};

use super::{answered, instruct, DEFINITION_QUESTION};
use crate::error::{Error, Result};
use crate::eval::Task;

/// JSON-lines texts (each line ends with a newline).
pub struct Workshop {
    /// Two pairs per taught term: `What is X?` → its definition, and the definition →
    /// its name as the continuation-form question.
    pub sft: String,
    /// The taught terms' multiple-choice questions, MedQA's format.
    pub quiz: String,
    /// As many questions on held-out terms that the set does not teach.
    pub control: String,
}

/// The set for the first `terms` definition questions of `test` (MedQA-format records as
/// `medphi data build` writes them), with the next `terms` as the control quiz.
pub fn workshop(test: &str, file: &str, terms: usize) -> Result<Workshop> {
    let mut questions = Vec::new();
    for (i, line) in test
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let record: Value =
            serde_json::from_str(line).map_err(|e| Error::file(format!("{file}:{}", i + 1), e))?;
        let definition = record["question"]
            .as_str()
            .and_then(|q| q.strip_prefix(DEFINITION_QUESTION));
        let term = record["answer"].as_str();
        if let (Some(definition), Some(term)) = (definition, term) {
            questions.push((record.clone(), term.to_string(), definition.to_string()));
        }
    }
    if questions.len() < 2 * terms {
        return Err(Error::file(
            file,
            format!(
                "has {} definition questions, fewer than the {} needed",
                questions.len(),
                2 * terms
            ),
        ));
    }
    let lines = |values: &mut dyn Iterator<Item = Value>| -> String {
        values.map(|v| v.to_string() + "\n").collect()
    };
    let (taught, control) = questions.split_at(terms);
    let mut sft = Vec::new();
    for (record, term, definition) in taught {
        let prompt = instruct(&format!("What is {}?", term.to_lowercase()));
        sft.push(json!({"prompt": prompt, "response": format!(" {definition}")}));
        sft.push(answered(Task::MedQa4Continuation, record)?);
    }
    Ok(Workshop {
        sft: lines(&mut sft.into_iter()),
        quiz: lines(&mut taught.iter().map(|q| q.0.clone())),
        control: lines(&mut control[..terms].iter().map(|q| q.0.clone())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teaches_the_quiz_terms_both_ways_and_keeps_the_control_apart() {
        let q = |term: &str, def: &str| {
            json!({"question": format!("{DEFINITION_QUESTION}{def}"), "answer": term,
                   "options": {"A": term, "B": "Other", "C": "Third", "D": "Fourth"},
                   "meta_info": "hpo-definition", "answer_idx": "A"})
            .to_string()
        };
        let other = json!({"question": "A patient presents with fever. Which diagnosis?", "answer": "Flu",
            "options": {"A": "Flu", "B": "b", "C": "c", "D": "d"}, "answer_idx": "A"});
        let test = [
            q("Macrocephaly", "A large head."),
            other.to_string(),
            q("Fever", "A high temperature."),
            q("Ataxia", "Poor coordination."),
        ]
        .join("\n");
        let w = workshop(&test, "t.jsonl", 1).unwrap();
        let sft: Vec<Value> = w
            .sft
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(sft.len(), 2);
        assert_eq!(sft[0]["prompt"], "Instruct: What is macrocephaly?\nOutput:");
        assert_eq!(sft[0]["response"], " A large head.");
        assert!(sft[1]["prompt"].as_str().unwrap().contains("A large head."));
        assert_eq!(sft[1]["response"], " Macrocephaly");
        assert!(w.quiz.contains("Macrocephaly") && !w.quiz.contains("Fever"));
        assert!(w.control.contains("Fever") && !w.control.contains("Ataxia"));
        assert!(workshop(&test, "t.jsonl", 2).is_err());
    }
}
