//! The bundled model, models/tiny-medphi, does what its model card says: the CLI uses it by
//! default, it answers its held-out questions far above chance and it defines a phenotype
//! it was taught about on topic.
#![cfg(not(target_arch = "wasm32"))] // native only; the page's tests are tests/e2e

mod common;

use std::path::PathBuf;

use common::{medphi_cmd, run_ok};
use serde_json::Value;

fn bundled() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-medphi")
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
        "25%",
    ] {
        assert!(card.contains(needed), "the model card lacks {needed:?}");
    }
}

/// Below what the model card reports for these questions, by a margin for floating-point
/// differences between machines; chance is 0.25.
const ACCURACY_FLOOR: f64 = 0.40;

/// The first 400 held-out questions: the whole file takes minutes in a debug build, and 400
/// give a standard error near 2.5 points.
#[test]
fn answers_held_out_questions_far_above_chance() {
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
    let results: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("results.json")).unwrap()).unwrap();
    let acc = results["results"]["medqa_4options"]["acc,none"]
        .as_f64()
        .unwrap();
    assert!(
        acc >= ACCURACY_FLOOR,
        "accuracy {acc} on held-out questions"
    );
}

#[test]
fn defines_macrocephaly_on_topic() {
    let out = run_ok(medphi_cmd().env_remove("MEDPHI_MODEL").args([
        "generate",
        "--prompt",
        "Instruct: What is macrocephaly?\nOutput:",
        "--max-new-tokens",
        "40",
    ]));
    let text = String::from_utf8(out.stdout).unwrap().to_lowercase();
    assert!(
        ["head", "skull", "cranial", "circumference"]
            .iter()
            .any(|w| text.contains(w)),
        "off topic: {text}"
    );
}
