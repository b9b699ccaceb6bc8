#!/bin/sh
# Trains the same LoRA recipe with cpeft and with the PyTorch reference
# (tools/ref_lora.py train, Debian python3-torch) in one run, and reports
# training throughput and peak resident memory side by side with their
# ratios, since absolute numbers on a shared machine are noisy.
#
# Usage: bench/lora_train.sh [SHARED_DIR] [STEPS]
# Recipe: stories260K, LoRA r 8 / alpha 16 on q,k,v,o, batch 8, seq-len 128,
# lr 3e-3, cosine, on the first 90% of tinyshakespeare.
set -eu
shared=${1:-../shared}
steps=${2:-30}
model="$shared/models/stories260K"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

text="$shared/data/tinyshakespeare/input.txt"
head -c 1003854 "$text" >"$work/train.txt"
head -c 2000 "$text" >"$work/tiny_eval.txt"
threads=${OMP_NUM_THREADS:-$(nproc)}
tokens=$((steps * 8 * 128))

# cpeft: the time of the training steps, summed from metrics.jsonl.
/usr/bin/time -f "%M" -o "$work/cpeft.rss" ./cpeft train --model "$model" \
    --data "$work/train.txt" --eval-split 0 --method lora --r 8 --alpha 16 \
    --target q_proj,k_proj,v_proj,o_proj --steps "$steps" --batch-size 8 --seq-len 128 \
    --lr 3e-3 --out "$work/run" --quiet >/dev/null
cpeft_s=$(awk -F'"tokens_per_s": ' '/tokens_per_s/ { split($2, a, "}"); s += 1024 / a[1] }
    END { printf "%.2f", s }' "$work/run/metrics.jsonl")

# PyTorch: the train_seconds it reports (its evaluation is excluded).
/usr/bin/time -f "%M" -o "$work/torch.rss" /usr/bin/python3 tools/ref_lora.py train \
    --model "$model" --train "$work/train.txt" --eval "$work/tiny_eval.txt" --r 8 --alpha 16 \
    --target q_proj,k_proj,v_proj,o_proj --steps "$steps" --batch-size 8 --seq-len 128 \
    --lr 3e-3 --threads "$threads" --log-every 1000000 >"$work/torch.json" 2>/dev/null
torch_s=$(sed 's/.*"train_seconds": \([0-9.]*\).*/\1/' "$work/torch.json")

cpeft_rss=$(tail -n 1 "$work/cpeft.rss")
torch_rss=$(tail -n 1 "$work/torch.rss")
awk -v t="$tokens" -v cs="$cpeft_s" -v ps="$torch_s" -v cr="$cpeft_rss" -v pr="$torch_rss" \
    -v steps="$steps" -v threads="$threads" 'BEGIN {
    printf "LoRA training, stories260K, %d steps of 8 x 128 tokens, %d threads\n", steps, threads
    printf "%-8s %12s %14s\n", "", "tokens/s", "peak RSS (MB)"
    printf "%-8s %12.0f %14.1f\n", "cpeft", t / cs, cr / 1024
    printf "%-8s %12.0f %14.1f\n", "PyTorch", t / ps, pr / 1024
    printf "ratio: cpeft is %.2fx the throughput at %.2fx the memory\n", (t / cs) / (t / ps), cr / pr
}'
