//! Browser tests (`wasm-pack test --headless --chrome`): the fixture checkpoint through
//! the wasm package's own API, on the wasm CPU path and on the browser's WebGPU, against
//! what transformers computed (tests/fixtures/reference.*).
#![cfg(target_arch = "wasm32")]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use medphi::backend::{Backend, CpuBackend, Want};
use medphi::checkpoint::{Checkpoint, NamedBytes};
use medphi::generate::{GenerateOptions, Session};
use medphi::gpu::{GpuBackend, KernelChoice};
use medphi::web::{parse_benchmark, Model};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

const CONFIG: &[u8] = include_bytes!("fixtures/tiny-phi/config.json");
const TOKENIZER: &[u8] = include_bytes!("fixtures/tiny-phi/tokenizer.json");
const WEIGHTS: &[u8] = include_bytes!("fixtures/tiny-phi/model.safetensors");
const Q8_GGUF: &[u8] = include_bytes!("fixtures/tiny-phi-q8_0.gguf");
const Q4_GGUF: &[u8] = include_bytes!("fixtures/tiny-phi-q4_0.gguf");
const F16_GGUF: &[u8] = include_bytes!("fixtures/tiny-phi-f16.gguf");
const REFERENCE: &[u8] = include_bytes!("fixtures/reference.safetensors");
const PROMPT: &str = "Instruct: What is macrocephaly?\nOutput:";

struct Reference {
    input_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    logits: Vec<f32>,
    /// transformers on the weights of each GGUF fixture as llama.cpp's gguf-py decodes them.
    gguf_logits: HashMap<&'static str, Vec<f32>>,
}

fn reference() -> Reference {
    let t: HashMap<String, Tensor> =
        candle_core::safetensors::load_buffer(REFERENCE, &Device::Cpu).unwrap();
    let ids = |n: &str| t[n].to_dtype(DType::U32).unwrap().to_vec1::<u32>().unwrap();
    let flat = |n: &str| t[n].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    Reference {
        input_ids: ids("input_ids"),
        greedy_ids: ids("greedy_ids"),
        logits: flat("logits"),
        gguf_logits: ["f16", "q8_0", "q4_0"]
            .into_iter()
            .map(|f| (f, flat(&format!("logits_{f}"))))
            .collect(),
    }
}

fn named(name: &str, bytes: &[u8]) -> NamedBytes {
    NamedBytes {
        name: name.into(),
        bytes: bytes.to_vec(),
    }
}

/// A GGUF fixture, with tiny-phi's tokenizer: not every fixture embeds it; all share it.
fn gguf_fixture(format: &str, file: &[u8]) -> Checkpoint {
    Checkpoint::from_bytes(
        None,
        Some(named("tokenizer.json", TOKENIZER)),
        vec![named(&format!("tiny-phi-{format}.gguf"), file)],
        DType::F32,
    )
    .unwrap()
}

