//! The layout rules ARCHITECTURE.md states, checked over the source text: the library's
//! modules depend on each other without a cycle, and every checkpoint tensor name is
//! spelled in exactly one source file (`src/model/names.rs`).
#![cfg(not(target_arch = "wasm32"))] // native only: reads the source tree

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The library's source files (the CLI shell, `src/main.rs` and `src/cli/`, is not part of
/// the library), each with its path below `src/`.
fn library_files() -> Vec<(String, String)> {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, std::fs::read_to_string(&p).unwrap())
        })
        .filter(|(rel, _)| rel != "main.rs" && !rel.starts_with("cli/"))
        .collect()
}

/// The top-level module a file belongs to (`model` for `model/phi.rs`).
fn top_module(rel: &str) -> String {
    rel.split('/')
        .next()
        .unwrap()
        .trim_end_matches(".rs")
        .to_string()
}

/// Top-level module → the top-level modules its files name through `crate::`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in library_files() {
        let from = top_module(&rel);
        if from == "lib" {
            continue;
        }
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // `crate::Error`/`crate::Result` are lib.rs's re-exports of `error`.
            let to = match name.as_str() {
                "Error" | "Result" => "error".to_string(),
                _ => name,
            };
            if to != from && !to.is_empty() {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    graph
}

/// A cycle through `node`, if there is one reachable from it.
fn find_cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(at) = path.iter().position(|n| n == node) {
        let mut cycle = path[at..].to_vec();
        cycle.push(node.to_string());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_string());
    for next in graph.get(node).into_iter().flatten() {
        if let Some(cycle) = find_cycle(graph, next, path, done) {
            return Some(cycle);
        }
    }
    path.pop();
    done.insert(node.to_string());
    None
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = module_graph();
    // The graph is read, not empty: the backend reaches the model, generation the backend.
    assert!(graph["backend"].contains("model"), "{graph:?}");
    assert!(graph["generate"].contains("backend"), "{graph:?}");
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = find_cycle(&graph, node, &mut Vec::new(), &mut done) {
            panic!("module cycle: {}", cycle.join(" → "));
        }
    }
}

/// The string literals of a Rust source (enough of Rust's syntax for this tree: plain
/// strings with escapes; char literals and lifetimes are skipped).
fn string_literals(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'/' if bytes.get(i + 1) == Some(&b'/') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'\'' if bytes.get(i + 2) == Some(&b'\'') => i += 3,
            b'\'' if bytes.get(i + 1) == Some(&b'\\') => i += 4,
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                out.push(&text[start..i.min(text.len())]);
            }
            _ => {}
        }
        i += 1;
    }
    out
}

#[test]
fn every_checkpoint_tensor_name_is_spelled_in_one_file() {
    // The pieces each layout's names are made of: transformers' module paths, phi-msft's,
    // llama.cpp's phi2 names, PEFT's adapter prefix.
    let pieces = [
        "embed_tokens",
        "final_layernorm",
        "lm_head",
        "input_layernorm",
        "q_proj",
        "k_proj",
        "v_proj",
        "self_attn",
        "mlp.fc",
        "embd.wte",
        "mixer.",
        "Wqkv",
        "lm_head.ln",
        "transformer.h",
        "token_embd",
        "output_norm",
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_up",
        "ffn_down",
        "blk.",
        ".lora_",
        "base_model.model",
    ];
    let mut found: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (rel, text) in library_files() {
        for literal in string_literals(&text) {
            for piece in pieces {
                if literal.contains(piece) {
                    found.entry(piece).or_default().insert(rel.clone());
                }
            }
        }
    }
    for piece in pieces {
        let files = found.get(piece).cloned().unwrap_or_default();
        assert_eq!(
            files.into_iter().collect::<Vec<_>>(),
            ["model/names.rs"],
            "{piece:?} is spelled outside the name table"
        );
    }
}
