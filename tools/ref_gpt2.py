#!/usr/bin/python3
r"""Independent PyTorch reference for the Hugging Face GPT-2 forward pass.

This script computes the golden values that cpeft's C tests compare against for
GPT-2. It implements transformers' GPT2LMHeadModel semantics from a Hugging
Face folder (config.json + model.safetensors) in plain PyTorch, without
transformers or the safetensors package, and runs with Debian's python3-torch
1.13 and numpy. Every computation is in float64 by default, so the fixture is
the exact-math result of the stored float32 weights.

Semantics, checked against transformers' src/transformers/models/gpt2/
modeling_gpt2.py (GPT2Attention._attn, GPT2MLP, GPT2Block.forward, GPT2Model)
and configuration_gpt2.py (GPT2Config defaults), and activations.py
(NewGELUActivation for "gelu_new"):
  - x = wte[ids] + wpe[positions], positions 0..len-1.
  - Each block is pre-LayerNorm: x += attn(ln_1(x)), then x += mlp(ln_2(x)).
  - c_attn, c_proj, c_fc and mlp.c_proj are Conv1D layers. Their weight is
    stored (in_features, out_features), so y = x @ W + b with no transpose.
  - c_attn's output splits into q, k and v of n_embd columns each, in that
    order, and each into n_head heads of n_embd / n_head columns.
  - Scores are divided by sqrt(head_dim) when scale_attn_weights (default
    true), and also by layer_idx + 1 when scale_attn_by_inverse_layer_idx
    (default false). A causal mask precedes the softmax.
  - The MLP has n_inner units (4 * n_embd when n_inner is null) and uses
    gelu_new, the tanh approximation
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
  - After the final LayerNorm ln_f, logits = x @ wte^T, because
    tie_word_embeddings defaults to true and GPT-2 checkpoints store no
    lm_head.weight.

Regenerate the fixture from the repository root:

    /usr/bin/python3 tools/ref_gpt2.py make-tiny

Subcommands:
    logits     prints the logits of the last position for a list of token ids
    make-tiny  writes tests/fixtures/tiny-gpt2/ and checks it
"""

import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ref_llama import dumps_compact_arrays, float9, read_safetensors, write_safetensors  # noqa: E402

# ---------------------------------------------------------------------------
# Config and weights
# ---------------------------------------------------------------------------


def parse_config(raw):
    """Return the fields the forward pass uses, with GPT2Config's defaults for missing keys."""
    model_type = raw.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"model_type {model_type!r} is not supported (expected gpt2)")
    activation = raw.get("activation_function", "gelu_new")
    if activation != "gelu_new":
        raise ValueError(f"activation_function {activation!r} is not supported (expected gelu_new)")
    if raw.get("add_cross_attention", False):
        raise ValueError("add_cross_attention=true is not supported")

    hidden = raw.get("n_embd", 768)
    heads = raw.get("n_head", 12)
    if hidden % heads != 0:
        raise ValueError(f"n_embd {hidden} is not a multiple of n_head {heads}")
    return {
        "model_type": model_type,
        "n_embd": hidden,
        "n_layer": raw.get("n_layer", 12),
        "n_head": heads,
        "head_dim": hidden // heads,
        "n_positions": raw.get("n_positions", 1024),
        "n_inner": raw.get("n_inner") or 4 * hidden,
        "vocab_size": raw.get("vocab_size", 50257),
        "layer_norm_epsilon": raw.get("layer_norm_epsilon", 1e-5),
        "activation_function": activation,
        # GPT2Config leaves tie_word_embeddings at PretrainedConfig's default, true.
        "tie_word_embeddings": raw.get("tie_word_embeddings", True),
        "scale_attn_weights": raw.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": raw.get("scale_attn_by_inverse_layer_idx", False),
    }