fn checkpoint() -> Checkpoint {
    Checkpoint::from_bytes(
        Some(named("config.json", CONFIG)),
        Some(named("tokenizer.json", TOKENIZER)),
        vec![named("model.safetensors", WEIGHTS)],
        DType::F32,
    )
    .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// All-position logits within `limit` of transformers, and the first `tokens` greedy ids.
async fn check_against_reference(backend: impl Backend, limit: f32, tokens: usize) {
    let r = reference();
    let mut session = Session::new(backend);
    let rows = session
        .backend_mut()
        .forward(&r.input_ids, Want::AllRows)
        .await
        .unwrap()
        .rows()
        .unwrap();
    let diff = max_abs_diff(&rows, &r.logits);
    assert!(diff < limit, "logits differ from transformers by {diff}");
    let tokenizer = checkpoint().tokenizer;
    let opts = GenerateOptions {
        max_new_tokens: tokens,
        ..Default::default()
    };
    let g = session
        .generate(&tokenizer, &r.input_ids, &opts, &mut |_| true)
        .await
        .unwrap();
    assert_eq!(g.output_ids, r.greedy_ids[..tokens]);
}

#[wasm_bindgen_test]
fn tokenizer_matches_the_reference_ids() {
    let ckpt = checkpoint();
    assert_eq!(
        ckpt.tokenizer.encode(PROMPT).unwrap(),
        reference().input_ids
    );
}

#[wasm_bindgen_test]
async fn cpu_forward_matches_transformers() {
    let (model, _) = checkpoint().into_model(true).unwrap();
    check_against_reference(CpuBackend::new(model, None).unwrap(), 1e-4, 64).await;
}

/// The wasm kernels (rows split across rayon's pool) in each format, made through
/// `QuantMatrix` as the loader makes them, against candle's reading of the same blocks: its
/// dequantized weights times the activations rounded to q8_0 as ours are (candle's own
/// k-quant kernels round them per 256 values). A row count that leaves a partial group of
/// four, two super-blocks a row, decode (1 row) and prefill (5, 9 rows); wrong sizes are
/// errors. The loader hands k-quants to ours only where there are threads to split them
/// across (these tests run on one).
#[wasm_bindgen_test]
fn quantized_kernels_match_candle() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use medphi::model::quant_matmul::{Q4Matrix, Q8Matrix, QuantMatrix};
    let (rows, cols) = (37, 512);
    let wave = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin() * 3.0).collect();
    let w = Tensor::from_vec(wave(rows * cols, 0.37), (rows, cols), &Device::Cpu).unwrap();
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let k_quant = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K);
        let threads = rayon::current_num_threads() > 1;
        assert_eq!(QuantMatrix::serves(dtype), !k_quant || threads, "{dtype:?}");
        let q = QTensor::quantize(&w, dtype).unwrap();
        let ours = QuantMatrix::for_this_cpu(dtype, &q.data().unwrap(), rows, cols)
            .unwrap()
            .expect("a format our kernels serve");
        assert_eq!(ours.dtype(), dtype, "{dtype:?}");
        let weights = q.dequantize(&Device::Cpu).unwrap();
        for m in [1, 5, 9] {
            let x: Vec<f32> = wave(m * cols, 0.11);
            let rounded = QTensor::quantize(
                &Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap(),
                GgmlDType::Q8_0,
            )
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
            let want = rounded
                .matmul(&weights.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = ours.matmul(&x).unwrap();
            assert_eq!(got.len(), want.len());
            let largest = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * largest,
                    "{dtype:?}, {m} rows: {g} vs {w}"
                );
            }
        }
        assert!(ours.matmul(&[0.0; 511]).is_err());
    }
    assert!(Q8Matrix::for_this_cpu(&[0; 33], 1, 32).is_err());
    assert!(Q4Matrix::for_this_cpu(&[0; 17], 1, 32).is_err());
    // A q4_K super-block holds 256 values: a row of 32 is not one.
    assert!(QuantMatrix::for_this_cpu(GgmlDType::Q4K, &[0; 144], 1, 32).is_err());
}

/// The q8_0 and q4_0 fixtures on the wasm CPU path: our kernels through the whole model,
/// against transformers on the same decoded weights (activations quantized to q8_0 as
/// llama.cpp's are, hence the looser bound tests/gguf.rs uses natively).
#[wasm_bindgen_test]
async fn cpu_quantized_forward_matches_transformers() {
    let r = reference();
    for (format, file) in [("q8_0", Q8_GGUF), ("q4_0", Q4_GGUF)] {
        let ckpt = gguf_fixture(format, file);
        let (model, _) = ckpt.into_model(true).unwrap();
        let mut backend = CpuBackend::new(model, None).unwrap();
        let rows = backend
            .forward(&r.input_ids, Want::AllRows)
            .await
            .unwrap()
            .rows()
            .unwrap();
        let want = &r.gguf_logits[format];
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff: Vec<f32> = rows.iter().zip(want).map(|(a, b)| a - b).collect();
        let relative = norm(&diff) / norm(want);
        assert!(
            relative < 0.02,
            "{format} logits differ from transformers by {relative} (relative)"
        );
    }
}

