#!/usr/bin/python3
r"""Independent PyTorch reference for the Llama/Mistral decoder forward pass.

This script computes the golden values that cpeft's C tests compare against. It
implements Hugging Face transformers' LlamaForCausalLM and MistralForCausalLM
semantics from a Hugging Face folder (config.json + model.safetensors) in plain
PyTorch, without transformers or the safetensors package. It runs with Debian's
python3-torch 1.13, numpy and sentencepiece.

Precision: every subcommand computes in float64 by default (--dtype float64),
so the fixtures are the exact-math result of the stored float32 weights. A
float32 implementation should match them to within float32 rounding error, and
make-tiny records that float32 error for each fixture.

Regenerate the fixtures from the repository root (../shared is the default
location of the shared models and data, the same as the Makefile's SHARED):

    /usr/bin/python3 tools/ref_llama.py make-tiny
    /usr/bin/python3 tools/ref_llama.py eval --model ../shared/models/stories260K \
        --data ../shared/data/tinyshakespeare/input.txt --seq-len 512 128 \
        --out tests/fixtures/stories260K_tinyshakespeare_eval.json

Check the reference against llama2.c's greedy output for stories260K:

    /usr/bin/python3 tools/ref_llama.py check-golden --model ../shared/models/stories260K

Subcommands:
    generate      greedy decoding of a prompt, prints the token ids
    check-golden  reproduces every case of a golden.json (exit status 1 on a mismatch)
    eval          mean cross-entropy and perplexity over consecutive windows of a text
    make-tiny     writes the random-weight checkpoints under tests/fixtures/
"""

import argparse
import hashlib
import json
import math
import os
import re
import struct
import sys

import numpy as np
import torch

# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------
# File layout: an 8-byte little-endian header length n, then n bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
# then the tensor data. The offsets count from the first byte after the header.

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # converted to float32 by shifting into the high half
}


def read_safetensors(path):
    """Read every tensor of a safetensors file into a dict of float32 numpy arrays."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: file is shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if 8 + header_len > len(blob):
        raise ValueError(f"{path}: header length {header_len} exceeds the file size {len(blob)}")
    header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    data = memoryview(blob)[8 + header_len:]

    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info["dtype"]
        if dtype_name not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape)) if shape else 1
        if end > len(data) or end - begin != count * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name} has invalid data_offsets {begin}..{end} for shape {shape}")
        array = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
        if dtype_name == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array.astype(np.float32)
    return tensors


def write_safetensors(path, tensors):
    """Write a dict of numpy arrays as an F32 safetensors file, tensors sorted by name."""
    header = {"__metadata__": {"format": "pt"}}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], dtype="<f4")
        raw = array.tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad the header with spaces so that the data starts 8-byte aligned, as the
    # safetensors library does.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for raw in chunks:
            f.write(raw)


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def parse_config(raw):
    """Return the fields the forward pass uses, with Hugging Face's defaults for missing keys."""
    model_type = raw.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"model_type {model_type!r} is not supported (expected llama, mistral or qwen2)")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {raw['hidden_act']!r} is not supported (expected silu)")
    if model_type == "qwen2" and raw.get("use_sliding_window", False):
        raise ValueError("use_sliding_window=true is not supported for qwen2")

    hidden = raw["hidden_size"]
    heads = raw["num_attention_heads"]
    cfg = {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": raw["intermediate_size"],
        "num_hidden_layers": raw["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": raw.get("num_key_value_heads") or heads,
        # transformers reads head_dim from the config when it is set, else hidden / heads.
        "head_dim": raw.get("head_dim") or hidden // heads,
        "vocab_size": raw["vocab_size"],
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
        # LlamaConfig and MistralConfig both default to untied embeddings.
        "tie_word_embeddings": raw.get("tie_word_embeddings", False),
        # Bias terms: Qwen2Attention gives q, k and v a bias (o_proj none);
        # LlamaAttention's attention_bias adds one to all four projections and
        # LlamaMLP's mlp_bias to gate, up and down (transformers modeling_qwen2.py
        # and modeling_llama.py).
        "qkv_bias": model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        "o_bias": model_type != "qwen2" and bool(raw.get("attention_bias", False)),
        "mlp_bias": model_type != "qwen2" and bool(raw.get("mlp_bias", False)),
    }
    if heads % cfg["num_key_value_heads"] != 0:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                         f"{cfg['num_key_value_heads']}")

    # transformers v5 moved rope_theta and rope_scaling into rope_parameters.
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    cfg["rope_theta"] = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    cfg["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    cfg["rope_scaling"] = {k: v for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta")}
    if cfg["rope_type"] not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_type {cfg['rope_type']!r} is not supported (expected default, linear or llama3)")

    # LlamaModel has no sliding window in transformers, and Qwen2 uses its
    # sliding_window only with use_sliding_window, so only Mistral applies it.
    cfg["sliding_window"] = raw.get("sliding_window") if model_type == "mistral" else None
    if model_type == "llama" and raw.get("sliding_window") is not None:
        print("warning: sliding_window is ignored for model_type llama, as transformers does", file=sys.stderr)
    return cfg


