#!/usr/bin/python3
r"""PyTorch reference for a PEFT LoRA sequence-classification adapter on GPT-2.

The script rebuilds a random-weight base model with GPT-2 124M's shapes from a
counter-based hash, so that the C test can regenerate the same float32 values
instead of storing 500 MB. It applies a PEFT LoRA adapter with task_type
SEQ_CLS (LoRA on c_attn with fan_in_fan_out, plus the trained `score` head),
and writes the final hidden states and class logits of a few sequences to
tests/fixtures/seqcls/expected.json. It runs in float64 with Debian's
python3-torch 1.13 and numpy, without transformers, peft or safetensors.

Semantics, as transformers' GPT2ForSequenceClassification and PEFT's LoRA
define them:
  - The decoder is tools/ref_gpt2.py's forward pass (GPT2Model, then ln_f).
    LoRA adds (x @ A^T) @ B^T * lora_alpha / r to every targeted Conv1D
    module (ref_gpt2.conv1d). fan_in_fan_out=true only matters for merging.
  - score is nn.Linear(n_embd, num_labels, bias=False). It is applied to the
    final hidden state of every position, and the class logits of a
    sequence are those of its last token, as GPT2ForSequenceClassification
    picks them when the input has no padding.
  - PEFT adds score to modules_to_save for task_type SEQ_CLS and saves the
    trained copy as base_model.model.score.weight. Some versions write
    base_model.model.score.modules_to_save.default.weight, and both are read.

The base weights. Tensor k of the list below gets element i from
    z = splitmix64_mix(SEED + (k * 2^32 + i + 1) * 0x9E3779B97F4A7C15)  (mod 2^64)
    u = ((z >> 40) - 2^23) / 2^23                                        in [-1, 1)
    value = float32(center + scale * u)  (computed in float64, rounded to nearest)
where splitmix64_mix(z) is z ^= z >> 30; z *= 0xBF58476D1CE4E5B9;
z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31 (all mod 2^64).
The tensors, in order k = 0, 1, ...: wte, wpe, then for each layer ln_1.weight,
ln_1.bias, attn.c_attn.weight, attn.c_attn.bias, attn.c_proj.weight,
attn.c_proj.bias, ln_2.weight, ln_2.bias, mlp.c_fc.weight, mlp.c_fc.bias,
mlp.c_proj.weight, mlp.c_proj.bias, then ln_f.weight and ln_f.bias.
Matrices and embeddings use center 0 and scale 1/32 (standard deviation
0.018, near GPT-2's 0.02 initialization), the other biases scale 1/128,
LayerNorm weights center 1 and scale 1/8, LayerNorm biases scale 1/32.

Regenerate the fixture from the repository root:

    /usr/bin/python3 tools/ref_seqcls.py make-fixture \
        --adapter ../shared/adapters/peft-gpt2-lora-seqcls

`write-base --out DIR` writes the base model folder (config.json and a
500 MB model.safetensors), to compare with what the C test writes.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ref_gpt2  # noqa: E402  (the tools folder must be on sys.path first)
from ref_llama import dumps_compact_arrays, float9, read_safetensors, write_safetensors  # noqa: E402

# ---------------------------------------------------------------------------
# The hashed base model
# ---------------------------------------------------------------------------

SEED = 0x5EC0C1A5
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
CHUNK = 1 << 22

# GPT-2 124M's config.json values, without the tokenizer and task fields.
GPT2_124M_CONFIG = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_positions": 1024,
    "n_ctx": 1024,
    "n_inner": None,
    "vocab_size": 50257,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "tie_word_embeddings": True,
}

MATRIX_SCALE = 1 / 32
BIAS_SCALE = 1 / 128
NORM_WEIGHT_SCALE = 1 / 8
NORM_BIAS_SCALE = 1 / 32

# Suffixes of one layer's tensors in hash order, with (center, scale).
LAYER_TENSORS = [
    ("ln_1.weight", 1.0, NORM_WEIGHT_SCALE),
    ("ln_1.bias", 0.0, NORM_BIAS_SCALE),
    ("attn.c_attn.weight", 0.0, MATRIX_SCALE),
    ("attn.c_attn.bias", 0.0, BIAS_SCALE),
    ("attn.c_proj.weight", 0.0, MATRIX_SCALE),
    ("attn.c_proj.bias", 0.0, BIAS_SCALE),
    ("ln_2.weight", 1.0, NORM_WEIGHT_SCALE),
    ("ln_2.bias", 0.0, NORM_BIAS_SCALE),
    ("mlp.c_fc.weight", 0.0, MATRIX_SCALE),
    ("mlp.c_fc.bias", 0.0, BIAS_SCALE),
    ("mlp.c_proj.weight", 0.0, MATRIX_SCALE),
    ("mlp.c_proj.bias", 0.0, BIAS_SCALE),
]


def tensor_specs(cfg):
    """Return [(name, shape, center, scale)] in hash order, names without the "transformer." prefix."""
    shapes = ref_gpt2.expected_shapes(cfg)
    specs = [("wte.weight", 0.0, MATRIX_SCALE), ("wpe.weight", 0.0, MATRIX_SCALE)]
    for layer in range(cfg["n_layer"]):
        specs += [(f"h.{layer}.{suffix}", center, scale) for suffix, center, scale in LAYER_TENSORS]
    specs += [("ln_f.weight", 1.0, NORM_WEIGHT_SCALE), ("ln_f.bias", 0.0, NORM_BIAS_SCALE)]
    return [(name, shapes["transformer." + name], center, scale) for name, center, scale in specs]


def hashed_uniform(tensor_index, count):
    """Return the float64 values u in [-1, 1) of elements 0..count-1 of tensor tensor_index."""
    out = np.empty(count, dtype=np.float64)
    # uint64 arithmetic wraps modulo 2^64, as the hash intends.
    with np.errstate(over="ignore"):
        base = np.uint64(SEED) + np.uint64(tensor_index << 32) * GOLDEN
        for start in range(0, count, CHUNK):
            counter = np.arange(start + 1, min(start + CHUNK, count) + 1, dtype=np.uint64)
            z = base + counter * GOLDEN
            z = (z ^ (z >> np.uint64(30))) * MIX1
            z = (z ^ (z >> np.uint64(27))) * MIX2
            z = z ^ (z >> np.uint64(31))
            out[start:start + len(counter)] = ((z >> np.uint64(40)).astype(np.int64) - (1 << 23)) / float(1 << 23)
    return out


def hashed_base(cfg):
    """Return {name: float32 numpy array} of the hashed base, names as the original gpt2 checkpoint stores them."""
    arrays = {}
    for index, (name, shape, center, scale) in enumerate(tensor_specs(cfg)):
        count = int(np.prod(shape))
        arrays[name] = (center + scale * hashed_uniform(index, count)).astype(np.float32).reshape(shape)
    return arrays


def base_weights64(cfg, arrays):
    """Return ref_gpt2's float64 weight dict (with the tied lm_head) for the arrays of hashed_base."""
    weights = {"transformer." + name: torch.from_numpy(array).to(torch.float64) for name, array in arrays.items()}
    weights["lm_head.weight"] = weights["transformer.wte.weight"]
    return weights


