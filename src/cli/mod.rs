//! Argument parsing and the shared plumbing of the subcommands: opening a model with a
//! spinner, building a backend, and turning every error into one line and exit code 1.

mod bench;
mod bundled;
mod chart;
mod chat;
mod data;
mod eval;
mod eval_report;
mod export;
mod generate;
mod gpu_info;
mod info;
pub mod memory;
pub mod threads;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use medphi::backend::{Backend, CpuBackend};
use medphi::cancel::Cancel;
use medphi::checkpoint::Checkpoint;
use medphi::generate::SamplingParams;
use medphi::gpu::{GpuBackend, KernelChoice, KernelFamily};
use medphi::tokenizer::PhiTokenizer;
use medphi::weights::{Adapter, Quantization};

#[derive(Parser)]
#[command(
    name = "medphi",
    version,
    about = "Phi-2-family medical language models: chat, generate, inspect, benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Print the logits at every position of a token sequence (JSON).
    Logits(generate::LogitsArgs),
    /// Interactive chat with streaming output and conversation history.
    Chat(chat::ChatArgs),
    /// Describe a model: architecture, parameter count, dtypes, size on disk.
    Info(info::InfoArgs),
    /// Measure load time, prefill and decode speed and peak memory.
    Bench(bench::BenchArgs),
    /// Show the GPU adapter wgpu finds, with its limits and features.
    GpuInfo,
    /// Score benchmark files (MedQA, PubMedQA, MedMCQA, MMLU, MedExQA) like lm-eval.
    Eval(eval::EvalArgs),
    /// Table and bar chart (PNG) comparing eval runs with published scores.
    EvalReport(eval_report::EvalReportArgs),
    /// Train: pretraining (from scratch or a checkpoint), SFT, DPO, LoRA.
    Train(Box<train::TrainArgs>),
    /// Write a model folder as a phi2 GGUF (for llama.cpp and the page).
    ExportGguf(export::ExportArgs),
    /// Training data from medical ontologies.
    #[command(subcommand)]
    Data(data::DataCommand),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum BackendKind {
    /// candle on the CPU.
    Cpu,
    /// The WGSL kernels through wgpu (Vulkan/Metal/DX12; lavapipe without a GPU).
    Wgpu,
}

/// How to find and run a model; shared by every subcommand.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A model folder (config.json, tokenizer.json, safetensors) or a .gguf file. Without it,
    /// the bundled tiny-medphi, which is built into this binary.
    #[arg(long, env = "MEDPHI_MODEL")]
    model: Option<PathBuf>,
    /// tokenizer.json to use instead of the model's own (needed for GGUF files without one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendKind,
    /// Cap the KV cache at this many tokens (default: the model's context length).
    #[arg(long)]
    context: Option<usize>,
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) to merge
    /// into the model's weights as they load.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Convert the weight matrices to GGML q8_0 or q4_0 blocks as they load (f32/f16/bf16
    /// checkpoints; the blocks `export-gguf` writes).
    #[arg(long)]
    quantize: Option<Quantization>,
    /// GPU kernels for --backend wgpu: gpu (built for hardware GPUs), emulator (for CPU
    /// adapters such as lavapipe), or auto (by the adapter's type).
    #[arg(long, env = "MEDPHI_GPU_KERNELS", default_value = "auto")]
    gpu_kernels: KernelChoice,
}

impl ModelArgs {
    /// The model's folder or file, or the bundled model's name, for reports.
    pub fn source(&self) -> String {
        self.model
            .as_ref()
            .map_or_else(|| bundled::NAME.to_string(), |p| p.display().to_string())
    }

    /// The model as lm-eval's `model_args` name it: `pretrained=…`, with `peft=…` for an
    /// adapter.
    pub fn model_args(&self) -> String {
        match &self.adapter {
            Some(dir) => format!("pretrained={},peft={}", self.source(), dir.display()),
            None => format!("pretrained={}", self.source()),
        }
    }

