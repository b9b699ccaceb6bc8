#!/bin/sh
# make demo: the main job on a default model. Until training lands, it
# generates a story with stories260K, a small pretrained Llama.
# Usage: tools/demo.sh SHARED_DIR
set -eu
shared=${1:-../shared}
model="$shared/models/stories260K"

if [ ! -f "$model/config.json" ]; then
    echo "demo: no model at $model" >&2
    echo "demo: place Karpathy's stories260K in Hugging Face layout there" \
         "(config.json, model.safetensors, tokenizer.model), or run" \
         "'make demo SHARED=DIR' with DIR holding models/stories260K" >&2
    exit 2
fi

echo "== cpeft inspect $model (first lines)"
./cpeft inspect "$model" | head -n 12
echo
echo "== cpeft generate: greedy continuation of \"Once upon a time\""
./cpeft generate --model "$model" --prompt "Once upon a time" --max-new-tokens 120 --temperature 0
echo
echo "== cpeft generate: sampled at temperature 0.8, seed 42"
./cpeft generate --model "$model" --prompt "Lily and her dog" --max-new-tokens 120 \
    --temperature 0.8 --seed 42
