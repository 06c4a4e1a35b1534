//! ICD-10-CM's tabular list (the XML shipped inside the `simple-icd-10-cm` PyPI package):
//! every `<diag>` code with its description, nested categories included.

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Code {
    pub code: String,
    pub desc: String,
}

/// Parses the tabular XML. `<diag>` elements nest (category → subcategory → code); each
/// gives one `Code` from its own `<name>` and `<desc>` children.
pub fn parse_tabular(xml: &str, file: &str) -> Result<Vec<Code>> {
    let mut reader = Reader::from_str(xml);
    // Open elements, and for each open <diag> its (name, desc) so far.
    let mut path: Vec<String> = Vec::new();
    let mut diags: Vec<(String, String)> = Vec::new();
    let mut codes = Vec::new();
    let err = |reader: &Reader<&[u8]>, e: String| {
        Error::file(
            file,
            format!("XML error at byte {}: {e}", reader.buffer_position()),
        )
    };
    loop {
        let event = reader
            .read_event()
            .map_err(|e| err(&reader, e.to_string()))?;
        match event {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_string();
                if name == "diag" {
                    diags.push(Default::default());
                }
                path.push(name);
            }
            Event::End(_) if path.last().map(String::as_str) == Some("diag") => {
                path.pop();
                let (code, desc) = diags.pop().unwrap_or_default();
                if code.is_empty() || desc.is_empty() {
                    return Err(err(&reader, "a <diag> without <name> or <desc>".into()));
                }
                codes.push(Code {
                    code: code.trim().to_string(),
                    desc: desc.trim().to_string(),
                });
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t) => append(&path, &mut diags, &t.xml10_content()),
            Event::GeneralRef(r) => {
                let text = match r.as_ref() {
                    "amp" => "&",
                    "lt" => "<",
                    "gt" => ">",
                    "quot" => "\"",
                    "apos" => "'",
                    _ => "",
                };
                append(&path, &mut diags, text);
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !path.is_empty() {
        return Err(err(&reader, format!("unclosed <{}>", path.join("><"))));
    }
    if codes.is_empty() {
        return Err(Error::file(file, "no <diag> codes"));
    }
    Ok(codes)
}

/// Adds text to the innermost diag's name or description when it is directly inside them.
fn append(path: &[String], diags: &mut [(String, String)], text: &str) {
    let n = path.len();
    if n < 2 || path[n - 2] != "diag" {
        return;
    }
    if let Some((code, desc)) = diags.last_mut() {
        match path[n - 1].as_str() {
            "name" => code.push_str(text),
            "desc" => desc.push_str(text),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nested_codes_and_entities() {
        let xml = r#"<?xml version="1.0"?><ICD10CM.tabular><chapter><name>4</name>
            <section id="E08-E13"><diag><name>E11</name><desc>Type 2 diabetes mellitus</desc>
            <inclusionTerm><note>diabetes NOS</note></inclusionTerm>
            <diag><name>E11.9</name><desc>Type 2 diabetes mellitus without complications</desc>
            <excludes1><note>in remission (E11.A)</note></excludes1></diag></diag>
            <diag><name>E16.A1</name><desc>Hypoglycemia level 1 &amp; more</desc></diag>
            </section></chapter></ICD10CM.tabular>"#;
        let codes = parse_tabular(xml, "t.xml").unwrap();
        let pairs: Vec<(&str, &str)> = codes
            .iter()
            .map(|c| (c.code.as_str(), c.desc.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("E11.9", "Type 2 diabetes mellitus without complications"),
                ("E11", "Type 2 diabetes mellitus"),
                ("E16.A1", "Hypoglycemia level 1 & more"),
            ]
        );
        assert!(parse_tabular("<a><diag><name>X</name></diag></a>", "t.xml").is_err());
        assert!(parse_tabular("<a><diag>", "t.xml").is_err());
    }
}
