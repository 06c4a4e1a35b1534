"""Loads a medphi model folder with Hugging Face transformers and compares it with medphi.

    pip install torch transformers peft
    python scripts/check-transformers-parity.py MODEL_DIR ["prompt"] [--adapter ADAPTER_DIR]

Checks that transformers' tokenizer (PreTrainedTokenizerFast on the folder's tokenizer.json)
gives the ids medphi gives, and that `PhiForCausalLM.from_pretrained` computes the logits
`medphi logits` computes at every position; prints the largest difference as JSON. With
`--adapter`, a PEFT LoRA adapter folder (one the page's fine-tune downloads, or `medphi train
--lora-rank` writes) is loaded onto the model by `peft` and given to medphi as `--adapter`. The medphi
binary is $MEDPHI, or the release build under $CARGO_TARGET_DIR (default
~/.cache/medphi-target).
"""

import argparse
import json
import os
import subprocess
import sys

import torch
from transformers import PhiForCausalLM, PreTrainedTokenizerFast


def main():
    args = argparse.ArgumentParser()
    args.add_argument("model_dir")
    args.add_argument("prompt", nargs="?", default="Instruct: What is macrocephaly?\nOutput:")
    args.add_argument("--adapter")
    args = args.parse_args()
    model_dir, prompt = args.model_dir, args.prompt
    adapter = ["--adapter", args.adapter] if args.adapter else []
    target = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/medphi-target"))
    medphi = os.environ.get("MEDPHI", os.path.join(target, "release", "medphi"))

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"))
    ids = tok(prompt)["input_ids"]
    gen = json.loads(subprocess.run(
        [medphi, "generate", "--model", model_dir, "--prompt", prompt,
         "--max-new-tokens", "1", "--json", *adapter],
        check=True, capture_output=True, text=True).stdout)
    if gen["input_ids"] != ids:
        sys.exit(f"tokenizers differ: transformers {ids}, medphi {gen['input_ids']}")

    ours = json.loads(subprocess.run(
        [medphi, "logits", "--model", model_dir, "--tokens", ",".join(map(str, ids)), *adapter],
        check=True, capture_output=True, text=True).stdout)
    model = PhiForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    diff = (torch.tensor(ours["logits"]) - theirs).abs().max().item()
    print(json.dumps({"model": model_dir, "adapter": args.adapter, "tokens": len(ids),
                      "max_abs_logit_diff": diff}))
    if diff > 1e-4:
        sys.exit(f"logits differ by {diff}")


if __name__ == "__main__":
    main()