/// Both kernel families on Chromium's WebGPU (SwiftShader here). SwiftShader runs the gpu
/// family's barriers slowly, so it decodes 8 tokens here; tests/gpu_model.rs decodes 64 with
/// each family on lavapipe.
#[wasm_bindgen_test]
async fn webgpu_forward_matches_transformers() {
    for (kernels, tokens) in [(KernelChoice::Gpu, 8), (KernelChoice::Emulator, 64)] {
        let ckpt = checkpoint();
        let gpu = GpuBackend::load(&ckpt.config, ckpt.weights.as_ref(), None, kernels)
            .await
            .expect(
                "WebGPU in the browser (Chrome needs --enable-unsafe-webgpu, see webdriver.json)",
            );
        check_against_reference(gpu, 1e-3, tokens).await;
    }
}

/// Every weight format the GPU reads in place (GGUF files as llama.cpp's gguf package writes
/// them), with both kernel families.
#[wasm_bindgen_test]
async fn gguf_weights_match_transformers_with_both_kernel_families() {
    let r = reference();
    for (format, file) in [("f16", F16_GGUF), ("q8_0", Q8_GGUF), ("q4_0", Q4_GGUF)] {
        let ckpt = gguf_fixture(format, file);
        for kernels in [KernelChoice::Gpu, KernelChoice::Emulator] {
            let gpu = GpuBackend::load(&ckpt.config, ckpt.weights.as_ref(), None, kernels)
                .await
                .unwrap();
            let mut session = Session::new(gpu);
            let rows = session
                .backend_mut()
                .forward(&r.input_ids, Want::AllRows)
                .await
                .unwrap()
                .rows()
                .unwrap();
            // The reference is transformers on the same decoded weights (exact up to f32
            // rounding).
            let diff = max_abs_diff(&rows, &r.gguf_logits[format]);
            assert!(diff < 1e-3, "{format} {kernels:?}: logits differ by {diff}");
        }
    }
}

fn files(list: &[(&str, &[u8])]) -> js_sys::Array {
    list.iter()
        .map(|(name, bytes)| {
            let o = js_sys::Object::new();
            js_sys::Reflect::set(&o, &"name".into(), &(*name).into()).unwrap();
            js_sys::Reflect::set(&o, &"bytes".into(), &js_sys::Uint8Array::from(*bytes)).unwrap();
            JsValue::from(o)
        })
        .collect()
}

fn fixture_files() -> js_sys::Array {
    files(&[
        ("config.json", CONFIG),
        ("tokenizer.json", TOKENIZER),
        ("model.safetensors", WEIGHTS),
    ])
}

fn get(v: &JsValue, key: &str) -> JsValue {
    js_sys::Reflect::get(v, &key.into()).unwrap()
}

fn error_name(e: JsValue) -> (String, String) {
    let e: js_sys::Error = e.dyn_into().expect("a JS Error");
    (e.name().into(), e.message().into())
}

#[wasm_bindgen_test]
async fn the_js_api_generates_the_reference_tokens_and_streams_them() {
    for (backend, kernels) in [
        ("cpu", None),
        ("webgpu", Some("gpu")),
        ("webgpu", Some("emulator")),
    ] {
        let model = Model::load(
            fixture_files(),
            backend.into(),
            None,
            kernels.map(String::from),
            None,
            None,
            None,
        )
        .await
        .unwrap();
        let info = model.info().unwrap();
        assert_eq!(get(&info, "backend").as_string().unwrap(), backend);
        assert_eq!(get(&info, "kernels").as_string().as_deref(), kernels);
        let r = reference();
        // SwiftShader runs the gpu family's barriers slowly: a few tokens show it works
        // through this API (webgpu_forward_matches_transformers checks 64 of them).
        let count = if kernels == Some("gpu") { 4 } else { 16 };
        let request = serde_wasm_bindgen::to_value(&serde_json::json!({
            "prompt": PROMPT, "maxNewTokens": count, "temperature": 0.0
        }))
        .unwrap();
        let streamed = std::rc::Rc::new(std::cell::RefCell::new(String::new()));
        let sink = streamed.clone();
        let on_text = Closure::<dyn FnMut(String) -> bool>::new(move |piece: String| {
            sink.borrow_mut().push_str(&piece);
            true
        });
        let g = JsFuture::from(model.generate(request, on_text.as_ref().clone().into()))
            .await
            .unwrap();
        let ids: Vec<u32> = serde_wasm_bindgen::from_value(get(&g, "outputIds")).unwrap();
        assert_eq!(ids, r.greedy_ids[..count], "{backend} {kernels:?}");
        assert_eq!(get(&g, "text").as_string().unwrap(), *streamed.borrow());
    }
}

