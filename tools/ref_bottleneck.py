#!/usr/bin/python3
r"""PyTorch reference for bottleneck adapters on a Llama model, as cpeft computes them.

This script writes the golden values that tests/test_bottleneck.c compares
against. They are Houlsby bottleneck adapters for stories260K in
AdapterHub's layout (adapter_config.json and adapter.safetensors), the mean
cross-entropy of one fixed batch, and its gradient with respect to every
adapter tensor. Every weight and bias is drawn at random, because the
near-identity start's zero up-projection would leave the down-projection's
gradient zero.
It runs with Debian's python3-torch 1.13 and numpy, without transformers,
adapters or the safetensors package. The decoder is tools/ref_llama.py's
forward pass through tools/ref_ia3.py's projection hook.

The adapter, on a sublayer output h before the residual add (o_proj after
attention: AdapterHub's mh_adapter; down_proj after the MLP: output_adapter):
    out = h + act(h @ down^T + b_down) @ up^T + b_up
down (C / reduction_factor, C), up (C, C / reduction_factor). This is
AdapterHub's Adapter.forward (src/adapters/methods/modeling.py) with
original_ln_before false, residual_before_ln true, scaling 1 and no layer
norms. Tensor names, as AdapterHub's AdapterLoader saves them for a
LlamaForCausalLM: model.layers.{i}.attention_adapters.adapters.default.
adapter_down.0.weight, ...adapter_down.0.bias, ...adapter_up.weight,
...adapter_up.bias, and output_adapters for the MLP site.

Precision: the loss and gradients are computed in float64 from the stored
float32 adapter weights and model weights.

Regenerate the fixture from the repository root:

    /usr/bin/python3 tools/ref_bottleneck.py make-fixture
"""

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ref_llama  # noqa: E402  (the tools folder must be on sys.path first)
from ref_ia3 import BATCH_FILE, forward_with_hook, read_batch  # noqa: E402
from ref_llama import dumps_compact_arrays, load_model, read_safetensors, write_safetensors  # noqa: E402

SEED = 20240918
REDUCTION_FACTOR = 16
NON_LINEARITY = "swish"
SITES = {"o_proj": "attention_adapters", "down_proj": "output_adapters"}  # Houlsby: both
KINDS = ["adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"]

ACTIVATIONS = {
    "relu": torch.relu,
    "swish": torch.nn.functional.silu,
    "gelu": lambda z: 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0))),
}


def key(layer, site, kind):
    return f"model.layers.{layer}.{site}.adapters.default.{kind}"


def bottleneck_hook(params, act):
    """The adapter hook over params {name: tensor}: adds the bottleneck MLP to o_proj and down_proj."""
    def hook(layer, module, x, base):
        h = base(x)
        if module not in SITES:
            return h
        p = {kind: params[key(layer, SITES[module], kind)] for kind in KINDS}
        z = h @ p["adapter_down.0.weight"].T + p["adapter_down.0.bias"]
        return h + act(z) @ p["adapter_up.weight"].T + p["adapter_up.bias"]
    return hook


def cmd_make_fixture(args):
    cfg, weights = load_model(args.model, torch.float64)
    os.makedirs(args.out_dir, exist_ok=True)
    hidden = cfg["hidden_size"]
    r = hidden // REDUCTION_FACTOR
    generator = torch.Generator().manual_seed(SEED)

    def uniform(shape, bound):
        return (2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1) * bound

    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for site in SITES.values():
            tensors[key(layer, site, "adapter_down.0.weight")] = uniform((r, hidden), 1 / math.sqrt(hidden))
            tensors[key(layer, site, "adapter_down.0.bias")] = uniform((r,), 0.5)
            tensors[key(layer, site, "adapter_up.weight")] = uniform((hidden, r), 0.3)
            tensors[key(layer, site, "adapter_up.bias")] = uniform((hidden,), 0.05)
    weights_path = os.path.join(args.out_dir, "adapter.safetensors")
    write_safetensors(weights_path, {k: v.float().numpy() for k, v in tensors.items()})
    params = {k: torch.from_numpy(v.copy()).double().requires_grad_(True)
              for k, v in read_safetensors(weights_path).items()}
    config = {
        "config": {
            "adapter_residual_before_ln": False, "architecture": "bottleneck", "init_weights": "mam_adapter",
            "is_parallel": False, "ln_after": False, "ln_before": False, "mh_adapter": True,
            "non_linearity": NON_LINEARITY, "original_ln_after": True, "original_ln_before": False,
            "output_adapter": True, "reduction_factor": REDUCTION_FACTOR, "residual_before_ln": True,
            "scaling": 1.0, "use_gating": False,
        },
        "cpeft_method": "adapter",
        "hidden_size": hidden,
        "model_class": "LlamaForCausalLM",
        "model_name": "stories260K",
        "model_type": "llama",
        "name": "default",
        "version": "adapters.1.1.0",
    }
    with open(os.path.join(args.out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")

    ids, windows = read_batch()
    logits = forward_with_hook(cfg, weights, windows[:, :-1], bottleneck_hook(params, ACTIVATIONS[NON_LINEARITY]))
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    loss.backward()
    write_safetensors(os.path.join(args.out_dir, "grads.safetensors"),
                      {k: v.grad.float().numpy() for k, v in params.items()})

    # A zero up-projection must leave the base model unchanged.
    with torch.no_grad():
        zero_up = {k: (torch.zeros_like(v) if "adapter_up" in k else v) for k, v in params.items()}
        base = ref_llama.forward(cfg, weights, windows[:, :-1])
        with_zero = forward_with_hook(cfg, weights, windows[:, :-1],
                                      bottleneck_hook(zero_up, ACTIVATIONS[NON_LINEARITY]))
    assert float((base - with_zero).abs().max()) == 0.0

    expected = {
        "description": "Houlsby bottleneck adapters (reduction factor 16, swish) on stories260K. loss is the "
                       "mean cross-entropy of batch.json's inputs input_ids[:, :32] against input_ids[:, 1:], "
                       "in float64 from the float32 tensors of adapter.safetensors; grads.safetensors holds "
                       "the gradient of loss with respect to each of them (same names).",
        "regenerate": "/usr/bin/python3 tools/ref_bottleneck.py make-fixture",
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
    p = sub.add_parser("make-fixture", help="write tests/fixtures/bottleneck/")
    p.add_argument("--model", default="../shared/models/stories260K")
    p.add_argument("--out-dir", default="tests/fixtures/bottleneck")
    p.set_defaults(func=cmd_make_fixture)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
