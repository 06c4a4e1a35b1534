//! `medphi train` end to end on a small model: loss goes down, outputs are model folders
//! that load for generation, and an interrupted run resumed from its checkpoint ends
//! bit-for-bit where the uninterrupted run does.
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

mod common;

use std::path::Path;

use candle_core::{DType, Device};

use common::*;

const CORPUS: &str =
    "Macrocephaly. Occipitofrontal (head) circumference greater than 97th centile.\n\n\
    Microcephaly. Head circumference below 2 standard deviations below the mean.\n\n\
    Scurvy is characterised by bleeding gums, perifollicular hemorrhage and poor wound healing.\n\n\
    ICD-10-CM code E11.9: Type 2 diabetes mellitus without complications.\n\n";

fn config(dir: &Path) -> std::path::PathBuf {
    let cfg = serde_json::json!({
        "architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": 51200,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "layer_norm_eps": 1e-5, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "hidden_act": "gelu_new", "tie_word_embeddings": false,
        "bos_token_id": 50256, "eos_token_id": 50256
    });
    let path = dir.join("config.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

fn train(dir: &Path, out: &str, extra: &[&str]) {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, CORPUS.repeat(20)).unwrap();
    run_ok(
        medphi_cmd()
            .args(["train", "--stage", "pretrain", "--model-config"])
            .arg(config(dir))
            .arg("--tokenizer")
            .arg(fixtures().join("tiny-phi/tokenizer.json"))
            .arg("--data")
            .arg(&corpus)
            .args([
                "--steps",
                "8",
                "--batch-size",
                "2",
                "--seq-len",
                "16",
                "--lr",
                "1e-2",
            ])
            .args([
                "--seed",
                "3",
                "--device",
                "cpu",
                "--eval-every",
                "4",
                "--out",
            ])
            .arg(dir.join(out))
            .args(extra),
    );
}

/// The model and optimizer state of `b`'s checkpoint at `step` are `a`'s byte for byte,
/// and `b`'s output folder holds that model.
fn assert_same_run(a: &Path, b: &Path, step: u64) {
    let ckpt = format!("checkpoints/step-{step:08}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let (x, y) = (a.join(&ckpt).join(file), b.join(&ckpt).join(file));
        assert!(
            std::fs::read(&x).unwrap() == std::fs::read(&y).unwrap(),
            "{} differs from {}",
            y.display(),
            x.display()
        );
    }
    assert!(
        std::fs::read(a.join("model.safetensors")).unwrap()
            == std::fs::read(b.join("model.safetensors")).unwrap()
    );
}

fn metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn pretraining_lowers_the_loss_and_writes_a_loadable_model() {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), "run", &[]);
    let run = dir.path().join("run");
    let m = metrics(&run);
    assert_eq!(m.len(), 8);
    for line in &m {
        for key in ["step", "loss", "lr", "tokens_per_s"] {
            assert!(line[key].is_number(), "{key} missing in {line}");
        }
    }
    let (first, last) = (
        m[0]["loss"].as_f64().unwrap(),
        m[7]["loss"].as_f64().unwrap(),
    );
    assert!(last < first - 0.5, "loss {first} → {last}");
    assert!(m[7]["eval_loss"].is_number());
    assert!(run.join("loss.png").is_file());
    // The output folder is a model: the CLI generates from it.
    run_ok(medphi_cmd().args(["generate", "--model"]).arg(&run).args([
        "--prompt",
        "Macrocephaly.",
        "--max-new-tokens",
        "4",
        "--json",
    ]));
}

#[test]
fn an_interrupted_run_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), "whole", &[]);
    train(dir.path(), "parts", &["--stop-after", "3"]);
    let parts = dir.path().join("parts");
    assert_eq!(metrics(&parts).len(), 3);
    run_ok(
        medphi_cmd()
            .args(["train", "--stage", "pretrain", "--data"])
            .arg(dir.path().join("corpus.txt"))
            .args(["--steps", "8", "--out"])
            .arg(&parts)
            .arg("--resume")
            .arg(&parts),
    );
    let whole = dir.path().join("whole");
    assert_same_run(&whole, &parts, 8);
    let (a, b) = (metrics(&whole), metrics(&parts));
    assert_eq!(b.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["loss"], y["loss"]);
        assert_eq!(x["lr"], y["lr"]);
    }
}

