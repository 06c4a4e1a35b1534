//! GGUF checkpoints written by llama.cpp's `gguf` package (and one k-quant file written
//! with candle's GGML quantizer) against the f32 transformers reference.
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

mod common;

use std::collections::HashMap;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use medphi::checkpoint::Checkpoint;
use medphi::generate::GenerateOptions;
use medphi::model::Phi;
use medphi::weights::{ReadAhead, TensorSource, Weight};
use pollster::block_on;

fn logits_of(ckpt: Checkpoint, ids: &[u32]) -> Tensor {
    let (model, _) = ckpt.into_model(true).unwrap();
    forward_all(&model, ids)
}

/// Max |Δlogit| against `reference` (a tensor of reference.safetensors), relative to the
/// largest reference logit.
fn relative_error(file: &str, reference_name: &str) -> f32 {
    let mut r = reference();
    r.logits = r.tensors[reference_name].clone();
    let tok = fixtures().join("tiny-phi/tokenizer.json");
    let ckpt = Checkpoint::open(&fixtures().join(file), Some(&tok), DType::F32).unwrap();
    let diff = max_abs_diff(&logits_of(ckpt, &r.input_ids), &r.logits);
    let scale = max_abs(&r.logits);
    eprintln!(
        "{file} vs {reference_name}: max |Δlogit| = {diff}, relative to max |logit| {scale}: {}",
        diff / scale
    );
    diff / scale
}

#[test]
fn f16_gguf_matches_reference() {
    // bf16-exact weights are f16-exact except for tiny subnormals: f32 parity.
    assert!(relative_error("tiny-phi-f16.gguf", "logits_f16") < 1e-5);
    assert!(relative_error("tiny-phi-f16.gguf", "logits") < 1e-5);
}

// Quantized files: tight against transformers run on the same dequantized weights (the
// rest is GGML's q8 rounding of activations inside the matmul), and loose against the
// f32 model (the quantization error itself, stated for the record).

#[test]
fn q8_0_gguf_matches_dequantized_reference() {
    assert!(relative_error("tiny-phi-q8_0.gguf", "logits_q8_0") < 0.02);
    assert!(relative_error("tiny-phi-q8_0.gguf", "logits") < 0.05);
}

#[test]
fn q4_0_gguf_matches_dequantized_reference() {
    assert!(relative_error("tiny-phi-q4_0.gguf", "logits_q4_0") < 0.02);
    assert!(relative_error("tiny-phi-q4_0.gguf", "logits") < 0.3);
}

