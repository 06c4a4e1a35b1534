#!/usr/bin/env bash
# Training tokens/s of medphi and of PyTorch (transformers' PhiForCausalLM, torch.optim.AdamW)
# side by side: the bundled model's configuration, pretraining on the same text with the same
# tokenizer, same batch and sequence length, same thread count, alternating round by round so
# both see the same machine.
#
#   scripts/measure/train-vs-pytorch.sh [STEPS=12] [BATCH=8] [SEQ=256] [ROUNDS=3] [THREADS=2]
#
# Each system's rate is the median over its steps after the first two (warm-up). Prints each
# round, then medians and the medphi/PyTorch ratio.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${1:-12} batch=${2:-8} seq=${3:-256} rounds=${4:-3} threads=${5:-2}
medphi=${MEDPHI_BIN:-${CARGO_TARGET_DIR:-target}/release/medphi}
config=scripts/tiny-medphi-config.json
tokenizer=www/models/tiny-medphi/tokenizer.json
out=$(mktemp -d)
# Any medical text will do; the questions' text is the project's own.
python3 -c "
import json, sys
with open(sys.argv[1], 'w') as f:
    for line in open('www/models/tiny-medphi/medqa_test.jsonl'):
        q = json.loads(line)
        f.write(q['question'] + ' ' + ' '.join(q['options'].values()) + '\n')
" "$out/corpus.txt"

for r in $(seq "$rounds"); do
  RAYON_NUM_THREADS=$threads "$medphi" train --stage pretrain --model-config "$config" \
    --tokenizer "$tokenizer" --data "$out/corpus.txt" --steps "$steps" --batch-size "$batch" \
    --seq-len "$seq" --lr 1e-3 --seed "$r" --device cpu --out "$out/medphi-$r" > /dev/null 2>&1
  python3 - "$config" "$tokenizer" "$out/corpus.txt" "$steps" "$batch" "$seq" "$threads" "$r" \
    > "$out/torch-$r.json" <<'PY'
import json, statistics, sys, time
import torch
from tokenizers import Tokenizer
from transformers import PhiConfig, PhiForCausalLM
config, tokenizer, corpus, steps, batch, seq, threads, seed = sys.argv[1:]
steps, batch, seq, threads = int(steps), int(batch), int(seq), int(threads)
torch.set_num_threads(threads)
torch.manual_seed(int(seed))
model = PhiForCausalLM(PhiConfig.from_pretrained(config)).train()
ids = Tokenizer.from_file(tokenizer).encode(open(corpus).read()).ids
windows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
rates = []
for step in range(steps):
    x = windows[(step * batch + torch.arange(batch)) % len(windows)]
    t0 = time.perf_counter()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    rates.append(batch * seq / (time.perf_counter() - t0))
print(json.dumps({"tokens_per_s": statistics.median(rates[2:])}))
PY
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics as st, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for r in range(1, rounds + 1):
    m = [json.loads(l)["tokens_per_s"] for l in open(f"{out}/medphi-{r}/metrics.jsonl") if '"tokens_per_s"' in l]
    t = json.load(open(f"{out}/torch-{r}.json"))["tokens_per_s"]
    rows.append({"medphi": st.median(m[2:]), "pytorch": t})
    print("round", r, {k: round(v) for k, v in rows[-1].items()})
med = {k: st.median(x[k] for x in rows) for k in rows[0]}
print("medians", {k: round(v) for k, v in med.items()}, "ratio", round(med["medphi"] / med["pytorch"], 2))
PY
