//! `medphi eval`: lm-eval-compatible benchmark runs, written as `results.json` and
//! `samples_<task>.jsonl` in the output folder.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use medphi::backend::Backend;
use medphi::eval::{self, Item, Mode, Task};
use medphi::generate::Session;
use medphi::weights::Quantization;
use serde_json::json;

use super::ModelArgs;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
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
    mode: ModeArg,
    /// Score every choice from scratch instead of continuing the question's KV cache
    /// (what lm-eval does; slower, same numbers).
    #[arg(long)]
    no_share_prefix: bool,
    /// Tokens the model may write per answer in generate mode.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// The folder for results.json and samples_<task>.jsonl (written item by item).
    #[arg(long)]
    output: PathBuf,
    /// Continue an interrupted run in --output: items already in its samples files are kept
    /// and not scored again.
    #[arg(long)]
    resume: bool,
}

struct LoadedTask {
    name: String,
    items: Vec<Item>,
    original: usize,
}

fn load_tasks(args: &EvalArgs) -> Result<Vec<LoadedTask>> {
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
    Ok(tasks)
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let tasks = load_tasks(&args)?;
    std::fs::create_dir_all(&args.output).with_context(|| format!("{}", args.output.display()))?;
    let mut done = tasks
        .iter()
        .map(|t| earlier_samples(&args, t))
        .collect::<Result<Vec<_>>>()?;
    let mode = match args.mode {
        ModeArg::Loglikelihood => Mode::Loglikelihood {
            share_prefix: !args.no_share_prefix,
        },
        ModeArg::Generate => Mode::Generate {
            max_new_tokens: args.max_new_tokens,
        },
    };
    let super::Loaded {
        backend, tokenizer, ..
    } = args.model.load()?;
    let mut session = Session::new(backend);
    let total: usize = tasks.iter().map(|t| t.items.len()).sum();
    let resumed: usize = done.iter().map(Vec::len).sum();
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:24} {bar:30} {pos}/{len} items  {per_sec}  ETA {eta}")
            .expect("static template"),
    );
    pb.set_position(resumed as u64);
    let interrupt = super::interrupt();
    let started = Instant::now();
    for (task, lines) in tasks.iter().zip(&mut done) {
        pb.set_message(task.name.clone());
        pollster::block_on(eval::score_items(
            &mut session,
            &tokenizer,
            &task.items,
            mode,
            &samples_path(&args, task),
            lines,
            &interrupt,
            &mut || pb.inc(1),
        ))?;
    }
    pb.finish_and_clear();
    let scored: usize = done.iter().map(Vec::len).sum();
    if scored < total {
        bail!(super::Interrupted(format!(
            "{scored} of {total} items are in the samples files of {}; --resume continues",
            args.output.display()
        )));
    }
    let secs = started.elapsed().as_secs_f64();
    let summaries: Vec<eval::report::TaskSummary> = tasks
        .iter()
        .zip(&done)
        .map(|(t, lines)| eval::report::TaskSummary {
            name: &t.name,
            original: t.original,
            lines,
        })
        .collect();
    let scored_now = total - resumed;
    let config = json!({
        "model": "medphi",
        "model_args": args.model.model_args(),
        "quantize": args.model.quantize.map(Quantization::name),
        "backend": session.backend().name(),
        "limit": args.limit,
        "mode": match args.mode { ModeArg::Loglikelihood => "loglikelihood", ModeArg::Generate => "generate" },
        "share_prefix": !args.no_share_prefix,
        "items_per_s": scored_now as f64 / secs,
    });
    let out = eval::report::results_json(&summaries, config, secs);
    let path = write_results(&args, &out)?;
    eprintln!(
        "{scored_now} items in {secs:.1} s ({:.2} items/s) → {}",
        scored_now as f64 / secs,
        path.display()
    );
    Ok(())
}

fn samples_path(args: &EvalArgs, task: &LoadedTask) -> PathBuf {
    args.output.join(format!("samples_{}.jsonl", task.name))
}

/// The samples lines an interrupted run left for `task` (with `--resume`); none for a new
/// run, which will not overwrite another run's samples.
fn earlier_samples(args: &EvalArgs, task: &LoadedTask) -> Result<Vec<serde_json::Value>> {
    let path = samples_path(args, task);
    if args.resume {
        return Ok(eval::resume_samples(&path, &task.items)?);
    }
    if path.exists() {
        bail!(
            "{} exists: --resume continues that run, or choose another --output",
            path.display()
        );
    }
    Ok(Vec::new())
}

/// Writes results.json (whole or not at all) and prints each task's metrics.
fn write_results(args: &EvalArgs, out: &serde_json::Value) -> Result<PathBuf> {
    let path = args.output.join("results.json");
    let tmp = args.output.join(".results.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(out)?)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .with_context(|| format!("{}", path.display()))?;
    for (name, m) in out["results"].as_object().into_iter().flatten() {
        let shown: Vec<String> = m
            .as_object()
            .into_iter()
            .flatten()
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
    Ok(path)
}
