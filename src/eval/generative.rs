//! Chat-style evaluation: the model answers in free text (greedy), and the chosen option is
//! read out of the answer. MedExQA reports accuracy this way; it is kept apart from the
//! log-likelihood `acc` because the two are not comparable.

use super::tasks::Item;

/// Reads which choice an answer names: a choice label standing alone ("B", "B.", "(B)",
/// "answer: yes") first, else the one option whose text the answer quotes.
pub fn extract_choice(answer: &str, item: &Item) -> Option<usize> {
    let words: Vec<String> = answer
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    for w in &words {
        let exact = item.choices.iter().position(|c| c == w);
        let folded = item
            .choices
            .iter()
            .position(|c| c.len() > 1 && c.eq_ignore_ascii_case(w));
        if let Some(i) = exact.or(folded) {
            return Some(i);
        }
    }
    let lower = answer.to_lowercase();
    let option_texts = option_texts(item);
    let quoted: Vec<usize> = option_texts
        .iter()
        .enumerate()
        .filter(|(_, t)| !t.is_empty() && lower.contains(&t.to_lowercase()))
        .map(|(i, _)| i)
        .collect();
    match quoted.as_slice() {
        [only] => Some(*only),
        _ => None,
    }
}

/// The text of each option, where the item's record has it.
fn option_texts(item: &Item) -> Vec<String> {
    let doc = &item.doc;
    let text =
        |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or("").trim().to_string();
    if let Some(options) = doc.get("options") {
        ["A", "B", "C", "D"]
            .iter()
            .map(|k| text(options.get(*k)))
            .collect()
    } else if doc.get("opa").is_some() {
        ["opa", "opb", "opc", "opd"]
            .iter()
            .map(|k| text(doc.get(*k)))
            .collect()
    } else if let Some(choices) = doc.get("choices").and_then(|c| c.as_array()) {
        choices.iter().map(|c| text(Some(c))).collect()
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> Item {
        Item {
            doc: serde_json::json!({"options": {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"}}),
            context: String::new(),
            choices: vec!["A".into(), "B".into(), "C".into(), "D".into()],
            gold: 1,
            mutual_info: false,
        }
    }

    #[test]
    fn reads_letters_and_option_texts() {
        assert_eq!(extract_choice(" B. Heparin", &item()), Some(1));
        assert_eq!(extract_choice("The answer is (C)", &item()), Some(2));
        assert_eq!(
            extract_choice("I would give alteplase now.", &item()),
            Some(3)
        );
        assert_eq!(extract_choice("Either aspirin or heparin", &item()), None);
        assert_eq!(extract_choice("no idea", &item()), None);
    }

    #[test]
    fn reads_yes_no_maybe() {
        let it = Item {
            doc: serde_json::json!({}),
            context: String::new(),
            choices: vec!["yes".into(), "no".into(), "maybe".into()],
            gold: 0,
            mutual_info: false,
        };
        assert_eq!(extract_choice(" Yes, it does.", &it), Some(0));
        assert_eq!(extract_choice("maybe", &it), Some(2));
    }
}
