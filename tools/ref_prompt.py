#!/usr/bin/python3
r"""PyTorch reference for prompt tuning (PEFT's PROMPT_TUNING) on Llama and GPT-2 decoders.

Prompt tuning in PEFT's semantics (read for this script in huggingface/peft:
src/peft/peft_model.py for PeftModelForCausalLM.forward and get_prompt,
src/peft/tuners/prompt_tuning/model.py for PromptEmbedding):
    inputs_embeds = cat(prompt_embeddings, embed_tokens(input_ids)) per sequence
    attention_mask = cat(ones(n), attention_mask), so every token attends to the prompt
    position_ids default to 0..n+T-1: the virtual rows take positions 0..n-1
    (GPT-2 adds wpe to them), the tokens n..n+T-1
    labels of the virtual positions are -100: they are not scored
prompt_embeddings (n, hidden) is the one saved tensor. Here the loss is the
mean cross-entropy of targets given for the token rows only, as cpeft's
training batches give inputs and targets shifted by one.

The decoder forward pass in this file also takes per-layer key/value
prefixes for tools/ref_prefix.py. It runs with Debian's python3-torch 1.13
and numpy, without transformers or peft; model loading comes from
tools/ref_lora_arch.py (which uses tools/ref_llama.py and tools/ref_gpt2.py).

Regenerate the fixture from the repository root:

    /usr/bin/python3 tools/ref_prompt.py make-fixture

It writes tests/fixtures/prompt/, all computed in float64:
- adapter_config.json and adapter_model.safetensors, a random prompt of 4
  virtual tokens for stories260K;
- grads.safetensors, the gradient of prompt_embeddings in F32;
- expected.json, the input ids (tinyshakespeare's first lines), targets
  and loss.
"""

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ref_gpt2  # noqa: E402  (the tools folder must be on sys.path first)
import ref_llama  # noqa: E402
from ref_lora_arch import Architecture, model_family  # noqa: E402

DEFAULT_SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
N_VIRTUAL = 4
BATCH, SEQ = 2, 16
SEED = 20240607


def visible_mask(n_prefix, seq_len, sliding_window):
    """Return a boolean [seq, n_prefix + seq] mask over absolute key positions.

    Query i sits at position n_prefix + i and attends to keys j <= n_prefix + i,
    and with a sliding window W only j > n_prefix + i - W, as transformers
    masks a cache of n_prefix past positions.
    """
    i = torch.arange(seq_len).unsqueeze(1) + n_prefix
    j = torch.arange(n_prefix + seq_len).unsqueeze(0)
    mask = j <= i
    if sliding_window is not None:
        mask = mask & (j > i - sliding_window)
    return mask


def attend(q, k, v, mask, scale):
    """Softmax attention of q (B, H, S, D) over k, v (B, H, P + S, D) under mask."""
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def prefix_layer(prefix, layer, kv_heads, head_dim, batch):
    """Return layer `layer`'s key and value prefixes (B, KVH, P, D) from prompt_embeddings (P, L*2*KVH*D).

    PEFT views the tensor as (P, L*2, KVH, D) and takes entry 2*layer as the
    key and 2*layer + 1 as the value.
    """
    n = prefix.shape[0]
    view = prefix.view(n, -1, kv_heads, head_dim)
    key = view[:, 2 * layer].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
    value = view[:, 2 * layer + 1].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
    return key, value


def llama_forward(arch, ids, virtual, prefix):
    cfg, w = arch.cfg, arch.weights
    batch, n_tokens = ids.shape
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    group = heads // kv_heads
    eps = cfg["rms_norm_eps"]
    n_prefix = 0 if prefix is None else prefix.shape[0]

    x = w["model.embed_tokens.weight"][ids]
    if virtual is not None:
        x = torch.cat([virtual.unsqueeze(0).expand(batch, -1, -1), x], dim=1)
    seq_len = x.shape[1]
    cos, sin = ref_llama.rope_cos_sin(ref_llama.rope_inv_freq(cfg), n_prefix + seq_len, torch.float64)
    cos, sin = cos[n_prefix:], sin[n_prefix:]
    mask = visible_mask(n_prefix, seq_len, cfg["sliding_window"])

    for layer in range(arch.num_layers):
        p = arch.module_path(layer, "")
        h = ref_llama.rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = arch.project(None, p + "self_attn.q_proj", h).view(batch, seq_len, heads, head_dim).transpose(1, 2)
        k = arch.project(None, p + "self_attn.k_proj", h).view(batch, seq_len, kv_heads, head_dim).transpose(1, 2)
        v = arch.project(None, p + "self_attn.v_proj", h).view(batch, seq_len, kv_heads, head_dim).transpose(1, 2)
        q = ref_llama.apply_rope(q, cos, sin)
        k = ref_llama.apply_rope(k, cos, sin)
        if prefix is not None:
            # The prefix keys are used as given: no rotation.
            pk, pv = prefix_layer(prefix, layer, kv_heads, head_dim, batch)
            k = torch.cat([pk, k], dim=2)
            v = torch.cat([pv, v], dim=2)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        attn = attend(q, k, v, mask, 1.0 / math.sqrt(head_dim))
        attn = attn.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)
        x = x + arch.project(None, p + "self_attn.o_proj", attn)

        h = ref_llama.rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(arch.project(None, p + "mlp.gate_proj", h))
        up = arch.project(None, p + "mlp.up_proj", h)
        x = x + arch.project(None, p + "mlp.down_proj", gate * up)

    x = ref_llama.rms_norm(x, w["model.norm.weight"], eps)
    return x @ w["lm_head.weight"].T