#[wasm_bindgen_test]
async fn returning_false_from_the_callback_stops_generation() {
    let model = Model::load(fixture_files(), "cpu".into(), None, None, None, None, None)
        .await
        .unwrap();
    let request = serde_wasm_bindgen::to_value(&serde_json::json!({
        "prompt": PROMPT, "maxNewTokens": 50
    }))
    .unwrap();
    let on_text = Closure::<dyn FnMut(String) -> bool>::new(|_: String| false);
    let g = JsFuture::from(model.generate(request, on_text.as_ref().clone().into()))
        .await
        .unwrap();
    assert_eq!(get(&g, "stopReason").as_string().unwrap(), "cancelled");
    let ids: Vec<u32> = serde_wasm_bindgen::from_value(get(&g, "outputIds")).unwrap();
    assert!(ids.len() < 50);
}

#[wasm_bindgen_test]
async fn scores_a_parsed_medqa_question() {
    let line = r#"{"question": "Which vitamin deficiency causes scurvy?", "answer": "Vitamin C", "options": {"A": "Vitamin A", "B": "Vitamin C", "C": "Vitamin D", "D": "Vitamin K"}, "meta_info": "step1", "answer_idx": "B"}"#;
    let questions = parse_benchmark("medqa_4options", line, "sample.jsonl").unwrap();
    let q = js_sys::Array::from(&questions).get(0);
    assert_eq!(get(&q, "gold").as_f64(), Some(1.0));
    let model = Model::load(fixture_files(), "cpu".into(), None, None, None, None, None)
        .await
        .unwrap();
    let scored = JsFuture::from(model.score(q)).await.unwrap();
    let ll: Vec<f64> = serde_wasm_bindgen::from_value(get(&scored, "loglikelihoods")).unwrap();
    assert_eq!(ll.len(), 4);
    assert!(ll.iter().all(|v| v.is_finite() && *v < 0.0), "{ll:?}");
    // The page's report is `medphi eval`'s: its sample line and results object.
    let sample = get(&scored, "sample");
    let doc: serde_json::Value = serde_wasm_bindgen::from_value(get(&sample, "doc")).unwrap();
    assert_eq!(doc["answer_idx"], "B");
    let samples = js_sys::Array::of1(&sample);
    let report = medphi::web::eval_report(
        "medqa_4options",
        samples.into(),
        1,
        serde_wasm_bindgen::to_value(&serde_json::json!({"model": "medphi"})).unwrap(),
        1.5,
    )
    .unwrap();
    let report: serde_json::Value = serde_wasm_bindgen::from_value(report).unwrap();
    let acc = if get(&scored, "acc").as_bool().unwrap() {
        1.0
    } else {
        0.0
    };
    assert_eq!(report["results"]["medqa_4options"]["acc,none"], acc);
    assert_eq!(report["n-samples"]["medqa_4options"]["effective"], 1);
    assert_eq!(report["samples"]["medqa_4options"][0]["target"], 1);
}

