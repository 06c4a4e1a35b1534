#!/usr/bin/env python3
"""A checkpoint of Phi-2's exact shape (2.7B parameters, random weights) saved by transformers
as microsoft/phi-2 ships: f16, two safetensors shards with an index, Phi-2's tokenizer. For
measuring load memory, conversion and speed at full size where the real weights cannot be had.

Usage: python scripts/measure/make_phi2_shaped.py OUT_DIR
Needs: pip install torch transformers safetensors.
"""
import argparse
import os
import shutil

import torch
from transformers import PhiConfig, PhiForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("out")
args = parser.parse_args()

config = PhiConfig(
    vocab_size=51200,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=2048,
    partial_rotary_factor=0.4,
    layer_norm_eps=1e-5,
    hidden_act="gelu_new",
    bos_token_id=50256,
    eos_token_id=50256,
)
torch.manual_seed(0)
torch.set_default_dtype(torch.float16)
model = PhiForCausalLM(config)
model.save_pretrained(args.out, max_shard_size="5GB")
tiny = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "tiny-phi")
shutil.copy(os.path.join(tiny, "tokenizer.json"), os.path.join(args.out, "tokenizer.json"))
print(sorted(os.listdir(args.out)))
