//! Checkpoints as they were published: the phi-msft layout (fused `Wqkv`, GPT-2 style config)
//! and PEFT LoRA adapters on a phi base, against transformers + peft
//! (scripts/fixtures/make_layouts_and_adapter.py), on both backends; and quantization on
//! load, against the blocks `export-gguf` writes.
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use medphi::backend::{Backend, Want};
use medphi::checkpoint::Checkpoint;
use medphi::gpu::{GpuBackend, KernelChoice};
use medphi::model::names::all_tensors;
use medphi::model::Weight;
use medphi::weights::{Adapter, Bytes, Gguf, Quantization, QuantizeOnLoad, WithAdapter};
use pollster::block_on;

struct LayoutReference {
    input_ids: Vec<u32>,
    tensors: HashMap<String, Tensor>,
}

impl LayoutReference {
    fn load() -> Self {
        let tensors = candle_core::safetensors::load(
            fixtures().join("layouts_reference.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        Self {
            input_ids: ids(&tensors["input_ids"]),
            tensors,
        }
    }

    fn greedy(&self, which: &str) -> Vec<u32> {
        ids(&self.tensors[&format!("{which}_greedy_ids")])
    }

    fn logits(&self, which: &str) -> &Tensor {
        &self.tensors[&format!("{which}_logits")]
    }
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().to_vec1().unwrap()
}

fn with_adapter(mut ckpt: Checkpoint) -> Checkpoint {
    let adapter = Adapter::open(&fixtures().join("tiny-phi-lora"), &ckpt.config).unwrap();
    assert_eq!(adapter.adapted(), 6 * ckpt.config.num_hidden_layers);
    ckpt.weights = Box::new(WithAdapter::new(ckpt.weights, adapter));
    ckpt
}

/// The msft checkpoint, or tiny-phi with the LoRA adapter merged.
fn checkpoint(which: &str) -> Checkpoint {
    match which {
        "msft" => open("tiny-phi-msft"),
        "lora" => with_adapter(open("tiny-phi")),
        _ => unreachable!(),
    }
}

#[test]
fn cpu_logits_match_transformers_and_peft() {
    let r = LayoutReference::load();
    for which in ["msft", "lora"] {
        for fused in [true, false] {
            let (model, _) = checkpoint(which).into_model(fused).unwrap();
            let diff = max_abs_diff(&forward_all(&model, &r.input_ids), r.logits(which));
            eprintln!("{which} cpu fused={fused}: max |Δlogit| = {diff}");
            assert!(diff < 1e-4, "{which} fused={fused}: max |Δlogit| = {diff}");
        }
    }
}

#[test]
fn gpu_logits_match_transformers_and_peft() {
    let r = LayoutReference::load();
    for which in ["msft", "lora"] {
        for kernels in [KernelChoice::Gpu, KernelChoice::Emulator] {
            let ckpt = checkpoint(which);
            let mut backend = block_on(GpuBackend::load(
                &ckpt.config,
                ckpt.weights.as_ref(),
                None,
                kernels,
            ))
            .unwrap();
            let rows = block_on(backend.forward(&r.input_ids, Want::AllRows))
                .unwrap()
                .rows()
                .unwrap();
            let expected = r.logits(which);
            let ours = Tensor::from_vec(rows, expected.shape(), &Device::Cpu).unwrap();
            let diff = max_abs_diff(&ours, expected);
            eprintln!("{which} wgpu {kernels:?}: max |Δlogit| = {diff}");
            assert!(diff < 1e-3, "{which} {kernels:?}: max |Δlogit| = {diff}");
        }
    }
}

fn generate_ids(extra: &[&str]) -> Vec<u32> {
    let r = LayoutReference::load();
    let prompt = "Instruct: What is macrocephaly?\nOutput:";
    let out = run_ok(
        medphi_cmd()
            .args([
                "generate",
                "--prompt",
                prompt,
                "--prompt-format",
                "raw",
                "--max-new-tokens",
                "64",
                "--temperature",
                "0",
                "--json",
            ])
            .args(extra),
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let input: Vec<u32> = serde_json::from_value(json["input_ids"].clone()).unwrap();
    assert_eq!(input, r.input_ids, "{extra:?}");
    serde_json::from_value(json["output_ids"].clone()).unwrap()
}

#[test]
fn cli_gives_transformers_greedy_ids_on_both_backends() {
    let r = LayoutReference::load();
    let msft = fixtures().join("tiny-phi-msft").display().to_string();
    let base = fixtures().join("tiny-phi").display().to_string();
    let adapter = fixtures().join("tiny-phi-lora").display().to_string();
    for backend in ["cpu", "wgpu"] {
        assert_eq!(
            generate_ids(&["--model", &msft, "--backend", backend]),
            r.greedy("msft"),
            "msft on {backend}"
        );
        assert_eq!(
            generate_ids(&[
                "--model",
                &base,
                "--adapter",
                &adapter,
                "--backend",
                backend
            ]),
            r.greedy("lora"),
            "lora on {backend}"
        );
    }
}

#[test]
fn quantized_on_load_runs_as_its_export_runs_on_both_backends() {
    // The msft f16 shards converted on load, against the same checkpoint exported to a q8_0
    // GGUF: the same blocks, so the same greedy ids on each backend. (Across backends ids
    // may part: candle's CPU kernels also round the activations to q8_0, the WGSL ones
    // keep them in f32.)
    let msft = fixtures().join("tiny-phi-msft").display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("msft-q8_0.gguf").display().to_string();
    run_ok(medphi_cmd().args(["export-gguf", "--quant", "q8_0", &msft, &gguf]));
    for backend in ["cpu", "wgpu"] {
        let on_load = generate_ids(&["--model", &msft, "--quantize", "q8_0", "--backend", backend]);
        let exported = generate_ids(&["--model", &gguf, "--backend", backend]);
        assert_eq!(on_load, exported, "{backend}");
    }
}

#[test]
fn quantization_on_load_writes_the_blocks_export_gguf_writes() {
    let dir = tempfile::tempdir().unwrap();
    for (quant, to) in [("q8_0", Quantization::Q8_0), ("q4_0", Quantization::Q4_0)] {
        let path = dir.path().join(format!("tiny-{quant}.gguf"));
        let model = fixtures().join("tiny-phi").display().to_string();
        run_ok(medphi_cmd().args([
            "export-gguf",
            "--quant",
            quant,
            &model,
            &path.display().to_string(),
        ]));
        let exported = Gguf::from_bytes(
            path.display().to_string(),
            Bytes::open(&path).unwrap(),
            DType::F32,
        )
        .unwrap();
        let ckpt = open("tiny-phi");
        let cfg = ckpt.config.clone();
        let on_load = QuantizeOnLoad::new(ckpt.weights, to);
        let mut compared = 0;
        for id in all_tensors(&cfg) {
            let (name, shape) = (id.hf(), id.shape(&cfg));
            use medphi::model::TensorSource;
            match (
                on_load.tensor(&name, &shape).unwrap(),
                exported.tensor(&name, &shape).unwrap(),
            ) {
                (Weight::Quantized(a), Weight::Quantized(b)) => {
                    assert_eq!(a.dtype(), to.ggml(), "{name}");
                    assert_eq!(a.data().unwrap(), b.data().unwrap(), "{name} ({quant})");
                    compared += 1;
                }
                (Weight::Dense(_), Weight::Dense(_)) => {}
                _ => panic!("{name}: quantized on one side only ({quant})"),
            }
        }
        // Every matrix: the embedding, six per block and the head.
        assert_eq!(compared, 2 + 6 * cfg.num_hidden_layers, "{quant}");
    }
}

/// The msft fixture copied to `dir`, with `edit` applied to its tensors.
fn edited_msft(dir: &Path, edit: impl Fn(&mut HashMap<String, Tensor>)) -> std::path::PathBuf {
    let src = fixtures().join("tiny-phi-msft");
    let out = dir.join("msft");
    std::fs::create_dir_all(&out).unwrap();
    let mut tensors = HashMap::new();
    for shard in ["model-00001-of-00002", "model-00002-of-00002"] {
        tensors.extend(
            candle_core::safetensors::load(src.join(format!("{shard}.safetensors")), &Device::Cpu)
                .unwrap(),
        );
    }
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    out
}

#[test]
fn malformed_layouts_and_adapters_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let err = |path: &Path| {
        Checkpoint::open(path, None, DType::F32)
            .and_then(|c| c.into_model(true))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    // A fused Wqkv that lost its v rows.
    let short = edited_msft(dir.path(), |t| {
        let w = t["transformer.h.1.mixer.Wqkv.weight"]
            .narrow(0, 0, 64)
            .unwrap();
        t.insert("transformer.h.1.mixer.Wqkv.weight".into(), w);
    });
    let e = err(&short);
    assert!(
        e.contains("transformer.h.1.mixer.Wqkv.weight") && e.contains("[96, 32]"),
        "{e}"
    );
    let missing = edited_msft(&dir.path().join("b"), |t| {
        t.remove("lm_head.linear.bias");
    });
    let e = err(&missing);
    assert!(e.contains("lm_head.linear.bias is missing"), "{e}");

    // Adapters: a rank that does not match the matrices, a matrix target_modules does not
    // name, and an adapter for a different model shape.
    let base = open("tiny-phi").config;
    let lora = fixtures().join("tiny-phi-lora");
    let config = std::fs::read_to_string(lora.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(lora.join("adapter_model.safetensors")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json["r"] = 8.into();
    let e = Adapter::from_bytes(&json.to_string(), &weights, &base, "lora")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rank 8"), "{e}");
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json["target_modules"] = serde_json::json!(["q_proj", "k_proj", "v_proj", "dense", "fc1"]);
    let e = Adapter::from_bytes(&json.to_string(), &weights, &base, "lora")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("fc2") && e.contains("target_modules"), "{e}");
    let wider = medphi::model::PhiConfig {
        hidden_size: 64,
        ..base.clone()
    };
    let e = Adapter::from_bytes(&config, &weights, &wider, "lora")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("needs"), "{e}");
    let mut json: serde_json::Value = serde_json::from_str(&config).unwrap();
    json["use_dora"] = true.into();
    let e = Adapter::from_bytes(&json.to_string(), &weights, &base, "lora")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("DoRA"), "{e}");
}

/// The msft fixture read by ranges; reads after the `short_from`th come back a byte short.
fn ranged_msft(short_from: usize) -> (medphi::Result<Checkpoint>, Reads) {
    let dir = fixtures().join("tiny-phi-msft");
    let reads = Reads::default();
    let files = ["model-00001-of-00002", "model-00002-of-00002"]
        .map(|shard| {
            let file: std::rc::Rc<dyn medphi::weights::RangeRead> = std::rc::Rc::new(Recorded {
                bytes: std::fs::read(dir.join(format!("{shard}.safetensors"))).unwrap(),
                reads: reads.clone(),
                short_from,
            });
            (format!("{shard}.safetensors"), file)
        })
        .into();
    let named = |f: &str| medphi::checkpoint::NamedBytes {
        name: f.into(),
        bytes: std::fs::read(dir.join(f)).unwrap(),
    };
    let ckpt = block_on(Checkpoint::from_ranged(
        Some(named("config.json")),
        Some(named("tokenizer.json")),
        files,
        DType::F32,
    ));
    (ckpt, reads)
}

#[test]
fn a_checkpoint_read_by_ranges_streams_one_tensor_at_a_time() {
    let r = LayoutReference::load();
    let largest = 51_200 * 32 * 2; // the f16 token table and output layer
    for gpu in [false, true] {
        let (ckpt, reads) = ranged_msft(usize::MAX);
        let ckpt = ckpt.unwrap();
        // Only the two headers (length, then JSON) are read before loading.
        assert_eq!(reads.borrow().len(), 4);
        let rows = streamed_logits(&ckpt, &r.input_ids, gpu);
        let expected = r.logits("msft");
        let ours = Tensor::from_vec(rows, expected.shape(), &Device::Cpu).unwrap();
        let diff = max_abs_diff(&ours, expected);
        assert!(diff < 1e-3, "gpu={gpu}: max |Δlogit| = {diff}");
        // Each tensor's bytes were read once, by themselves (the fused Wqkv once for q, k
        // and v), and no read was larger than the largest tensor.
        let reads = reads.borrow();
        let tensor_reads = &reads[4..];
        assert!(
            tensor_reads.iter().all(|r| r.end - r.start <= largest),
            "{tensor_reads:?}"
        );
        let mut unique = tensor_reads.to_vec();
        unique.sort_by_key(|r| (r.start, r.end));
        unique.dedup();
        assert_eq!(unique.len(), tensor_reads.len(), "a tensor was read twice");
        // 1 embedding + 2 × (norm 2, Wqkv 2, out_proj 2, fc1 2, fc2 2) + final norm 2 + head 2.
        assert_eq!(tensor_reads.len(), 1 + 2 * 10 + 2 + 2);
    }
    // A read that comes back short is an error naming what was read, not a panic.
    let (ckpt, _) = ranged_msft(1);
    let err = ckpt.err().unwrap().to_string();
    assert!(err.contains("reading the header"), "{err}");
    let (ckpt, _) = ranged_msft(4);
    let ckpt = ckpt.unwrap();
    let err = block_on(GpuBackend::load(
        &ckpt.config,
        ckpt.weights.as_ref(),
        None,
        KernelChoice::Emulator,
    ))
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("bytes came back for"), "{err}");
}

