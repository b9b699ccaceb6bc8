#!/usr/bin/python3
r"""PyTorch reference for (IA)³ on a Llama model, in Hugging Face PEFT's semantics.

This script writes the golden values that tests/test_ia3.c compares against.
They are an IA3 adapter for stories260K in PEFT's layout, the mean
cross-entropy of one fixed batch, and its gradient with respect to every
vector. The vectors are drawn around one rather than PEFT's all-ones start,
so that every gradient is non-trivial. It runs with Debian's python3-torch 1.13 and numpy, without
transformers, peft or the safetensors package. The decoder is
tools/ref_llama.py's forward pass, with its projections routed through a hook
(forward_with_hook, which tools/ref_bottleneck.py reuses).

(IA)³ as PEFT defines it (read for this script in huggingface/peft:
src/peft/tuners/ia3/layer.py for IA3Layer.update_layer and Linear.forward,
src/peft/tuners/ia3/model.py for _create_and_replace and
_prepare_adapter_config, src/peft/utils/constants.py for the defaults):
    y = (x W^T + b) * l            l (out, 1), for a target module
    y = (x * l) W^T + b            l (1, in), for a target in feedforward_modules
    l starts at ones; llama's defaults are target_modules [k_proj, v_proj,
    down_proj] and feedforward_modules [down_proj]
The saved tensors drop the adapter name, so the keys read
base_model.model.model.layers.{i}.self_attn.k_proj.ia3_l.

The fixture's adapter_config.json leaves target_modules and
feedforward_modules null, as PEFT's default config does, so the C loader's
architecture defaults are exercised.

Precision: the loss and gradients are computed in float64 from the stored
float32 vectors and weights.

Regenerate the fixture from the repository root (../shared is the default
location of the shared models, the same as the Makefile's SHARED):

    /usr/bin/python3 tools/ref_ia3.py make-fixture
"""

import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ref_llama  # noqa: E402  (the tools folder must be on sys.path first)
from ref_llama import dumps_compact_arrays, load_model, read_safetensors, write_safetensors  # noqa: E402

SEED = 20240917
SPREAD = 0.2  # vectors are drawn from 1 + U(-SPREAD, SPREAD)
BATCH_FILE = "tests/fixtures/lora_step/batch.json"

# Module name -> (path inside the layer, scales the input: feedforward).
LLAMA_DEFAULT = {
    "k_proj": ("self_attn.k_proj", False),
    "v_proj": ("self_attn.v_proj", False),
    "down_proj": ("mlp.down_proj", True),
}

PROJECTION_NAME = re.compile(r"model\.layers\.(\d+)\.(\w+)\.(\w+)$")


def forward_with_hook(cfg, weights, ids, hook):
    """Return ref_llama.forward's logits with every projection routed through hook.

    hook(layer, module, x, base) returns the projection's output, where base(x)
    is the frozen projection x W^T + b and module is e.g. "k_proj". ref_llama's
    module-level linear is swapped for the call and restored afterwards.
    """
    original = ref_llama.linear

    def linear(w, name, x):
        match = PROJECTION_NAME.match(name)
        if match is None:
            return original(w, name, x)
        return hook(int(match.group(1)), match.group(3), x, lambda inp: original(w, name, inp))

    ref_llama.linear = linear
    try:
        return ref_llama.forward(cfg, weights, ids)
    finally:
        ref_llama.linear = original


def peft_key(layer, path):
    return f"base_model.model.model.layers.{layer}.{path}.ia3_l"


def ia3_hook(vectors):
    """The (IA)³ hook over vectors {(layer, module): l}, l flat, as PEFT's Linear.forward computes it."""
    def hook(layer, module, x, base):
        if (layer, module) not in vectors:
            return base(x)
        l = vectors[(layer, module)]
        if LLAMA_DEFAULT[module][1]:
            return base(x * l)
        return base(x) * l
    return hook


def batch_loss(cfg, weights, windows, hook):
    logits = forward_with_hook(cfg, weights, windows[:, :-1], hook)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


def read_batch():
    with open(BATCH_FILE) as f:
        batch = json.load(f)
    return batch["input_ids"], torch.tensor(batch["input_ids"], dtype=torch.long)


def cmd_make_fixture(args):
    cfg, weights = load_model(args.model, torch.float64)
    os.makedirs(args.out_dir, exist_ok=True)
    generator = torch.Generator().manual_seed(SEED)

    # Draw, store as float32, and read back, so that every value comes from the file.
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (path, feedforward) in LLAMA_DEFAULT.items():
            w = weights[f"model.layers.{layer}.{path}.weight"]
            n = w.shape[1] if feedforward else w.shape[0]
            l = 1.0 + SPREAD * (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1)
            shape = (1, n) if feedforward else (n, 1)
            tensors[peft_key(layer, path)] = l.reshape(shape).float().numpy()
    weights_path = os.path.join(args.out_dir, "adapter_model.safetensors")
    write_safetensors(weights_path, tensors)
    stored = read_safetensors(weights_path)
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": "stories260K",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "feedforward_modules": None,
        "inference_mode": True,
        "init_ia3_weights": True,
        "modules_to_save": None,
        "peft_type": "IA3",
        "revision": None,
        "target_modules": None,
        "task_type": "CAUSAL_LM",
    }
    with open(os.path.join(args.out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    vectors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (path, _) in LLAMA_DEFAULT.items():
            vectors[(layer, module)] = torch.from_numpy(stored[peft_key(layer, path)].copy()).double() \
                .flatten().requires_grad_(True)

    ids, windows = read_batch()
    loss = batch_loss(cfg, weights, windows, ia3_hook(vectors))
    loss.backward()
    grads = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (path, feedforward) in LLAMA_DEFAULT.items():
            g = vectors[(layer, module)].grad
            grads[peft_key(layer, path)] = g.reshape((1, -1) if feedforward else (-1, 1)).float().numpy()
    write_safetensors(os.path.join(args.out_dir, "grads.safetensors"), grads)

    # All-ones vectors must leave the base model unchanged.
    with torch.no_grad():
        ones = {k: torch.ones_like(v) for k, v in vectors.items()}
        base = ref_llama.forward(cfg, weights, windows[:, :-1])
        with_ones = forward_with_hook(cfg, weights, windows[:, :-1], ia3_hook(ones))
    assert float((base - with_ones).abs().max()) == 0.0

    expected = {
        "description": "IA3 on stories260K with PEFT's llama defaults (k_proj, v_proj scale outputs; "
                       "down_proj scales its input). loss is the mean cross-entropy of batch.json's "
                       "inputs input_ids[:, :32] against input_ids[:, 1:], in float64 from the float32 "
                       "vectors of adapter_model.safetensors; grads.safetensors holds d loss / d ia3_l.",
        "regenerate": "/usr/bin/python3 tools/ref_ia3.py make-fixture",
        "loss": float(loss),
    }
    with open(os.path.join(args.out_dir, "expected.json"), "w") as f:
        f.write(dumps_compact_arrays(expected))
    with open(os.path.join(args.out_dir, "batch.json"), "w") as f:
        f.write(dumps_compact_arrays({"source": BATCH_FILE, "input_ids": ids}))
    print(f"loss {float(loss):.9f}; wrote {args.out_dir}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-fixture", help="write tests/fixtures/ia3/")
    p.add_argument("--model", default="../shared/models/stories260K")
    p.add_argument("--out-dir", default="tests/fixtures/ia3")
    p.set_defaults(func=cmd_make_fixture)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
