#!/bin/sh
# make demo: fine-tune stories260K, a small Llama pretrained on children's
# stories, with LoRA on text unlike its pretraining, and show the eval loss
# and a sample before and after. Leaves the run folder in runs/demo.
# Usage: tools/demo.sh SHARED_DIR
set -eu
shared=${1:-../shared}
work=build/demo
mkdir -p "$work" runs

# The model: from the shared folder, else downloaded and converted once.
model="$shared/models/stories260K"
if [ ! -f "$model/config.json" ]; then
    model=models/stories260K
    sh tools/fetch-stories260K.sh "$model"
fi

# The text: tinyshakespeare when present, else the King James Bible's first
# books from Debian's bible-kjv package (public domain).
text="$shared/data/tinyshakespeare/input.txt"
prompt="ROMEO:"
if [ ! -f "$text" ]; then
    sh tools/ensure-deps.sh bible-kjv
    text="$work/kjv.txt"
    bible gen1:1-50:26 exo1:1-40:38 lev1:1-27:34 >"$text" 2>/dev/null
    prompt="And God said"
fi

# First 90% of the bytes for training, a held-out 30 KB from the rest.
size=$(wc -c <"$text")
head -c $((size * 9 / 10)) "$text" >"$work/train.txt"
tail -c $((size - size * 9 / 10)) "$text" | tail -c 30000 >"$work/eval.txt"

sample() {
    ./cpeft generate --model "$model" "$@" --prompt "$prompt" --max-new-tokens 60 \
        --temperature 0.8 --seed 1
}

echo "== sample before fine-tuning"
sample
echo
echo "== cpeft train --method lora (r 8, alpha 16, q/k/v/o projections, 100 steps)"
./cpeft train --model "$model" --data "$work/train.txt" --eval-data "$work/eval.txt" \
    --method lora --r 8 --alpha 16 --target q_proj,k_proj,v_proj,o_proj \
    --steps 100 --batch-size 8 --seq-len 128 --lr 3e-3 --out runs/demo
echo
echo "== sample after fine-tuning (--adapter runs/demo)"
sample --adapter runs/demo
