//! lm-evaluation-harness parity: prompts, per-choice log-likelihoods, predictions and
//! aggregate metrics against lm-eval's own run (tests/fixtures/lm_eval, made by
//! scripts/fixtures/make_lm_eval_reference.py) on the real benchmark samples in
//! ../shared/data/benchmarks.
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{fixtures, session};
use medphi::backend::{Backend, CpuBackend, Want};
use medphi::eval::{evaluate_item, sample_json, task_results, Item, Sample, Task};
use medphi::generate::Session;
use medphi::tokenizer::PhiTokenizer;
use pollster::block_on;
use serde_json::Value;

fn benchmarks() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/benchmarks")
}

const TASKS: [(&str, &str); 9] = [
    ("medqa_4options", "medqa_us_4options.sample.jsonl"),
    ("pubmedqa", "pubmedqa_test.sample.json"),
    ("medmcqa", "medmcqa_dev.sample.json"),
    ("mmlu_anatomy", "mmlu_anatomy_test.sample.csv"),
    (
        "mmlu_clinical_knowledge",
        "mmlu_clinical_knowledge_test.sample.csv",
    ),
    (
        "mmlu_college_biology",
        "mmlu_college_biology_test.sample.csv",
    ),
    (
        "mmlu_college_medicine",
        "mmlu_college_medicine_test.sample.csv",
    ),
    (
        "mmlu_medical_genetics",
        "mmlu_medical_genetics_test.sample.csv",
    ),
    (
        "mmlu_professional_medicine",
        "mmlu_professional_medicine_test.sample.csv",
    ),
];

fn load(task: &str, file: &str) -> Vec<Item> {
    let path = benchmarks().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    task.parse::<Task>().unwrap().load(&text, file).unwrap()
}

fn score(
    session: &mut Session<CpuBackend>,
    tokenizer: &PhiTokenizer,
    doc_id: usize,
    item: &Item,
    share_prefix: bool,
) -> Sample {
    block_on(evaluate_item(
        session.backend_mut(),
        tokenizer,
        doc_id,
        item,
        share_prefix,
    ))
    .unwrap()
}

fn lm_eval_samples(task: &str) -> Vec<Value> {
    let text =
        std::fs::read_to_string(fixtures().join(format!("lm_eval/samples_{task}.jsonl"))).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn lm_eval_results() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("lm_eval/results.json")).unwrap())
        .unwrap()
}

#[test]
fn prompts_and_targets_are_lm_evals_byte_for_byte() {
    for (task, file) in TASKS {
        let items = load(task, file);
        let theirs = lm_eval_samples(task);
        assert_eq!(items.len(), theirs.len(), "{task}");
        for (item, s) in items.iter().zip(&theirs) {
            // lm-eval keeps PubMedQA's target as the answer string, the others as an index.
            match &s["target"] {
                Value::String(answer) => assert_eq!(&item.choices[item.gold], answer),
                index => assert_eq!(
                    item.gold as u64,
                    index.as_u64().unwrap(),
                    "{task} doc {}",
                    s["doc_id"]
                ),
            }
            let args = s["arguments"].as_array().unwrap();
            assert_eq!(args.len(), item.choices.len());
            for (arg, choice) in args.iter().zip(&item.choices) {
                assert_eq!(
                    arg[0].as_str().unwrap(),
                    item.context,
                    "{task} doc {}",
                    s["doc_id"]
                );
                assert_eq!(arg[1].as_str().unwrap(), format!(" {choice}"));
            }
        }
    }
}

#[test]
fn loglikelihoods_predictions_and_metrics_match_lm_eval() {
    let (mut session, tokenizer) = session("tiny-phi");
    let results = lm_eval_results();
    let mut worst = 0f64;
    for (task, file) in TASKS {
        let items = load(task, file);
        let theirs = lm_eval_samples(task);
        let mut samples = Vec::new();
        for (doc_id, (item, s)) in items.iter().zip(&theirs).enumerate() {
            let ours = score(&mut session, &tokenizer, doc_id, item, true);
            for (mine, resp) in ours
                .scores
                .iter()
                .zip(s["filtered_resps"].as_array().unwrap())
            {
                let ll = resp[0].as_f64().unwrap();
                worst = worst.max((mine.loglikelihood - ll).abs());
                assert!(
                    (mine.loglikelihood - ll).abs() < 1e-3,
                    "{task} doc {doc_id}: {} vs {ll}",
                    mine.loglikelihood
                );
                assert_eq!(
                    mine.is_greedy,
                    resp[1].as_bool().unwrap(),
                    "{task} doc {doc_id}"
                );
            }
            assert_eq!(
                f64::from(u8::from(ours.acc)),
                s["acc"].as_f64().unwrap(),
                "{task} doc {doc_id}"
            );
            if let Some(norm) = s["acc_norm"].as_f64() {
                assert_eq!(
                    f64::from(u8::from(ours.acc_norm)),
                    norm,
                    "{task} doc {doc_id}"
                );
            }
            samples.push(sample_json(item, &ours));
        }
        let ours = task_results(task, &samples);
        let theirs = &results["results"][task];
        for key in [
            "acc,none",
            "acc_stderr,none",
            "acc_norm,none",
            "acc_norm_stderr,none",
        ] {
            if let Some(v) = theirs[key].as_f64() {
                let mine = ours[key].as_f64().unwrap();
                assert!((mine - v).abs() < 1e-12, "{task} {key}: {mine} vs {v}");
            }
        }
    }
    eprintln!("worst |Δ loglikelihood| vs lm-eval: {worst:e}");
}

