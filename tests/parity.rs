//! Parity with independent implementations on the committed tiny checkpoints:
//! Hugging Face transformers (reference logits and greedy ids) and candle-transformers.
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use medphi::backend::{Backend, CpuBackend, Want};
use medphi::generate::{GenerateOptions, SamplingParams};
use medphi::tokenizer::TokenStream;
use pollster::block_on;

fn all_logits(path: &str, fused: bool, ids: &[u32]) -> Tensor {
    let (model, _) = open(path).into_model(fused).unwrap();
    forward_all(&model, ids)
}

#[test]
fn f32_logits_match_transformers_at_every_position() {
    let r = reference();
    for fused in [true, false] {
        let ours = all_logits("tiny-phi", fused, &r.input_ids);
        let diff = max_abs_diff(&ours, &r.logits);
        assert!(diff < 1e-4, "fused={fused}: max |Δlogit| = {diff}");
    }
}

#[test]
fn sharded_bf16_checkpoint_in_transformers5_layout_matches() {
    // The weights are bf16-exact, so upcast to f32 they are the reference model itself.
    let r = reference();
    let ours = all_logits("tiny-phi-sharded", true, &r.input_ids);
    let diff = max_abs_diff(&ours, &r.logits);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
}

#[test]
fn kv_cache_decode_matches_full_forward() {
    let r = reference();
    let (model, _) = open("tiny-phi").into_model(true).unwrap();
    let mut backend = CpuBackend::new(model, None).unwrap();
    let split = 5;
    let mut rows = block_on(backend.forward(&r.input_ids[..split], Want::AllRows))
        .unwrap()
        .rows()
        .unwrap();
    for &t in &r.input_ids[split..] {
        rows.extend(
            block_on(backend.forward(&[t], Want::LastRow))
                .unwrap()
                .rows()
                .unwrap(),
        );
    }
    let ours = Tensor::from_vec(rows, r.logits.shape(), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&ours, &r.logits);
    assert!(diff < 1e-4, "max |Δlogit| = {diff}");
    assert_eq!(backend.cached(), r.input_ids.len());
}

#[test]
fn tokenizer_matches_transformers() {
    let r = reference();
    let (_, tokenizer) = session("tiny-phi");
    let prompt = r.json["prompt"].as_str().unwrap();
    assert_eq!(tokenizer.encode(prompt).unwrap(), r.input_ids);
    let text = r.json["utf8_text"].as_str().unwrap();
    let ids: Vec<u32> = serde_json::from_value(r.json["utf8_ids"].clone()).unwrap();
    assert_eq!(tokenizer.encode(text).unwrap(), ids);
    assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    assert_eq!(tokenizer.vocab_limit(), 50295);
}

#[test]
fn streaming_detokenizer_never_splits_a_character() {
    let r = reference();
    let (_, tokenizer) = session("tiny-phi");
    let text = r.json["utf8_text"].as_str().unwrap();
    let ids: Vec<u32> = serde_json::from_value(r.json["utf8_ids"].clone()).unwrap();
    // The emoji and CJK characters span several byte-level tokens.
    let partial = ids
        .iter()
        .filter(|&&id| tokenizer.decode(&[id]).unwrap().contains('\u{FFFD}'))
        .count();
    assert!(
        partial >= 2,
        "fixture text should contain tokens that are partial characters"
    );
    let mut stream = TokenStream::new(&tokenizer);
    let mut out = String::new();
    for &id in &ids {
        if let Some(piece) = stream.push(id).unwrap() {
            assert!(
                !piece.contains('\u{FFFD}'),
                "piece {piece:?} holds a broken character"
            );
            out.push_str(&piece);
        }
    }
    if let Some(rest) = stream.finish().unwrap() {
        out.push_str(&rest);
    }
    assert_eq!(out, text);
}

#[test]
fn greedy_generation_matches_transformers_for_64_tokens() {
    let r = reference();
    let (mut session, tokenizer) = session("tiny-phi");
    let opts = GenerateOptions {
        max_new_tokens: 64,
        sampling: SamplingParams::default(),
        stop: vec![],
    };
    let mut streamed = String::new();
    let g = block_on(session.generate(&tokenizer, &r.input_ids, &opts, &mut |t| {
        streamed.push_str(t);
        true
    }))
    .unwrap();
    assert_eq!(g.output_ids, r.greedy_ids);
    assert_eq!(g.text, streamed);
    assert_eq!(g.text, r.json["greedy_text"].as_str().unwrap());
    // Padding ids (≥ the tokenizer's 50295) exist in the 51200-row head but are never chosen.
    assert!(g.output_ids.iter().all(|&t| t < 50295));
}

#[test]
fn matches_candle_transformers_phi() {
    use candle_transformers::models::phi;
    let r = reference();
    let dir = fixtures().join("tiny-phi");
    let cfg: phi::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let mut theirs = phi::Model::new(&cfg, vb).unwrap();
    let (model, _) = open("tiny-phi").into_model(true).unwrap();
    let mut ours = CpuBackend::new(model, None).unwrap();
    // candle-transformers returns last-position logits only: compare while decoding.
    for (i, &t) in r.input_ids.iter().enumerate() {
        let input = Tensor::new(&[t], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let theirs_row = theirs.forward(&input).unwrap().squeeze(0).unwrap();
        let ours_row = Tensor::new(
            block_on(ours.forward(&[t], Want::LastRow))
                .unwrap()
                .rows()
                .unwrap(),
            &Device::Cpu,
        )
        .unwrap();
        let diff = max_abs_diff(&ours_row, &theirs_row);
        assert!(
            diff < 1e-4,
            "position {i}: max |Δlogit| vs candle-transformers = {diff}"
        );
    }
}

#[test]
fn f16_safetensors_match_the_f32_reference() {
    // The fixture's bf16-exact weights survive f16 except for subnormals (|w| < 6e-5).
    let dir = tempfile::tempdir().unwrap();
    let model = f16_copy_of_tiny_phi(dir.path());
    let r = reference();
    let ckpt = medphi::checkpoint::Checkpoint::open(&model, None, DType::F32).unwrap();
    assert!(ckpt
        .weights
        .stored_tensors()
        .iter()
        .all(|t| t.dtype == "F16"));
    let (m, _) = ckpt.into_model(true).unwrap();
    let diff = max_abs_diff(&forward_all(&m, &r.input_ids), &r.logits);
    assert!(diff < 1e-3, "max |Δlogit| = {diff}");
    // Where the f16 kernel runs, the matrices stay f16: a forward reads half the bytes of
    // the f32 checkpoint's, and a little more: norms and biases (the output layer's 51,200
    // among them) are f32 in both.
    let (f32_model, _) = open("tiny-phi").into_model(true).unwrap();
    let (half, full) = (m.bytes_read(1, 0), f32_model.bytes_read(1, 0));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("f16c")
        && std::arch::is_x86_feature_detected!("fma")
    {
        assert!(half * 2 > full && half * 5 < full * 3, "{half} vs {full}");
        return;
    }
    assert_eq!(half, full);
}
