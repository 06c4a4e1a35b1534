//! The whole model on the GPU (lavapipe in CI) against the transformers fixtures.
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

mod common;

use candle_core::{Device, Tensor};
use common::*;
use medphi::backend::{Backend, Next, Want};
use medphi::checkpoint::Checkpoint;
use medphi::generate::{GenerateOptions, Session};
use medphi::gpu::{GpuBackend, KernelChoice, KernelFamily, WeightFormat};
use pollster::block_on;

/// Every test runs with both kernel families: the gpu family (built for hardware GPUs) and
/// the emulator family (built for the CPU adapters CI has) must agree with the references.
const FAMILIES: [KernelFamily; 2] = [KernelFamily::Gpu, KernelFamily::Emulator];

fn choice(family: KernelFamily) -> KernelChoice {
    match family {
        KernelFamily::Gpu => KernelChoice::Gpu,
        KernelFamily::Emulator => KernelChoice::Emulator,
    }
}

fn gpu(
    path: &str,
    tokenizer: Option<&str>,
    family: KernelFamily,
) -> (GpuBackend, medphi::tokenizer::PhiTokenizer) {
    let tok = tokenizer.map(|t| fixtures().join(t));
    let ckpt = Checkpoint::open(
        &fixtures().join(path),
        tok.as_deref(),
        candle_core::DType::F32,
    )
    .unwrap();
    let backend = block_on(GpuBackend::load(
        &ckpt.config,
        ckpt.weights.as_ref(),
        None,
        choice(family),
    ))
    .unwrap();
    assert_eq!(backend.kernel_family(), family);
    (backend, ckpt.tokenizer)
}

#[test]
fn logits_match_transformers_at_every_position() {
    for family in FAMILIES {
        let r = reference();
        let (mut backend, _) = gpu("tiny-phi", None, family);
        let rows = block_on(backend.forward(&r.input_ids, Want::AllRows))
            .unwrap()
            .rows()
            .unwrap();
        let ours = Tensor::from_vec(rows, r.logits.shape(), &Device::Cpu).unwrap();
        let diff = max_abs_diff(&ours, &r.logits);
        eprintln!("wgpu f32: max |Δlogit| = {diff}");
        assert!(diff < 1e-3, "max |Δlogit| = {diff}");
    }
}

#[test]
fn cached_decode_matches_full_forward() {
    for family in FAMILIES {
        let r = reference();
        let (mut backend, _) = gpu("tiny-phi", None, family);
        let mut rows = block_on(backend.forward(&r.input_ids[..4], Want::AllRows))
            .unwrap()
            .rows()
            .unwrap();
        for &t in &r.input_ids[4..] {
            rows.extend(
                block_on(backend.forward(&[t], Want::LastRow))
                    .unwrap()
                    .rows()
                    .unwrap(),
            );
        }
        let ours = Tensor::from_vec(rows, r.logits.shape(), &Device::Cpu).unwrap();
        assert!(max_abs_diff(&ours, &r.logits) < 1e-3);
    }
}

#[test]
fn greedy_generation_matches_transformers_for_64_tokens() {
    for family in FAMILIES {
        let r = reference();
        let (backend, tokenizer) = gpu("tiny-phi", None, family);
        let mut session = Session::new(backend);
        let opts = GenerateOptions {
            max_new_tokens: 64,
            ..Default::default()
        };
        let g = block_on(session.generate(&tokenizer, &r.input_ids, &opts, &mut |_| true)).unwrap();
        assert_eq!(g.output_ids, r.greedy_ids);
    }
}

#[test]
fn gguf_blocks_are_read_in_place_and_match_transformers_on_the_same_weights() {
    for family in FAMILIES {
        let r = reference();
        for (file, reference) in [
            ("tiny-phi-f16.gguf", "logits_f16"),
            ("tiny-phi-q8_0.gguf", "logits_q8_0"),
            ("tiny-phi-q4_0.gguf", "logits_q4_0"),
        ] {
            let (mut backend, _) = gpu(file, Some("tiny-phi/tokenizer.json"), family);
            let rows = block_on(backend.forward(&r.input_ids, Want::AllRows))
                .unwrap()
                .rows()
                .unwrap();
            let ours = Tensor::from_vec(rows, r.logits.shape(), &Device::Cpu).unwrap();
            // The GPU decodes the blocks exactly and multiplies in f32, as transformers does on
            // gguf-py's dequantized weights.
            let diff = max_abs_diff(&ours, &r.tensors[reference]);
            eprintln!("wgpu {file}: max |Δlogit| vs transformers = {diff}");
            assert!(diff < 1e-3, "{file}: max |Δlogit| = {diff}");
            // candle's CPU path also quantizes the activations to 8 bits (GGML's q8 dot
            // products), so it differs from both by the activation rounding.
            let (cpu, _) = Checkpoint::open(
                &fixtures().join(file),
                Some(&fixtures().join("tiny-phi/tokenizer.json")),
                candle_core::DType::F32,
            )
            .unwrap()
            .into_model(true)
            .unwrap();
            let cpu = forward_all(&cpu, &r.input_ids);
            let scale = max_abs(&cpu);
            let rel = max_abs_diff(&ours, &cpu) / scale;
            eprintln!(
                "wgpu {file}: max |Δlogit| vs candle CPU quantized matmul = {rel:.4} of max |logit|"
            );
            assert!(rel < 0.02, "{file}: {rel}");
        }
    }
}

