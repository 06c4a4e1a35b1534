#!/usr/bin/env python3
"""A checkpoint of Phi-2's exact shape (2.7B parameters, random weights) saved by transformers
as microsoft/phi-2 ships: f16, two safetensors shards with an index, Phi-2's tokenizer. For
measuring load memory, conversion and speed at full size where the real weights cannot be had.

Usage: python scripts/measure/make_phi2_shaped.py OUT_DIR [--hidden N --layers N --dtype f32]
(the options make a narrower or shallower Phi of Phi-2's vocabulary and head size, e.g. `--hidden 1280
--layers 14 --dtype f32` for a 1.6 GB f32 checkpoint).
Needs: pip install torch transformers safetensors.
"""
import argparse
import os
import shutil

import torch
from transformers import PhiConfig, PhiForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--hidden", type=int, default=2560)
parser.add_argument("--layers", type=int, default=32)
parser.add_argument("--dtype", choices=["f16", "f32"], default="f16")
args = parser.parse_args()

config = PhiConfig(
    vocab_size=51200,
    hidden_size=args.hidden,
    intermediate_size=4 * args.hidden,
    num_hidden_layers=args.layers,
    num_attention_heads=args.hidden // 80,  # Phi-2's head size
    max_position_embeddings=2048,
    partial_rotary_factor=0.4,
    layer_norm_eps=1e-5,
    hidden_act="gelu_new",
    bos_token_id=50256,
    eos_token_id=50256,
)
torch.manual_seed(0)
torch.set_default_dtype(torch.float16 if args.dtype == "f16" else torch.float32)
model = PhiForCausalLM(config)
model.save_pretrained(args.out, max_shard_size="5GB")
tiny = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "tiny-phi")
shutil.copy(os.path.join(tiny, "tokenizer.json"), os.path.join(args.out, "tokenizer.json"))
print(sorted(os.listdir(args.out)))
