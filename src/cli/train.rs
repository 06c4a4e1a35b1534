//! `medphi train`: pretraining from scratch or from a checkpoint, SFT and DPO, with a progress
//! bar, `metrics.jsonl` and a loss plot (`loss.png`) in the output folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use medphi::checkpoint::Checkpoint;
use medphi::model::{Phi, PhiConfig};
use medphi::tokenizer::PhiTokenizer;
use medphi::train::{
    defaults, rows_from_text, Examples, FolderRun, LoraConfig, Objective, Params, Precision, Stage,
    StepMetrics, TrainConfig, Trainer,
};
use plotters::prelude::*;

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Args)]
pub struct TrainArgs {
    /// pretrain: next-token loss on a text corpus; sft: loss on the responses of
    /// prompt/response pairs; dpo: preference pairs against the starting model.
    #[arg(long, value_enum)]
    stage: StageArg,
    /// Corpus (.txt, documents separated by blank lines) for pretrain; prompt/response pairs
    /// (.jsonl) for sft; prompt/chosen/rejected pairs (.jsonl) for dpo.
    #[arg(long)]
    data: PathBuf,
    /// The output folder: a loadable model folder, metrics.jsonl, loss.png and checkpoints/.
    #[arg(long)]
    out: PathBuf,
    /// Total steps the schedule is planned for.
    #[arg(long)]
    steps: u64,

    /// A model folder to start from (continued pretraining, sft, dpo, LoRA).
    #[arg(long, help_heading = "The model to train")]
    init_from: Option<PathBuf>,
    /// config.json of a new model, initialised at random (pretrain).
    #[arg(long, help_heading = "The model to train")]
    model_config: Option<PathBuf>,
    /// tokenizer.json of a new model (with --model-config), or instead of --init-from's.
    #[arg(long, help_heading = "The model to train")]
    tokenizer: Option<PathBuf>,