#[test]
fn f16_safetensors_stay_f16_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let model = f16_copy_of_tiny_phi(dir.path());
    let r = reference();
    let ckpt = Checkpoint::open(&model, None, candle_core::DType::F32).unwrap();
    let (cpu, _) = Checkpoint::open(&model, None, candle_core::DType::F32)
        .unwrap()
        .into_model(true)
        .unwrap();
    let expected = forward_all(&cpu, &r.input_ids);
    for family in FAMILIES {
        let mut backend = block_on(GpuBackend::load(
            &ckpt.config,
            ckpt.weights.as_ref(),
            None,
            choice(family),
        ))
        .unwrap();
        assert_eq!(backend.weight_formats(), vec![WeightFormat::F16]);
        let rows = block_on(backend.forward(&r.input_ids, Want::AllRows))
            .unwrap()
            .rows()
            .unwrap();
        let ours = Tensor::from_vec(rows, r.logits.shape(), &Device::Cpu).unwrap();
        let diff = max_abs_diff(&ours, &expected);
        assert!(
            diff < 1e-4,
            "{family:?}: packed f16 vs the same weights upcast on the CPU: {diff}"
        );
    }
}

#[test]
fn rejects_overlong_input_and_bad_ids() {
    for family in FAMILIES {
        let (mut backend, _) = gpu("tiny-phi", None, family);
        let too_long = vec![1u32; backend.capacity() + 1];
        assert!(block_on(backend.forward(&too_long, Want::LastRow))
            .unwrap_err()
            .to_string()
            .contains("context"));
        assert!(block_on(backend.forward(&[60_000], Want::LastRow))
            .unwrap_err()
            .to_string()
            .contains("vocabulary"));
    }
}

#[test]
fn cli_generates_the_reference_tokens_on_wgpu() {
    let r = reference();
    for family in ["gpu", "emulator"] {
        let out = run_ok(
            medphi_cmd()
                .env("MEDPHI_GPU_KERNELS", family)
                .args(["generate", "--model"])
                .arg(fixtures().join("tiny-phi"))
                .args([
                    "--prompt",
                    r.json["prompt"].as_str().unwrap(),
                    "--max-new-tokens",
                    "64",
                ])
                .args(["--temperature", "0", "--backend", "wgpu", "--json"]),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids: Vec<u32> = serde_json::from_value(v["output_ids"].clone()).unwrap();
        assert_eq!(ids, r.greedy_ids, "{family}");
    }
    let info = run_ok(medphi_cmd().arg("gpu-info"));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info["max_storage_buffer_binding_size"].as_u64().unwrap() > 0);
}

#[test]
fn long_prompts_run_in_several_passes_like_the_cpu_path() {
    for family in FAMILIES {
        // 200 tokens: two 128-token passes on the GPU, one forward on the CPU.
        let r = reference();
        let ids: Vec<u32> = r.input_ids.iter().copied().cycle().take(200).collect();
        let (model, _) = open("tiny-phi").into_model(true).unwrap();
        let cpu = forward_all(&model, &ids);
        let (mut backend, _) = gpu("tiny-phi", None, family);
        let rows = block_on(backend.forward(&ids, Want::AllRows))
            .unwrap()
            .rows()
            .unwrap();
        let ours = Tensor::from_vec(rows, cpu.shape(), &Device::Cpu).unwrap();
        let diff = max_abs_diff(&ours, &cpu);
        assert!(diff < 1e-3, "max |Δlogit| vs CPU = {diff}");
        backend.truncate(0);
        let last = cpu.get(199).unwrap().to_vec1::<f32>().unwrap();
        let greedy = block_on(backend.forward(
            &ids,
            Want::Greedy {
                vocab_limit: 50_295,
            },
        ))
        .unwrap();
        assert_eq!(
            greedy,
            Next::Token(medphi::candidates::argmax(&last[..50_295]))
        );
        assert_eq!(backend.cached(), 200);
    }
}