def load_model(model_dir, dtype):
    """Load config.json and model.safetensors from a Hugging Face folder."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = parse_config(json.load(f))
    arrays = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    weights = {name: torch.from_numpy(array.copy()).to(dtype) for name, array in arrays.items()}
    if "lm_head.weight" not in weights:
        if not cfg["tie_word_embeddings"]:
            raise ValueError(f"{model_dir}: lm_head.weight is missing and tie_word_embeddings is false")
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    elif cfg["tie_word_embeddings"] and not torch.equal(weights["lm_head.weight"],
                                                        weights["model.embed_tokens.weight"]):
        raise ValueError(f"{model_dir}: tie_word_embeddings is true but the stored lm_head.weight differs from "
                         "model.embed_tokens.weight; remove one of them or set tie_word_embeddings to false")
    check_shapes(cfg, weights)
    return cfg, weights


def bias_shapes(cfg, prefix):
    """Return {name: shape} of the bias tensors layer `prefix` has under cfg."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {}
    if cfg["qkv_bias"]:
        shapes.update({prefix + "self_attn.q_proj.bias": (q_dim,), prefix + "self_attn.k_proj.bias": (kv_dim,),
                       prefix + "self_attn.v_proj.bias": (kv_dim,)})
    if cfg["o_bias"]:
        shapes[prefix + "self_attn.o_proj.bias"] = (hidden,)
    if cfg["mlp_bias"]:
        shapes.update({prefix + "mlp.gate_proj.bias": (inter,), prefix + "mlp.up_proj.bias": (inter,),
                       prefix + "mlp.down_proj.bias": (hidden,)})
    return shapes


def linear(weights, name, x):
    """x @ W.T for the projection `name`, plus its bias when the checkpoint has one."""
    y = x @ weights[name + ".weight"].T
    bias = weights.get(name + ".bias")
    return y if bias is None else y + bias


def check_shapes(cfg, weights):
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    expected = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expected.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_dim),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
        expected.update(bias_shapes(cfg, p))
    for name, shape in expected.items():
        if name not in weights:
            raise ValueError(f"tensor {name} is missing from model.safetensors")
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(weights[name].shape)}, expected {shape}")


# ---------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------


def rope_inv_freq(cfg, dtype=torch.float64):
    """Compute RoPE's inverse frequencies theta^(-2i/d), i < d/2, with the config's scaling applied."""
    # NOTE: transformers computes inv_freq in float32, so its values differ
    # from these float64 ones by float32 rounding (about 1e-7 relative).
    dim = cfg["head_dim"]
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / (float(cfg["rope_theta"]) ** exponents)
    rope_type = cfg["rope_type"]
    scaling = cfg["rope_scaling"]

    if rope_type == "linear":
        # Dividing the frequencies by factor equals dividing the positions by factor.
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = llama3_scale_inv_freq(inv_freq, scaling)
    return inv_freq.to(dtype)


def llama3_bands(inv_freq, scaling):
    """Classify each frequency as 'high' (kept), 'medium' (interpolated) or 'low' (divided by factor).

    The bands follow transformers' _compute_llama3_parameters in
    src/transformers/modeling_rope_utils.py (commit 0044e3b3, read for this
    script): with wavelength = 2*pi / inv_freq, wavelengths below
    original_max_position_embeddings / high_freq_factor are high, wavelengths
    above original_max_position_embeddings / low_freq_factor are low, and the
    closed interval between the two bounds is medium.
    """
    old_context = float(scaling["original_max_position_embeddings"])
    high_freq_wavelen = old_context / float(scaling["high_freq_factor"])
    low_freq_wavelen = old_context / float(scaling["low_freq_factor"])
    bands = []
    for wavelen in (2 * math.pi / inv_freq).tolist():
        if wavelen < high_freq_wavelen:
            bands.append("high")
        elif wavelen > low_freq_wavelen:
            bands.append("low")
        else:
            bands.append("medium")
    return bands