#[test]
fn half_precision_trains_f32_master_weights() {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), "f32", &[]);
    train(dir.path(), "f16", &["--precision", "f16"]);
    let (full, half) = (
        metrics(&dir.path().join("f32")),
        metrics(&dir.path().join("f16")),
    );
    let loss = |m: &[serde_json::Value], i: usize| m[i]["loss"].as_f64().unwrap();
    // Same initial weights: the first losses differ only by f16 rounding.
    assert!((loss(&full, 0) - loss(&half, 0)).abs() < 0.05);
    assert_ne!(full[0]["loss"], half[0]["loss"]);
    assert!(loss(&half, 7) < loss(&half, 0) - 0.5);
    let saved =
        candle_core::safetensors::load(dir.path().join("f16/model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(saved.values().all(|t| t.dtype() == DType::F32));

    let corpus = dir.path().join("corpus.txt");
    let out = medphi_cmd()
        .args([
            "train",
            "--stage",
            "pretrain",
            "--precision",
            "bf16",
            "--model-config",
        ])
        .arg(config(dir.path()))
        .arg("--tokenizer")
        .arg(fixtures().join("tiny-phi/tokenizer.json"))
        .arg("--data")
        .arg(&corpus)
        .args(["--steps", "2", "--seq-len", "16", "--out"])
        .arg(dir.path().join("bf16"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device cuda"));
}

#[test]
fn a_finished_run_is_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), "run", &[]);
    let out = medphi_cmd()
        .args(["train", "--stage", "pretrain", "--model-config"])
        .arg(config(dir.path()))
        .arg("--tokenizer")
        .arg(fixtures().join("tiny-phi/tokenizer.json"))
        .arg("--data")
        .arg(dir.path().join("corpus.txt"))
        .args(["--steps", "2", "--out"])
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
}

fn run_stage(dir: &Path, stage: &str, data: &str, out: &str) {
    let path = dir.join(format!("{stage}.jsonl"));
    std::fs::write(&path, data).unwrap();
    run_ok(
        medphi_cmd()
            .args(["train", "--stage", stage, "--init-from"])
            .arg(dir.join("run"))
            .arg("--data")
            .arg(&path)
            .args([
                "--steps",
                "10",
                "--batch-size",
                "4",
                "--seq-len",
                "24",
                "--lr",
                "5e-3",
            ])
            .args(["--seed", "1", "--beta", "0.5", "--device", "cpu", "--out"])
            .arg(dir.join(out)),
    );
}

#[test]
fn sft_and_dpo_continue_from_a_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), "run", &[]);
    let pairs = [
        ("What is macrocephaly?", " A large head.", " A small head."),
        ("What is microcephaly?", " A small head.", " A large head."),
        (
            "What causes scurvy?",
            " Lack of vitamin C.",
            " Lack of vitamin D.",
        ),
        ("What is E11.9?", " Type 2 diabetes.", " Type 1 diabetes."),
    ];
    let line = |p: &str, c: &str, r: &str, dpo: bool| {
        let prompt = format!("Instruct: {p}\nOutput:");
        if dpo {
            serde_json::json!({"prompt": prompt, "chosen": c, "rejected": r}).to_string()
        } else {
            serde_json::json!({"prompt": prompt, "response": c}).to_string()
        }
    };
    let jsonl = |dpo: bool| -> String {
        let lines = pairs.iter().cycle().take(40);
        lines.map(|(p, c, r)| line(p, c, r, dpo) + "\n").collect()
    };
    let sft = jsonl(false);
    run_stage(dir.path(), "sft", &sft, "sft");
    let m = metrics(&dir.path().join("sft"));
    let (first, last) = (
        m[0]["loss"].as_f64().unwrap(),
        m[9]["loss"].as_f64().unwrap(),
    );
    assert!(last < first, "SFT loss {first} → {last}");

    let dpo = jsonl(true);
    run_stage(dir.path(), "dpo", &dpo, "dpo");
    let m = metrics(&dir.path().join("dpo"));
    // Step 1 starts at the reference itself: zero margin, loss log 2.
    assert!(
        (m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4,
        "{}",
        m[0]
    );
    assert!(m[0]["reward_margin"].as_f64().unwrap().abs() < 1e-4);
    let last = &m[9];
    assert!(last["reward_margin"].as_f64().unwrap() > 0.0, "{last}");
    assert!(last["reward_accuracy"].as_f64().unwrap() >= 0.75, "{last}");
    assert!(
        last["loss"].as_f64().unwrap() < std::f64::consts::LN_2,
        "{last}"
    );
}

