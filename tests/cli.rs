//! The `medphi` binary end to end on the fixtures, in the exact forms other tools rely on.
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{fixtures, reference};

fn medphi(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_medphi"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn path(p: &str) -> String {
    fixtures().join(p).display().to_string()
}

#[test]
fn generate_json_reproduces_transformers_greedy_ids() {
    let r = reference();
    let prompt = r.json["prompt"].as_str().unwrap();
    for model in ["tiny-phi", "tiny-phi-sharded"] {
        let out = medphi(&[
            "generate",
            "--model",
            &path(model),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "64",
            "--temperature",
            "0",
            "--backend",
            "cpu",
            "--json",
        ]);
        let ids = |k: &str| serde_json::from_value::<Vec<u32>>(out[k].clone()).unwrap();
        assert_eq!(ids("input_ids"), r.input_ids, "{model}");
        assert_eq!(ids("output_ids"), r.greedy_ids, "{model}");
        assert_eq!(out["text"], r.json["greedy_text"]);
        assert!(out["prefill_tok_s"].as_f64().unwrap() > 0.0);
        assert!(out["decode_tok_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let run = |seed: &str| {
        medphi(&[
            "generate",
            "--model",
            &path("tiny-phi"),
            "--prompt",
            "Fever and",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.9",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ])["output_ids"]
            .clone()
    };
    assert_eq!(run("1"), run("1"));
    assert_ne!(run("1"), run("2"));
}

#[test]
fn logits_json_matches_transformers() {
    let r = reference();
    let tokens: Vec<String> = r.input_ids.iter().map(u32::to_string).collect();
    let out = medphi(&[
        "logits",
        "--model",
        &path("tiny-phi"),
        "--tokens",
        &tokens.join(","),
        "--backend",
        "cpu",
    ]);
    let rows: Vec<Vec<f32>> = serde_json::from_value(out["logits"].clone()).unwrap();
    let expected: Vec<Vec<f32>> = r.logits.to_vec2().unwrap();
    assert_eq!(rows.len(), expected.len());
    for (a, b) in rows.iter().zip(&expected) {
        assert_eq!(a.len(), 51200);
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    }
}

#[test]
fn info_describes_each_format() {
    let st = medphi(&["info", "--model", &path("tiny-phi"), "--json"]);
    assert_eq!(st["parameters"], 3_369_984);
    assert_eq!(st["dtypes"]["F32"], 3_369_984);
    let gguf = medphi(&["info", "--model", &path("tiny-phi-q8_0.gguf"), "--json"]);
    assert_eq!(gguf["parameters"], 3_369_984);
    assert!(gguf["dtypes"]["Q8_0"].as_u64().unwrap() > 3_000_000);
    let sharded = medphi(&["info", "--model", &path("tiny-phi-sharded"), "--json"]);
    assert_eq!(sharded["dtypes"]["BF16"], 3_369_984);
}

#[test]
fn bench_reports_speeds_and_the_candle_reference() {
    let out = medphi(&[
        "bench",
        "--model",
        &path("tiny-phi"),
        "--backend",
        "cpu",
        "--prompt-len",
        "16",
        "--gen",
        "8",
        "--rounds",
        "1",
        "--compare-candle",
        "--json",
    ]);
    for k in [
        "load_s",
        "prefill_tok_s",
        "decode_tok_s",
        "peak_rss_mib",
        "decode_speedup_vs_candle",
    ] {
        assert!(out[k].as_f64().unwrap() > 0.0, "{k}: {out}");
    }
    let gguf = medphi(&[
        "bench",
        "--model",
        &path("tiny-phi-q4_0.gguf"),
        "--tokenizer",
        &path("tiny-phi/tokenizer.json"),
        "--prompt-len",
        "8",
        "--gen",
        "4",
        "--rounds",
        "1",
        "--json",
    ]);
    assert_eq!(gguf["format"], "gguf");
}

#[test]
fn chat_streams_answers_and_keeps_history() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_medphi"))
        .args([
            "chat",
            "--model",
            &path("tiny-phi"),
            "--max-new-tokens",
            "6",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is sepsis?\nAnd its treatment?\n/reset\nHi\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reused: Vec<usize> = stderr
        .lines()
        .filter_map(|l| l.split("; ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    // Turn 2 reuses turn 1 from the KV cache; after /reset nothing is reused.
    assert_eq!(reused.len(), 3, "{stderr}");
    assert_eq!(reused[0], 0);
    assert!(reused[1] > 5, "{stderr}");
    assert_eq!(reused[2], 0);
    assert!(stderr.contains("conversation cleared"));
}
