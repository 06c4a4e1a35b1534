"""Loads a medphi model folder with Hugging Face transformers and compares it with medphi.

    pip install torch transformers
    python scripts/check-transformers-parity.py MODEL_DIR ["prompt"]

Checks that transformers' tokenizer (PreTrainedTokenizerFast on the folder's tokenizer.json)
gives the ids medphi gives, and that `PhiForCausalLM.from_pretrained` computes the logits
`medphi logits` computes at every position; prints the largest difference as JSON. The medphi
binary is $MEDPHI, or the release build under $CARGO_TARGET_DIR (default
~/.cache/medphi-target).
"""

import json
import os
import subprocess
import sys

import torch
from transformers import PhiForCausalLM, PreTrainedTokenizerFast


def main():
    model_dir = sys.argv[1]
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Instruct: What is macrocephaly?\nOutput:"
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/medphi-target"))
    medphi = os.environ.get("MEDPHI", os.path.join(target, "release", "medphi"))

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    ids = tok(prompt)["input_ids"]
    gen = json.loads(subprocess.run(
        [medphi, "generate", "--model", model_dir, "--prompt", prompt,
         "--max-new-tokens", "1", "--json"],
        check=True, capture_output=True, text=True).stdout)
    if gen["input_ids"] != ids:
        sys.exit(f"tokenizers differ: transformers {ids}, medphi {gen['input_ids']}")

    ours = json.loads(subprocess.run(
        [medphi, "logits", "--model", model_dir, "--tokens", ",".join(map(str, ids))],
        check=True, capture_output=True, text=True).stdout)
    model = PhiForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    diff = (torch.tensor(ours["logits"]) - theirs).abs().max().item()
    print(json.dumps({"model": model_dir, "tokens": len(ids), "max_abs_logit_diff": diff}))
    if diff > 1e-4:
        sys.exit(f"logits differ by {diff}")


if __name__ == "__main__":
    main()