#[test]
fn scoring_choices_from_scratch_gives_the_same_numbers() {
    // PubMedQA abstracts overflow the tiny model's 256-token context: this also covers
    // lm-eval's left truncation.
    let (mut session, tokenizer) = session("tiny-phi");
    for (task, file) in [TASKS[0], TASKS[1]] {
        for (doc_id, item) in load(task, file).iter().enumerate().take(6) {
            let shared = score(&mut session, &tokenizer, doc_id, item, true);
            let scratch = score(&mut session, &tokenizer, doc_id, item, false);
            for (a, b) in shared.scores.iter().zip(&scratch.scores) {
                assert!(
                    (a.loglikelihood - b.loglikelihood).abs() < 1e-4,
                    "{task} {doc_id}"
                );
            }
        }
    }
}

#[test]
fn mutual_information_subtracts_each_choice_scored_alone_after_eos() {
    // lm-eval's unconditional request is ("", choice): the choice, without the space the
    // conditional continuation gets, after the end-of-text token.
    let (mut session, tokenizer) = session("tiny-phi");
    let eos = tokenizer.eos_token_id().unwrap();
    let vocab = session.backend().config().vocab_size;
    let mut changed = 0;
    for (doc_id, item) in load("medqa_4options_continuation", TASKS[0].1)
        .iter()
        .enumerate()
    {
        let s = score(&mut session, &tokenizer, doc_id, item, true);
        assert_eq!(s.unconditional.len(), item.choices.len());
        let mut pmi = Vec::new();
        for ((choice, cond), alone) in item.choices.iter().zip(&s.scores).zip(&s.unconditional) {
            let ids: Vec<u32> = std::iter::once(eos)
                .chain(tokenizer.encode(choice).unwrap())
                .collect();
            let backend = session.backend_mut();
            backend.truncate(0);
            let rows = block_on(backend.forward(&ids[..ids.len() - 1], Want::AllRows))
                .unwrap()
                .rows()
                .unwrap();
            let mut ll = 0.0;
            for (row, &t) in rows.chunks(vocab).zip(&ids[1..]) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
                ll += f64::from(row[t as usize] - max) - sum.ln();
            }
            assert!(
                (alone.loglikelihood - ll).abs() < 1e-4,
                "doc {doc_id} {choice}"
            );
            pmi.push(cond.loglikelihood - ll);
        }
        let best = (0..pmi.len()).fold(0, |b, i| if pmi[i] > pmi[b] { i } else { b });
        assert_eq!(s.pred_mutual_info, Some(best));
        assert_eq!(s.acc_mutual_info, Some(best == item.gold));
        changed += usize::from(best != s.pred);
        let line = sample_json(item, &s);
        assert_eq!(line["arguments"].as_array().unwrap().len(), 8);
        assert_eq!(
            line["arguments"][4],
            serde_json::json!(["", item.choices[0]])
        );
    }
    // The metric is not acc under another name: on these questions it often disagrees.
    assert!(changed > 0);
    // Letter-scored items carry no unconditional requests.
    let letters = &load("medqa_4options", TASKS[0].1)[0];
    let s = score(&mut session, &tokenizer, 0, letters, true);
    assert!(s.unconditional.is_empty() && s.acc_mutual_info.is_none());
}

