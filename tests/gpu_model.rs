//! The whole model on the GPU (lavapipe in CI) against the transformers fixtures.
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

mod common;

use candle_core::{Device, Tensor};
use common::*;
use medphi::backend::Backend;
use medphi::checkpoint::Checkpoint;
use medphi::generate::{GenerateOptions, Session};
use medphi::gpu::GpuBackend;
use medphi::model::Logits;
use pollster::block_on;

fn gpu(path: &str, tokenizer: Option<&str>) -> (GpuBackend, medphi::tokenizer::PhiTokenizer) {
    let tok = tokenizer.map(|t| fixtures().join(t));
    let ckpt = Checkpoint::open(
        &fixtures().join(path),
        tok.as_deref(),
        candle_core::DType::F32,
    )
    .unwrap();
    let backend = block_on(GpuBackend::load(&ckpt.config, ckpt.weights.as_ref(), None)).unwrap();
    (backend, ckpt.tokenizer)
}

#[test]
fn logits_match_transformers_at_every_position() {
    let r = reference();
    let (mut backend, _) = gpu("tiny-phi", None);
    let rows = block_on(backend.forward(&r.input_ids, Logits::All)).unwrap();
    let ours = Tensor::from_vec(rows, r.logits.shape(), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&ours, &r.logits);
    eprintln!("wgpu f32: max |Δlogit| = {diff}");
    assert!(diff < 1e-3, "max |Δlogit| = {diff}");
}

#[test]
fn cached_decode_matches_full_forward() {
    let r = reference();
    let (mut backend, _) = gpu("tiny-phi", None);
    let mut rows = block_on(backend.forward(&r.input_ids[..4], Logits::All)).unwrap();
    for &t in &r.input_ids[4..] {
        rows.extend(block_on(backend.forward(&[t], Logits::Last)).unwrap());
    }
    let ours = Tensor::from_vec(rows, r.logits.shape(), &Device::Cpu).unwrap();
    assert!(max_abs_diff(&ours, &r.logits) < 1e-3);
}

#[test]
fn greedy_generation_matches_transformers_for_64_tokens() {
    let r = reference();
    let (backend, tokenizer) = gpu("tiny-phi", None);
    let mut session = Session::new(backend);
    let opts = GenerateOptions {
        max_new_tokens: 64,
        ..Default::default()
    };
    let g = block_on(session.generate(&tokenizer, &r.input_ids, &opts, &mut |_| true)).unwrap();
    assert_eq!(g.output_ids, r.greedy_ids);
}

#[test]
fn dequantized_gguf_matches_transformers_on_the_same_weights() {
    let r = reference();
    let (mut backend, _) = gpu("tiny-phi-q4_0.gguf", Some("tiny-phi/tokenizer.json"));
    let rows = block_on(backend.forward(&r.input_ids, Logits::All)).unwrap();
    let ours = Tensor::from_vec(rows, r.logits.shape(), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&ours, &r.tensors["logits_q4_0"]);
    assert!(diff < 1e-3, "max |Δlogit| = {diff}");
}

#[test]
fn rejects_overlong_input_and_bad_ids() {
    let (mut backend, _) = gpu("tiny-phi", None);
    let too_long = vec![1u32; backend.capacity() + 1];
    assert!(block_on(backend.forward(&too_long, Logits::Last))
        .unwrap_err()
        .to_string()
        .contains("context"));
    assert!(block_on(backend.forward(&[60_000], Logits::Last))
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
}

#[test]
fn cli_generates_the_reference_tokens_on_wgpu() {
    let r = reference();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_medphi"))
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-phi"))
        .args([
            "--prompt",
            r.json["prompt"].as_str().unwrap(),
            "--max-new-tokens",
            "64",
        ])
        .args(["--temperature", "0", "--backend", "wgpu", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(v["output_ids"].clone()).unwrap();
    assert_eq!(ids, r.greedy_ids);
    let info = std::process::Command::new(env!("CARGO_BIN_EXE_medphi"))
        .arg("gpu-info")
        .output()
        .unwrap();
    assert!(info.status.success());
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info["max_storage_buffer_binding_size"].as_u64().unwrap() > 0);
}

#[test]
fn long_prompts_run_in_several_passes_like_the_cpu_path() {
    // 200 tokens: two 128-token passes on the GPU, one forward on the CPU.
    let r = reference();
    let ids: Vec<u32> = r.input_ids.iter().copied().cycle().take(200).collect();
    let (model, _) = open("tiny-phi").into_model(true).unwrap();
    let cpu = forward_all(&model, &ids);
    let (mut backend, _) = gpu("tiny-phi", None);
    let rows = block_on(backend.forward(&ids, Logits::All)).unwrap();
    let ours = Tensor::from_vec(rows, cpu.shape(), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&ours, &cpu);
    assert!(diff < 1e-3, "max |Δlogit| vs CPU = {diff}");
    backend.truncate(0);
    let last = cpu.get(199).unwrap().to_vec1::<f32>().unwrap();
    let greedy = block_on(backend.forward_greedy(&ids, 50_295)).unwrap();
    assert_eq!(greedy, medphi::generate::argmax(&last[..50_295]));
    assert_eq!(backend.cached(), 200);
}