/// q8_0, q4_0, q4_K and q6_K matrices reach our kernels straight from the file's blocks, where
/// this CPU runs them, and multiply as the weights candle dequantizes from the same blocks
/// times the activations rounded to q8_0 (as our kernels quantize them): the rest is the
/// order of f32 sums. (candle's own q4_K kernel rounds the activations per 256 values.)
#[test]
#[cfg(native_kernels)]
fn quantized_matrices_reach_our_kernels_from_the_file() {
    use medphi::model::quant_matmul::QuantMatrix;

    let dir = tempfile::tempdir().unwrap();
    let q4k = dir.path().join("tiny-q4k.gguf");
    write_q4k_gguf(&q4k);
    let q6k = dir.path().join("tiny-q6k.gguf");
    write_gguf(&q6k, false, |t| {
        if t.rank() == 2 && t.dim(1).unwrap() % 256 == 0 {
            GgmlDType::Q6K
        } else {
            GgmlDType::F32
        }
    });
    let tok = fixtures().join("tiny-phi/tokenizer.json");
    // fc1's rows (32 values) are too short for a k-quant's super-blocks: there fc2 is.
    for (file, dtype, name) in [
        (
            fixtures().join("tiny-phi-q8_0.gguf"),
            GgmlDType::Q8_0,
            "fc1",
        ),
        (
            fixtures().join("tiny-phi-q4_0.gguf"),
            GgmlDType::Q4_0,
            "fc1",
        ),
        (q4k, GgmlDType::Q4K, "fc2"),
        (q6k, GgmlDType::Q6K, "fc2"),
    ] {
        let ckpt = Checkpoint::open(&file, Some(&tok), DType::F32).unwrap();
        let cfg = &ckpt.config;
        let (name, shape) = match name {
            "fc1" => (
                "model.layers.1.mlp.fc1.weight",
                [cfg.intermediate_size, cfg.hidden_size],
            ),
            _ => (
                "model.layers.1.mlp.fc2.weight",
                [cfg.hidden_size, cfg.intermediate_size],
            ),
        };
        let file = file.file_name().unwrap().to_string_lossy();
        let ours = ckpt.weights.stored_quantized(name, &shape).unwrap();
        assert_eq!(ours.is_some(), QuantMatrix::serves(dtype), "{file}");
        let Some(ours) = ours else { continue };
        assert_eq!(ours.dtype(), dtype, "{file}");
        let Weight::Quantized(q) = ckpt.weights.tensor(name, &shape).unwrap() else {
            panic!("{file}: {name} is not stored quantized");
        };
        assert_eq!(q.dtype(), dtype);
        let w = q.dequantize(&Device::Cpu).unwrap();
        for m in [1, 5] {
            let x = Tensor::randn(0f32, 1.0, (m, shape[1]), &Device::Cpu).unwrap();
            let rounded = QTensor::quantize(&x, GgmlDType::Q8_0)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let want = rounded
                .matmul(&w.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = ours
                .matmul(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .unwrap();
            let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
            assert!(
                diff <= 1e-4 * scale,
                "{file}, {m} rows: max |Δ| {diff} of {scale}"
            );
        }
    }
}

/// Reads every tensor densely, so the only difference from transformers on gguf-py's
/// dequantized weights is float rounding: proves block layouts and names exactly.
struct Dequantized(Box<dyn TensorSource>);

impl TensorSource for Dequantized {
    fn tensor(&self, name: &str, shape: &[usize]) -> medphi::Result<Weight> {
        Ok(Weight::Dense(self.0.tensor(name, shape)?.dense()?))
    }
    fn check_tensor(&self, name: &str, shape: &[usize]) -> medphi::Result<()> {
        self.0.check_tensor(name, shape)
    }
    fn stored_tensors(&self) -> Vec<medphi::weights::StoredTensor> {
        self.0.stored_tensors()
    }
}

#[test]
fn quantized_blocks_decode_exactly_like_gguf_py() {
    let r = reference();
    let tok = fixtures().join("tiny-phi/tokenizer.json");
    for (file, name) in [
        ("tiny-phi-q8_0.gguf", "logits_q8_0"),
        ("tiny-phi-q4_0.gguf", "logits_q4_0"),
    ] {
        let ckpt = Checkpoint::open(&fixtures().join(file), Some(&tok), DType::F32).unwrap();
        let model = Phi::load(&ckpt.config, &Dequantized(ckpt.weights), true).unwrap();
        let ours = forward_all(&model, &r.input_ids);
        let diff = max_abs_diff(&ours, &r.tensors[name]);
        eprintln!("{file} dequantized: max |Δlogit| = {diff}");
        assert!(diff < 1e-4, "{file}: max |Δlogit| = {diff}");
    }
}

#[test]
fn gguf_config_and_embedded_tokenizer_match_the_hf_checkpoint() {
    let hf = open("tiny-phi");
    let gguf = open("tiny-phi-q8_0.gguf");
    let mut expected = hf.config.clone();
    expected.tie_word_embeddings = false;
    assert_eq!(gguf.config.hidden_size, expected.hidden_size);
    assert_eq!(gguf.config.rotary_dim(), expected.rotary_dim());
    assert_eq!(gguf.config.num_hidden_layers, expected.num_hidden_layers);
    assert_eq!(gguf.config.vocab_size, expected.vocab_size);
    assert_eq!(gguf.config.eos_token_id, Some(50256));
    let r = reference();
    let prompt = r.json["prompt"].as_str().unwrap();
    assert_eq!(gguf.tokenizer.encode(prompt).unwrap(), r.input_ids);
    let text = r.json["utf8_text"].as_str().unwrap();
    let ids: Vec<u32> = serde_json::from_value(r.json["utf8_ids"].clone()).unwrap();
    assert_eq!(gguf.tokenizer.encode(text).unwrap(), ids);
    assert_eq!(gguf.tokenizer.vocab_limit(), 50295);
}

#[test]
fn gguf_without_tokenizer_needs_one() {
    let path = fixtures().join("tiny-phi-q4_0.gguf");
    let err = Checkpoint::open(&path, None, DType::F32)
        .err()
        .expect("no tokenizer available");
    assert!(err.to_string().contains("--tokenizer"), "{err}");
    let tok = fixtures().join("tiny-phi/tokenizer.json");
    let ckpt = Checkpoint::open(&path, Some(&tok), DType::F32).unwrap();
    assert_eq!(ckpt.format, "gguf");
}

#[test]
fn q8_0_greedy_generation_follows_the_reference_for_a_while() {
    let r = reference();
    let (mut session, tokenizer) = session("tiny-phi-q8_0.gguf");
    let opts = GenerateOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    let g = block_on(session.generate(&tokenizer, &r.input_ids, &opts, &mut |_| true)).unwrap();
    let agree = g
        .output_ids
        .iter()
        .zip(&r.greedy_ids)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        agree >= 4,
        "q8_0 greedy agrees with f32 for only {agree} tokens"
    );
}

/// Writes the f32 fixture as a GGUF with k-quant (q4_k) matrices where rows allow it,
/// using llama.cpp's tensor names and metadata keys.
fn write_q4k_gguf(path: &std::path::Path) {
    write_gguf(path, false, |t| {
        if t.rank() == 2 && t.dim(1).unwrap() % 256 == 0 {
            GgmlDType::Q4K
        } else {
            GgmlDType::F32
        }
    });
}

/// The f32 fixture as a phi2 GGUF with llama.cpp's names and metadata; `fuse_qkv` stores
/// q, k, v as one `attn_qkv` tensor per layer (old phi2 GGUFs from the `Wqkv` layout);
/// `dtype` picks each tensor's GGML type.
fn write_gguf(path: &std::path::Path, fuse_qkv: bool, dtype: fn(&Tensor) -> GgmlDType) {
    let ckpt = open("tiny-phi");
    let cfg = ckpt.config.clone();
    let st =
        candle_core::safetensors::load(fixtures().join("tiny-phi/model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in &st {
        let gguf = name
            .replace("model.embed_tokens", "token_embd")
            .replace("model.final_layernorm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.")
            .replace("input_layernorm", "attn_norm")
            .replace("self_attn.q_proj", "attn_q")
            .replace("self_attn.k_proj", "attn_k")
            .replace("self_attn.v_proj", "attn_v")
            .replace("self_attn.dense", "attn_output")
            .replace("mlp.fc1", "ffn_up")
            .replace("mlp.fc2", "ffn_down");
        if fuse_qkv && name.contains("self_attn.q_proj") {
            let parts: Vec<Tensor> = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|p| st[&name.replace("q_proj", p)].clone())
                .collect();
            let fused = Tensor::cat(&parts, 0).unwrap();
            let fused_name = gguf.replace("attn_q", "attn_qkv");
            tensors.push((
                fused_name,
                QTensor::quantize(&fused, dtype(&fused)).unwrap(),
            ));
            continue;
        }
        if fuse_qkv && (name.contains("self_attn.k_proj") || name.contains("self_attn.v_proj")) {
            continue;
        }
        tensors.push((gguf, QTensor::quantize(t, dtype(t)).unwrap()));
    }
    let meta: HashMap<&str, gguf_file::Value> = HashMap::from([
        (
            "general.architecture",
            gguf_file::Value::String("phi2".into()),
        ),
        (
            "phi2.context_length",
            gguf_file::Value::U32(cfg.max_position_embeddings as u32),
        ),
        (
            "phi2.embedding_length",
            gguf_file::Value::U32(cfg.hidden_size as u32),
        ),
        (
            "phi2.feed_forward_length",
            gguf_file::Value::U32(cfg.intermediate_size as u32),
        ),
        (
            "phi2.block_count",
            gguf_file::Value::U32(cfg.num_hidden_layers as u32),
        ),
        (
            "phi2.attention.head_count",
            gguf_file::Value::U32(cfg.num_attention_heads as u32),
        ),
        (
            "phi2.attention.head_count_kv",
            gguf_file::Value::U32(cfg.num_key_value_heads as u32),
        ),
        (
            "phi2.attention.layer_norm_epsilon",
            gguf_file::Value::F32(cfg.layer_norm_eps as f32),
        ),
        (
            "phi2.rope.dimension_count",
            gguf_file::Value::U32(cfg.rotary_dim() as u32),
        ),
    ]);
    let meta: Vec<(&str, &gguf_file::Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let qt: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta, &qt).unwrap();
}

#[test]
fn q4_k_gguf_is_close_to_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-q4k.gguf");
    write_q4k_gguf(&path);
    let tok = fixtures().join("tiny-phi/tokenizer.json");
    let r = reference();
    let ckpt = Checkpoint::open(&path, Some(&tok), DType::F32).unwrap();
    assert!(
        ckpt.weights
            .stored_tensors()
            .iter()
            .any(|t| t.dtype == "Q4K"),
        "no q4_k tensor written"
    );
    let ours = logits_of(ckpt, &r.input_ids);
    let diff = max_abs_diff(&ours, &r.logits);
    eprintln!("q4_k: max |Δlogit| = {diff}");
    assert!(diff < 1.0, "max |Δlogit| = {diff}");
    assert!(diff > 0.0, "q4_k cannot be lossless");
}