def llama3_scale_inv_freq(inv_freq, scaling):
    """Apply Llama 3.1's frequency-dependent RoPE rescaling (rope_type llama3).

    High frequencies stay as they are and low frequencies are divided by factor.
    A medium frequency becomes (1 - s) * f / factor + s * f, where
    s = (original_max_position_embeddings / wavelength - low_freq_factor)
        / (high_freq_factor - low_freq_factor),
    which moves smoothly from f / factor at the low bound to f at the high bound.
    """
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    scaled = []
    for f, band in zip(inv_freq.tolist(), llama3_bands(inv_freq, scaling)):
        if band == "high":
            scaled.append(f)
        elif band == "low":
            scaled.append(f / factor)
        else:
            wavelen = 2 * math.pi / f
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            scaled.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(scaled, dtype=torch.float64)


def rope_cos_sin(inv_freq, seq_len, dtype):
    """Return cos and sin tables [seq_len, head_dim] in Hugging Face's rotate-half layout.

    Column j and column j + head_dim/2 share the frequency inv_freq[j].
    """
    positions = torch.arange(seq_len, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq.to(torch.float64))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x [..., seq, head_dim]: x * cos + rotate_half(x) * sin, rotate_half(a, b) = (-b, a)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ---------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def attention_mask(seq_len, sliding_window):
    """Return a boolean [seq, seq] mask, True where query i may attend to key j.

    Causal: j <= i. With a sliding window W, also j > i - W, so each query
    attends to at most W keys including itself. This matches transformers'
    sliding_window_overlay (kv_idx > q_idx - sliding_window) combined with
    causal_mask_function (kv_idx <= q_idx) in src/transformers/masking_utils.py
    (commit 00c4411c, read for this script).
    """
    i = torch.arange(seq_len).unsqueeze(1)
    j = torch.arange(seq_len).unsqueeze(0)
    mask = j <= i
    if sliding_window is not None:
        mask = mask & (j > i - sliding_window)
    return mask