    #[arg(long, default_value_t = 8, help_heading = "Optimisation (every stage)")]
    batch_size: usize,
    #[arg(long, default_value_t = 1, help_heading = "Optimisation (every stage)")]
    grad_accum: usize,
    /// Tokens per example: pretraining windows, and the longest sft/dpo example kept.
    #[arg(
        long,
        default_value_t = defaults::SEQ_LEN,
        help_heading = "Optimisation (every stage)"
    )]
    seq_len: usize,
    /// Peak learning rate (AdamW, warmup then cosine to a tenth).
    #[arg(
        long,
        default_value_t = defaults::LR,
        help_heading = "Optimisation (every stage)"
    )]
    lr: f64,
    /// Warmup steps (default: 5% of --steps).
    #[arg(long, help_heading = "Optimisation (every stage)")]
    warmup: Option<u64>,
    #[arg(
        long,
        default_value_t = defaults::WEIGHT_DECAY,
        help_heading = "Optimisation (every stage)"
    )]
    weight_decay: f64,
    /// Global gradient-norm limit (0: off).
    #[arg(
        long,
        default_value_t = defaults::CLIP,
        help_heading = "Optimisation (every stage)"
    )]
    clip: f64,
    #[arg(long, default_value_t = 0, help_heading = "Optimisation (every stage)")]
    seed: u64,
    #[arg(
        long,
        value_enum,
        default_value = "cpu",
        help_heading = "Optimisation (every stage)"
    )]
    device: DeviceKind,
    /// Precision of the forward and backward pass (weights and optimizer state stay f32).
    /// bf16 needs --device cuda: candle's CPU matmul has no bf16.
    #[arg(
        long,
        value_enum,
        default_value = "f32",
        help_heading = "Optimisation (every stage)"
    )]
    precision: PrecisionArg,

    /// DPO's β: how far the policy may move from the reference.
    #[arg(long, default_value_t = 0.1, help_heading = "sft and dpo")]
    beta: f64,
    /// Batch examples of similar length together (groups of 50 batches, each sorted by
    /// length), so batches carry little padding.
    #[arg(long, help_heading = "sft and dpo")]
    group_by_length: bool,

    /// Train LoRA adapters of this rank on q/k/v/dense/fc1/fc2, the base (--init-from) frozen.
    #[arg(long, help_heading = "LoRA (with --init-from)")]
    lora_rank: Option<usize>,
    /// LoRA scale numerator (the update is alpha / rank · B·A).
    #[arg(long, default_value_t = defaults::LORA_ALPHA, help_heading = "LoRA (with --init-from)")]
    lora_alpha: f64,
    /// Also write the merged full model, not only the adapters.
    #[arg(long, help_heading = "LoRA (with --init-from)")]
    merge: bool,

    /// Held-out loss every this many steps.
    #[arg(
        long,
        default_value_t = 50,
        help_heading = "Evaluation and checkpoints"
    )]
    eval_every: u64,
    /// Held-out batches per evaluation.
    #[arg(long, default_value_t = 4, help_heading = "Evaluation and checkpoints")]
    eval_batches: usize,
    /// Checkpoint every this many steps (0: only at the end, or when stopped by Ctrl-C).
    #[arg(long, default_value_t = 0, help_heading = "Evaluation and checkpoints")]
    save_every: u64,
    /// End after this step (with a checkpoint), as if interrupted.
    #[arg(long, help_heading = "Evaluation and checkpoints")]
    stop_after: Option<u64>,
    /// Continue the run in this folder from its newest intact checkpoint (--data and --steps
    /// as before; the rest comes from the checkpoint).
    #[arg(long, help_heading = "Evaluation and checkpoints")]
    resume: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum PrecisionArg {
    F32,
    Bf16,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum StageArg {
    Pretrain,
    Sft,
    Dpo,
}

/// The stage's examples from `path`; for DPO also the frozen reference (the starting model).
fn objective(
    config: &TrainConfig,
    tok: &PhiTokenizer,
    cfg: &PhiConfig,
    path: &Path,
    device: &Device,
) -> medphi::Result<Objective> {
    let text = std::fs::read_to_string(path).map_err(|e| medphi::Error::file(path.display(), e))?;
    let file = path.display().to_string();
    let rows = || rows_from_text(&text, &file);
    let eos = tok
        .eos_token_id()
        .or(cfg.eos_token_id)
        .ok_or_else(|| medphi::Error::input("the tokenizer has no end-of-text token"))?;
    let seq_len = config.seq_len;
    Ok(match config.stage {
        Stage::Pretrain => Objective::Lm(Examples::pretrain(tok, &text, seq_len, eos)?),
        Stage::Sft => Objective::Lm(Examples::sft(tok, &rows()?, &file, seq_len, eos)?),
        Stage::Dpo => {
            let dir = config.init_from.as_ref().ok_or_else(|| {
                medphi::Error::input("DPO needs --init-from MODEL_DIR (its reference model)")
            })?;
            // The reference lives where the policy does.
            let ckpt = Checkpoint::open(dir, None, DType::F32)?;
            let weights = Params::from_source(&ckpt.config, ckpt.weights.as_ref(), device)?;
            let reference = Phi::load(&ckpt.config, &weights, true)?;
            let (chosen, rejected) = Examples::preferences(tok, &rows()?, &file, seq_len, eos)?;
            Objective::Dpo {
                chosen,
                rejected,
                reference: Box::new(reference),
            }
        }
    })
}

pub fn train(args: TrainArgs) -> Result<()> {
    let device = match args.device {
        DeviceKind::Cpu => Device::Cpu,
        #[cfg(feature = "cuda")]
        DeviceKind::Cuda => Device::new_cuda(0)?,
        #[cfg(not(feature = "cuda"))]
        DeviceKind::Cuda => bail!("this medphi was built without CUDA: build with `--features cuda` (scripts/cuda-toolkit.sh installs nvcc)"),
    };
    let mut run = match &args.resume {
        Some(dir) => resume(dir, &args, &device)?,
        None => start(&args, &device)?,
    };
    let trainer = &run.trainer;
    eprintln!(
        "training {} parameters, stage {:?}, from step {} to {}",
        trainer.parameter_count(),
        trainer.config.stage,
        trainer.step,
        args.stop_after
            .unwrap_or(trainer.config.steps)
            .min(trainer.config.steps)
    );
    let pb = ProgressBar::new(trainer.config.steps);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed} < {eta}]")
            .expect("static template"),
    );
    pb.set_position(trainer.step);
    let interrupt = super::interrupt();
    run.run(args.stop_after, &interrupt, &mut |m: &StepMetrics| {
        pb.set_position(m.step);
        let eval = m
            .eval_loss
            .map(|e| format!(" eval {e:.3}"))
            .unwrap_or_default();
        pb.set_message(format!(
            "loss {:.3}{eval} lr {:.1e} {:.0} tok/s",
            m.loss, m.lr, m.tokens_per_s
        ));
    })?;
    pb.finish();
    plot(&args.out.join("metrics.jsonl"), &args.out.join("loss.png"))?;
    eprintln!(
        "model, metrics.jsonl and loss.png in {}",
        args.out.display()
    );
    if interrupt.is_cancelled() {
        return Err(super::Interrupted(format!(
            "stopped at step {} with a checkpoint; continue with --resume {}",
            run.trainer.step,
            args.out.display()
        ))
        .into());
    }
    Ok(())
}

