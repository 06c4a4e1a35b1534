//! Every kind of bad input ends in a clear error naming the file, never a panic, and never
//! an allocation sized by an unchecked length from the file. Checked through the library
//! and through the `medphi` binary (one line on stderr, exit code 1).
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::DType;
use common::fixtures;
use medphi::checkpoint::Checkpoint;
use medphi::model::PhiConfig;

/// A copy of the tiny checkpoint that a test may damage.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-phi").join(f), model.join(f)).unwrap();
    }
    (dir, model)
}

fn open_err(path: &Path) -> String {
    match Checkpoint::open(path, None, DType::F32).and_then(|c| c.into_model(true)) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "error {err:?} does not mention {n:?}");
    }
}

#[test]
fn missing_folder_and_files() {
    let (_d, model) = scratch();
    assert_mentions(&open_err(&model.join("nope")), &["nope", "no such"]);
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    assert_mentions(&open_err(&model), &["no model.safetensors"]);
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    assert_mentions(&open_err(&model), &["tokenizer.json"]);
    std::fs::remove_file(model.join("config.json")).unwrap();
    assert_mentions(&open_err(&model), &["config.json"]);
}

#[test]
fn empty_files() {
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        let (_d, model) = scratch();
        std::fs::write(model.join(f), b"").unwrap();
        assert_mentions(&open_err(&model), &[f]);
    }
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("empty.gguf");
    std::fs::write(&gguf, b"").unwrap();
    assert_mentions(&open_err(&gguf), &["empty.gguf", "empty"]);
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let (_d, model) = scratch();
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(
        &open_err(&model),
        &["model.safetensors", "not a valid safetensors"],
    );
    std::fs::write(&path, &bytes[..5]).unwrap();
    assert_mentions(&open_err(&model), &["model.safetensors"]);
    let mut corrupt = bytes.clone();
    corrupt[8..20].copy_from_slice(b"garbage!!!!!");
    std::fs::write(&path, &corrupt).unwrap();
    assert_mentions(
        &open_err(&model),
        &["model.safetensors", "not a valid safetensors"],
    );
}

#[test]
fn safetensors_header_claiming_absurd_sizes() {
    let (_d, model) = scratch();
    let path = model.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(&open_err(&model), &["model.safetensors"]);
    // A tensor whose offsets point far past the end of the file.
    let header = br#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[1000000000,1000000],"data_offsets":[0,4000000000000000]}}"#;
    let mut fake = (header.len() as u64).to_le_bytes().to_vec();
    fake.extend_from_slice(header);
    fake.extend_from_slice(&[0; 64]);
    std::fs::write(&path, &fake).unwrap();
    assert_mentions(&open_err(&model), &["model.safetensors"]);
}

/// A GGUF v3 header: magic, version, tensor count, metadata count, then `rest`.
fn gguf_header(tensors: u64, kvs: u64, rest: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&tensors.to_le_bytes());
    b.extend_from_slice(&kvs.to_le_bytes());
    b.extend_from_slice(rest);
    b
}

#[test]
fn gguf_truncated_corrupt_and_absurd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let good = std::fs::read(fixtures().join("tiny-phi-q8_0.gguf")).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 3].to_vec()),
        ("not gguf", b"this is not a gguf file at all".to_vec()),
        ("absurd tensor count", gguf_header(1 << 60, 0, &[])),
        ("absurd metadata count", gguf_header(0, 1 << 60, &[])),
        // One metadata key whose string length claims 2^62 bytes.
        (
            "absurd string",
            gguf_header(0, 1, &(1u64 << 62).to_le_bytes()),
        ),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let err = open_err(&path);
        assert_mentions(&err, &["bad.gguf"]);
        eprintln!("{what}: {err}");
    }
}

#[test]
fn gguf_of_another_architecture() {
    // Rewrite "phi2" as "phi3" in the architecture value: same length, valid file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.gguf");
    let mut bytes = std::fs::read(fixtures().join("tiny-phi-q8_0.gguf")).unwrap();
    let key = b"general.architecture";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    let value_at = at + key.len() + 4 + 8; // value type u32, string length u64
    assert_eq!(&bytes[value_at..value_at + 4], b"phi2");
    bytes[value_at + 3] = b'3';
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(&open_err(&path), &["other.gguf", "phi3"]);
}

