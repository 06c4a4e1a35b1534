//! Replays the fuzz corpus: every file of `tests/fuzz_corpus/<target>/` (the seeds the
//! fuzzers start from and the minimized crashers they found) goes through the same
//! `medphi::fuzzing` function as the cargo-fuzz target of that name (`fuzz/`), and must end
//! in `Ok` or a clean error, never a panic. Files named `ok-*` must load (they are valid
//! inputs, so the fuzzers start deep inside the parsers); `crash-*` files are crashers
//! that were fixed. The real fixtures and benchmark samples, too large to be fuzz seeds,
//! are run through the same functions and must succeed.
//!
//! The seeds are written by `MEDPHI_WRITE_SEEDS=1 cargo test --test fuzz_replay`, and checked
//! against what it would write by every run.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashMap;
use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use medphi::checkpoint::{Checkpoint, NamedBytes};
use medphi::fuzzing::{self, assert_clean};
use medphi::model::{expected_tensors, PhiConfig};
use medphi::tokenizer::PhiTokenizer;
use medphi::Result;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus(target: &str) -> PathBuf {
    root().join("tests/fuzz_corpus").join(target)
}

fn chat_tokenizer() -> &'static PhiTokenizer {
    static T: OnceLock<PhiTokenizer> = OnceLock::new();
    T.get_or_init(|| fuzzing::fixture_tokenizer().unwrap())
}

/// Runs every corpus file of `target` through `run`; reports all failures at once.
fn replay(target: &str, run: impl Fn(&[u8]) -> Result<()>) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus(target))
        .unwrap_or_else(|e| panic!("{target}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus for {target}");
    let mut failures = Vec::new();
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let result = run(&bytes);
            if name.starts_with("ok-") {
                if let Err(e) = &result {
                    panic!("should load but: {e}");
                }
            }
            assert_clean(result);
        }));
        if let Err(panic) = outcome {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{target}/{name}: {msg}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{target}: {} files replayed", files.len());
}

#[test]
fn gguf_corpus() {
    replay("gguf", fuzzing::gguf);
    replay("gguf", fuzzing::gguf_forward);
    replay("gguf", fuzzing::gguf_weights);
}

#[test]
fn safetensors_corpus() {
    replay("safetensors", fuzzing::safetensors);
    replay("safetensors", fuzzing::safetensors_forward);
    replay("safetensors", fuzzing::safetensors_weights);
}

#[test]
fn config_json_corpus() {
    replay("config_json", fuzzing::config_json);
}

#[test]
fn tokenizer_json_corpus() {
    replay("tokenizer_json", fuzzing::tokenizer_json);
}

#[test]
fn benchmarks_corpus() {
    replay("benchmarks", fuzzing::benchmarks);
}

#[test]
fn chat_template_corpus() {
    replay("chat_template", |data| {
        fuzzing::chat_template(chat_tokenizer(), data)
    });
}