#[test]
fn fused_attn_qkv_is_split_by_rows() {
    let dir = tempfile::tempdir().unwrap();
    let tok = fixtures().join("tiny-phi/tokenizer.json");
    let r = reference();
    let logits = |fuse: bool, dtype: fn(&Tensor) -> GgmlDType| {
        let path = dir.path().join(format!("fused-{fuse}.gguf"));
        write_gguf(&path, fuse, dtype);
        logits_of(
            Checkpoint::open(&path, Some(&tok), DType::F32).unwrap(),
            &r.input_ids,
        )
    };
    // f32: the split must give back exactly the reference model.
    let f32_fused = logits(true, |_| GgmlDType::F32);
    assert!(max_abs_diff(&f32_fused, &r.logits) < 1e-4);
    // q8_0: splitting whole rows keeps the blocks, so fused and separate files agree exactly.
    let q8 = |t: &Tensor| {
        if t.rank() == 2 {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        }
    };
    assert!(max_abs_diff(&logits(true, q8), &logits(false, q8)) < 1e-6);
}

/// `path` read by ranges as the page reads a GGUF it streams: the checkpoint (or its
/// error), and every read made.
fn ranged_gguf(path: &std::path::Path, short_from: usize) -> (medphi::Result<Checkpoint>, Reads) {
    let reads = Reads::default();
    let file: std::rc::Rc<dyn medphi::weights::RangeRead> = std::rc::Rc::new(Recorded {
        bytes: std::fs::read(path).unwrap(),
        reads: reads.clone(),
        short_from,
    });
    let weights = vec![("model.gguf".to_string(), file)];
    let tokenizer = medphi::checkpoint::NamedBytes {
        name: "tokenizer.json".into(),
        bytes: std::fs::read(fixtures().join("tiny-phi/tokenizer.json")).unwrap(),
    };
    let ckpt = block_on(Checkpoint::from_ranged(
        None,
        Some(tokenizer),
        weights,
        DType::F32,
    ));
    (ckpt, reads)
}