/// A tensor larger than the part a mapped file is converted by (16 MiB) comes out whole and
/// exact in every stored dtype, the part boundaries falling mid-row; an f16 matrix handed over
/// as stored gives back the file's halves.
#[test]
fn large_tensors_of_a_mapped_file_are_read_in_parts_exactly() {
    use medphi::model::TensorSource;
    use medphi::weights::Safetensors;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("large.safetensors");
    let (rows, cols) = (2063, 4099);
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 20_011) as f32 / 997.0 - 10.0)
        .collect();
    let base = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
    let stored = HashMap::from([
        ("f32".to_string(), base.narrow(0, 0, 1031).unwrap()),
        ("f16".to_string(), base.to_dtype(DType::F16).unwrap()),
        ("bf16".to_string(), base.to_dtype(DType::BF16).unwrap()),
        ("small".to_string(), base.narrow(0, 0, 3).unwrap()),
    ]);
    candle_core::safetensors::save(&stored, &path).unwrap();
    let file = Safetensors::from_shards(
        vec![(path.display().to_string(), Bytes::open(&path).unwrap())],
        DType::F32,
    )
    .unwrap();
    for (name, want) in &stored {
        let got = file.tensor(name, want.dims()).unwrap().dense().unwrap();
        let want = want.to_dtype(DType::F32).unwrap();
        assert_eq!(got.dims(), want.dims(), "{name}");
        let (got, want) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(got == want, "{name} differs");
    }
    let again = Safetensors::from_shards(
        vec![(path.display().to_string(), Bytes::open(&path).unwrap())],
        DType::F32,
    )
    .unwrap();
    let want: Vec<u8> = stored["f16"]
        .flatten_all()
        .unwrap()
        .to_vec1::<half::f16>()
        .unwrap()
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    // In place (a share of the mapped file) and copied: the same bytes.
    for in_place in [true, false] {
        let halves = again
            .stored_f16_bytes("f16", &[rows, cols], in_place)
            .unwrap()
            .unwrap();
        assert!(halves.as_slice() == want.as_slice(), "in place: {in_place}");
    }
    assert!(again
        .stored_f16_bytes("f32", &[1031, cols], true)
        .unwrap()
        .is_none());
}