/// A new run: the model (fresh from --model-config, or --init-from's, or LoRA adapters on
/// it), its data and the run's configuration from the flags.
fn start(args: &TrainArgs, device: &Device) -> Result<FolderRun> {
    if args.lora_rank.is_some() && args.init_from.is_none() {
        bail!("LoRA trains adapters on an existing model: give --init-from MODEL_DIR");
    }
    let (cfg, tokenizer_path, params) = match (&args.init_from, &args.model_config, &args.tokenizer)
    {
        (Some(dir), None, _) => {
            let ckpt = Checkpoint::open(dir, args.tokenizer.as_deref(), DType::F32)?;
            let src = ckpt.weights.as_ref();
            let params = match args.lora_rank {
                Some(rank) => {
                    let lora = LoraConfig {
                        rank,
                        alpha: args.lora_alpha,
                    };
                    Params::lora(&ckpt.config, src, lora, args.seed, None, device)?
                }
                None => Params::from_source(&ckpt.config, src, device)?,
            };
            let tok = args.tokenizer.clone().unwrap_or(dir.join("tokenizer.json"));
            (ckpt.config, tok, params)
        }
        (None, Some(cfg_path), Some(tok)) => {
            let json = std::fs::read_to_string(cfg_path)
                .with_context(|| format!("{}", cfg_path.display()))?;
            let cfg = PhiConfig::from_json(&json, &cfg_path.display().to_string())?;
            let params = Params::init(&cfg, args.seed, device)?;
            (cfg, tok.clone(), params)
        }
        _ => bail!(
            "give either --init-from MODEL_DIR, or --model-config and --tokenizer for a new model"
        ),
    };
    let tokenizer_json = std::fs::read_to_string(&tokenizer_path)
        .with_context(|| format!("{}", tokenizer_path.display()))?;
    let tok = PhiTokenizer::from_bytes(
        tokenizer_json.as_bytes(),
        &tokenizer_path.display().to_string(),
    )?;
    let config = train_config(args);
    let objective = objective(&config, &tok, &cfg, &args.data, device)?;
    if medphi::train::checkpoint_exists(&args.out)? {
        bail!(
            "{} already holds a run; use --resume {0} to continue it",
            args.out.display()
        );
    }
    // A run killed before its first checkpoint leaves only its metrics: start over.
    let metrics = args.out.join("metrics.jsonl");
    if metrics.exists() {
        std::fs::remove_file(&metrics).with_context(|| format!("{}", metrics.display()))?;
    }
    let trainer = Trainer::new(cfg, params, objective, config)?;
    Ok(FolderRun::new(trainer, tokenizer_json, &args.out))
}

/// Everything that decides a new run, from the flags.
fn train_config(args: &TrainArgs) -> TrainConfig {
    TrainConfig {
        stage: match args.stage {
            StageArg::Pretrain => Stage::Pretrain,
            StageArg::Sft => Stage::Sft,
            StageArg::Dpo => Stage::Dpo,
        },
        steps: args.steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        seq_len: args.seq_len,
        lr: args.lr,
        warmup: args.warmup.unwrap_or(defaults::warmup(args.steps)),
        weight_decay: args.weight_decay,
        clip: args.clip,
        seed: args.seed,
        eval_every: args.eval_every,
        eval_batches: args.eval_batches,
        save_every: args.save_every,
        beta: args.beta,
        init_from: args.init_from.clone(),
        lora: args.lora_rank.map(|rank| LoraConfig {
            rank,
            alpha: args.lora_alpha,
        }),
        merge: args.merge,
        precision: match args.precision {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::F16 => Precision::F16,
        },
        group_by_length: args.group_by_length,
    }
}

/// The trainer of the newest intact checkpoint in `dir`, with `--out`'s metrics.jsonl made
/// to end at its step.
fn resume(dir: &Path, args: &TrainArgs, device: &Device) -> Result<FolderRun> {
    let (checkpoint, state, skipped) = medphi::train::latest_checkpoint(dir)?;
    for why in skipped {
        eprintln!("warning: {why}");
    }
    let step = state.step;
    let run = FolderRun::resume(
        &checkpoint,
        state,
        device,
        |config, tok, cfg| objective(config, tok, cfg, &args.data, device),
        &args.out,
    )?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    medphi::train::restore_metrics(dir, &args.out, step)?;
    Ok(run)
}

/// Training and evaluation loss by step.
fn plot(metrics: &Path, png: &Path) -> Result<()> {
    let lines: Vec<StepMetrics> = std::fs::read_to_string(metrics)?
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    let max_step = lines.last().map_or(1, |m| m.step).max(1) as f64;
    let max_loss = lines.iter().map(|m| m.loss).fold(0.0, f64::max).max(1e-3) * 1.05;
    super::chart::save_png(png, (960, 540), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("Loss", ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, 0f64..max_loss)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("cross-entropy")
            .label_style(("sans-serif", 15))
            .draw()?;
        chart
            .draw_series(LineSeries::new(
                lines.iter().map(|m| (m.step as f64, m.loss)),
                &BLUE,
            ))?
            .label("train")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLUE));
        chart
            .draw_series(lines.iter().filter_map(|m| {
                m.eval_loss
                    .map(|e| Circle::new((m.step as f64, e), 4, RED.filled()))
            }))?
            .label("held-out")
            .legend(|(x, y)| Circle::new((x + 9, y), 4, RED.filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE)
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()?;
        Ok(())
    })
}