#[test]
fn tensor_shapes_that_disagree_with_the_config() {
    let (_d, model) = scratch();
    let cfg_path = model.join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace("\"intermediate_size\": 256", "\"intermediate_size\": 128"),
    )
    .unwrap();
    assert_mentions(
        &open_err(&model),
        &["model.safetensors", "mlp.fc1.weight", "[128, 32]"],
    );
    std::fs::write(
        &cfg_path,
        cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
    )
    .unwrap();
    assert_mentions(&open_err(&model), &["model.layers.2", "missing"]);
}

#[test]
fn invalid_configs() {
    let base = std::fs::read_to_string(fixtures().join("tiny-phi/config.json")).unwrap();
    let cases = [
        (
            base.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 5"),
            "not divisible",
        ),
        (base.replace("\"gelu_new\"", "\"swish\""), "hidden_act"),
        (
            base.replace("\"hidden_size\": 32", "\"hidden_size\": 0"),
            "hidden_size",
        ),
        (
            base.replace("\"hidden_size\": 32", "\"hidden_size\": -3"),
            "config.json",
        ),
        (
            base.replace("\"vocab_size\": 51200", "\"vocab_size\": 99999999999"),
            "vocab_size",
        ),
        (
            base.replace("\"model_type\": \"phi\"", "\"model_type\": \"llama\""),
            "model_type",
        ),
        ("{ not json".to_string(), "not a valid config.json"),
    ];
    for (json, needle) in cases {
        let err = PhiConfig::from_json(&json, "config.json")
            .unwrap_err()
            .to_string();
        assert_mentions(&err, &["config.json", needle]);
    }
}

#[test]
fn invalid_tokenizer() {
    let (_d, model) = scratch();
    std::fs::write(
        model.join("tokenizer.json"),
        br#"{"model": {"type": "Nonsense"}}"#,
    )
    .unwrap();
    assert_mentions(
        &open_err(&model),
        &["tokenizer.json", "not a valid tokenizer.json"],
    );
}

#[test]
fn shard_index_cannot_escape_the_folder() {
    let (_d, model) = scratch();
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    std::fs::write(
        model.join("model.safetensors.index.json"),
        br#"{"weight_map": {"lm_head.weight": "../../etc/passwd"}}"#,
    )
    .unwrap();
    assert_mentions(
        &open_err(&model),
        &["model.safetensors.index.json", "not a plain file name"],
    );
}

fn medphi(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_medphi"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_reports_one_line_errors_with_exit_code_1() {
    let (_d, model) = scratch();
    let bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors"), &bytes[..1000]).unwrap();
    let m = model.to_str().unwrap();
    let long_prompt = "word ".repeat(400);
    let tiny = fixtures().join("tiny-phi");
    let tiny = tiny.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["generate", "--model", m, "--prompt", "hi"],
            "model.safetensors",
        ),
        (vec!["info", "--model", "/no/such/model"], "/no/such/model"),
        (
            vec!["generate", "--model", tiny, "--prompt", &long_prompt],
            "longer than the context",
        ),
        (
            vec!["logits", "--model", tiny, "--tokens", "1,x"],
            "not a token id",
        ),
        (
            vec!["logits", "--model", tiny, "--tokens", "1,99999999"],
            "outside the vocabulary",
        ),
        (
            vec![
                "generate",
                "--model",
                tiny,
                "--prompt",
                "hi",
                "--temperature=-1",
            ],
            "temperature",
        ),
        (
            vec![
                "generate", "--model", tiny, "--prompt", "hi", "--top-p", "2",
            ],
            "top_p",
        ),
    ];
    for (args, needle) in cases {
        let (code, _, stderr) = medphi(&args);
        assert_eq!(code, 1, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        let line = stderr.trim().lines().last().unwrap_or("");
        assert!(
            line.starts_with("error: ") && line.contains(needle),
            "{args:?}: {stderr}"
        );
    }
}
