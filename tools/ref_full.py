#!/usr/bin/python3
r"""PyTorch reference for training the base model's own tensors: full
fine-tuning, BitFit and PEFT's modules_to_save.

It writes the loss and the gradients of one batch that cpeft's tests compare
against (tests/test_full.c, tests/test_bitfit.c, tests/test_modules_to_save.c).
The forward passes are those of tools/ref_llama.py and tools/ref_gpt2.py,
imported; here the weights themselves require gradients, in float64 from the
stored float32 values. It runs with Debian's python3-torch 1.13 and numpy.

Semantics:
  - full: every tensor trains. A tied head is the embedding tensor itself, so
    its gradient is the sum of the embedding's and the head's.
  - BitFit: only the bias terms train (GPT-2: every Conv1D and LayerNorm
    bias); their gradients are those of the full run.
  - modules_to_save lm_head on a tied model: PEFT wraps lm_head in a copy,
    which unties it, so the copy's gradient comes from the head alone.

Regenerate the fixtures from the repository root (../shared is the default
location of the shared models, as the Makefile's SHARED):

    /usr/bin/python3 tools/ref_full.py make-fixture

It writes tests/fixtures/full/:
    expected.json        losses, and the tiny-gpt2 batch
    grads_stories.safetensors
        stories260K on the batch of tests/fixtures/lora_step/batch.json:
        "<name>.sample" (64 values of each tensor's gradient at flat indices
        i * n // 64), "<name>" (the whole gradient) for the tensors that
        --trainable 'model.layers.4.self_attn.*,model.norm.weight' selects,
        and "untied.lm_head.weight.sample" for modules_to_save lm_head
    grads_gpt2.safetensors
        tests/fixtures/tiny-gpt2, every tensor's whole gradient
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ref_gpt2  # noqa: E402  (the tools folder must be on sys.path first)
import ref_llama  # noqa: E402

OUT = "tests/fixtures/full"
SAMPLES = 64
TRAINABLE = ("model.layers.4.self_attn.q_proj.weight", "model.layers.4.self_attn.k_proj.weight",
             "model.layers.4.self_attn.v_proj.weight", "model.layers.4.self_attn.o_proj.weight",
             "model.norm.weight")


def sample(grad):
    """Return 64 values of grad at flat indices i * n // 64."""
    flat = grad.reshape(-1)
    n = flat.numel()
    return flat[[i * n // SAMPLES for i in range(SAMPLES)]]


def next_token_loss(logits, windows):
    """Mean cross-entropy of logits (B, T, V) against windows[:, 1:]."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


def trainable_leaves(weights):
    """Mark every distinct tensor of weights as requiring a gradient; a tied head is the embedding tensor."""
    for tensor in weights.values():
        tensor.requires_grad_(True)


def stories(shared):
    model_dir = os.path.join(shared, "models/stories260K")
    cfg, weights = ref_llama.load_model(model_dir, torch.float64)
    with open("tests/fixtures/lora_step/batch.json") as f:
        windows = torch.tensor(json.load(f)["input_ids"])

    trainable_leaves(weights)
    loss = next_token_loss(ref_llama.forward(cfg, weights, windows[:, :-1]), windows)
    loss.backward()
    out = {}
    for name, tensor in weights.items():
        if name == "lm_head.weight" and tensor is weights["model.embed_tokens.weight"]:
            continue
        out[name + ".sample"] = sample(tensor.grad).numpy()
        if name in TRAINABLE:
            out[name] = tensor.grad.numpy()

    # modules_to_save lm_head: a copy of the tied head trains on its own.
    cfg, weights = ref_llama.load_model(model_dir, torch.float64)
    head = weights["lm_head.weight"].clone().requires_grad_(True)
    weights["lm_head.weight"] = head
    untied_loss = next_token_loss(ref_llama.forward(cfg, weights, windows[:, :-1]), windows)
    untied_loss.backward()
    out["untied.lm_head.weight.sample"] = sample(head.grad).numpy()
    return loss.item(), untied_loss.item(), out


def gpt2():
    cfg, weights = ref_gpt2.load_model("tests/fixtures/tiny-gpt2", torch.float64)
    generator = torch.Generator().manual_seed(7)
    windows = torch.randint(0, cfg["vocab_size"], (2, 9), generator=generator)
    trainable_leaves(weights)
    logits, _ = ref_gpt2.forward(cfg, weights, windows[:, :-1])
    loss = next_token_loss(logits, windows)
    loss.backward()
    out = {name: t.grad.numpy() for name, t in weights.items() if name != "lm_head.weight"}
    return loss.item(), windows.tolist(), out


def cmd_make_fixture(args):
    os.makedirs(OUT, exist_ok=True)
    loss, untied_loss, grads = stories(args.shared)
    ref_llama.write_safetensors(os.path.join(OUT, "grads_stories.safetensors"), grads)
    gpt2_loss, gpt2_windows, gpt2_grads = gpt2()
    ref_llama.write_safetensors(os.path.join(OUT, "grads_gpt2.safetensors"), gpt2_grads)
    expected = {
        "description": "Mean next-token loss of one batch with every base tensor trainable; "
                       "the gradients are in the safetensors files beside this one.",
        "stories260K": {"batch": "tests/fixtures/lora_step/batch.json", "loss": ref_llama.float9(loss),
                        "untied_head_loss": ref_llama.float9(untied_loss), "samples": SAMPLES,
                        "whole": list(TRAINABLE)},
        "tiny-gpt2": {"input_ids": gpt2_windows, "loss": ref_llama.float9(gpt2_loss)},
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        f.write(ref_llama.dumps_compact_arrays(expected))
    print(f"stories260K loss {loss:.9g}, tiny-gpt2 loss {gpt2_loss:.9g}; wrote {OUT}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-fixture", help=f"write {OUT}/")
    make.add_argument("--shared", default="../shared", help="the shared models folder (default ../shared)")
    make.set_defaults(func=cmd_make_fixture)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