#[test]
fn a_gguf_read_by_ranges_gives_the_whole_files_logits_one_tensor_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let r = reference();
    // llama.cpp's q8_0 file, and one with q, k, v fused (each is a row range of one tensor).
    let fused = dir.path().join("fused.gguf");
    write_gguf(&fused, true, |t| {
        if t.rank() == 2 {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        }
    });
    // The fixture's header (its embedded tokenizer's 51,200 strings) takes more than the
    // first read, so it is read again, longer; the other's (no tokenizer) fits.
    for (path, tensors, header_reads) in [
        (fixtures().join("tiny-phi-q8_0.gguf"), 1 + 2 * 14 + 2 + 2, 2),
        (fused, 1 + 2 * 10 + 2 + 2, 1),
    ] {
        for gpu in [false, true] {
            let tok = fixtures().join("tiny-phi/tokenizer.json");
            let whole = Checkpoint::open(&path, Some(&tok), DType::F32).unwrap();
            let expected = streamed_logits(&whole, &r.input_ids, gpu);
            let (ckpt, reads) = ranged_gguf(&path, usize::MAX);
            // Only the header is read before loading.
            assert_eq!(reads.borrow().len(), header_reads, "{:?}", reads.borrow());
            assert!(reads.borrow().iter().all(|r| r.start == 0));
            assert!(
                streamed_logits(&ckpt.unwrap(), &r.input_ids, gpu) == expected,
                "{path:?} gpu={gpu}: the logits differ from the whole file's"
            );
            // Each tensor was read once, by itself (a fused qkv once for q, k and v).
            let reads = reads.borrow();
            let tensor_reads = &reads[header_reads..];
            let mut unique = tensor_reads.to_vec();
            unique.sort_by_key(|r| (r.start, r.end));
            unique.dedup();
            assert_eq!(unique.len(), tensor_reads.len(), "a tensor was read twice");
            assert_eq!(tensor_reads.len(), tensors, "{path:?} gpu={gpu}");
        }
    }
    // A read that comes back short is an error naming what was read, not a panic.
    let path = fixtures().join("tiny-phi-q8_0.gguf");
    let err = ranged_gguf(&path, 0).0.err().unwrap().to_string();
    assert!(err.contains("reading the header"), "{err}");
    let header_reads = ranged_gguf(&path, usize::MAX).1.borrow().len();
    let ckpt = ranged_gguf(&path, header_reads).0.unwrap();
    let err = block_on(ReadAhead::read(
        ckpt.weights.as_ref(),
        &ckpt.config,
        &mut |_| {},
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("bytes came back for"), "{err}");
}

