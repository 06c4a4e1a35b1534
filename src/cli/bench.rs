//! `medphi bench`: load time, prefill and decode speed, peak memory; optionally the same
//! decode loop on candle-transformers' `phi` model over the same checkpoint, interleaved
//! in the same process so the ratio is fair.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use medphi::backend::{Backend, BoxFuture, Next, Want};
use medphi::bench::{decode_speed, Speed};
use medphi::candidates::argmax;
use medphi::generate::SAMPLING_CANDIDATES;
use medphi::model::PhiConfig;
use medphi::weights::Safetensors;

use super::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length in tokens (prefill).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens to decode after the prompt.
    #[arg(long, default_value_t = 64)]
    gen: usize,
    /// Measurement rounds; the median is reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Also run candle-transformers' phi model on the same (safetensors) checkpoint.
    #[arg(long)]
    compare_candle: bool,
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let json = std::fs::read_to_string(&index).with_context(|| {
        format!(
            "--compare-candle needs a safetensors model folder; {}",
            index.display()
        )
    })?;
    Ok(
        Safetensors::shard_names(&json, &index.display().to_string())?
            .into_iter()
            .map(|n| dir.join(n))
            .collect(),
    )
}

/// candle-transformers' `phi` behind the `Backend` interface, so the same measurement times
/// it: it decodes greedily and keeps its own KV cache.
struct CandleReference {
    model: candle_transformers::models::phi::Model,
    cfg: PhiConfig,
    cached: usize,
}

impl CandleReference {
    /// The same weights as ours: the model folder's safetensors, or the bundled model's
    /// (`dir` None).
    fn load(dir: Option<&Path>, cfg: &PhiConfig) -> Result<Self> {
        use candle_transformers::models::phi;
        let config: phi::Config = serde_json::from_value(cfg.to_hf_json())?;
        let vb = match dir {
            Some(dir) => {
                let files = safetensors_files(dir)?;
                // SAFETY: read-only map of files we just validated through our own loader.
                unsafe {
                    candle_nn::VarBuilder::from_mmaped_safetensors(
                        &files,
                        DType::F32,
                        &Device::Cpu,
                    )?
                }
            }
            None => candle_nn::VarBuilder::from_buffered_safetensors(
                super::bundled::WEIGHTS.to_vec(),
                DType::F32,
                &Device::Cpu,
            )?,
        };
        Ok(Self {
            model: phi::Model::new(&config, vb)?,
            cfg: cfg.clone(),
            cached: 0,
        })
    }
}

