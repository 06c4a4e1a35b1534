#!/usr/bin/env bash
# medphi's CPU path and llama.cpp side by side on one GGUF, alternating round by round so
# both see the same machine (a VM's memory bandwidth drifts by a third within minutes).
#
#   LLAMA_BENCH=/path/to/llama-bench scripts/measure/cpu-vs-llamacpp.sh MODEL.gguf TOKENIZER.json \
#       [PROMPT=64] [GEN=16] [CONTEXT=256] [ROUNDS=3] [THREADS=2]
#
# llama.cpp is not part of the project: build its `llama-bench` yourself (cmake, -DGGML_NATIVE=ON).
# Prints each round, then medians and medphi/llama.cpp ratios. Load time: medphi's own
# (`load_s`: the model ready, before any token) beside the wall time of a one-token llama.cpp
# run; then the like-for-like figure, the wall time of a one-token run of each (process start,
# load, one token: what a user waits for).
set -euo pipefail
model=$1 tokenizer=$2 prompt=${3:-64} gen=${4:-16} context=${5:-256} rounds=${6:-3} threads=${7:-2}
medphi=${MEDPHI_BIN:-target/release/medphi}
: "${LLAMA_BENCH:?set LLAMA_BENCH to the path of llama-bench}"
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  RAYON_NUM_THREADS=$threads /usr/bin/time -f '%M' -o "$out/medphi-rss-$r" "$medphi" bench --model "$model" \
    --tokenizer "$tokenizer" --prompt-len "$prompt" --gen "$gen" --context "$context" --rounds 1 --json \
    > "$out/medphi-$r.json"
  # Decode at the prompt's depth (-d), as medphi's follows its prompt: llama-bench's own tgN starts
  # from an empty cache, 12% faster than after 128 tokens at 407M (attention reads the cache).
  "$LLAMA_BENCH" -m "$model" -p "$prompt" -n 0 -t "$threads" -r 1 -o json 2>/dev/null > "$out/llama-pp-$r.json"
  "$LLAMA_BENCH" -m "$model" -p 0 -n "$gen" -d "$prompt" -t "$threads" -r 1 -o json 2>/dev/null \
    > "$out/llama-tg-$r.json"
  /usr/bin/time -f '%e %M' -o "$out/llama-load-$r" "$LLAMA_BENCH" -m "$model" -p 1 -n 0 -t "$threads" -r 1 \
    > /dev/null 2>&1
  RAYON_NUM_THREADS=$threads /usr/bin/time -f '%e' -o "$out/medphi-first-$r" "$medphi" generate \
    --model "$model" --tokenizer "$tokenizer" --prompt a --prompt-format raw --max-new-tokens 1 \
    --context "$context" > /dev/null 2>&1
done
python3 - "$out" "$rounds" <<'PY'
import json, sys, statistics as st
out, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for r in range(1, rounds + 1):
    m = json.load(open(f"{out}/medphi-{r}.json"))
    l = {what: json.load(open(f"{out}/llama-{test}-{r}.json"))[0]["avg_ts"]
         for what, test in [("prefill", "pp"), ("decode", "tg")]}
    wall, lrss = open(f"{out}/llama-load-{r}").read().split()
    rows.append(dict(
        medphi_prefill=m["prefill_tok_s"], llama_prefill=l["prefill"],
        medphi_decode=m["decode_tok_s"], llama_decode=l["decode"],
        medphi_load_s=m["load_s"], llama_load_s=float(wall),
        medphi_first_token_s=float(open(f"{out}/medphi-first-{r}").read()),
        medphi_rss_mib=int(open(f"{out}/medphi-rss-{r}").read()) / 1024, llama_rss_mib=int(lrss) / 1024,
        medphi_gb_s=m.get("effective_gb_s")))
    print("round", r, {k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()})
med = {k: st.median(x[k] for x in rows) for k in rows[0] if rows[0][k] is not None}
print("medians", {k: round(v, 2) for k, v in med.items()})
for what in ["prefill", "decode"]:
    print(f"{what}: medphi {med['medphi_' + what]:.2f} tok/s, llama.cpp {med['llama_' + what]:.2f} tok/s, "
          f"ratio {med['medphi_' + what] / med['llama_' + what]:.2f}x")
print(f"load: medphi {med['medphi_load_s']:.2f} s, llama.cpp {med['llama_load_s']:.2f} s "
      f"({med['medphi_load_s'] / med['llama_load_s']:.2f}x its time)")
print(f"one-token run, wall: medphi {med['medphi_first_token_s']:.2f} s, llama.cpp {med['llama_load_s']:.2f} s "
      f"({med['medphi_first_token_s'] / med['llama_load_s']:.2f}x its time)")
print(f"peak RSS: medphi {med['medphi_rss_mib']:.0f} MiB, llama.cpp {med['llama_rss_mib']:.0f} MiB")
PY