#[test]
fn export_gguf_round_trips_with_its_embedded_tokenizer() {
    let r = reference();
    let dir = tempfile::tempdir().unwrap();
    for (quant, limit) in [("f32", 1e-5f32), ("q8_0", 0.02), ("q4_0", 0.25)] {
        let out = dir.path().join(format!("tiny-{quant}.gguf"));
        run_ok(
            medphi_cmd()
                .arg("export-gguf")
                .arg(fixtures().join("tiny-phi"))
                .arg(&out)
                .args(["--quant", quant]),
        );
        // llama.cpp refuses a file whose general.file_type is not a u32 (GGUF type 4).
        let bytes = std::fs::read(&out).unwrap();
        let key = b"general.file_type";
        match bytes.windows(key.len()).position(|w| w == key) {
            Some(at) => {
                let code = &bytes[at + key.len()..at + key.len() + 4];
                assert_eq!(code, 4u32.to_le_bytes(), "{quant}: file_type's type");
            }
            None => assert_eq!(quant, "f32", "a quantized export names its file type"),
        }
        // No tokenizer given: the embedded one must encode like the original.
        let ckpt = Checkpoint::open(&out, None, DType::F32).unwrap();
        // GGUF stores the epsilon as f32, as llama.cpp does.
        let mut expected = open("tiny-phi").config;
        expected.layer_norm_eps = f64::from(expected.layer_norm_eps as f32);
        assert_eq!(ckpt.config, expected);
        let prompt = r.json["prompt"].as_str().unwrap();
        assert_eq!(ckpt.tokenizer.encode(prompt).unwrap(), r.input_ids);
        let ours = logits_of(ckpt, &r.input_ids);
        let scale = max_abs(&r.logits);
        let rel = max_abs_diff(&ours, &r.logits) / scale;
        eprintln!("export-gguf {quant}: max |Δlogit| = {rel:.5} of max |logit|");
        assert!(rel < limit, "{quant}: {rel}");
    }
}
