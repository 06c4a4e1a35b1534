//! Failing system calls, injected with strace: a write or fsync that fails (a full disk, an
//! I/O error) while a checkpoint, a metrics line or an eval sample is being written, and a
//! read that fails while a model loads. Each ends in a one-line error (exit code 1, never a
//! panic), and what was written before stays usable: `--resume` afterwards ends exactly
//! where an undisturbed run does.
//!
//! Which calls to fail comes from a dry run under strace: the test lists the main thread's
//! calls on files (descriptors 3 and up; a failed write to stderr would only hide the error
//! message) and fails a spread of them, one per run.
#![cfg(not(target_arch = "wasm32"))] // native only

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fixtures, medphi_cmd, run_ok};

fn strace() -> PathBuf {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("strace"))
        .find(|p| p.is_file());
    found.expect("these tests need strace (scripts/test.sh installs it: apt-get install strace)")
}

/// `cmd` under strace, with `inject` (strace's `-e inject=…`) if given; the trace of the
/// syscalls in `trace` goes to `log`.
fn traced(cmd: &Command, trace: &str, inject: Option<&str>, log: &Path) -> Output {
    let mut s = Command::new(strace());
    s.args(["-f", "-qq", "-e", &format!("trace={trace}"), "-o"])
        .arg(log);
    if let Some(i) = inject {
        s.args(["-e", &format!("inject={i}")]);
    }
    s.arg(cmd.get_program()).args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        s.current_dir(dir);
    }
    s.output().unwrap()
}

/// The numbers (1-based, as strace's `when=` counts them for the main thread) of `syscall`'s
/// calls on descriptors ≥ 3 in a trace; with `opened_from`, only on descriptors the trace
/// shows opened from a path containing it (the trace must then include `openat`).
fn calls_on_files(log: &Path, syscall: &str, opened_from: Option<&str>) -> Vec<usize> {
    let text = std::fs::read_to_string(log).unwrap();
    let main = text.split_whitespace().next().unwrap().to_string();
    let prefix = format!("{syscall}(");
    let fd_of = |args: &str| -> u32 {
        args.split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0)
    };
    let mut wanted_fds = std::collections::HashSet::new();
    let mut found = Vec::new();
    let mut count = 0;
    for call in text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{main} ")))
        .map(str::trim_start)
    {
        if let (Some(needle), Some(rest)) = (opened_from, call.strip_prefix("openat(")) {
            let fd = call
                .rsplit("= ")
                .next()
                .and_then(|r| r.trim().parse::<u32>().ok());
            match fd {
                Some(fd) if rest.contains(needle) => wanted_fds.insert(fd),
                Some(fd) => wanted_fds.remove(&fd),
                None => false,
            };
        }
        if let Some(args) = call.strip_prefix(&prefix) {
            count += 1;
            let fd = fd_of(args);
            if fd >= 3 && (opened_from.is_none() || wanted_fds.contains(&fd)) {
                found.push(count);
            }
        }
    }
    found
}

/// About `n` entries of `all`, evenly spread, first and last included.
fn spread(all: &[usize], n: usize) -> Vec<usize> {
    if all.len() <= n {
        return all.to_vec();
    }
    (0..n).map(|i| all[i * (all.len() - 1) / (n - 1)]).collect()
}

/// Exit code 1, and a last line on stderr that is the error and names the failure.
fn assert_clean_failure(out: &Output, what: &str, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(needle),
        "{what}: {stderr}"
    );
}

fn train_cmd(dir: &Path, out: &str, resume: bool) -> Command {
    let mut cmd = medphi_cmd();
    cmd.current_dir(dir)
        .args(["train", "--stage", "pretrain", "--data", "corpus.txt"])
        .args(["--steps", "4", "--out", out]);
    if resume {
        cmd.args(["--resume", out]);
    } else {
        cmd.args(["--model-config", "config.json", "--tokenizer"])
            .arg(fixtures().join("tiny-phi/tokenizer.json"))
            .args(["--batch-size", "2", "--seq-len", "16", "--lr", "1e-2"])
            .args(["--seed", "3", "--eval-every", "2", "--save-every", "1"]);
    }
    cmd
}

/// Whether a run folder holds a finished checkpoint (not just one that failed half-way).
fn has_checkpoint(run: &Path) -> bool {
    std::fs::read_dir(run.join("checkpoints"))
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
        })
        .unwrap_or(false)
}