/// The fixtures and samples too large for a fuzz corpus, through the fuzz targets' code.
#[test]
fn real_files_pass_the_fuzz_targets_code() {
    let fixtures = root().join("tests/fixtures");
    let q8 = std::fs::read(fixtures.join("tiny-phi-q8_0.gguf")).unwrap();
    fuzzing::gguf(&q8).unwrap();
    fuzzing::gguf_forward(&q8).unwrap();
    fuzzing::gguf_weights(&q8).unwrap();
    // These two carry no tokenizer; the page is then given tokenizer.json beside them.
    let tokenizer = std::fs::read(fixtures.join("tiny-phi/tokenizer.json")).unwrap();
    for gguf in ["tiny-phi-q4_0.gguf", "tiny-phi-f16.gguf"] {
        let ckpt = Checkpoint::from_bytes(
            None,
            Some(NamedBytes {
                name: "tokenizer.json".into(),
                bytes: tokenizer.clone(),
            }),
            vec![NamedBytes {
                name: gguf.into(),
                bytes: std::fs::read(fixtures.join(gguf)).unwrap(),
            }],
            DType::F32,
        )
        .unwrap();
        fuzzing::exercise_checkpoint(ckpt).unwrap_or_else(|e| panic!("{gguf}: {e}"));
    }
    for tokenizer in [
        fixtures.join("tiny-phi/tokenizer.json"),
        root().join("models/tiny-medphi/tokenizer.json"),
    ] {
        let bytes = std::fs::read(&tokenizer).unwrap();
        fuzzing::tokenizer_json(&bytes).unwrap_or_else(|e| panic!("{e}"));
    }
    for config in [
        fixtures.join("tiny-phi/config.json"),
        fixtures.join("tiny-phi-sharded/config.json"),
        root().join("models/tiny-medphi/config.json"),
    ] {
        let bytes = std::fs::read(&config).unwrap();
        fuzzing::config_json(&bytes).unwrap_or_else(|e| panic!("{e}"));
    }
    let index =
        std::fs::read(fixtures.join("tiny-phi-sharded/model.safetensors.index.json")).unwrap();
    fuzzing::safetensors(&[&[3u8][..], &index].concat()).unwrap();
    let benchmarks = root().join("../shared/data/benchmarks");
    let mut samples = 0;
    for entry in std::fs::read_dir(&benchmarks).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e != "md") {
            let bytes = std::fs::read(&path).unwrap();
            fuzzing::benchmarks(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            samples += 1;
        }
    }
    assert!(
        samples >= 4,
        "benchmark samples missing in {}",
        benchmarks.display()
    );
}

// ---- seed corpus ----------------------------------------------------------------------

/// Deterministic weights for the tiny model: norms at 1, everything else small sines.
fn tiny_weights(cfg: &PhiConfig) -> HashMap<String, Tensor> {
    expected_tensors(cfg)
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if name.contains("layernorm.weight") {
                vec![1.0; n]
            } else {
                (0..n)
                    .map(|i| ((i as f32) * 0.37 + k as f32).sin() * 0.05)
                    .collect()
            };
            let t = Tensor::from_vec(values, shape, &Device::Cpu).unwrap();
            (name, t)
        })
        .collect()
}

/// llama.cpp's phi2 name of a Hugging Face tensor name (`fused`: q, k, v as `attn_qkv`).
fn gguf_name(hf: &str, fused: bool) -> String {
    let (stem, suffix) = hf.rsplit_once('.').unwrap();
    let mapped = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.final_layernorm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            let (layer, part) = stem
                .strip_prefix("model.layers.")
                .unwrap()
                .split_once('.')
                .unwrap();
            let part = match part {
                "input_layernorm" => "attn_norm",
                "self_attn.q_proj" | "self_attn.k_proj" | "self_attn.v_proj" if fused => "attn_qkv",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.dense" => "attn_output",
                "mlp.fc1" => "ffn_up",
                "mlp.fc2" => "ffn_down",
                other => panic!("{other}"),
            };
            format!("blk.{layer}.{part}")
        }
    };
    format!("{mapped}.{suffix}")
}