def gpt2_forward(arch, ids, virtual, prefix):
    cfg, w = arch.cfg, arch.weights
    batch, n_tokens = ids.shape
    hidden, heads, head_dim = cfg["n_embd"], cfg["n_head"], cfg["head_dim"]
    eps = cfg["layer_norm_epsilon"]
    n_prefix = 0 if prefix is None else prefix.shape[0]

    x = w["transformer.wte.weight"][ids]
    if virtual is not None:
        x = torch.cat([virtual.unsqueeze(0).expand(batch, -1, -1), x], dim=1)
    seq_len = x.shape[1]
    # Positions continue after the prefix, as GPT-2 derives them from the cache length.
    x = x + w["transformer.wpe.weight"][n_prefix:n_prefix + seq_len]
    mask = visible_mask(n_prefix, seq_len, None)

    for layer in range(arch.num_layers):
        p = arch.module_path(layer, "")
        h = ref_gpt2.layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)
        qkv = arch.project(None, p + "attn.c_attn", h)
        q, k, v = (t.reshape(batch, seq_len, heads, head_dim).transpose(1, 2) for t in qkv.split(hidden, dim=-1))
        if prefix is not None:
            pk, pv = prefix_layer(prefix, layer, heads, head_dim, batch)
            k = torch.cat([pk, k], dim=2)
            v = torch.cat([pv, v], dim=2)
        scale = 1.0 / math.sqrt(head_dim) if cfg["scale_attn_weights"] else 1.0
        if cfg["scale_attn_by_inverse_layer_idx"]:
            scale /= layer + 1
        context = attend(q, k, v, mask, scale).transpose(1, 2).reshape(batch, seq_len, hidden)
        x = x + arch.project(None, p + "attn.c_proj", context)

        h = ref_gpt2.layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
        inner = ref_gpt2.gelu_new(arch.project(None, p + "mlp.c_fc", h))
        x = x + arch.project(None, p + "mlp.c_proj", inner)

    x = ref_gpt2.layer_norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)
    return x @ w["lm_head.weight"].T


def forward(arch, ids, virtual=None, prefix=None):
    """Return the logits (B, T, V) of the token rows of ids (B, T).

    virtual (n, hidden) is prompt tuning's rows before the tokens; prefix
    (P, L*2*KVH*D) is prefix tuning's prompt_embeddings.
    """
    run = gpt2_forward if arch.family == "gpt2" else llama_forward
    logits = run(arch, ids, virtual, prefix)
    n_virtual = 0 if virtual is None else virtual.shape[0]
    return logits[:, n_virtual:]


def mean_loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def text_batch(shared, model_dir):
    """Return inputs and targets (BATCH, SEQ): windows of tinyshakespeare's first lines, targets shifted by one."""
    with open(os.path.join(shared, "data", "tinyshakespeare", "input.txt")) as f:
        text = f.read(2000)
    ids = ref_llama.encode_with_bos(ref_llama.load_tokenizer(model_dir), text)
    windows = torch.tensor([ids[b * SEQ:(b + 1) * SEQ + 1] for b in range(BATCH)])
    return windows[:, :-1], windows[:, 1:]


def write_fixture(out_dir, config, tensor, grad, inputs, targets, loss):
    """Write the adapter, the gradient of prompt_embeddings and expected.json into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    ref_llama.write_safetensors(
        os.path.join(out_dir, "adapter_model.safetensors"),
        {"prompt_embeddings": tensor.detach().to(torch.float32).numpy()},
    )
    ref_llama.write_safetensors(
        os.path.join(out_dir, "grads.safetensors"),
        {"prompt_embeddings": grad.to(torch.float32).numpy()},
    )
    expected = {"inputs": inputs.tolist(), "targets": targets.tolist(), "loss": loss}
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        f.write(ref_llama.dumps_compact_arrays(expected))
        f.write("\n")


def cmd_make_fixture(args):
    model_dir = os.path.join(args.shared, "models", "stories260K")
    arch = Architecture(model_family(model_dir), model_dir)
    generator = torch.Generator().manual_seed(SEED)
    hidden = arch.cfg["hidden_size"]
    # The stored float32 values are the exact inputs of the float64 computation.
    prompt = torch.randn(N_VIRTUAL, hidden, generator=generator, dtype=torch.float64)
    prompt = prompt.to(torch.float32).to(torch.float64).requires_grad_(True)
    inputs, targets = text_batch(args.shared, model_dir)

    loss = mean_loss(forward(arch, inputs, virtual=prompt), targets)
    loss.backward()
    config = {
        "base_model_name_or_path": "stories260K",
        "inference_mode": True,
        "num_attention_heads": arch.cfg["num_attention_heads"],
        "num_layers": arch.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": N_VIRTUAL,
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        "task_type": "CAUSAL_LM",
        "token_dim": hidden,
    }
    write_fixture(args.out, config, prompt, prompt.grad, inputs, targets, loss.item())
    print(f"{args.out}: loss {loss.item():.6f}, |grad| max {prompt.grad.abs().max().item():.3g}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-fixture", help="write tests/fixtures/prompt/")
    p.add_argument("--shared", default=DEFAULT_SHARED)
    p.add_argument("--out", default="tests/fixtures/prompt")
    p.set_defaults(run=cmd_make_fixture)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