#[test]
fn malformed_files_name_the_file_and_line() {
    let cases = [
        ("medqa_4options", "{\"question\": \"q\", \"options\": {\"A\": \"a\"}, \"answer_idx\": \"A\"}\n", "x.jsonl:1", "options"),
        ("medqa_4options", "\n{not json\n", "x.jsonl:2", "not valid JSON"),
        ("medmcqa", "{\"question\":\"q\",\"opa\":\"a\",\"opb\":\"b\",\"opc\":\"c\",\"opd\":\"d\",\"cop\":0}\n", "x.jsonl:1", "cop 0"),
        ("pubmedqa", "{\"1\": {\"QUESTION\": \"q\", \"CONTEXTS\": [\"c\"], \"final_decision\": \"perhaps\"}}", "PMID 1", "final_decision"),
        ("pubmedqa", "[1, 2]", "x.jsonl", "PubMedQA"),
        ("mmlu_anatomy", "q,a,b,c,d,A\nq2,a,b,c,d\n", "x.jsonl:2", "expected 6 columns"),
        ("mmlu_anatomy", "q,a,b,c,d,E\n", "x.jsonl:1", "not one of A, B, C, D"),
        ("medexqa_cardiology", "q\ta\tb\tc\td\te1\te2\tZ\n", "x.jsonl:1", "not one of"),
        ("medqa_4options", "", "x.jsonl", "no questions"),
    ];
    for (task, text, place, what) in cases {
        let err = task
            .parse::<Task>()
            .unwrap()
            .load(text, "x.jsonl")
            .unwrap_err()
            .to_string();
        assert!(err.contains(place) && err.contains(what), "{task}: {err}");
    }
    assert!("mmlu_astrology".parse::<Task>().is_err());
}

#[test]
fn medexqa_tsv_uses_mmlus_template() {
    let text = "Which valve?\tMitral\tAortic\tTricuspid\tPulmonary\tThe mitral…\tBecause…\tA\n";
    let items = "medexqa_biomedical_engineer"
        .parse::<Task>()
        .unwrap()
        .load(text, "t.tsv")
        .unwrap();
    assert_eq!(
        items[0].context,
        "The following are multiple choice questions (with answers) about biomedical engineer.\n\n\
         Which valve?\nA. Mitral\nB. Aortic\nC. Tricuspid\nD. Pulmonary\nAnswer:"
    );
    assert_eq!(items[0].gold, 0);
}

#[test]
fn medqa_continuation_scores_the_option_texts_after_the_bare_question() {
    let letters = load("medqa_4options", TASKS[0].1);
    let texts = load("medqa_4options_continuation", TASKS[0].1);
    assert_eq!(letters.len(), texts.len());
    for (l, t) in letters.iter().zip(&texts) {
        let question = l.doc["question"].as_str().unwrap();
        assert_eq!(t.context, format!("Question: {question}\nAnswer:"));
        assert_eq!(t.gold, l.gold);
        for (letter, text) in l.choices.iter().zip(&t.choices) {
            assert_eq!(&l.doc["options"][letter.as_str()].as_str().unwrap(), text);
        }
        assert_eq!(t.choices[t.gold], l.doc["answer"].as_str().unwrap());
    }
}

/// Runs `medphi eval` with `args` into a fresh folder; returns it and its results.json.
fn run_eval(args: &[&str]) -> (tempfile::TempDir, Value) {
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_medphi"))
        .args(["eval", "--model"])
        .arg(fixtures().join("tiny-phi"))
        .args(args)
        .arg("--output")
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "{args:?}");
    let results = std::fs::read_to_string(out.path().join("results.json")).unwrap();
    (out, serde_json::from_str(&results).unwrap())
}

fn data(i: usize) -> String {
    benchmarks().join(TASKS[i].1).display().to_string()
}

#[test]
fn cli_writes_lm_eval_results_and_samples() {
    let (out, results) = run_eval(&[
        "--task",
        "medqa_4options",
        "--data",
        &data(0),
        "--task",
        "mmlu_anatomy",
        "--data",
        &data(3),
        "--limit",
        "5",
    ]);
    assert_eq!(results["n-samples"]["medqa_4options"]["original"], 20);
    assert_eq!(results["n-samples"]["medqa_4options"]["effective"], 5);
    assert_eq!(results["n-samples"]["mmlu_anatomy"]["original"], 8);
    for key in ["acc,none", "acc_stderr,none", "acc_norm,none"] {
        assert!(
            results["results"]["medqa_4options"][key].is_number(),
            "{key}"
        );
    }
    let samples = std::fs::read_to_string(out.path().join("samples_medqa_4options.jsonl")).unwrap();
    let lines: Vec<Value> = samples
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    let theirs = lm_eval_samples("medqa_4options");
    for (mine, theirs) in lines.iter().zip(&theirs) {
        assert_eq!(mine["doc_id"], theirs["doc_id"]);
        assert_eq!(mine["target"], theirs["target"]);
        assert_eq!(mine["acc"], theirs["acc"]);
        assert_eq!(mine["filtered_resps"].as_array().unwrap().len(), 4);
        assert!(mine["filtered_resps"][0][1].is_boolean());
    }
}