/// The tiny model as a phi2 GGUF with its tokenizer embedded, written by candle's GGUF
/// writer (not ours, so the seeds do not share our writer's assumptions). Matrices whose
/// rows are whole blocks take `quant`; `fused` stores q, k and v as one `attn_qkv` (the
/// old phi2 layout).
fn gguf_bytes(quant: Option<GgmlDType>, fused: bool) -> Vec<u8> {
    use gguf_file::Value as V;
    let cfg = fuzzing::tiny_config(false);
    let (tokens, types, merges) = fuzzing::tiny_vocabulary();
    let u = |v: usize| V::U32(v as u32);
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("phi2".into())),
        ("general.name", V::String("tiny".into())),
        ("phi2.context_length", u(cfg.max_position_embeddings)),
        ("phi2.embedding_length", u(cfg.hidden_size)),
        ("phi2.feed_forward_length", u(cfg.intermediate_size)),
        ("phi2.block_count", u(cfg.num_hidden_layers)),
        ("phi2.attention.head_count", u(cfg.num_attention_heads)),
        ("phi2.attention.head_count_kv", u(cfg.num_key_value_heads)),
        (
            "phi2.attention.layer_norm_epsilon",
            V::F32(cfg.layer_norm_eps as f32),
        ),
        ("phi2.rope.dimension_count", u(cfg.rotary_dim())),
        ("phi2.rope.freq_base", V::F32(cfg.rope_theta as f32)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens",
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            V::Array(types.into_iter().map(|t| V::I32(t as i32)).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            V::Array(merges.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(62)),
        ("tokenizer.ggml.eos_token_id", V::U32(62)),
    ];
    let mut by_name: std::collections::BTreeMap<String, Vec<Tensor>> = Default::default();
    let weights = tiny_weights(&cfg);
    let mut names: Vec<&String> = weights.keys().collect();
    // q, k, v in that order when fused.
    names.sort_by_key(|n| {
        (
            n.replace("q_proj", "a").replace("k_proj", "b"),
            n.to_string(),
        )
    });
    for name in names {
        by_name
            .entry(gguf_name(name, fused))
            .or_default()
            .push(weights[name].clone());
    }
    let tensors: Vec<(String, QTensor)> = by_name
        .into_iter()
        .map(|(name, parts)| {
            let t = Tensor::cat(&parts, 0).unwrap();
            let dtype = match quant {
                Some(q) if t.rank() == 2 && t.dim(1).unwrap().is_multiple_of(q.block_size()) => q,
                _ => GgmlDType::F32,
            };
            (name, QTensor::quantize(&t, dtype).unwrap())
        })
        .collect();
    let meta: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let qt: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta, &qt).unwrap();
    out.into_inner()
}

/// The tiny weights under the phi-msft (MixFormer) names microsoft/phi-2 first shipped with.
fn msft_weights(hf: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (name, t) in hf {
        let msft = if let Some(rest) = name.strip_prefix("model.layers.") {
            let (layer, part) = rest.split_once('.').unwrap();
            let part = match part {
                p if p.starts_with("self_attn.q_proj")
                    || p.starts_with("self_attn.k_proj")
                    || p.starts_with("self_attn.v_proj") =>
                {
                    continue;
                }
                p => p
                    .replace("input_layernorm", "ln")
                    .replace("self_attn.dense", "mixer.out_proj"),
            };
            format!("transformer.h.{layer}.{part}")
        } else {
            name.replace("model.embed_tokens", "transformer.embd.wte")
                .replace("model.final_layernorm", "lm_head.ln")
                .replace("lm_head.weight", "lm_head.linear.weight")
                .replace("lm_head.bias", "lm_head.linear.bias")
        };
        out.insert(msft, t.clone());
    }
    for suffix in ["weight", "bias"] {
        let part = |p: &str| hf[&format!("model.layers.0.self_attn.{p}.{suffix}")].clone();
        let fused = Tensor::cat(&[part("q_proj"), part("k_proj"), part("v_proj")], 0).unwrap();
        out.insert(format!("transformer.h.0.mixer.Wqkv.{suffix}"), fused);
    }
    out
}

fn safetensors_bytes(tensors: &HashMap<String, Tensor>, dtype: DType) -> Vec<u8> {
    let converted: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&converted, &path).unwrap();
    std::fs::read(path).unwrap()
}

fn tokenizer_variant(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(&fuzzing::tiny_tokenizer_json()).unwrap();
    edit(&mut v);
    serde_json::to_vec_pretty(&v).unwrap()
}