    /// The model folder or file given; `None` for the bundled model.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.model.as_deref()
    }

    /// The checkpoint, with its headers read and checked, and the adapter and conversion
    /// asked for applied as its tensors are read.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let ckpt = match &self.model {
            Some(path) => Checkpoint::open(path, self.tokenizer.as_deref(), DType::F32)?,
            None if self.tokenizer.is_some() => {
                anyhow::bail!("--tokenizer goes with --model (the bundled model has its own)")
            }
            None => bundled::checkpoint()?,
        };
        let adapter = match &self.adapter {
            Some(dir) => Some(Adapter::open(dir, &ckpt.config)?),
            None => None,
        };
        Ok(ckpt.convert_on_load(adapter, self.quantize))
    }

    /// Opens the checkpoint, checks it and builds the backend, with a spinner meanwhile.
    pub fn load(&self) -> Result<Loaded> {
        let spinner = spinner(&format!("loading {}", self.source()));
        let ckpt = self.checkpoint()?;
        let format = ckpt.format;
        let loaded = match self.backend {
            BackendKind::Cpu => {
                let (model, tokenizer) = ckpt.into_model(true)?;
                Loaded {
                    backend: Box::new(CpuBackend::new(model, self.context)?),
                    tokenizer,
                    format,
                    kernels: None,
                }
            }
            BackendKind::Wgpu => {
                let gpu = pollster::block_on(GpuBackend::load(
                    &ckpt.config,
                    ckpt.weights.as_ref(),
                    self.context,
                    self.gpu_kernels,
                ))?;
                Loaded {
                    kernels: Some(gpu.kernel_family()),
                    backend: Box::new(gpu),
                    tokenizer: ckpt.tokenizer,
                    format,
                }
            }
        };
        spinner.finish_and_clear();
        memory::release_freed_memory();
        Ok(loaded)
    }
}

/// A model ready to run.
pub struct Loaded {
    pub backend: Box<dyn Backend>,
    pub tokenizer: PhiTokenizer,
    /// "safetensors" or "gguf".
    pub format: &'static str,
    /// The GPU kernel family, on `--backend wgpu`.
    pub kernels: Option<KernelFamily>,
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        }
    }
}

/// Prints a line to stdout; a closed pipe (`medphi … | head`) is not an error.
pub fn print_line(line: impl std::fmt::Display) -> Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// A spinner on stderr, hidden when stderr is not a terminal.
pub fn spinner(msg: &str) -> ProgressBar {
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("static template"),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

/// Work stopped by Ctrl-C after saving what it had; the message says how to continue.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted: {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

/// The flag Ctrl-C raises. The first Ctrl-C asks the running work to stop at its next safe
/// point (a token, an item, a training step) and keep what it has; a second one quits at once.
pub fn interrupt() -> Cancel {
    static FLAG: std::sync::OnceLock<Cancel> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Cancel::new();
        let raised = flag.clone();
        let installed = ctrlc::set_handler(move || {
            if raised.is_cancelled() {
                std::process::exit(130);
            }
            raised.cancel();
            eprintln!("\nstopping at the next safe point (Ctrl-C again quits at once)");
        });
        if let Err(e) = installed {
            eprintln!("warning: Ctrl-C will not stop cleanly: {e}");
        }
        flag
    })
    .clone()
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::generate(a),
        Command::Logits(a) => generate::logits(a),
        Command::Chat(a) => chat::chat(a),
        Command::Info(a) => info::info(a),
        Command::Bench(a) => bench::bench(a),
        Command::Eval(a) => eval::eval(a),
        Command::GpuInfo => gpu_info::gpu_info(),
        Command::EvalReport(a) => eval_report::eval_report(a),
        Command::Data(c) => data::data(c),
        Command::Train(a) => {
            threads::train_on_rayon_alone();
            train::train(*a)
        }
        Command::ExportGguf(a) => export::export_gguf(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Interrupted>() => {
            eprintln!("{e}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
