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
        "medphi data tokenizer",
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

/// The model card's score on the first 400 held-out questions (its full-set score is in
/// eval_results.json), within one question for floating-point differences between machines.
#[test]
fn held_out_score_matches_the_model_card() {
    let out = tempfile::tempdir().unwrap();
    run_ok(
        medphi_cmd()
            .env_remove("MEDPHI_MODEL")
            .args([
                "eval",
                "--task",
                "medqa_4options",
                "--limit",
                "400",
                "--data",
            ])
            .arg(bundled().join("medqa_test.jsonl"))
            .arg("--output")
            .arg(out.path()),
    );
    let results = json(out.path().join("results.json"));
    let acc = results["results"]["medqa_4options"]["acc,none"]
        .as_f64()
        .unwrap();
    assert!(
        (acc - CARD_FIRST_400).abs() <= 1.0 / 400.0,
        "accuracy {acc}"
    );
    let card = std::fs::read_to_string(bundled().join("README.md")).unwrap();
    assert!(card.contains(&format!("{:.1}%", CARD_FIRST_400 * 100.0)));
}

const CARD_FIRST_400: f64 = 0.28;