#[wasm_bindgen_test]
async fn bad_files_are_js_errors_not_aborts() {
    let cases: Vec<(js_sys::Array, &str, &str)> = vec![
        (
            files(&[
                ("config.json", CONFIG),
                ("tokenizer.json", TOKENIZER),
                ("model.safetensors", &WEIGHTS[..1000]),
            ]),
            "FileError",
            "model.safetensors",
        ),
        (
            files(&[
                ("config.json", b"{not json"),
                ("tokenizer.json", TOKENIZER),
                ("model.safetensors", WEIGHTS),
            ]),
            "FileError",
            "config.json",
        ),
        (
            files(&[("config.json", CONFIG), ("tokenizer.json", TOKENIZER)]),
            "InputError",
            "no weights",
        ),
        (files(&[("notes.txt", b"hello")]), "FileError", "notes.txt"),
        (
            files(&[("model.gguf", b"GGUF\x03\x00\x00\x00garbage")]),
            "FileError",
            "model.gguf",
        ),
    ];
    for (list, name, needle) in cases {
        let err = Model::load(list, "cpu".into(), None, None, None, None, None)
            .await
            .err()
            .expect("bad files must not load");
        let (got_name, message) = error_name(err);
        assert_eq!(got_name, name, "{message}");
        assert!(message.contains(needle), "{message}");
    }
    let err = Model::load(fixture_files(), "tpu".into(), None, None, None, None, None)
        .await
        .err()
        .unwrap();
    assert_eq!(error_name(err).0, "InputError");
    // The module is still alive after all of that.
    assert!(
        Model::load(fixture_files(), "cpu".into(), None, None, None, None, None)
            .await
            .is_ok()
    );
}

/// The page's Benchmark button: `medphi bench`'s measurement, with bytes per token and
/// bandwidth on both backends (the same f32 weights, read alike).
#[wasm_bindgen_test]
async fn benchmark_reports_speed_and_bandwidth() {
    let mut bytes = Vec::new();
    for backend in ["cpu", "webgpu"] {
        let model = Model::load(
            fixture_files(),
            backend.into(),
            None,
            Some("emulator".into()),
            None,
            None,
            None,
        )
        .await
        .unwrap();
        let speed = JsFuture::from(model.benchmark(8, 4)).await.unwrap();
        let number = |k: &str| get(&speed, k).as_f64();
        assert!(number("decodeTokS").unwrap() > 0.0, "{backend}");
        assert!(number("prefillTokS").unwrap() > 0.0, "{backend}");
        // The output layer alone is 51,200 rows of 32 floats.
        assert!(
            number("bytesPerToken").unwrap() > 51_200.0 * 32.0 * 4.0,
            "{backend}"
        );
        assert!(number("effectiveGbS").unwrap() > 0.0, "{backend}");
        bytes.push(number("bytesPerToken"));
    }
    assert_eq!(bytes[0], bytes[1]);
}

const MSFT_CONFIG: &[u8] = include_bytes!("fixtures/tiny-phi-msft/config.json");
const MSFT_SHARD_1: &[u8] =
    include_bytes!("fixtures/tiny-phi-msft/model-00001-of-00002.safetensors");
const MSFT_SHARD_2: &[u8] =
    include_bytes!("fixtures/tiny-phi-msft/model-00002-of-00002.safetensors");
const LORA_CONFIG: &[u8] = include_bytes!("fixtures/tiny-phi-lora/adapter_config.json");
const LORA_WEIGHTS: &[u8] = include_bytes!("fixtures/tiny-phi-lora/adapter_model.safetensors");
const LAYOUTS_REFERENCE: &[u8] = include_bytes!("fixtures/layouts_reference.safetensors");

fn msft_files() -> js_sys::Array {
    files(&[
        ("tiny-phi-msft/config.json", MSFT_CONFIG),
        ("tiny-phi-msft/tokenizer.json", TOKENIZER),
        (
            "tiny-phi-msft/model-00002-of-00002.safetensors",
            MSFT_SHARD_2,
        ),
        (
            "tiny-phi-msft/model-00001-of-00002.safetensors",
            MSFT_SHARD_1,
        ),
    ])
}

fn adapter_files() -> js_sys::Array {
    files(&[
        ("adapter_config.json", LORA_CONFIG),
        ("adapter_model.safetensors", LORA_WEIGHTS),
    ])
}

