#!/usr/bin/env bash
# Rebuilds models/tiny-medphi from scratch, as its model card describes: fetch the ontology
# data, build the training sets, train the tokenizer, pretrain, instruction-tune, one pass over
# the term <-> definition pairs both ways, drill and polish the most-used terms, evaluate on the
# held-out questions. About an hour of training on 2 CPU cores, then about 7 minutes of
# evaluation. Work goes to WORK (default target/tiny-medphi); the model is copied to OUT
# (default models/tiny-medphi) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-target/tiny-medphi}"
OUT="${2:-models/tiny-medphi}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/medphi-target}"
cargo build --locked --release --bin medphi
medphi() { "$CARGO_TARGET_DIR/release/medphi" "$@"; }

mkdir -p "$WORK"
scripts/fetch-training-data.sh "$WORK/raw"
medphi data build --raw "$WORK/raw" --out "$WORK/data" --seed 1
medphi data tokenizer --text "$WORK/data/corpus.txt" --text "$WORK/data/sft.jsonl" \
  --vocab-size 4096 --out "$WORK/tokenizer.json"
cp scripts/tiny-medphi-config.json "$WORK/config.json"

medphi train --stage pretrain --model-config "$WORK/config.json" --tokenizer "$WORK/tokenizer.json" \
  --data "$WORK/data/corpus.txt" --steps 1000 --batch-size 8 --seq-len 256 --lr 2e-3 --warmup 50 \
  --seed 1 --device cpu --out "$WORK/pretrain" --eval-every 100 --save-every 200
medphi train --stage sft --init-from "$WORK/pretrain" --data "$WORK/data/sft.jsonl" \
  --steps 300 --batch-size 16 --seq-len 256 --lr 1e-3 --seed 1 --device cpu \
  --out "$WORK/sft" --eval-every 100 --save-every 100
# One pass over the term <-> definition pairs.
medphi train --stage sft --init-from "$WORK/sft" --data "$WORK/data/terms.jsonl" \
  --steps 1850 --batch-size 16 --seq-len 256 --lr 1e-3 --warmup 50 --seed 1 --device cpu \
  --group-by-length --out "$WORK/terms" --eval-every 200 --save-every 300
# The most-used terms' pairs (and a fifth of the others'), about 3 epochs.
medphi train --stage sft --init-from "$WORK/terms" --data "$WORK/data/term_drill.jsonl" \
  --steps 1600 --batch-size 16 --seq-len 256 --lr 1e-3 --warmup 50 --seed 4 --device cpu \
  --group-by-length --out "$WORK/drill" --eval-every 200 --save-every 400
# A polish on the most-used terms' pairs alone, about 4 epochs.
medphi train --stage sft --init-from "$WORK/drill" --data "$WORK/data/core_terms.jsonl" \
  --steps 800 --batch-size 16 --seq-len 256 --lr 1e-3 --warmup 20 --seed 5 --device cpu \
  --group-by-length --out "$WORK/polish" --eval-every 100 --save-every 200

medphi eval --model "$WORK/polish" --task medqa_4options --data "$WORK/data/medqa_test.jsonl" \
  --task medqa_4options_continuation --data "$WORK/data/medqa_test.jsonl" --output "$WORK/eval"
MEDPHI="$CARGO_TARGET_DIR/release/medphi" scripts/definitions-on-topic.py "$WORK/polish" "$WORK/data"
mkdir -p "$OUT"
cp "$WORK"/polish/{config.json,tokenizer.json,model.safetensors} "$OUT/"
for stage in pretrain sft terms drill polish; do
  cp "$WORK/$stage/metrics.jsonl" "$OUT/$stage-metrics.jsonl"
  cp "$WORK/$stage/loss.png" "$OUT/$stage-loss.png"
done
cp "$WORK/data/medqa_test.jsonl" "$WORK/data/SOURCES.md" "$OUT/"
cp "$WORK/eval/results.json" "$OUT/eval_results.json"
