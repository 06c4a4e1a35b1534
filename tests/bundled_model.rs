//! The bundled model, models/tiny-medphi: within its size budget, documented, the CLI's
//! default, and scored on its held-out questions as its model card reports.
#![cfg(not(target_arch = "wasm32"))] // native only; the page's tests are tests/e2e

mod common;

use std::path::PathBuf;

use common::{medphi_cmd, run_ok};
use serde_json::Value;

fn bundled() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-medphi")
}

fn json(path: PathBuf) -> Value {
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn fits_the_size_budget_and_has_its_model_card() {
    let dir = bundled();
    let size: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(size <= 40 << 20, "models/tiny-medphi is {size} bytes");
    let card = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for needed in [
        "medphi train --stage pretrain",
        "medphi train --stage sft",
        "terms.jsonl",
        "term_drill.jsonl",
        "core_terms.jsonl",
        "medphi data tokenizer",
        "acc_mutual_info",
        "25%",
    ] {
        assert!(card.contains(needed), "the model card lacks {needed:?}");
    }
}

#[test]
fn the_cli_uses_it_by_default() {
    let out = run_ok(medphi_cmd().env_remove("MEDPHI_MODEL").args([
        "generate",
        "--prompt",
        "Instruct: What is macrocephaly?\nOutput:",
        "--max-new-tokens",
        "16",
        "--json",
    ]));
    let g: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Its own 4,096-token vocabulary: the prompt is 9 tokens (Phi-2's would be 12).
    assert_eq!(g["input_ids"].as_array().unwrap().len(), 9);
    assert!(!g["output_ids"].as_array().unwrap().is_empty());
}

/// Asked what a common finding is (greedy, as the card shows), it answers on topic: with a word
/// of the finding's HPO definition that its name does not give away.
#[test]
fn defines_common_findings_on_topic() {
    for (term, topic) in [
        ("macrocephaly", &["head", "skull", "cranium"][..]),
        ("microcephaly", &["head", "skull", "cranium"]),
        ("scoliosis", &["spine", "curvature"]),
        ("hypotonia", &["muscle", "tone"]),
        ("fever", &["temperature"]),
        ("strabismus", &["eye"]),
    ] {
        let out = run_ok(medphi_cmd().env_remove("MEDPHI_MODEL").args([
            "generate",
            "--prompt",
            &format!("Instruct: What is {term}?\nOutput:"),
            "--max-new-tokens",
            "64",
            "--json",
        ]));
        let g: Value = serde_json::from_slice(&out.stdout).unwrap();
        let text = g["text"].as_str().unwrap().to_lowercase();
        assert!(
            topic.iter().any(|w| text.contains(w)),
            "{term}: {text:?} mentions none of {topic:?}"
        );
    }
}

/// The model card's scores on the first 400 held-out questions (its full-set scores are in
/// eval_results.json), within one question for floating-point differences between machines;
/// and the option-text score far above chance, in standard errors.
#[test]
fn held_out_scores_match_the_model_card() {
    let out = tempfile::tempdir().unwrap();
    let test = bundled().join("medqa_test.jsonl");
    run_ok(
        medphi_cmd()
            .env_remove("MEDPHI_MODEL")
            .args([
                "eval",
                "--limit",
                "400",
                "--task",
                "medqa_4options",
                "--data",
            ])
            .arg(&test)
            .args(["--task", "medqa_4options_continuation", "--data"])
            .arg(&test)
            .arg("--output")
            .arg(out.path()),
    );
    let results = json(out.path().join("results.json"));
    let metric = |task: &str, key: &str| results["results"][task][key].as_f64().unwrap();
    let card = std::fs::read_to_string(bundled().join("README.md")).unwrap();
    for (task, key, expected) in [
        ("medqa_4options", "acc", CARD_LETTERS_400),
        (
            "medqa_4options_continuation",
            "acc_mutual_info",
            CARD_MUTUAL_INFO_400,
        ),
    ] {
        let got = metric(task, &format!("{key},none"));
        assert!((got - expected).abs() <= 1.0 / 400.0, "{task} {key} {got}");
        assert!(
            card.contains(&format!("{:.1}%", expected * 100.0)),
            "{task} {key}"
        );
    }
    let (mi, se) = (
        metric("medqa_4options_continuation", "acc_mutual_info,none"),
        metric("medqa_4options_continuation", "acc_mutual_info_stderr,none"),
    );
    assert!(
        (mi - 0.25) / se > 8.0,
        "{mi} ± {se} is not far above chance"
    );
}

const CARD_LETTERS_400: f64 = 0.2375;
const CARD_MUTUAL_INFO_400: f64 = 0.4975;
