//! `medphi eval`: lm-eval-compatible benchmark runs, written as `results.json` and
//! `samples_<task>.jsonl` in the output folder.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use medphi::backend::Backend;
use medphi::eval::{self, extract_choice, Item, Task};
use medphi::generate::{GenerateOptions, Session};
use serde_json::{json, Value};

use super::ModelArgs;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// lm-eval's multiple_choice: log-likelihood of each choice (acc, acc_norm; acc_mutual_info
    /// for the continuation tasks).
    Loglikelihood,
    /// Chat-style: greedy free-text answer, option read out of it (exact_match).
    Generate,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Task name (medqa_4options, pubmedqa, medmcqa, mmlu_<subject>, medexqa_<specialty>);
    /// repeat together with --data for several tasks.
    #[arg(long, required = true)]
    task: Vec<String>,
    /// The benchmark file for the task in the same position, in its original format.
    #[arg(long, required = true)]
    data: Vec<PathBuf>,
    /// Score only the first N items of each task.
    #[arg(long)]
    limit: Option<usize>,
    #[arg(long, value_enum, default_value = "loglikelihood")]
    mode: Mode,
    /// Score every choice from scratch instead of continuing the question's KV cache
    /// (what lm-eval does; slower, same numbers).
    #[arg(long)]
    no_share_prefix: bool,
    /// Tokens the model may write per answer in generate mode.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    #[arg(long)]
    output: PathBuf,
}

struct LoadedTask {
    name: String,
    items: Vec<Item>,
    original: usize,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    if args.task.len() != args.data.len() {
        bail!(
            "give one --data file per --task ({} tasks, {} files)",
            args.task.len(),
            args.data.len()
        );
    }
    let mut tasks = Vec::new();
    for (name, path) in args.task.iter().zip(&args.data) {
        let task: Task = name.parse()?;
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let mut items = task.load(&text, &path.display().to_string())?;
        let original = items.len();
        items.truncate(args.limit.unwrap_or(usize::MAX));
        tasks.push(LoadedTask {
            name: task.name(),
            items,
            original,
        });
    }
    std::fs::create_dir_all(&args.output).with_context(|| format!("{}", args.output.display()))?;
    let (backend, tokenizer, _) = args.model.load()?;
    let mut session = Session::new(backend);

    let total: usize = tasks.iter().map(|t| t.items.len()).sum();
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:24} {bar:30} {pos}/{len} items  {per_sec}  ETA {eta}")
            .expect("static template"),
    );
    let started = Instant::now();
    let mut results = serde_json::Map::new();
    let mut n_samples = serde_json::Map::new();
    for task in &tasks {
        pb.set_message(task.name.clone());
        let mut lines = Vec::with_capacity(task.items.len());
        let metrics = match args.mode {
            Mode::Loglikelihood => {
                let mut samples = Vec::with_capacity(task.items.len());
                for (doc_id, item) in task.items.iter().enumerate() {
                    let s = pollster::block_on(eval::evaluate_item(
                        session.backend_mut(),
                        &tokenizer,
                        doc_id,
                        item,
                        !args.no_share_prefix,
                    ))?;
                    lines.push(eval::sample_json(item, &s));
                    samples.push(s);
                    pb.inc(1);
                }
                eval::task_metrics(&task.name, &samples)
            }
            Mode::Generate => {
                let opts = GenerateOptions {
                    max_new_tokens: args.max_new_tokens,
                    stop: vec!["\n".into()],
                    ..Default::default()
                };
                let mut correct = Vec::with_capacity(task.items.len());
                for (doc_id, item) in task.items.iter().enumerate() {
                    let ids = tokenizer.encode(&item.context)?;
                    let g =
                        pollster::block_on(
                            session.generate(&tokenizer, &ids, &opts, &mut |_| true),
                        )?;
                    let extracted = extract_choice(&g.text, item);
                    let ok = extracted == Some(item.gold);
                    correct.push(f64::from(u8::from(ok)));
                    lines.push(json!({
                        "doc_id": doc_id, "doc": item.doc, "target": item.gold,
                        "arguments": [[item.context, {"until": ["\n"], "max_gen_toks": args.max_new_tokens, "do_sample": false}]],
                        "resps": [[g.text]],
                        "filtered_resps": [extracted.map(|i| item.choices[i].clone())],
                        "exact_match": f64::from(u8::from(ok)),
                    }));
                    pb.inc(1);
                }
                let (mean, se) = eval::mean_stderr(&correct);
                json!({"alias": task.name, "exact_match,none": mean,
                       "exact_match_stderr,none": se.map_or(json!("N/A"), |v| json!(v))})
            }
        };
        let path = args.output.join(format!("samples_{}.jsonl", task.name));
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("{}", path.display()))?,
        );
        for line in &lines {
            writeln!(file, "{line}")?;
        }
        file.flush()?;
        results.insert(task.name.clone(), metrics);
        n_samples.insert(
            task.name.clone(),
            json!({"original": task.original, "effective": task.items.len()}),
        );
    }
    pb.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let names: Vec<&String> = tasks.iter().map(|t| &t.name).collect();
    let per_task = |v: Value| -> Value {
        names
            .iter()
            .map(|n| ((*n).clone(), v.clone()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    // Every metric a task reports is an accuracy: higher is better.
    let higher: serde_json::Map<String, Value> = results
        .iter()
        .map(|(name, metrics)| {
            let metrics = metrics.as_object().expect("built above");
            let names = metrics
                .keys()
                .filter_map(|k| k.strip_suffix(",none"))
                .filter(|k| !k.contains("stderr"))
                .map(|k| (k.to_string(), json!(true)))
                .collect::<serde_json::Map<_, _>>();
            (name.clone(), Value::Object(names))
        })
        .collect();
    let out = json!({
        "results": results,
        "n-samples": n_samples,
        "n-shot": per_task(json!(0)),
        "higher_is_better": higher,
        "config": {
            "model": "medphi",
            "model_args": format!("pretrained={}", args.model.model.display()),
            "backend": session.backend().name(),
            "limit": args.limit,
            "mode": match args.mode { Mode::Loglikelihood => "loglikelihood", Mode::Generate => "generate" },
            "share_prefix": !args.no_share_prefix,
            "items_per_s": total as f64 / secs,
        },
        "total_evaluation_time_seconds": format!("{secs}"),
        "medphi_version": env!("CARGO_PKG_VERSION"),
    });
    let path = args.output.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("{}", path.display()))?;
    for (name, m) in out["results"].as_object().expect("built above") {
        let shown: Vec<String> = m
            .as_object()
            .expect("built above")
            .iter()
            .filter(|(k, _)| k.ends_with(",none") && !k.contains("stderr"))
            .map(|(k, v)| {
                format!(
                    "{} {:.4}",
                    k.trim_end_matches(",none"),
                    v.as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect();
        eprintln!("{name:28} {}", shown.join("  "));
    }
    eprintln!(
        "{total} items in {secs:.1} s ({:.2} items/s) → {}",
        total as f64 / secs,
        path.display()
    );
    Ok(())
}