/// transformers' (and peft's) greedy ids for the msft checkpoint or tiny-phi + the adapter.
fn layouts_greedy(which: &str) -> Vec<u32> {
    let t: HashMap<String, Tensor> =
        candle_core::safetensors::load_buffer(LAYOUTS_REFERENCE, &Device::Cpu).unwrap();
    t[&format!("{which}_greedy_ids")]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `count` greedy ids for the fixture prompt, through the JS API.
async fn greedy_ids(model: &Model, count: usize) -> Vec<u32> {
    let request = serde_wasm_bindgen::to_value(&serde_json::json!({
        "prompt": PROMPT, "format": "raw", "maxNewTokens": count, "temperature": 0.0
    }))
    .unwrap();
    let on_text = Closure::<dyn FnMut(String) -> bool>::new(|_: String| true);
    let g = JsFuture::from(model.generate(request, on_text.as_ref().clone().into()))
        .await
        .unwrap();
    serde_wasm_bindgen::from_value(get(&g, "outputIds")).unwrap()
}

/// The checkpoints people have: the phi-msft layout in f16 shards and a PEFT adapter on a
/// phi base, on both backends, with transformers' greedy ids; and quantization on load,
/// which runs as the same checkpoint exported to a q8_0 GGUF runs.
#[wasm_bindgen_test]
async fn published_layouts_and_adapters_give_transformers_ids_in_the_browser() {
    const TOKENS: usize = 16;
    let (msft, lora) = (layouts_greedy("msft"), layouts_greedy("lora"));
    let exported = {
        let ckpt = Checkpoint::from_bytes(
            Some(named("config.json", MSFT_CONFIG)),
            Some(named("tokenizer.json", TOKENIZER)),
            vec![
                named("model-00001-of-00002.safetensors", MSFT_SHARD_1),
                named("model-00002-of-00002.safetensors", MSFT_SHARD_2),
            ],
            DType::F32,
        )
        .unwrap();
        let mut out = Vec::new();
        medphi::weights::write_gguf(
            &mut out,
            &ckpt.config,
            ckpt.weights.as_ref(),
            std::str::from_utf8(TOKENIZER).unwrap(),
            Some(candle_core::quantized::GgmlDType::Q8_0),
            &mut |_| {},
        )
        .unwrap();
        out
    };
    for backend in ["cpu", "webgpu"] {
        let kernels = || Some("emulator".to_string());
        let model = Model::load(
            msft_files(),
            backend.into(),
            None,
            kernels(),
            None,
            None,
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            greedy_ids(&model, TOKENS).await,
            msft[..TOKENS],
            "msft {backend}"
        );
        let info = model.info().unwrap();
        assert!(get(&info, "wasmMemoryBytes").as_f64().unwrap() > MSFT_SHARD_1.len() as f64);

        let model = Model::load(
            fixture_files(),
            backend.into(),
            None,
            kernels(),
            None,
            Some(adapter_files()),
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            get(&model.info().unwrap(), "adaptedMatrices").as_f64(),
            Some(12.0)
        );
        assert_eq!(
            greedy_ids(&model, TOKENS).await,
            lora[..TOKENS],
            "lora {backend}"
        );

        let on_load = Model::load(
            msft_files(),
            backend.into(),
            None,
            kernels(),
            Some("q8_0".into()),
            None,
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            get(&on_load.info().unwrap(), "quantize")
                .as_string()
                .as_deref(),
            Some("q8_0")
        );
        let gguf = Model::load(
            files(&[("msft-q8_0.gguf", &exported)]),
            backend.into(),
            None,
            kernels(),
            None,
            None,
            None,
        )
        .await
        .unwrap();
        assert_eq!(
            greedy_ids(&on_load, TOKENS).await,
            greedy_ids(&gguf, TOKENS).await,
            "q8_0 on load vs exported, {backend}"
        );
    }
    // Bad options are errors that name the problem.
    for (quantize, adapter, needle) in [
        (Some("q5_k"), None, "unknown quantization"),
        (
            None,
            Some(files(&[("adapter_config.json", LORA_CONFIG)])),
            "adapter_model.safetensors",
        ),
        (
            None,
            Some(files(&[
                ("adapter_config.json", b"{\"r\": 4, \"lora_alpha\": 8}"),
                ("adapter_model.safetensors", LORA_WEIGHTS),
            ])),
            "target_modules",
        ),
    ] {
        let err = Model::load(
            fixture_files(),
            "cpu".into(),
            None,
            None,
            quantize.map(String::from),
            adapter,
            None,
        )
        .await
        .err()
        .expect("a bad option must not load");
        let (name, message) = error_name(err);
        assert!(message.contains(needle), "{name}: {message}");
    }
}

/// `files` as the page gives a download it keeps on disk: `{name, size, read(start, end)}`,
/// each read recorded in `reads` and refused after `fail_after` of them.
fn ranged_files(
    list: &[(&str, &'static [u8])],
    reads: std::rc::Rc<std::cell::Cell<usize>>,
    fail_after: usize,
) -> js_sys::Array {
    list.iter()
        .map(|&(name, bytes)| {
            let o = js_sys::Object::new();
            js_sys::Reflect::set(&o, &"name".into(), &name.into()).unwrap();
            js_sys::Reflect::set(&o, &"size".into(), &(bytes.len() as f64).into()).unwrap();
            let reads = reads.clone();
            let read = Closure::<dyn FnMut(f64, f64) -> js_sys::Promise>::new(
                move |start: f64, end: f64| {
                    reads.set(reads.get() + 1);
                    if reads.get() > fail_after {
                        let reset = JsValue::from(js_sys::Error::new("connection reset"));
                        return js_sys::Promise::reject(&reset);
                    }
                    let part = js_sys::Uint8Array::from(&bytes[start as usize..end as usize]);
                    js_sys::Promise::resolve(&JsValue::from(part))
                },
            );
            js_sys::Reflect::set(&o, &"read".into(), read.as_ref()).unwrap();
            read.forget();
            JsValue::from(o)
        })
        .collect()
}

/// Weights read by ranges through the page's `read` function stream through the load a
/// tensor at a time, on both backends, with transformers' ids; a failed read is a FileError
/// that says what was being read.
#[wasm_bindgen_test]
async fn weights_read_by_ranges_stream_through_the_load() {
    const TOKENS: usize = 16;
    let msft = layouts_greedy("msft");
    let list: [(&str, &'static [u8]); 4] = [
        ("config.json", MSFT_CONFIG),
        ("tokenizer.json", TOKENIZER),
        ("model-00001-of-00002.safetensors", MSFT_SHARD_1),
        ("model-00002-of-00002.safetensors", MSFT_SHARD_2),
    ];
    for backend in ["cpu", "webgpu"] {
        let reads = std::rc::Rc::new(std::cell::Cell::new(0));
        let announced = std::rc::Rc::new(std::cell::RefCell::new(Vec::<String>::new()));
        let sink = announced.clone();
        let on_tensor =
            Closure::<dyn FnMut(String, f64, f64)>::new(move |name: String, _: f64, _: f64| {
                sink.borrow_mut().push(name);
            });
        let model = Model::load(
            ranged_files(&list, reads.clone(), usize::MAX),
            backend.into(),
            None,
            Some("emulator".into()),
            None,
            None,
            Some(on_tensor.as_ref().clone().into()),
        )
        .await
        .unwrap();
        assert_eq!(
            greedy_ids(&model, TOKENS).await,
            msft[..TOKENS],
            "{backend}"
        );
        // config and tokenizer whole, two header reads per shard, then one read per stored
        // tensor: 1 + 2 × 5 + 2 + 2 weights and biases (q, k and v share Wqkv's two).
        assert_eq!(reads.get(), 2 + 4 + 25, "{backend}");
        let announced = announced.borrow();
        assert_eq!(announced.len(), 1 + 2 * 14 + 2 + 2, "{backend}");
        assert_eq!(announced[0], "model.embed_tokens.weight");
    }
    // The connection drops after the headers and two tensors.
    let reads = std::rc::Rc::new(std::cell::Cell::new(0));
    let err = Model::load(
        ranged_files(&list, reads, 2 + 4 + 2),
        "webgpu".into(),
        None,
        Some("emulator".into()),
        None,
        None,
        None,
    )
    .await
    .err()
    .expect("a failed read must fail the load");
    let (name, message) = error_name(err);
    assert_eq!(name, "FileError", "{message}");
    assert!(
        message.contains("connection reset") && message.contains("reading tensor"),
        "{message}"
    );
}

/// A Phi-2-shaped f16 checkpoint (2.7B parameters, 5.6 GB) that exists only as headers:
/// its `read` serves the safetensors header and records any other read.
fn phi2_shaped_headers(
    tensor_reads: std::rc::Rc<std::cell::Cell<usize>>,
) -> (js_sys::Array, &'static [u8]) {
    const CONFIG: &str = r#"{"model_type": "phi", "vocab_size": 51200, "hidden_size": 2560,
        "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
        "max_position_embeddings": 2048, "partial_rotary_factor": 0.4}"#;
    let cfg = medphi::model::PhiConfig::from_json(CONFIG, "config.json").unwrap();
    let mut header = serde_json::Map::new();
    // u64: wasm32's usize cannot count 5.6 GB.
    let mut offset = 0u64;
    for (name, shape) in medphi::model::expected_tensors(&cfg) {
        let bytes = 2 * shape.iter().product::<usize>() as u64;
        header.insert(
            name,
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let json = serde_json::Value::Object(header).to_string().into_bytes();
    let mut head = (json.len() as u64).to_le_bytes().to_vec();
    head.extend(json);
    let head: &'static [u8] = Box::leak(head.into_boxed_slice());
    let size = head.len() as u64 + offset;
    let o = js_sys::Object::new();
    js_sys::Reflect::set(&o, &"name".into(), &"model.safetensors".into()).unwrap();
    js_sys::Reflect::set(&o, &"size".into(), &(size as f64).into()).unwrap();
    let read =
        Closure::<dyn FnMut(f64, f64) -> js_sys::Promise>::new(move |start: f64, end: f64| {
            // A cast from f64 saturates, so a read past 4 GiB in wasm32 still lands here.
            let (start, end) = (start as usize, end as usize);
            if end > head.len() {
                tensor_reads.set(tensor_reads.get() + 1);
                let refused = JsValue::from(js_sys::Error::new("a weight byte was read"));
                return js_sys::Promise::reject(&refused);
            }
            let part = &head[start..end];
            js_sys::Promise::resolve(&JsValue::from(js_sys::Uint8Array::from(part)))
        });
    js_sys::Reflect::set(&o, &"read".into(), read.as_ref()).unwrap();
    read.forget();
    let list = files(&[
        ("config.json", CONFIG.as_bytes()),
        ("tokenizer.json", TOKENIZER),
    ]);
    list.push(&o);
    (list, head)
}

/// Phi-2 in f16 on the wasm CPU backend needs 11 GB as f32: refused from its headers, before
/// any weight byte is read, with what would fit.
#[wasm_bindgen_test]
async fn a_load_that_cannot_fit_is_refused_before_any_weight_is_read() {
    let tensor_reads = std::rc::Rc::new(std::cell::Cell::new(0));
    let (list, _) = phi2_shaped_headers(tensor_reads.clone());
    let err = Model::load(list, "cpu".into(), None, None, None, None, None)
        .await
        .err()
        .expect("11 GB cannot fit in 4 GiB");
    let (name, message) = error_name(err);
    assert_eq!(name, "InputError", "{message}");
    assert!(
        message.contains("WebAssembly memory") && message.contains("quantize: 'q4_0'"),
        "{message}"
    );
    assert_eq!(tensor_reads.get(), 0, "no weight byte may be read");
    // The advice holds: converted to q4_0 the plan passes and the load goes on to read
    // weights (which this checkpoint does not have).
    let (list, _) = phi2_shaped_headers(tensor_reads.clone());
    let err = Model::load(
        list,
        "cpu".into(),
        None,
        None,
        Some("q4_0".into()),
        None,
        None,
    )
    .await
    .err()
    .expect("the weights are not there");
    let (name, message) = error_name(err);
    assert_eq!(name, "FileError", "{message}");
    assert!(message.contains("a weight byte was read"), "{message}");
    assert_eq!(tensor_reads.get(), 1);
}