# GPT2Attention registers its causal mask as the buffers attn.bias (shape
# (1, 1, n_positions, n_positions)) and attn.masked_bias in modeling_gpt2.py,
# so checkpoints saved by such transformers versions contain them. They are not
# parameters, and the forward pass builds its own mask.
MASK_BUFFER = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")


def expected_shapes(cfg):
    """Return {name: shape} of every parameter of GPT2LMHeadModel under cfg, without lm_head."""
    hidden, inner = cfg["n_embd"], cfg["n_inner"]
    shapes = {
        "transformer.wte.weight": (cfg["vocab_size"], hidden),
        "transformer.wpe.weight": (cfg["n_positions"], hidden),
        "transformer.ln_f.weight": (hidden,),
        "transformer.ln_f.bias": (hidden,),
    }
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (hidden,),
            p + "ln_1.bias": (hidden,),
            p + "attn.c_attn.weight": (hidden, 3 * hidden),
            p + "attn.c_attn.bias": (3 * hidden,),
            p + "attn.c_proj.weight": (hidden, hidden),
            p + "attn.c_proj.bias": (hidden,),
            p + "ln_2.weight": (hidden,),
            p + "ln_2.bias": (hidden,),
            p + "mlp.c_fc.weight": (hidden, inner),
            p + "mlp.c_fc.bias": (inner,),
            p + "mlp.c_proj.weight": (inner, hidden),
            p + "mlp.c_proj.bias": (hidden,),
        })
    return shapes