# ---------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------

HEAD_NAMES = ["base_model.model.score.weight", "base_model.model.score.modules_to_save.default.weight"]


def load_seqcls_adapter(adapter_dir, cfg):
    """Return ({module path: (A, B, scaling)} in float64, score weight (num_labels, n_embd) in float64)."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    expected = {"peft_type": "LORA", "task_type": "SEQ_CLS", "fan_in_fan_out": True, "use_rslora": False,
                "use_dora": False, "bias": "none"}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(f"{adapter_dir}: adapter_config.json has {key} {config.get(key)!r}, expected {value!r}")
    if config.get("layers_to_transform") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{adapter_dir}: per-layer settings are not implemented here")
    rank, scaling = config["r"], config["lora_alpha"] / config["r"]

    arrays = read_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"))
    heads = [name for name in HEAD_NAMES if name in arrays]
    if len(heads) != 1:
        raise ValueError(f"{adapter_dir}: expected exactly one of {HEAD_NAMES}, found {heads}")
    score = torch.from_numpy(arrays.pop(heads[0]).copy()).to(torch.float64)

    targets = config["target_modules"]
    adapter = {}
    for layer in range(cfg["n_layer"]):
        for module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            if module.split(".")[-1] not in targets:
                continue
            path = f"transformer.h.{layer}.{module}"
            a = torch.from_numpy(arrays.pop(f"base_model.model.{path}.lora_A.weight").copy()).to(torch.float64)
            b = torch.from_numpy(arrays.pop(f"base_model.model.{path}.lora_B.weight").copy()).to(torch.float64)
            if a.shape[0] != rank or b.shape[1] != rank:
                raise ValueError(f"{adapter_dir}: {path} has rank {a.shape[0]}, expected r = {rank}")
            adapter[path] = (a, b, scaling)
    if arrays:
        raise ValueError(f"{adapter_dir}: tensors of no target module: {sorted(arrays)}")
    if score.shape[1] != cfg["n_embd"]:
        raise ValueError(f"{adapter_dir}: score weight has shape {tuple(score.shape)}, expected (*, {cfg['n_embd']})")
    return adapter, score


def merged_weights(weights, adapter):
    """Return the weights with scaling * (B @ A)^T added to each adapted Conv1D weight, as PEFT merges fan_in_fan_out."""
    merged = dict(weights)
    for path, (a, b, scaling) in adapter.items():
        merged[path + ".weight"] = weights[path + ".weight"] + (b @ a).T * scaling
    return merged


def classify(cfg, weights, ids, adapter, score):
    """Return (final hidden (batch, seq, n_embd), class logits (batch, num_labels)).

    As GPT2ForSequenceClassification, the score is applied at every position and the last one is kept.
    """
    _, hidden = ref_gpt2.forward(cfg, weights, ids, adapter)
    per_position = hidden @ score.T
    return hidden, per_position[:, -1, :]


# ---------------------------------------------------------------------------
# make-fixture
# ---------------------------------------------------------------------------

IDS_SEED = 31337
BATCH, SEQ_LEN = 2, 8
# Columns of every position's hidden state stored in the fixture, besides the
# full last-token rows: 32 columns spread over the 768.
SAMPLE_COLUMNS = list(range(0, 768, 24))
# Tensors whose first values and float64 sum the fixture stores, so that the C
# test can tell a generator mismatch from a forward-pass mismatch.
PROBED_TENSORS = ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.5.attn.c_attn.weight", "h.11.mlp.c_proj.bias",
                  "ln_f.weight", "ln_f.bias"]
MERGE_TOLERANCE = 1e-10
MIN_LORA_EFFECT = 1e-2


def make_fixture(adapter_dir, out_dir):
    cfg = ref_gpt2.parse_config(GPT2_124M_CONFIG)
    arrays = hashed_base(cfg)
    probes = {name: {"first": [float(v) for v in arrays[name].reshape(-1)[:4]],
                     "sum": float(arrays[name].astype(np.float64).sum())} for name in PROBED_TENSORS}
    weights = base_weights64(cfg, arrays)
    del arrays
    adapter, score = load_seqcls_adapter(adapter_dir, cfg)
    ids = torch.randint(0, cfg["vocab_size"], (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(IDS_SEED))

    with torch.no_grad():
        hidden, logits = classify(cfg, weights, ids, adapter, score)
        _, logits_base = classify(cfg, weights, ids, None, score)
        _, logits_merged = classify(cfg, merged_weights(weights, adapter), ids, None, score)
        # Each sequence alone (batch 1), as GPT2ForSequenceClassification requires without a pad token.
        logits_single = torch.cat([classify(cfg, weights, ids[i:i + 1], adapter, score)[1] for i in range(BATCH)])

    checks = {
        "max_abs_diff_merged": float((logits_merged - logits).abs().max()),
        "max_abs_diff_one_sequence_at_a_time": float((logits_single - logits).abs().max()),
        "max_abs_diff_without_lora": float((logits_base - logits).abs().max()),
    }
    for key, value in checks.items():
        print(f"seqcls: {key} = {value:.3g}")
    if checks["max_abs_diff_merged"] > MERGE_TOLERANCE:
        raise RuntimeError("the LoRA forward pass differs from the forward pass on merged weights")
    if checks["max_abs_diff_one_sequence_at_a_time"] > MERGE_TOLERANCE:
        raise RuntimeError("the batched forward pass differs from one sequence at a time")
    if checks["max_abs_diff_without_lora"] < MIN_LORA_EFFECT:
        raise RuntimeError("the adapter's LoRA weights barely change the logits, so the fixture tests little")

    expected = {
        "description": "Final hidden states (after ln_f) and class logits of GPT-2 124M-shaped hashed random "
                       "weights with a PEFT LoRA SEQ_CLS adapter (LoRA on c_attn, score head on the last token), "
                       "computed in float64 by tools/ref_seqcls.py; its docstring defines the weight hash.",
        "regenerate": "/usr/bin/python3 tools/ref_seqcls.py make-fixture --adapter "
                      "../shared/adapters/peft-gpt2-lora-seqcls",
        "adapter": "adapters/peft-gpt2-lora-seqcls",
        "seed": SEED,
        "scales": {"matrix": MATRIX_SCALE, "bias": BIAS_SCALE, "norm_weight": NORM_WEIGHT_SCALE,
                   "norm_bias": NORM_BIAS_SCALE},
        "dtype": "float64",
        "checks": checks,
        "weight_probes": probes,
        "input_ids": ids.tolist(),
        "num_labels": int(score.shape[0]),
        "logits": [[float9(v) for v in row] for row in logits.tolist()],
        "logits_without_lora": [[float9(v) for v in row] for row in logits_base.tolist()],
        "hidden_last": [[float9(v) for v in row] for row in hidden[:, -1, :].tolist()],
        "hidden_sample_columns": SAMPLE_COLUMNS,
        "hidden_sample": [[[float9(v) for v in row] for row in seq] for seq in hidden[:, :, SAMPLE_COLUMNS].tolist()],
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "expected.json")
    with open(path, "w") as f:
        f.write(dumps_compact_arrays(expected))
    print(f"seqcls: wrote {path} ({os.path.getsize(path)} bytes)")


def write_base(out_dir):
    cfg = ref_gpt2.parse_config(GPT2_124M_CONFIG)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(GPT2_124M_CONFIG, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(out_dir, "model.safetensors"), hashed_base(cfg))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-fixture", help="write tests/fixtures/seqcls/expected.json")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json and "
                                                    "adapter_model.safetensors)")
    p.add_argument("--out-dir", default="tests/fixtures/seqcls", help="output folder (default tests/fixtures/seqcls)")
    p.set_defaults(func=lambda args: make_fixture(args.adapter, args.out_dir))

    p = sub.add_parser("write-base", help="write the hashed base model folder")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=lambda args: write_base(args.out))

    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