def forward(cfg, weights, ids, inv_freq=None):
    """Return the logits [batch, seq, vocab] for token ids [batch, seq], in the weights' dtype."""
    dtype = weights["model.embed_tokens.weight"].dtype
    batch, seq_len = ids.shape
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    group = heads // kv_heads
    eps = cfg["rms_norm_eps"]

    if inv_freq is None:
        inv_freq = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(inv_freq, seq_len, dtype)
    mask = attention_mask(seq_len, cfg["sliding_window"])

    x = weights["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."

        # Attention block.
        h = rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        q = linear(weights, p + "self_attn.q_proj", h).view(batch, seq_len, heads, head_dim).transpose(1, 2)
        k = linear(weights, p + "self_attn.k_proj", h).view(batch, seq_len, kv_heads, head_dim).transpose(1, 2)
        v = linear(weights, p + "self_attn.v_proj", h).view(batch, seq_len, kv_heads, head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        # Grouped-query attention: query head h reads key/value head h // group.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        # Scaling q before the product equals scaling the scores and touches fewer values.
        scores = (q / math.sqrt(head_dim)) @ k.transpose(-1, -2)
        scores.masked_fill_(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)
        x = x + linear(weights, p + "self_attn.o_proj", attn)

        # SwiGLU MLP block: down(silu(gate(h)) * up(h)).
        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(linear(weights, p + "mlp.gate_proj", h))
        up = linear(weights, p + "mlp.up_proj", h)
        x = x + linear(weights, p + "mlp.down_proj", gate * up)

    x = rms_norm(x, weights["model.norm.weight"], eps)
    return x @ weights["lm_head.weight"].T


# ---------------------------------------------------------------------------
# Tokenizer, generation and evaluation
# ---------------------------------------------------------------------------


def load_tokenizer(model_dir):
    import sentencepiece

    path = os.path.join(model_dir, "tokenizer.model")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: generate and eval need the model's sentencepiece tokenizer")
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    if sp.bos_id() < 0:
        raise ValueError(f"{path} defines no BOS token")
    return sp


def encode_with_bos(sp, text):
    return [sp.bos_id()] + sp.encode(text)


def greedy_generate(cfg, weights, prompt_ids, max_new_tokens):
    """Generate exactly max_new_tokens ids by argmax, with no stop on EOS.

    Each step reruns the full forward pass over the whole sequence, which is
    slow but has no KV cache that could hide a bug.
    """
    if not prompt_ids:
        raise ValueError("the prompt must contain at least one token id (BOS)")
    inv_freq = rope_inv_freq(cfg)
    ids = list(prompt_ids)
    generated = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = forward(cfg, weights, torch.tensor([ids]), inv_freq)
            next_id = int(torch.argmax(logits[0, -1]))
            ids.append(next_id)
            generated.append(next_id)
    return generated


def windowed_loss(cfg, weights, ids, seq_len, batch_tokens=4096):
    """Sum the cross-entropy over floor((len(ids) - 1) / seq_len) consecutive windows.

    Window k reads ids[k*N : (k+1)*N] and predicts ids[k*N+1 : (k+1)*N+1], so
    every id but the first is predicted at most once, and a partial last window
    is dropped. Returns (sum of losses in nats as a float64, predicted tokens).
    """
    num_windows = (len(ids) - 1) // seq_len
    if num_windows == 0:
        raise ValueError(f"the text has {len(ids)} ids, too few for one window of {seq_len} inputs")
    stream = torch.tensor(ids[:num_windows * seq_len + 1], dtype=torch.long)
    inputs = stream[:-1].view(num_windows, seq_len)
    targets = stream[1:].view(num_windows, seq_len)

    inv_freq = rope_inv_freq(cfg)
    batch_size = max(1, batch_tokens // seq_len)
    total = 0.0
    with torch.no_grad():
        for start in range(0, num_windows, batch_size):
            logits = forward(cfg, weights, inputs[start:start + batch_size], inv_freq)
            log_probs = torch.log_softmax(logits.to(torch.float64), dim=-1)
            picked = log_probs.gather(-1, targets[start:start + batch_size].unsqueeze(-1))
            total -= float(picked.sum())
    return total, num_windows * seq_len


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Random-weight fixtures
# ---------------------------------------------------------------------------

# Each variant exercises something stories260K does not. In tiny-llama3,
# head_dim 8 and theta 500000 give RoPE wavelengths of about 6.3, 167, 4443
# and 118000 positions. original_max_position_embeddings is 256 so that the
# bands (high below 256/4 = 64, low above 256/1) contain 6.3 (high), 167
# (medium) and the rest (low). A value of 16 would leave the high band empty.
# max_position_embeddings is 256 * factor = 2048 because transformers warns
# when it is not above original_max_position_embeddings.
TINY_VARIANTS = {
    "tiny-mistral": {
        "seed": 1001,
        "seq_len": 10,
        "config": {
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 40,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "sliding_window": 3,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        },
    },
    "tiny-llama3": {
        "seed": 1002,
        "seq_len": 12,
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 24,
            "head_dim": 8,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "vocab_size": 40,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        },
    },
    # Qwen2: q/k/v biases; sliding_window is present but off
    # (use_sliding_window false), so it must not change anything.
    "tiny-qwen2": {
        "seed": 1004,
        "seq_len": 9,
        "config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 40,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": 4,
            "max_window_layers": 2,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        },
    },
    # Llama with attention_bias and mlp_bias: a bias on all seven projections.
    "tiny-llama-bias": {
        "seed": 1005,
        "seq_len": 7,
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": 40,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "attention_bias": True,
            "mlp_bias": True,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        },
    },
    "tiny-linear": {
        "seed": 1003,
        "seq_len": 8,
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 16,
            "intermediate_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": 40,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        },
    },
}

# A fixture whose scaled RoPE or sliding window changes no logit by more than
# this would not test the feature, so make-tiny fails instead of writing it.
MIN_FEATURE_EFFECT = 1e-3


def random_weights(cfg, generator):
    """Draw float32 weights: N(0, 0.2^2) for matrices, 1 + N(0, 0.1^2) for RMSNorm weights."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (q_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, q_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
        shapes.update(bias_shapes(cfg, p))
    weights = {}
    # Draw in sorted name order so that the values depend only on the seed and the shapes.
    for name in sorted(shapes):
        noise = torch.randn(shapes[name], generator=generator, dtype=torch.float32)
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.1 * noise
        else:
            weights[name] = 0.2 * noise
    return {name: tensor.numpy() for name, tensor in weights.items()}


def float9(x):
    """Round to 9 significant digits, enough to recover any float32 exactly."""
    return float(f"{x:.9g}")


def dumps_compact_arrays(obj):
    """Format obj as indented JSON with every innermost array on one line (one logits row a line)."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