/// The KV cache starts small and grows as positions are used: decoding one token at a time
/// across the growth points keeps every cached position (same logits as the CPU's one pass).
#[test]
fn kv_cache_grows_with_use_and_keeps_its_positions() {
    for family in FAMILIES {
        let r = reference();
        let ids: Vec<u32> = r.input_ids.iter().copied().cycle().take(200).collect();
        let (model, _) = open("tiny-phi").into_model(true).unwrap();
        let cpu = forward_all(&model, &ids);
        let (mut backend, _) = gpu("tiny-phi", None, family);
        let mut rows = block_on(backend.forward(&ids[..100], Want::AllRows))
            .unwrap()
            .rows()
            .unwrap();
        for &t in &ids[100..] {
            rows.extend(
                block_on(backend.forward(&[t], Want::LastRow))
                    .unwrap()
                    .rows()
                    .unwrap(),
            );
        }
        let ours = Tensor::from_vec(rows, cpu.shape(), &Device::Cpu).unwrap();
        let diff = max_abs_diff(&ours, &cpu);
        assert!(diff < 1e-3, "max |Δlogit| vs CPU = {diff}");
    }
}

/// Sampling on the GPU reads back only the candidates unless a draw lands outside them, and
/// picks the tokens the CPU path picks from whole rows for the same seed.
#[test]
fn sampling_on_the_gpu_matches_the_cpu_and_reads_back_candidates() {
    for family in FAMILIES {
        let r = reference();
        let (model, _) = open("tiny-phi").into_model(true).unwrap();
        let (backend, tokenizer) = gpu("tiny-phi", None, family);
        let mut cpu = Session::new(medphi::backend::CpuBackend::new(model, None).unwrap());
        let mut gpu = Session::new(backend);
        for (top_k, top_p) in [(None, None), (Some(5), None), (None, Some(0.9))] {
            let mut opts = GenerateOptions {
                max_new_tokens: 24,
                ..Default::default()
            };
            opts.sampling.temperature = 0.8;
            opts.sampling.top_k = top_k;
            opts.sampling.top_p = top_p;
            opts.sampling.seed = 11;
            let on_cpu = block_on(cpu.generate(&tokenizer, &r.input_ids, &opts, &mut |_| true));
            let on_gpu = block_on(gpu.generate(&tokenizer, &r.input_ids, &opts, &mut |_| true));
            assert_eq!(on_gpu.unwrap().output_ids, on_cpu.unwrap().output_ids);
        }
        // A top-k of 5 is always decided by the candidates: 11 words come back per token.
        let b = gpu.backend_mut();
        let want = Want::Candidates {
            k: 5,
            vocab_limit: 50_295,
            temperature: 0.8,
        };
        let Next::Candidates(top) = block_on(b.forward(&r.input_ids, want)).unwrap() else {
            panic!("a candidates forward returns candidates");
        };
        assert_eq!(b.device_stats().unwrap().bytes_read, 11 * 4);
        let row = block_on(b.last_row()).unwrap();
        let host = medphi::candidates::top_k(&row[..50_295], 5, 0.8);
        assert_eq!((&top.ids, &top.logits), (&host.ids, &host.logits));
        // Summation order differs over 50,295 terms.
        assert!((top.log_norm - host.log_norm).abs() < 1e-3);
    }
}

/// `medphi bench` on the GPU says which kernel family ran, what a decode token moves and the
/// bandwidth that makes; on the CPU, what a decode token reads, the same weights held alike.
#[test]
fn bench_reports_the_kernel_family_and_bandwidth() {
    let bench = |backend: &str, family: &str| {
        let out = run_ok(
            medphi_cmd()
                .env("MEDPHI_GPU_KERNELS", family)
                .args(["bench", "--model"])
                .arg(fixtures().join("tiny-phi"))
                .args(["--backend", backend, "--prompt-len", "8", "--gen", "4"])
                .args(["--rounds", "1", "--json"]),
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let cpu = bench("cpu", "auto");
    for family in ["gpu", "emulator"] {
        let v = bench("wgpu", family);
        assert_eq!(v["kernels"], family);
        // Two layers of weights at least, and the output layer's 51,200 rows.
        assert!(
            v["bytes_per_token"].as_u64().unwrap() > 51_200 * 32 * 4,
            "{v}"
        );
        assert!(v["effective_gb_s"].as_f64().unwrap() > 0.0, "{v}");
        assert_eq!(v["bytes_per_token"], cpu["bytes_per_token"], "{v}\n{cpu}");
    }
    let gb_s =
        cpu["bytes_per_token"].as_f64().unwrap() * cpu["decode_tok_s"].as_f64().unwrap() / 1e9;
    assert!(
        (cpu["effective_gb_s"].as_f64().unwrap() - gb_s).abs() < 1e-9 * gb_s.max(1.0),
        "{cpu}"
    );
}