#[test]
fn lora_trains_only_adapters_and_merges_into_a_full_model() {
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), "run", &[]);
    let sft: String = (0..40)
        .map(|i| {
            let p = format!("Instruct: What is finding {}?\nOutput:", i % 4);
            serde_json::json!({"prompt": p, "response": format!(" Answer {}.", i % 4)}).to_string()
                + "\n"
        })
        .collect();
    let data = dir.path().join("sft.jsonl");
    std::fs::write(&data, sft).unwrap();
    let lora = |out: &str, extra: &[&str]| {
        run_ok(
            medphi_cmd()
                .args(["train", "--stage", "sft", "--init-from"])
                .arg(dir.path().join("run"))
                .arg("--data")
                .arg(&data)
                .args([
                    "--steps",
                    "6",
                    "--batch-size",
                    "4",
                    "--seq-len",
                    "24",
                    "--lr",
                    "2e-2",
                ])
                .args([
                    "--lora-rank",
                    "2",
                    "--lora-alpha",
                    "4",
                    "--seed",
                    "1",
                    "--out",
                ])
                .arg(dir.path().join(out))
                .args(extra),
        );
    };
    lora("adapters", &[]);
    lora("merged", &["--merge"]);
    // Interrupted and resumed, the adapters end where the uninterrupted run's do.
    lora("parts", &["--stop-after", "3"]);
    run_ok(
        medphi_cmd()
            .args(["train", "--stage", "sft", "--data"])
            .arg(&data)
            .args(["--steps", "6", "--out"])
            .arg(dir.path().join("parts"))
            .arg("--resume")
            .arg(dir.path().join("parts")),
    );
    let bytes =
        |d: &str| std::fs::read(dir.path().join(d).join("adapter_model.safetensors")).unwrap();
    assert!(
        bytes("parts") == bytes("adapters"),
        "resumed LoRA adapters differ"
    );
    let adapters = dir.path().join("adapters");
    assert!(!adapters.join("model.safetensors").exists());
    let a = candle_core::safetensors::load(
        adapters.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // q, k, v, dense, fc1, fc2 × A and B, one layer.
    assert_eq!(a.len(), 12);
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapters.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(peft["r"], 2);
    let m = metrics(&adapters);
    assert!(m[5]["loss"].as_f64().unwrap() < m[0]["loss"].as_f64().unwrap());
    // The merged model: frozen tensors unchanged, adapted ones moved by exactly
    // alpha/r · B·A, a rank-2 update.
    let load = |d: &str| {
        candle_core::safetensors::load(
            dir.path().join(d).join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (base, merged) = (load("run"), load("merged"));
    assert_eq!(base.len(), merged.len());
    for (name, b) in &base {
        let d = max_abs_diff(&merged[name], b);
        let adapted = name.ends_with(".weight")
            && ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
                .iter()
                .any(|t| name.contains(t));
        if adapted {
            let layer = name.strip_suffix(".weight").unwrap();
            let get = |w: &str| a[&format!("base_model.model.{layer}.lora_{w}.weight")].clone();
            let update = (get("B").matmul(&get("A")).unwrap() * 2.0).unwrap();
            let expected = (b + update).unwrap();
            let err = max_abs_diff(&merged[name], &expected);
            assert!(err < 1e-6, "{name}: {err}");
        } else {
            assert_eq!(d, 0.0, "{name} is frozen but changed");
        }
    }
    run_ok(
        medphi_cmd()
            .args(["generate", "--model"])
            .arg(dir.path().join("merged"))
            .args([
                "--prompt",
                "Instruct: What is finding 1?\nOutput:",
                "--max-new-tokens",
                "3",
            ]),
    );
}

/// The command of `train`, to run as a child process that a test may kill.
fn train_cmd(dir: &Path, out: &Path, lr: &str, extra: &[&str]) -> std::process::Command {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, CORPUS.repeat(20)).unwrap();
    let mut cmd = medphi_cmd();
    cmd.args(["train", "--stage", "pretrain", "--model-config"])
        .arg(config(dir))
        .arg("--tokenizer")
        .arg(fixtures().join("tiny-phi/tokenizer.json"))
        .arg("--data")
        .arg(&corpus)
        .args(["--steps", "8", "--batch-size", "2", "--seq-len", "16"])
        .args(["--lr", lr, "--seed", "3", "--eval-every", "4"])
        .args(["--save-every", "1", "--out"])
        .arg(out)
        .args(extra);
    cmd
}

/// Runs killed with SIGKILL at random moments (mid-step, mid-checkpoint, mid-metrics) and
/// resumed, as often as it takes, end with the uninterrupted run's weights and optimizer
/// state byte for byte, and with each step's metrics exactly once.
#[test]
fn killed_runs_resume_to_the_uninterrupted_weights() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let t0 = std::time::Instant::now();
    run_ok(&mut train_cmd(dir.path(), &whole, "1e-2", &[]));
    let duration = t0.elapsed();
    // A fixed plan of kill times, spread over the run's length.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next_fraction = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 1000) as f64 / 1000.0
    };
    // A kill that comes after the run ended does not count; then the window shrinks (the
    // first run may have been slowed by tests running beside it).
    let mut window = duration;
    let (mut kills, mut trial) = (0, 0);
    while kills < 12 {
        trial += 1;
        assert!(
            trial <= 40,
            "only {kills} of {trial} runs were killed before they ended"
        );
        let out = dir.path().join(format!("trial{trial}"));
        let mut child = train_cmd(dir.path(), &out, "1e-2", &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(window.mul_f64(next_fraction()));
        if child.try_wait().unwrap().is_some() {
            window = window.mul_f64(0.7);
            continue;
        }
        kills += 1;
        child.kill().unwrap();
        child.wait().unwrap();
        // Resume for as long as the run is unfinished; a kill before the first checkpoint
        // leaves nothing to resume, so that run starts over.
        let resumed = if out.join("checkpoints").exists() {
            medphi_cmd()
                .args(["train", "--stage", "pretrain", "--steps", "8", "--data"])
                .arg(dir.path().join("corpus.txt"))
                .arg("--out")
                .arg(&out)
                .arg("--resume")
                .arg(&out)
                .output()
                .unwrap()
        } else {
            train_cmd(dir.path(), &out, "1e-2", &[]).output().unwrap()
        };
        assert!(
            resumed.status.success(),
            "trial {trial}: {}",
            String::from_utf8_lossy(&resumed.stderr)
        );
        assert_same_run(&whole, &out, 8);
        let steps: Vec<u64> = metrics(&out)
            .iter()
            .map(|m| m["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "trial {trial}");
        // Only the last two checkpoints are kept.
        let kept = std::fs::read_dir(out.join("checkpoints")).unwrap().count();
        assert_eq!(kept, 2, "trial {trial}");
    }
}

/// A damaged newest checkpoint is passed over (with a warning) for the one before it, and
/// the resumed run still ends where the uninterrupted one does.
#[test]
fn a_damaged_checkpoint_falls_back_to_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    run_ok(&mut train_cmd(dir.path(), &whole, "1e-2", &[]));
    let parts = dir.path().join("parts");
    run_ok(&mut train_cmd(
        dir.path(),
        &parts,
        "1e-2",
        &["--stop-after", "5"],
    ));
    let newest = parts.join("checkpoints/step-00000005/optimizer.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&newest, bytes).unwrap();
    let out = run_ok(
        medphi_cmd()
            .args(["train", "--stage", "pretrain", "--steps", "8", "--data"])
            .arg(dir.path().join("corpus.txt"))
            .arg("--out")
            .arg(&parts)
            .arg("--resume")
            .arg(&parts),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("step-00000005") && stderr.contains("checksum"),
        "{stderr}"
    );
    assert_same_run(&whole, &parts, 8);
}

/// Two runs with the same seed, data and thread count give identical bytes. The model is
/// big enough that the kernels' parallel reductions split into several tasks.
#[test]
fn same_seed_runs_are_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let bundled = fixtures().join("../../models/tiny-medphi");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundled.join("config.json")).unwrap())
            .unwrap();
    cfg["hidden_size"] = 64.into();
    cfg["intermediate_size"] = 256.into();
    cfg["num_hidden_layers"] = 1.into();
    cfg["num_attention_heads"] = 4.into();
    cfg["num_key_value_heads"] = 4.into();
    let cfg_path = dir.path().join("config.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let corpus = dir.path().join("corpus.txt");
    std::fs::write(&corpus, CORPUS.repeat(200)).unwrap();
    let run = |out: &str| {
        run_ok(
            medphi_cmd()
                .args(["train", "--stage", "pretrain", "--model-config"])
                .arg(&cfg_path)
                .arg("--tokenizer")
                .arg(bundled.join("tokenizer.json"))
                .arg("--data")
                .arg(&corpus)
                .args(["--steps", "3", "--batch-size", "8", "--seq-len", "128"])
                .args(["--lr", "1e-3", "--seed", "5", "--out"])
                .arg(dir.path().join(out))
                .env("RAYON_NUM_THREADS", "2"),
        );
    };
    run("a");
    run("b");
    assert_same_run(&dir.path().join("a"), &dir.path().join("b"), 3);
}

/// A step whose loss is not finite is not applied: the run stops with an error naming the
/// step, and the last good state is saved as a checkpoint.
#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_good_state() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let result = train_cmd(dir.path(), &out, "1e30", &["--clip", "0"])
        .output()
        .unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("step ") && stderr.contains("not applied"),
        "{stderr}"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::fs::read_dir(out.join("checkpoints"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .max()
                .unwrap()
                .join("trainer_state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!(step < 8, "checkpoint at step {step}");
    // The saved weights are finite and load.
    run_ok(medphi_cmd().args(["generate", "--model"]).arg(&out).args([
        "--prompt",
        "Scurvy",
        "--max-new-tokens",
        "2",
    ]));
}