#[test]
fn cli_reports_mutual_information_for_the_continuation_form() {
    let (out, results) = run_eval(&["--task", "medqa_4options_continuation", "--data", &data(0)]);
    let m = &results["results"]["medqa_4options_continuation"];
    let lines: Vec<Value> =
        std::fs::read_to_string(out.path().join("samples_medqa_4options_continuation.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(lines.len(), 20);
    let mean = lines
        .iter()
        .map(|l| l["acc_mutual_info"].as_f64().unwrap())
        .sum::<f64>()
        / 20.0;
    assert!((m["acc_mutual_info,none"].as_f64().unwrap() - mean).abs() < 1e-12);
    assert!(m["acc_mutual_info_stderr,none"].is_number());
    assert_eq!(
        results["higher_is_better"]["medqa_4options_continuation"]["acc_mutual_info"],
        true
    );
}

#[test]
fn generative_mode_reports_exact_match() {
    let (out, results) = run_eval(&[
        "--mode",
        "generate",
        "--max-new-tokens",
        "4",
        "--task",
        "mmlu_anatomy",
        "--data",
        &data(3),
        "--limit",
        "3",
    ]);
    assert!(results["results"]["mmlu_anatomy"]["exact_match,none"].is_number());
    let samples = std::fs::read_to_string(out.path().join("samples_mmlu_anatomy.jsonl")).unwrap();
    assert_eq!(samples.lines().count(), 3);
}

#[test]
fn eval_report_draws_runs_beside_published_rows() {
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("report.png");
    let published = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/published/zero_shot_medical_qa.csv");
    let output = Command::new(env!("CARGO_BIN_EXE_medphi"))
        .arg("eval-report")
        .arg(fixtures().join("lm_eval"))
        .arg("--published")
        .arg(&published)
        .arg("--png")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8(output.stdout).unwrap();
    // lm-eval's own run: PubMedQA 0/20, MedQA 7/20, MedMCQA 3/20, MMLU 14/48 pooled.
    assert!(
        table.contains("| lm_eval | 0.00 | 35.00 | 15.00 | 29.17 | 19.79 |"),
        "{table}"
    );
    assert!(
        table.contains("MedPhi-2 2.7B (published) | 65.60 | 34.33 | 38.39 | 55.59 | 48.48 |"),
        "{table}"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}

/// `medphi eval` stopped by Ctrl-C (exit 130, no results.json) or killed outright (a line
/// half-written) and then run with `--resume` ends with the uninterrupted run's samples files
/// byte for byte and its results.json up to timings; without `--resume` it refuses to start
/// over a run's samples.
#[test]
fn an_interrupted_eval_resumes_to_the_same_results() {
    let args = [
        "--task",
        "medqa_4options_continuation",
        "--data",
        &data(0),
        "--task",
        "mmlu_anatomy",
        "--data",
        &data(3),
    ];
    let (whole, expected) = run_eval(&args);
    let eval_cmd = |out: &std::path::Path, extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_medphi"));
        cmd.args(["eval", "--model"])
            .arg(fixtures().join("tiny-phi"))
            .args(args)
            .arg("--output")
            .arg(out)
            .args(extra);
        cmd
    };
    let samples = |dir: &std::path::Path, task: &str| {
        std::fs::read_to_string(dir.join(format!("samples_{task}.jsonl"))).unwrap_or_default()
    };
    let without_timing = |mut v: Value| {
        v.as_object_mut()
            .unwrap()
            .remove("total_evaluation_time_seconds");
        v["config"].as_object_mut().unwrap().remove("items_per_s");
        v
    };
    for signal in ["INT", "KILL"] {
        let out = tempfile::tempdir().unwrap();
        let child = eval_cmd(out.path(), &[])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        while samples(out.path(), "medqa_4options_continuation")
            .lines()
            .count()
            < 4
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        let stopped = child.wait_with_output().unwrap();
        assert!(!out.path().join("results.json").exists());
        let path = out.path().join("samples_medqa_4options_continuation.jsonl");
        if signal == "INT" {
            assert_eq!(stopped.status.code(), Some(130));
            let stderr = String::from_utf8_lossy(&stopped.stderr);
            assert!(stderr.contains("--resume"), "{stderr}");
        } else {
            // What a kill in the middle of a write leaves.
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            std::io::Write::write_all(&mut f, b"{\"doc_id\": 99, \"doc\": {\"quest").unwrap();
        }
        let again = eval_cmd(out.path(), &[]).output().unwrap();
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
        assert!(eval_cmd(out.path(), &["--resume"])
            .status()
            .unwrap()
            .success());
        for task in ["medqa_4options_continuation", "mmlu_anatomy"] {
            assert!(
                samples(out.path(), task) == samples(whole.path(), task),
                "{signal}: {task}"
            );
        }
        let resumed: Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("results.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            without_timing(resumed),
            without_timing(expected.clone()),
            "{signal}"
        );
    }
}