def make_tiny_variant(name, spec, out_root):
    out_dir = os.path.join(out_root, name)
    os.makedirs(out_dir, exist_ok=True)
    raw_config = spec["config"]
    cfg = parse_config(raw_config)

    generator = torch.Generator().manual_seed(spec["seed"])
    arrays = random_weights(cfg, generator)
    input_ids = torch.randint(0, cfg["vocab_size"], (spec["seq_len"],), generator=generator).tolist()

    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw_config, f, indent=2)
        f.write("\n")
    write_safetensors(os.path.join(out_dir, "model.safetensors"), arrays)

    # Reload from disk so that the logits come from exactly the stored file.
    _, weights64 = load_model(out_dir, torch.float64)
    _, weights32 = load_model(out_dir, torch.float32)
    ids = torch.tensor([input_ids])
    inv_freq = rope_inv_freq(cfg)
    with torch.no_grad():
        logits = forward(cfg, weights64, ids, inv_freq)[0]
        # The same checkpoint stored as BF16: every weight rounded to the
        # nearest bfloat16 (ties to even, as torch rounds), then computed in
        # float64, for tests that load a BF16 copy of the fixture.
        weights_bf16 = {n: t.to(torch.bfloat16).to(torch.float64) for n, t in weights64.items()}
        logits_bf16 = forward(cfg, weights_bf16, ids, inv_freq)[0]
        logits32 = forward(cfg, weights32, ids, rope_inv_freq(cfg, torch.float32))[0]
    checks = {"max_abs_diff_float32": float(torch.max(torch.abs(logits32.double() - logits)))}

    rope = {"inv_freq": [float(f) for f in inv_freq.tolist()]}
    if cfg["rope_type"] != "default":
        unscaled_cfg = dict(cfg, rope_type="default", rope_scaling={})
        unscaled_inv_freq = rope_inv_freq(unscaled_cfg)
        rope["inv_freq_unscaled"] = [float(f) for f in unscaled_inv_freq.tolist()]
        with torch.no_grad():
            unscaled = forward(cfg, weights64, ids, unscaled_inv_freq)[0]
        checks["max_abs_diff_unscaled_rope"] = float(torch.max(torch.abs(unscaled - logits)))
    if cfg["rope_type"] == "llama3":
        bands = llama3_bands(rope_inv_freq(dict(cfg, rope_type="default")), cfg["rope_scaling"])
        rope["llama3_bands"] = bands
        print(f"{name}: llama3 bands by frequency index: {bands}")
        missing = {"high", "medium", "low"} - set(bands)
        if missing:
            raise RuntimeError(f"{name}: no RoPE frequency falls in the llama3 band(s) {sorted(missing)}")
    biases = [n for n in weights64 if n.endswith(".bias")]
    if biases:
        unbiased = {n: t for n, t in weights64.items() if not n.endswith(".bias")}
        with torch.no_grad():
            plain = forward(cfg, unbiased, ids, inv_freq)[0]
        checks["max_abs_diff_without_biases"] = float(torch.max(torch.abs(plain - logits)))
    if cfg["sliding_window"] is not None:
        with torch.no_grad():
            full = forward(dict(cfg, sliding_window=None), weights64, ids, inv_freq)[0]
        checks["max_abs_diff_no_sliding_window"] = float(torch.max(torch.abs(full - logits)))

    for key, value in checks.items():
        print(f"{name}: {key} = {value:.3g}")
        if key != "max_abs_diff_float32" and value < MIN_FEATURE_EFFECT:
            raise RuntimeError(f"{name}: {key} is {value:.3g}, so the fixture would not test that feature")

    key_fields = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_type",
                  "rope_scaling", "sliding_window", "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias")
    expected = {
        "description": f"Random-weight {cfg['model_type']} checkpoint; logits of the full forward pass "
                       "over input_ids at positions 0..len-1, computed in float64 by tools/ref_llama.py.",
        "regenerate": "/usr/bin/python3 tools/ref_llama.py make-tiny",
        "seed": spec["seed"],
        "dtype": "float64",
        "config": {key: cfg[key] for key in key_fields},
        "rope": rope,
        "checks": checks,
        "input_ids": input_ids,
        "logits": [[float9(v) for v in row] for row in logits.tolist()],
        "logits_bf16_weights": [[float9(v) for v in row] for row in logits_bf16.tolist()],
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        f.write(dumps_compact_arrays(expected))
    sizes = {entry: os.path.getsize(os.path.join(out_dir, entry)) for entry in sorted(os.listdir(out_dir))}
    print(f"{name}: wrote {out_dir} {sizes}")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def cmd_generate(args):
    cfg, weights = load_model(args.model, DTYPES[args.dtype])
    sp = load_tokenizer(args.model)
    prompt_ids = encode_with_bos(sp, args.prompt)
    generated = greedy_generate(cfg, weights, prompt_ids, args.max_new_tokens)
    print(json.dumps({"prompt_ids": prompt_ids, "generated_ids": generated, "text": sp.decode(generated)}))


def cmd_check_golden(args):
    cfg, weights = load_model(args.model, DTYPES[args.dtype])
    sp = load_tokenizer(args.model)
    golden_path = args.golden or os.path.join(args.model, "golden.json")
    with open(golden_path) as f:
        cases = json.load(f)["cases"]
    failures = 0
    for number, case in enumerate(cases):
        prompt_ids = encode_with_bos(sp, case["prompt"])
        generated = greedy_generate(cfg, weights, prompt_ids, len(case["greedy_ids"]))
        prompt_ok = prompt_ids == case["prompt_ids"]
        greedy_ok = generated == case["greedy_ids"]
        if prompt_ok and greedy_ok:
            print(f"case {number} ({case['prompt']!r}): ok, {len(generated)} greedy ids match")
            continue
        failures += 1
        if not prompt_ok:
            print(f"case {number}: prompt ids {prompt_ids} differ from the expected {case['prompt_ids']}")
        if not greedy_ok:
            first = next(i for i, (a, b) in enumerate(zip(generated, case["greedy_ids"])) if a != b)
            print(f"case {number}: greedy ids differ first at index {first}: "
                  f"got {generated[first]}, expected {case['greedy_ids'][first]}")
    print(f"{len(cases) - failures} of {len(cases)} golden cases reproduced")
    return 1 if failures else 0


def cmd_eval(args):
    cfg, weights = load_model(args.model, DTYPES[args.dtype])
    sp = load_tokenizer(args.model)
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    # One text, BOS once at the start, no EOS.
    ids = encode_with_bos(sp, text)

    results = []
    for seq_len in args.seq_len:
        total, tokens = windowed_loss(cfg, weights, ids, seq_len)
        loss = total / tokens
        result = {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "seq_len": seq_len}
        print(json.dumps(result))
        results.append(result)

    if args.out:
        summary = {
            "description": "Mean cross-entropy (nats per predicted token) of the model over consecutive "
                           "windows of seq_len inputs; the text is tokenized as one string with BOS once "
                           "at the start and no EOS, and a partial last window is dropped.",
            "regenerate": f"/usr/bin/python3 tools/ref_llama.py eval --model {args.model} --data {args.data} "
                          f"--seq-len {' '.join(str(n) for n in args.seq_len)} --out {args.out}",
            "model": args.model,
            "data": args.data,
            "data_bytes": os.path.getsize(args.data),
            "data_sha256": sha256_file(args.data),
            "dtype": args.dtype,
            "num_ids": len(ids),
            "results": results,
        }
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        print(f"wrote {args.out}", file=sys.stderr)


def cmd_make_tiny(args):
    for name, spec in TINY_VARIANTS.items():
        make_tiny_variant(name, spec, args.out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model_args(p):
        p.add_argument("--model", required=True, help="Hugging Face folder with config.json, model.safetensors "
                                                        "and tokenizer.model")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float64",
                       help="precision of the forward pass (default float64)")

    p = sub.add_parser("generate", help="greedy decoding of a prompt; prints the prompt and generated ids")
    add_model_args(p)
    p.add_argument("--prompt", default="", help="prompt text; BOS is prepended")
    p.add_argument("--max-new-tokens", type=int, default=32, help="number of ids to generate")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("check-golden", help="reproduce the greedy ids of every case in a golden.json")
    add_model_args(p)
    p.add_argument("--golden", help="golden file (default: MODEL/golden.json)")
    p.set_defaults(func=cmd_check_golden)

    p = sub.add_parser("eval", help="loss and perplexity over consecutive windows of a text file")
    add_model_args(p)
    p.add_argument("--data", required=True, help="UTF-8 text file, tokenized as one string")
    p.add_argument("--seq-len", type=int, nargs="+", required=True,
                   help="window length in input tokens; several values give one result each")
    p.add_argument("--out", help="write every result to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("make-tiny", help="write the random-weight fixtures")
    p.add_argument("--out-dir", default="tests/fixtures", help="parent folder of the fixtures "
                                                               "(default tests/fixtures)")
    p.set_defaults(func=cmd_make_tiny)

    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
