#!/usr/bin/env python3
"""How often a model's greedy answer to `Instruct: What is X?` is on topic, for HPO terms.

Usage: scripts/definitions-on-topic.py MODEL_DIR DATA_DIR [N]

DATA_DIR is `medphi data build`'s output. Three samples of N terms (default 100, seed 0): the
most-used terms of core_terms.jsonl (less its last 1/50, other terms' pairs that the trainer
holds out), the other training terms, and held-out terms (their definitions come from the
definition → term questions of medqa_test.jsonl). An answer is on topic when it shares a
content word (4+ letters, not a stopword, not a word of the term's own name) with the term's
HPO definition; it is exact when it is the definition. A crude check, meant to compare models.
The medphi binary is $MEDPHI, else the release build under $CARGO_TARGET_DIR.
"""
import json
import os
import random
import re
import subprocess
import sys

STOP = set(
    "with that this which from than have been their there other more less into also such when "
    "where what form type kind abnormal abnormality presence increased decreased reduced".split()
)
PROMPT = re.compile(r"Instruct: What is (.*)\?\nOutput:$")


def words(text):
    return {w for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in STOP}


def definitions(path, held_out_tail=False):
    with open(path) as f:
        lines = f.read().splitlines()
    if held_out_tail:
        lines = lines[: len(lines) - max(len(lines) // 50, 1)]
    out = {}
    for line in lines:
        pair = json.loads(line)
        m = PROMPT.match(pair["prompt"])
        if m:
            out[m.group(1)] = pair["response"].strip()
    return out


def main():
    model, data = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    target = os.environ.get("CARGO_TARGET_DIR", "target")
    medphi = os.environ.get("MEDPHI", os.path.join(target, "release", "medphi"))
    core = definitions(os.path.join(data, "core_terms.jsonl"), held_out_tail=True)
    training = definitions(os.path.join(data, "terms.jsonl"))
    held_out = {}
    with open(os.path.join(data, "medqa_test.jsonl")) as f:
        for line in f:
            q = json.loads(line)
            if q["meta_info"] == "hpo-definition":
                held_out[q["answer"].lower()] = q["question"].split("definition: ", 1)[1]
    samples = {
        "most-used": core,
        "other training": {t: d for t, d in training.items() if t not in core},
        "held-out": held_out,
    }
    rng = random.Random(0)
    for name, defs in samples.items():
        terms = rng.sample(sorted(defs), min(n, len(defs)))
        on_topic = exact = 0
        for term in terms:
            run = subprocess.run(
                [medphi, "generate", "--model", model, "--max-new-tokens", "64", "--json",
                 "--prompt", f"Instruct: What is {term}?\nOutput:"],
                capture_output=True, text=True, check=True,
            )
            answer = json.loads(run.stdout)["text"].strip()
            on_topic += bool(words(answer) & words(defs[term]) - words(term))
            exact += answer == defs[term]
        print(f"{name:15} on topic {on_topic}/{len(terms)}  exact {exact}/{len(terms)}", flush=True)


if __name__ == "__main__":
    main()