impl Backend for CandleReference {
    fn name(&self) -> String {
        "candle-transformers phi".into()
    }
    fn config(&self) -> &PhiConfig {
        &self.cfg
    }
    fn capacity(&self) -> usize {
        self.cfg.max_position_embeddings
    }
    fn cached(&self) -> usize {
        self.cached
    }
    /// Only a full reset: candle-transformers' cache cannot be cut back part-way.
    fn truncate(&mut self, _len: usize) {
        self.model.clear_kv_cache();
        self.cached = 0;
    }
    fn forward<'a>(
        &'a mut self,
        tokens: &'a [u32],
        want: Want,
    ) -> BoxFuture<'a, medphi::Result<Next>> {
        Box::pin(async move {
            let Want::Greedy { vocab_limit } = want else {
                return Err(medphi::Error::input(
                    "the candle reference only decodes greedily",
                ));
            };
            let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
            let logits = self.model.forward(&input)?.squeeze(0)?.to_vec1::<f32>()?;
            self.cached += tokens.len();
            Ok(Next::Token(argmax(
                &logits[..vocab_limit.min(logits.len())],
            )))
        })
    }
    fn last_row(&mut self) -> BoxFuture<'_, medphi::Result<Vec<f32>>> {
        Box::pin(async { Err(medphi::Error::input("the candle reference keeps no rows")) })
    }
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.prompt_len == 0 || args.rounds == 0 {
        bail!("--prompt-len and --rounds must be at least 1");
    }
    let t = Instant::now();
    let super::Loaded {
        mut backend,
        tokenizer,
        format,
        kernels,
    } = args.model.load()?;
    let load_s = t.elapsed().as_secs_f64();
    if args.prompt_len + args.gen > backend.capacity() {
        bail!(
            "--prompt-len {} + --gen {} exceeds the context of {} tokens",
            args.prompt_len,
            args.gen,
            backend.capacity()
        );
    }
    let ids = medphi::bench::prompt_ids(&tokenizer, args.prompt_len)?;
    let vocab = tokenizer.vocab_limit().min(backend.config().vocab_size);
    let (ours, theirs) = greedy_rounds(&args, backend.as_mut(), &ids, vocab)?;
    let greedy_stats = backend.device_stats();
    let sampling = sampling_routes(backend.as_mut(), &ids, args.gen, vocab)?;
    let mut out = serde_json::json!({
        "model": args.model.source(),
        "format": format,
        "backend": backend.name(),
        "kernels": kernels,
        "bytes_per_token": ours.bytes_per_token,
        "effective_gb_s": ours.effective_gb_s,
        "load_s": load_s,
        "prompt_len": args.prompt_len,
        "gen": args.gen,
        "rounds": args.rounds,
        "prefill_tok_s": ours.prefill_tok_s,
        "decode_tok_s": ours.decode_tok_s,
        "peak_rss_mib": peak_rss_mib(),
        "device_per_decode_token": greedy_stats,
        "sampling_decode": sampling,
    });
    if let Some(theirs) = theirs {
        out["candle_transformers_phi"] = serde_json::json!({
            "prefill_tok_s": theirs.prefill_tok_s,
            "decode_tok_s": theirs.decode_tok_s,
        });
        out["decode_speedup_vs_candle"] =
            serde_json::json!(ours.decode_tok_s / theirs.decode_tok_s);
        out["prefill_speedup_vs_candle"] =
            serde_json::json!(ours.prefill_tok_s / theirs.prefill_tok_s);
    }
    if args.json {
        super::print_line(out)?;
    } else {
        super::print_line(serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

/// Median speeds of greedy decoding over `--rounds`, ours and (with --compare-candle)
/// candle-transformers' on the same weights, taking turns.
fn greedy_rounds(
    args: &BenchArgs,
    backend: &mut dyn Backend,
    ids: &[u32],
    vocab: usize,
) -> Result<(Speed, Option<Speed>)> {
    let mut reference = if args.compare_candle {
        Some(CandleReference::load(args.model.path(), backend.config())?)
    } else {
        None
    };
    let pb = ProgressBar::new(args.rounds as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} round {pos}/{len} {msg}").expect("static template"),
    );
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let greedy = Want::Greedy { vocab_limit: vocab };
    let measure = |b: &mut dyn Backend| pollster::block_on(decode_speed(b, ids, args.gen, greedy));
    for round in 0..args.rounds {
        // Alternate which implementation goes first, so warm caches favour neither.
        for turn in [round % 2, 1 - round % 2] {
            match (turn, reference.as_mut()) {
                (0, _) => ours.push(measure(&mut *backend)?),
                (_, Some(candle)) => theirs.push(measure(candle)?),
                (_, None) => {}
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    // The median of each rate; the bytes moved by a token do not change between rounds.
    let summarize = |v: &[Speed]| {
        let decode_tok_s = median(v.iter().map(|s| s.decode_tok_s).collect());
        let bytes_per_token = v.last().and_then(|s| s.bytes_per_token);
        Speed {
            prefill_tok_s: median(v.iter().map(|s| s.prefill_tok_s).collect()),
            decode_tok_s,
            bytes_per_token,
            effective_gb_s: bytes_per_token.map(|b| b as f64 * decode_tok_s / 1e9),
        }
    };
    Ok((
        summarize(&ours),
        (!theirs.is_empty()).then(|| summarize(&theirs)),
    ))
}

/// Sampling's decoding loop two ways: the top candidates selected where the logits are, or
/// the whole row brought to the host (what sampling costs without device selection).
fn sampling_routes(
    backend: &mut dyn Backend,
    ids: &[u32],
    gen: usize,
    vocab: usize,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut sampling = serde_json::Map::new();
    let candidates = Want::Candidates {
        k: SAMPLING_CANDIDATES,
        vocab_limit: vocab,
        temperature: 1.0,
    };
    for (route, want) in [("candidates", candidates), ("rows", Want::LastRow)] {
        let speed = pollster::block_on(decode_speed(backend, ids, gen, want))?;
        sampling.insert(
            route.into(),
            serde_json::json!({
                "decode_tok_s": speed.decode_tok_s,
                "bytes_read_per_token": backend.device_stats().map(|d| d.bytes_read),
            }),
        );
    }
    Ok(sampling)
}
