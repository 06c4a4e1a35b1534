//! `medphi data build`: training data from the HPO and ICD-10-CM files that
//! `scripts/fetch-training-data.sh` unpacks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use medphi::data::{build, hpo, icd10, Sources};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Build corpus.txt, sft.jsonl, dpo.jsonl, medqa_train.jsonl, medqa_test.jsonl, terms.jsonl,
    /// term_drill.jsonl and core_terms.jsonl.
    Build(BuildArgs),
    /// Train a byte-level BPE tokenizer.json (Phi-2's format) on text and JSON-lines files.
    Tokenizer(TokenizerArgs),
    /// The page's workshop set from held-out test questions: sft.jsonl (two pairs per taught
    /// term), quiz.jsonl (the taught terms' questions) and control.jsonl (other held-out terms).
    Workshop(WorkshopArgs),
}

#[derive(Args)]
pub struct WorkshopArgs {
    /// medqa_test.jsonl of `medphi data build`.
    #[arg(long)]
    questions: PathBuf,
    /// Terms taught (and as many in the control quiz).
    #[arg(long, default_value_t = 100)]
    terms: usize,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct TokenizerArgs {
    /// Plain-text files (paragraphs separated by blank lines) or .jsonl files (every string
    /// value of every record is used).
    #[arg(long = "text", required = true)]
    texts: Vec<PathBuf>,
    #[arg(long, default_value_t = 4096)]
    vocab_size: usize,
    /// Where to write tokenizer.json.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct BuildArgs {
    /// Folder with hp.obo, phenotype.hpoa and icd10cm-tabular.xml (from
    /// scripts/fetch-training-data.sh).
    #[arg(long)]
    raw: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn read(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))
}

pub fn data(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Build(args) => build_data(args),
        DataCommand::Tokenizer(args) => tokenizer(args),
        DataCommand::Workshop(args) => workshop(args),
    }
}

fn workshop(args: WorkshopArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.questions)
        .with_context(|| format!("{}", args.questions.display()))?;
    let set = medphi::data::workshop(&text, &args.questions.display().to_string(), args.terms)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    for (name, text) in [
        ("sft.jsonl", &set.sft),
        ("quiz.jsonl", &set.quiz),
        ("control.jsonl", &set.control),
    ] {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("{}", path.display()))?;
    }
    super::print_line(format!("wrote {}", args.out.display()))
}

fn tokenizer(args: TokenizerArgs) -> Result<()> {
    let spinner = super::spinner("reading text");
    let mut texts = Vec::new();
    for path in &args.texts {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        if path.extension().is_some_and(|e| e == "jsonl") {
            for (n, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let record: serde_json::Value = serde_json::from_str(line)
                    .with_context(|| format!("{} line {}", path.display(), n + 1))?;
                let strings = record.as_object().into_iter().flat_map(|o| o.values());
                texts.extend(strings.filter_map(|v| v.as_str().map(str::to_owned)));
            }
        } else {
            texts.extend(text.split("\n\n").map(str::to_owned));
        }
    }
    spinner.set_message(format!("training on {} texts", texts.len()));
    let json = medphi::data::bpe::train(texts.iter().map(String::as_str), args.vocab_size)?;
    std::fs::write(&args.out, json).with_context(|| format!("{}", args.out.display()))?;
    spinner.finish_and_clear();
    super::print_line(format!("wrote {}", args.out.display()))
}

fn build_data(args: BuildArgs) -> Result<()> {
    let spinner = super::spinner("parsing HPO and ICD-10-CM");
    let sources = Sources {
        terms: hpo::parse_obo(&read(&args.raw, "hp.obo")?, "hp.obo")?,
        diseases: hpo::parse_hpoa(&read(&args.raw, "phenotype.hpoa")?, "phenotype.hpoa")?,
        codes: icd10::parse_tabular(
            &read(&args.raw, "icd10cm-tabular.xml")?,
            "icd10cm-tabular.xml",
        )?,
    };
    spinner.set_message("building");
    let set = build(&sources, args.seed)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}", args.out.display()))?;
    for (name, text) in [
        ("corpus.txt", &set.corpus),
        ("sft.jsonl", &set.sft),
        ("dpo.jsonl", &set.dpo),
        ("medqa_train.jsonl", &set.mcq_train),
        ("medqa_test.jsonl", &set.mcq_test),
        ("terms.jsonl", &set.terms),
        ("term_drill.jsonl", &set.term_drill),
        ("core_terms.jsonl", &set.core_terms),
    ] {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("{}", path.display()))?;
    }
    let sources_md = args.raw.join("SOURCES.md");
    if sources_md.is_file() {
        std::fs::copy(&sources_md, args.out.join("SOURCES.md"))?;
    }
    spinner.finish_and_clear();
    super::print_line(serde_json::to_string_pretty(&set.counts)?)
}
