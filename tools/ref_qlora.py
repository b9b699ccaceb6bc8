#!/usr/bin/python3
r"""PyTorch reference for QLoRA: LoRA on a base whose projections are NF4.

The base model's seven projection weights per layer are quantized with
tools/ref_nf4.py: blocks of 64, absmax scales, optionally double-quantized
scales. Each is replaced by its dequantized float32 values, while embeddings
and norms stay as stored. The LoRA step of tools/ref_lora.py then runs in
float64 with the adapter and batch of tests/fixtures/lora_step (non-zero B),
so the loss and every A and B gradient are what a QLoRA step computes.

    /usr/bin/python3 tools/ref_qlora.py make-fixture
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_lora  # noqa: E402
import ref_nf4  # noqa: E402
from ref_llama import dumps_compact_arrays, load_model, write_safetensors  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def nf4_base(weights32, double_quant):
    """Return float64 weights with every projection replaced by its NF4 round trip."""
    out = {}
    for name, tensor in weights32.items():
        module = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if module not in PROJECTIONS:
            out[name] = tensor.double()
            continue
        array = tensor.numpy()
        codes, absmax, _ = ref_nf4.quantize_nf4(array)
        scales = ref_nf4.double_quantize(absmax)[3] if double_quant else absmax
        out[name] = torch.from_numpy(ref_nf4.dequantize(codes, scales).reshape(array.shape)).double()
    return out


def cmd_make_fixture(args):
    cfg, weights32 = load_model(args.model, torch.float32)
    adapter = ref_lora.load_peft_adapter(args.adapter, cfg, torch.float64)
    with open(os.path.join(args.adapter, "batch.json")) as f:
        windows = torch.tensor(json.load(f)["input_ids"], dtype=torch.long)

    results = {}
    for double_quant in (False, True):
        weights = nf4_base(weights32, double_quant)
        loss, grads = ref_lora.loss_and_grads(cfg, weights, windows, adapter)
        key = "double_quant" if double_quant else "nf4"
        results[key] = loss
        if not double_quant:
            write_safetensors(os.path.join(args.out_dir, "grads.safetensors"),
                              {name: g.float().numpy() for name, g in grads.items()})
    # QLoRA as cpeft train runs it: the embeddings and the tied head also
    # rounded to bfloat16 (round to nearest even, as torch rounds).
    weights = nf4_base(weights32, False)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name] = weights[name].to(torch.bfloat16).double()
    results["bf16_embeddings"], _ = ref_lora.loss_and_grads(cfg, weights, windows, adapter)
    full_loss, _ = ref_lora.loss_and_grads(cfg, {n: t.double() for n, t in weights32.items()}, windows,
                                           adapter)
    expected = {
        "description": "One LoRA step on stories260K whose projections are NF4 (tools/ref_nf4.py), "
                       "with the adapter and batch of tests/fixtures/lora_step; grads.safetensors holds "
                       "the A and B gradients with single-quantized scales.",
        "regenerate": "/usr/bin/python3 tools/ref_qlora.py make-fixture",
        "loss_nf4": results["nf4"],
        "loss_nf4_double_quant": results["double_quant"],
        "loss_nf4_bf16_embeddings": results["bf16_embeddings"],
        "loss_float32_base": full_loss,
    }
    with open(os.path.join(args.out_dir, "expected.json"), "w") as f:
        f.write(dumps_compact_arrays(expected))
    print(json.dumps(expected, indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-fixture", help="write tests/fixtures/qlora/")
    p.add_argument("--model", default="../shared/models/stories260K", help="Hugging Face model folder")
    p.add_argument("--adapter", default="tests/fixtures/lora_step", help="LoRA step fixture folder")
    p.add_argument("--out-dir", default="tests/fixtures/qlora", help="output folder")
    p.set_defaults(func=cmd_make_fixture)
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