def load_model(model_dir, dtype):
    """Load config.json and model.safetensors, adding the "transformer." prefix to names that lack it."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = parse_config(json.load(f))
    arrays = read_safetensors(os.path.join(model_dir, "model.safetensors"))

    weights = {}
    for name, array in arrays.items():
        if MASK_BUFFER.match(name):
            continue
        # A checkpoint saved from GPT2Model has no "transformer." prefix, which is
        # GPT2PreTrainedModel.base_model_prefix, and transformers adds it when it
        # loads such a file into GPT2LMHeadModel.
        # NOTE: no fixture covers this path or the mask-buffer skip, because
        # tiny-gpt2 stores GPT2LMHeadModel names.
        if name != "lm_head.weight" and not name.startswith("transformer."):
            name = "transformer." + name
        weights[name] = torch.from_numpy(array.copy()).to(dtype)

    if "lm_head.weight" not in weights:
        if not cfg["tie_word_embeddings"]:
            raise ValueError(f"{model_dir}: lm_head.weight is missing and tie_word_embeddings is false")
        weights["lm_head.weight"] = weights["transformer.wte.weight"]

    shapes = expected_shapes(cfg)
    shapes["lm_head.weight"] = (cfg["vocab_size"], cfg["n_embd"])
    for name, shape in shapes.items():
        if name not in weights:
            raise ValueError(f"{model_dir}: tensor {name} is missing")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{model_dir}: tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    unused = sorted(set(weights) - set(shapes))
    if unused:
        raise ValueError(f"{model_dir}: unexpected tensors {unused}, which GPT2LMHeadModel does not have")
    return cfg, weights


# ---------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last axis with the biased variance, as torch.nn.LayerNorm."""
    mean = x.mean(dim=-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def conv1d(weights, path, x, adapter=None):
    """Apply the Conv1D module at path (weight stored (in, out)) to x, plus its LoRA term when adapter has one.

    adapter maps module paths such as "transformer.h.0.attn.c_attn" to
    (A, B, scaling) with A (r, in) and B (out, r). The term is
    (x @ A^T) @ B^T * scaling, as PEFT's LoRA Linear computes it on a Conv1D
    base layer: fan_in_fan_out=true only transposes the base weight when
    merging, and lora_A and lora_B stay nn.Linear layers.
    """
    y = x @ weights[path + ".weight"] + weights[path + ".bias"]
    if adapter is not None and path in adapter:
        a, b, scaling = adapter[path]
        y = y + (x @ a.T) @ b.T * scaling
    return y


def attention(cfg, weights, prefix, layer_index, h, adapter=None):
    """Return causal multi-head self-attention of h (batch, seq, n_embd), after c_proj."""
    batch, seq_len, hidden = h.shape
    heads, head_dim = cfg["n_head"], cfg["head_dim"]

    qkv = conv1d(weights, prefix + "attn.c_attn", h, adapter)
    q, k, v = qkv.split(hidden, dim=-1)
    q, k, v = (t.reshape(batch, seq_len, heads, head_dim).transpose(1, 2) for t in (q, k, v))

    scores = q @ k.transpose(-1, -2)
    if cfg["scale_attn_weights"]:
        scores = scores / math.sqrt(head_dim)
    if cfg["scale_attn_by_inverse_layer_idx"]:
        scores = scores / (layer_index + 1)
    future = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    context = torch.softmax(scores, dim=-1) @ v

    merged = context.transpose(1, 2).reshape(batch, seq_len, hidden)
    return conv1d(weights, prefix + "attn.c_proj", merged, adapter)


def forward(cfg, weights, ids, adapter=None):
    """Return (logits, final_hidden) for ids (batch, seq): shapes (batch, seq, vocab) and (batch, seq, n_embd).

    adapter, when given, adds LoRA terms to the Conv1D modules it names (see conv1d).
    """
    seq_len = ids.shape[1]
    if seq_len > cfg["n_positions"]:
        raise ValueError(f"sequence length {seq_len} exceeds n_positions {cfg['n_positions']}")
    eps = cfg["layer_norm_epsilon"]

    x = weights["transformer.wte.weight"][ids] + weights["transformer.wpe.weight"][:seq_len]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = layer_norm(x, weights[p + "ln_1.weight"], weights[p + "ln_1.bias"], eps)
        x = x + attention(cfg, weights, p, i, h, adapter)

        h = layer_norm(x, weights[p + "ln_2.weight"], weights[p + "ln_2.bias"], eps)
        inner = gelu_new(conv1d(weights, p + "mlp.c_fc", h, adapter))
        x = x + conv1d(weights, p + "mlp.c_proj", inner, adapter)

    final_hidden = layer_norm(x, weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"], eps)
    logits = final_hidden @ weights["lm_head.weight"].T
    return logits, final_hidden


def forward_numpy_loop(cfg, weights, ids):
    """Recompute the logits of one sequence with per-position, per-head numpy loops.

    This second implementation shares no code with forward(), so that an
    error in the batched tensor layout (head split, mask, transposes) shows
    up as a mismatch between the two.
    """
    w = {name: t.double().numpy() for name, t in weights.items()}
    eps = cfg["layer_norm_epsilon"]
    hidden, heads, head_dim = cfg["n_embd"], cfg["n_head"], cfg["head_dim"]

    def norm(v, weight, bias):
        mean = sum(v) / len(v)
        variance = sum((a - mean) ** 2 for a in v) / len(v)
        return (v - mean) / math.sqrt(variance + eps) * weight + bias

    states = [w["transformer.wte.weight"][t] + w["transformer.wpe.weight"][pos] for pos, t in enumerate(ids)]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        qkv = [norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"]) @ w[p + "attn.c_attn.weight"]
               + w[p + "attn.c_attn.bias"] for x in states]
        new_states = []
        for pos, x in enumerate(states):
            context = np.zeros(hidden)
            for head in range(heads):
                cols = slice(head * head_dim, (head + 1) * head_dim)
                query = qkv[pos][:hidden][cols]
                scores = []
                for key_pos in range(pos + 1):
                    key = qkv[key_pos][hidden:2 * hidden][cols]
                    score = float(np.dot(query, key))
                    if cfg["scale_attn_weights"]:
                        score /= math.sqrt(head_dim)
                    if cfg["scale_attn_by_inverse_layer_idx"]:
                        score /= i + 1
                    scores.append(score)
                top = max(scores)
                exps = [math.exp(s - top) for s in scores]
                total = sum(exps)
                for key_pos, e in enumerate(exps):
                    context[cols] += e / total * qkv[key_pos][2 * hidden:][cols]
            x = x + context @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]

            h = norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
            pre = h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]
            act = np.array([0.5 * a * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a * a * a)))
                            for a in pre])
            new_states.append(x + act @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"])
        states = new_states

    rows = []
    for x in states:
        final = norm(x, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"])
        rows.append([float(np.dot(final, w["lm_head.weight"][token])) for token in range(cfg["vocab_size"])])
    return np.array(rows)


# ---------------------------------------------------------------------------
# make-tiny
# ---------------------------------------------------------------------------

TINY_NAME = "tiny-gpt2"
TINY_SEED = 2002
TINY_SEQ_LEN = 11
TINY_CONFIG = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_embd": 16,
    "n_layer": 2,
    "n_head": 4,
    "n_positions": 32,
    "n_inner": None,
    "vocab_size": 40,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "bos_token_id": 0,
    "eos_token_id": 0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}

# Tolerances of the self-checks that make-tiny runs before it writes expected.json.
NUMPY_LOOP_TOLERANCE = 1e-9
MIN_CAUSAL_EFFECT = 1e-3


def random_weights(cfg, generator):
    """Draw float32 weights.

    Matrices and embeddings get N(0, 0.2^2), LayerNorm weights 1 + N(0, 0.1^2),
    LayerNorm biases N(0, 0.1^2) and the other biases N(0, 0.2^2).
    """
    shapes = expected_shapes(cfg)
    weights = {}
    # Draw in sorted name order so that the values depend only on the seed and the shapes.
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=generator, dtype=torch.float32)
        is_layer_norm = re.search(r"\.ln_(1|2|f)\.", name) is not None
        if is_layer_norm and name.endswith(".weight"):
            weights[name] = 1.0 + 0.1 * noise
        elif is_layer_norm:
            weights[name] = 0.1 * noise
        else:
            weights[name] = 0.2 * noise
    return {name: tensor.numpy() for name, tensor in weights.items()}


