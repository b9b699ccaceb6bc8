#!/usr/bin/python3
r"""PyTorch reference for prefix tuning (PEFT's PREFIX_TUNING) on Llama and GPT-2 decoders.

Prefix tuning in PEFT's semantics (read for this script in huggingface/peft:
src/peft/peft_model.py for get_prompt and PeftModelForCausalLM.forward,
src/peft/tuners/prefix_tuning/model.py for PrefixEncoder,
src/peft/utils/other.py for _prepare_prompt_learning_config):
    prompt_embeddings (n, L*2*W), W = KVH * head_dim: PEFT sizes the prefixes
    by key/value heads where the model config has num_key_value_heads
    get_prompt views it as (n, L*2, KVH, head_dim) and permutes it to
    (L*2, B, KVH, n, head_dim): entry 2*l is layer l's key prefix, 2*l + 1
    its value prefix, handed to the model as past_key_values
    the prefix keys are used as given; transformers rotates only the new keys
    the attention mask gets n leading ones, so every query attends to the prefix
    the tokens' positions start at n, because transformers derives the
    position ids from the cache length (Llama's cache_position, GPT-2's
    past_length)
    with prefix_projection the prefixes are tanh(E W1^T + b1) W2^T + b2 while
    training, and what PEFT saves is that projected output
The loss is the mean cross-entropy of targets given for every token.

The forward pass comes from tools/ref_prompt.py. Regenerate the fixture from
the repository root:

    /usr/bin/python3 tools/ref_prefix.py make-fixture

It writes tests/fixtures/prefix/: adapter_config.json and
adapter_model.safetensors (random prefixes of 3 virtual tokens for
stories260K, drawn N(0, 1) as torch.nn.Embedding does), grads.safetensors
(the gradient of prompt_embeddings, F32) and expected.json (input ids,
targets and loss), all computed in float64.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ref_lora_arch import Architecture, model_family  # noqa: E402  (tools must be on sys.path first)
from ref_prompt import DEFAULT_SHARED, forward, mean_loss, text_batch, write_fixture  # noqa: E402

N_VIRTUAL = 3
SEED = 20240608


def prefix_width(cfg):
    """Return L * 2 * KVH * head_dim, the width of one virtual position's prefixes."""
    if "n_layer" in cfg:  # GPT-2 has no num_key_value_heads: its heads are all key/value heads
        return cfg["n_layer"] * 2 * cfg["n_embd"]
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"]


def cmd_make_fixture(args):
    model_dir = os.path.join(args.shared, "models", "stories260K")
    arch = Architecture(model_family(model_dir), model_dir)
    generator = torch.Generator().manual_seed(SEED)
    cfg = arch.cfg
    # The stored float32 values are the exact inputs of the float64 computation.
    prefix = torch.randn(N_VIRTUAL, prefix_width(cfg), generator=generator, dtype=torch.float64)
    prefix = prefix.to(torch.float32).to(torch.float64).requires_grad_(True)
    inputs, targets = text_batch(args.shared, model_dir)

    loss = mean_loss(forward(arch, inputs, prefix=prefix), targets)
    loss.backward()
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    config = {
        "base_model_name_or_path": "stories260K",
        "encoder_hidden_size": kv_dim,
        "inference_mode": True,
        "num_attention_heads": cfg["num_key_value_heads"],
        "num_layers": arch.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": N_VIRTUAL,
        "peft_type": "PREFIX_TUNING",
        "prefix_projection": False,
        "task_type": "CAUSAL_LM",
        "token_dim": kv_dim,
    }
    write_fixture(args.out, config, prefix, prefix.grad, inputs, targets, loss.item())
    print(f"{args.out}: loss {loss.item():.6f}, |grad| max {prefix.grad.abs().max().item():.3g}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-fixture", help="write tests/fixtures/prefix/")
    p.add_argument("--shared", default=DEFAULT_SHARED)
    p.add_argument("--out", default="tests/fixtures/prefix")
    p.set_defaults(run=cmd_make_fixture)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