fn write_training_inputs(dir: &Path) {
    let cfg = serde_json::json!({
        "architectures": ["PhiForCausalLM"], "model_type": "phi", "vocab_size": 51200,
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "bos_token_id": 50256, "eos_token_id": 50256
    });
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(
        dir.join("corpus.txt"),
        "Scurvy is characterised by bleeding gums and poor wound healing.\n\n".repeat(40),
    )
    .unwrap();
}

/// A failed write or fsync anywhere in a training run's checkpoints and metrics stops it
/// with an error; resuming gives the undisturbed run's final weights.
#[test]
fn failed_writes_during_training_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    write_training_inputs(dir.path());
    let log = dir.path().join("trace.log");
    let dry = traced(
        &train_cmd(dir.path(), "whole", false),
        "write,fsync",
        None,
        &log,
    );
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let final_weights = std::fs::read(dir.path().join("whole/model.safetensors")).unwrap();
    let mut cases: Vec<(String, &str)> = Vec::new();
    for n in spread(&calls_on_files(&log, "write", None), 12) {
        cases.push((format!("write:error=ENOSPC:when={n}"), "No space left"));
    }
    for n in spread(&calls_on_files(&log, "fsync", None), 6) {
        cases.push((format!("fsync:error=EIO:when={n}"), "Input/output error"));
    }
    assert!(cases.len() >= 15, "{} cases", cases.len());
    for (i, (inject, needle)) in cases.iter().enumerate() {
        let out = format!("run{i}");
        let failed = traced(
            &train_cmd(dir.path(), &out, false),
            "write,fsync",
            Some(inject),
            &log,
        );
        assert_clean_failure(&failed, inject, needle);
        let run = dir.path().join(&out);
        let finish = if has_checkpoint(&run) {
            train_cmd(dir.path(), &out, true)
        } else {
            train_cmd(dir.path(), &out, false)
        };
        run_ok(&mut { finish });
        assert!(
            std::fs::read(run.join("model.safetensors")).unwrap() == final_weights,
            "{inject}: resumed weights differ"
        );
    }
}

/// A failed write of an eval sample line stops `medphi eval` with an error; `--resume`
/// gives the undisturbed run's samples byte for byte.
#[test]
fn failed_writes_during_eval_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/benchmarks/mmlu_anatomy_test.sample.csv");
    let eval = |out: &str, resume: bool| {
        let mut cmd = medphi_cmd();
        cmd.current_dir(dir.path())
            .args(["eval", "--model"])
            .arg(fixtures().join("tiny-phi"))
            .args(["--task", "mmlu_anatomy", "--data"])
            .arg(&data)
            .args(["--output", out]);
        if resume {
            cmd.arg("--resume");
        }
        cmd
    };
    let log = dir.path().join("trace.log");
    let dry = traced(&eval("whole", false), "write", None, &log);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let samples = |out: &str| {
        std::fs::read_to_string(dir.path().join(out).join("samples_mmlu_anatomy.jsonl")).unwrap()
    };
    let writes = calls_on_files(&log, "write", None);
    assert!(writes.len() >= 8, "{writes:?}");
    for (i, n) in spread(&writes, 6).into_iter().enumerate() {
        let out = format!("run{i}");
        let inject = format!("write:error=ENOSPC:when={n}");
        let failed = traced(&eval(&out, false), "write", Some(&inject), &log);
        assert_clean_failure(&failed, &inject, "No space left");
        run_ok(&mut eval(&out, true));
        assert_eq!(samples(&out), samples("whole"), "{inject}");
    }
}

/// A read of the model's files that fails while it loads ends in an error, never a panic.
#[test]
fn failed_reads_while_loading_end_in_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("trace.log");
    // Weight files are memory-mapped (no reads to fail); the JSON files are read.
    for model in ["tiny-phi", "tiny-phi-sharded"] {
        let generate = || {
            let mut cmd = medphi_cmd();
            cmd.args(["generate", "--model"])
                .arg(fixtures().join(model))
                .args(["--prompt", "Scurvy", "--max-new-tokens", "2"]);
            cmd
        };
        let dry = traced(&generate(), "openat,read", None, &log);
        assert!(
            dry.status.success(),
            "{}",
            String::from_utf8_lossy(&dry.stderr)
        );
        let reads = calls_on_files(&log, "read", Some("tests/fixtures"));
        assert!(!reads.is_empty());
        for n in spread(&reads, 8) {
            let inject = format!("read:error=EIO:when={n}");
            let out = traced(&generate(), "openat,read", Some(&inject), &log);
            assert_clean_failure(&out, &format!("{model} {inject}"), "Input/output error");
        }
    }
}
