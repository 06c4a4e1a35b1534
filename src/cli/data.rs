//! `medphi data build`: training data from the HPO and ICD-10-CM files that
//! `scripts/fetch-training-data.sh` unpacks.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use medphi::data::{build, hpo, icd10, Sources};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Build corpus.txt, sft.jsonl, dpo.jsonl, medqa_train.jsonl and medqa_test.jsonl.
    Build(BuildArgs),
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
    let DataCommand::Build(args) = cmd;
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