def max_abs_diff(a, b):
    return float(torch.max(torch.abs(torch.as_tensor(a).double() - torch.as_tensor(b).double())))


def run_checks(cfg, weights64, weights32, input_ids, logits, final_hidden):
    """Compute the fixture's checks, raising RuntimeError when a self-check fails."""
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        logits32, hidden32 = forward(cfg, weights32, ids)
    checks = {
        "max_abs_diff_float32": max_abs_diff(logits32[0], logits),
        "max_abs_diff_float32_final_hidden": max_abs_diff(hidden32[0], final_hidden),
    }

    loop_logits = forward_numpy_loop(cfg, weights64, input_ids)
    checks["max_abs_diff_numpy_loop"] = max_abs_diff(loop_logits, logits)
    if checks["max_abs_diff_numpy_loop"] > NUMPY_LOOP_TOLERANCE:
        raise RuntimeError(f"the numpy loop differs from forward() by {checks['max_abs_diff_numpy_loop']:.3g}, "
                           f"more than {NUMPY_LOOP_TOLERANCE:g}")

    # Causality: a different last token must leave every earlier row unchanged.
    changed = list(input_ids)
    changed[-1] = (changed[-1] + 1) % cfg["vocab_size"]
    with torch.no_grad():
        changed_logits = forward(cfg, weights64, torch.tensor([changed]))[0][0]
    checks["max_abs_diff_earlier_rows_after_changing_last_id"] = max_abs_diff(changed_logits[:-1], logits[:-1])
    checks["max_abs_diff_last_row_after_changing_last_id"] = max_abs_diff(changed_logits[-1], logits[-1])
    if checks["max_abs_diff_earlier_rows_after_changing_last_id"] != 0.0:
        raise RuntimeError("changing the last input id changed earlier logits, so the attention is not causal")
    if checks["max_abs_diff_last_row_after_changing_last_id"] < MIN_CAUSAL_EFFECT:
        raise RuntimeError("changing the last input id left its own logits unchanged, so the check tests nothing")
    return checks