/// The seed corpus is what this generator writes: a change to the tiny model or a format
/// that leaves the committed seeds stale fails here. `MEDPHI_WRITE_SEEDS=1` rewrites them.
#[test]
fn the_seed_corpus_is_up_to_date() {
    let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
    let mut put = |target: &'static str, name: &str, bytes: Vec<u8>| {
        seeds.push((target, name.to_string(), bytes));
    };

    for (name, quant) in [
        ("f32", None),
        ("f16", Some(GgmlDType::F16)),
        ("q8_0", Some(GgmlDType::Q8_0)),
        ("q4_0", Some(GgmlDType::Q4_0)),
        ("q4_1", Some(GgmlDType::Q4_1)),
        ("q5_0", Some(GgmlDType::Q5_0)),
        ("q5_1", Some(GgmlDType::Q5_1)),
        ("bf16", Some(GgmlDType::BF16)),
    ] {
        put(
            "gguf",
            &format!("ok-tiny-{name}.gguf"),
            gguf_bytes(quant, false),
        );
    }
    put(
        "gguf",
        "ok-tiny-fused-qkv-q8_0.gguf",
        gguf_bytes(Some(GgmlDType::Q8_0), true),
    );
    // candle cannot read q8_1 tensors from a file: a clean error.
    put(
        "gguf",
        "tiny-q8_1.gguf",
        gguf_bytes(Some(GgmlDType::Q8_1), false),
    );

    let untied = tiny_weights(&fuzzing::tiny_config(false));
    let tied = tiny_weights(&fuzzing::tiny_config(true));
    let with_mode = |mode: u8, bytes: Vec<u8>| [vec![mode], bytes].concat();
    put(
        "safetensors",
        "ok-single-f32",
        with_mode(0, safetensors_bytes(&untied, DType::F32)),
    );
    put(
        "safetensors",
        "ok-single-f16",
        with_mode(0, safetensors_bytes(&untied, DType::F16)),
    );
    put(
        "safetensors",
        "ok-single-bf16",
        with_mode(0, safetensors_bytes(&untied, DType::BF16)),
    );
    put(
        "safetensors",
        "ok-msft-layout-f16",
        with_mode(0, safetensors_bytes(&msft_weights(&untied), DType::F16)),
    );
    put(
        "safetensors",
        "ok-tied-f16",
        with_mode(4, safetensors_bytes(&tied, DType::F16)),
    );
    let (first, second): (HashMap<_, _>, HashMap<_, _>) = untied
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .partition(|(k, _)| k.contains("layers.0.self_attn") || k.contains("embed"));
    let (a, b) = (
        safetensors_bytes(&first, DType::F16),
        safetensors_bytes(&second, DType::F16),
    );
    let at = u16::try_from(a.len()).unwrap().to_le_bytes();
    put(
        "safetensors",
        "ok-two-shards-f16",
        [vec![2, at[0], at[1]], a, b].concat(),
    );
    let index =
        std::fs::read(root().join("tests/fixtures/tiny-phi-sharded/model.safetensors.index.json"))
            .unwrap();
    put("safetensors", "ok-index.json", with_mode(3, index));

    let fixtures = root().join("tests/fixtures");
    for (name, path) in [
        ("ok-tiny-phi.json", fixtures.join("tiny-phi/config.json")),
        (
            "ok-tiny-phi-msft.json",
            fixtures.join("tiny-phi-msft/config.json"),
        ),
        (
            "ok-tiny-medphi.json",
            root().join("models/tiny-medphi/config.json"),
        ),
    ] {
        put("config_json", name, std::fs::read(path).unwrap());
    }
    put(
        "config_json",
        "ok-tiny.json",
        fuzzing::tiny_config_json(false).into_bytes(),
    );
    put(
        "config_json",
        "ok-tiny-tied.json",
        fuzzing::tiny_config_json(true).into_bytes(),
    );
    let mut v5: serde_json::Value =
        serde_json::from_str(&fuzzing::tiny_config_json(false)).unwrap();
    let obj = v5.as_object_mut().unwrap();
    obj.remove("rope_theta");
    obj.remove("partial_rotary_factor");
    obj.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    );
    put(
        "config_json",
        "ok-transformers5-layout.json",
        serde_json::to_vec_pretty(&v5).unwrap(),
    );

    put(
        "tokenizer_json",
        "ok-tiny.json",
        fuzzing::tiny_tokenizer_json().into_bytes(),
    );
    put(
        "tokenizer_json",
        "truncation.json",
        tokenizer_variant(|v| {
            v["truncation"] = serde_json::json!({"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 5});
        }),
    );
    put(
        "tokenizer_json",
        "ok-padding-fixed-4e9.json",
        tokenizer_variant(|v| {
            v["padding"] = serde_json::json!({"strategy": {"Fixed": 4_000_000_000u64}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 62, "pad_type_id": 0, "pad_token": "<|endoftext|>"});
        }),
    );
    put(
        "tokenizer_json",
        "ok-normalizer-added-token.json",
        tokenizer_variant(|v| {
            v["normalizer"] = serde_json::json!({"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]});
            v["added_tokens"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                    "id": 63, "content": "Output", "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": false,
                }));
        }),
    );
    put(
        "tokenizer_json",
        "ok-wordlevel.json",
        serde_json::to_vec(&serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "Instruct": 1, ":": 2}, "unk_token": "[UNK]"},
        }))
        .unwrap(),
    );

    let samples = root().join("../shared/data/benchmarks");
    let sample = |f: &str| std::fs::read_to_string(samples.join(f)).unwrap();
    let first_lines = |f: &str, n: usize| {
        sample(f)
            .lines()
            .take(n)
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .into_bytes()
    };
    put(
        "benchmarks",
        "ok-medqa.jsonl",
        first_lines("medqa_us_4options.sample.jsonl", 2),
    );
    put(
        "benchmarks",
        "ok-medmcqa.json",
        first_lines("medmcqa_dev.sample.json", 3),
    );
    let pubmed: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&sample("pubmedqa_test.sample.json")).unwrap();
    let two: serde_json::Map<String, serde_json::Value> = pubmed
        .into_iter()
        .take(2)
        .map(|(k, mut v)| {
            // Keep the fields the parser reads; the abstracts are long.
            let o = v.as_object_mut().unwrap();
            o.retain(|k, _| {
                ["QUESTION", "CONTEXTS", "final_decision", "YEAR"].contains(&k.as_str())
            });
            (k, v)
        })
        .collect();
    put(
        "benchmarks",
        "ok-pubmedqa.json",
        serde_json::to_vec_pretty(&two).unwrap(),
    );
    put(
        "benchmarks",
        "ok-mmlu_anatomy.csv",
        sample("mmlu_anatomy_test.sample.csv").into_bytes(),
    );
    put(
        "benchmarks",
        "ok-mmlu_medical_genetics.csv",
        sample("mmlu_medical_genetics_test.sample.csv").into_bytes(),
    );
    put(
        "benchmarks",
        "ok-medexqa.tsv",
        b"Which vessel supplies the SA node in most people?\tRight coronary artery\tLeft circumflex\tLAD\tLeft main\tThe SA nodal artery usually arises from the RCA.\tIn about 60% of hearts.\tA\n\
Which drug is first line for stable angina symptoms?\tNitroglycerin\t\"Aspirin\"\tWarfarin\tDigoxin\tShort-acting nitrates relieve angina.\tSublingual.\tA\n"
            .to_vec(),
    );

    for (name, json) in [
        (
            "ok-instruct.json",
            serde_json::json!({"prompt": "What is sepsis?", "format": "instruct"}),
        ),
        (
            "ok-chat-history.json",
            serde_json::json!({
                "prompt": "And its treatment?", "format": "chat",
                "history": [{"user": "What is DKA?", "assistant": " Diabetic ketoacidosis. "}, {"user": "Ünïcödé 🩺", "assistant": "ok"}],
                "maxNewTokens": 64, "temperature": 0.7, "topP": 0.9, "topK": 40,
                "repetitionPenalty": 1.1, "seed": 7, "stop": ["\nUser:", "."],
            }),
        ),
        (
            "ok-raw.json",
            serde_json::json!({"prompt": "Instruct: hi\nOutput:", "format": "raw", "history": []}),
        ),
        ("ok-empty.json", serde_json::json!({})),
    ] {
        put("chat_template", name, serde_json::to_vec(&json).unwrap());
    }

    let write = std::env::var_os("MEDPHI_WRITE_SEEDS").is_some();
    let mut stale = Vec::new();
    for (target, name, bytes) in seeds {
        let dir = corpus(target);
        assert!(
            bytes.len() <= 64 * 1024,
            "{target}/{name} is {} bytes",
            bytes.len()
        );
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(&name), bytes).unwrap();
        } else if std::fs::read(dir.join(&name)).ok().as_deref() != Some(&bytes[..]) {
            stale.push(format!("{target}/{name}"));
        }
    }
    assert!(
        stale.is_empty(),
        "seeds missing or stale (MEDPHI_WRITE_SEEDS=1 cargo test --test fuzz_replay rewrites them): {stale:?}"
    );
}