def make_tiny(out_root):
    out_dir = os.path.join(out_root, TINY_NAME)
    os.makedirs(out_dir, exist_ok=True)
    cfg = parse_config(TINY_CONFIG)

    generator = torch.Generator().manual_seed(TINY_SEED)
    arrays = random_weights(cfg, generator)
    input_ids = torch.randint(0, cfg["vocab_size"], (TINY_SEQ_LEN,), generator=generator).tolist()

    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(TINY_CONFIG, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(out_dir, "model.safetensors"), arrays)

    # Reload from disk so that the values come from exactly the stored file.
    _, weights64 = load_model(out_dir, torch.float64)
    _, weights32 = load_model(out_dir, torch.float32)
    with torch.no_grad():
        logits, final_hidden = forward(cfg, weights64, torch.tensor([input_ids]))
        # The same checkpoint stored as BF16 (weights rounded to nearest even),
        # computed in float64, for tests that load a BF16 copy.
        weights_bf16 = {n: t.to(torch.bfloat16).to(torch.float64) for n, t in weights64.items()}
        logits_bf16 = forward(cfg, weights_bf16, torch.tensor([input_ids]))[0][0]
    logits, final_hidden = logits[0], final_hidden[0]

    checks = run_checks(cfg, weights64, weights32, input_ids, logits, final_hidden)
    for key, value in checks.items():
        print(f"{TINY_NAME}: {key} = {value:.3g}")

    expected = {
        "description": "Random-weight gpt2 checkpoint (GPT2LMHeadModel, tied lm_head); logits and final_hidden "
                       "(the states after ln_f) of the full forward pass over input_ids at positions 0..len-1, "
                       "computed in float64 by tools/ref_gpt2.py.",
        "regenerate": "/usr/bin/python3 tools/ref_gpt2.py make-tiny",
        "seed": TINY_SEED,
        "dtype": "float64",
        "config": {key: cfg[key] for key in ("model_type", "n_embd", "n_layer", "n_head", "head_dim", "n_positions",
                                             "n_inner", "vocab_size", "layer_norm_epsilon", "activation_function",
                                             "tie_word_embeddings", "scale_attn_weights")},
        "checks": checks,
        "input_ids": input_ids,
        "logits": [[float9(v) for v in row] for row in logits.tolist()],
        "final_hidden": [[float9(v) for v in row] for row in final_hidden.tolist()],
        "logits_bf16_weights": [[float9(v) for v in row] for row in logits_bf16.tolist()],
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        f.write(dumps_compact_arrays(expected))
    sizes = {entry: os.path.getsize(os.path.join(out_dir, entry)) for entry in sorted(os.listdir(out_dir))}
    print(f"{TINY_NAME}: wrote {out_dir} {sizes}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def cmd_logits(args):
    cfg, weights = load_model(args.model, DTYPES[args.dtype])
    for token in args.ids:
        if not 0 <= token < cfg["vocab_size"]:
            raise SystemExit(f"token id {token} is out of range 0..{cfg['vocab_size'] - 1}")
    with torch.no_grad():
        logits, _ = forward(cfg, weights, torch.tensor([args.ids]))
    print(json.dumps([float9(v) for v in logits[0, -1].tolist()]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("logits", help="print the last position's logits as a JSON array")
    p.add_argument("--model", required=True, help="Hugging Face folder with config.json and model.safetensors")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                   help="precision of the forward pass (default float64)")
    p.add_argument("ids", type=int, nargs="+", help="input token ids")
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("make-tiny", help="write and check the random-weight fixture")
    p.add_argument("--out-dir", default="tests/fixtures", help="parent folder of the fixture "
                                                               "(default tests/fixtures)")
    p.set_defaults(func=lambda args: make_tiny(args.out_dir))

    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
