#!/usr/bin/python3
r"""Writes GGUF fixtures the way llama.cpp's converter lays them out.

cpeft loads GGUF models by undoing what llama.cpp's convert_hf_to_gguf.py
does to a Hugging Face checkpoint. This script does those steps from the
description of the format, independently of cpeft's C code:

- tensor names: token_embd, output_norm, output, blk.N.attn_norm, attn_q,
  attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down (llama,
  qwen2); position_embd, attn_qkv, ffn_up, ffn_down with biases (gpt2);
- llama's q and k rows (and their biases) permuted so that each head's two
  RoPE halves are interleaved; qwen2 keeps Hugging Face's order;
- GPT-2's Conv1D weights, stored (in, out) by transformers, transposed to
  (out, in); the tied head written again as output.weight;
- llama3 RoPE scaling stored as a rope_freqs tensor of per-frequency
  divisors instead of metadata;
- Q8_0 and Q4_0 blocks quantized as ggml's reference quantizers do.

Subcommand make-fixtures writes tests/fixtures/gguf/. It writes float32 GGUF
copies of the tiny-* fixtures, whose logits are already in
tests/fixtures/*/expected.json. It also writes tiny-llama-q, a random llama
with a small SentencePiece vocabulary, stored as F16, Q8_0 and Q4_0, with the
logits PyTorch computes in float64 from the dequantized weights:

    /usr/bin/python3 tools/make_gguf.py make-fixtures
"""

import argparse
import json
import math
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ref_llama  # noqa: E402

# ---------------------------------------------------------------------------
# GGUF writing
# ---------------------------------------------------------------------------

ALIGNMENT = 32
GGUF_UINT32, GGUF_INT32, GGUF_FLOAT32, GGUF_BOOL, GGUF_STRING, GGUF_ARRAY = 4, 5, 6, 7, 8, 9
GGML_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 8}
QK = 32  # elements per Q8_0 / Q4_0 block


def pack_string(s):
    data = s.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def pack_value(value):
    """Return (type id, bytes) for a metadata value; the Python type picks the GGUF type."""
    if isinstance(value, bool):
        return GGUF_BOOL, struct.pack("<B", value)
    if isinstance(value, int):
        return (GGUF_UINT32, struct.pack("<I", value)) if value >= 0 else (GGUF_INT32, struct.pack("<i", value))
    if isinstance(value, float):
        return GGUF_FLOAT32, struct.pack("<f", value)
    if isinstance(value, str):
        return GGUF_STRING, pack_string(value)
    if isinstance(value, tuple):  # (element type name, list)
        kind, items = value
        if kind == "str":
            elem, body = GGUF_STRING, b"".join(pack_string(v) for v in items)
        elif kind == "f32":
            elem, body = GGUF_FLOAT32, struct.pack(f"<{len(items)}f", *items)
        else:
            elem, body = GGUF_INT32, struct.pack(f"<{len(items)}i", *items)
        return GGUF_ARRAY, struct.pack("<IQ", elem, len(items)) + body
    raise TypeError(f"no GGUF type for {value!r}")


def write_gguf(path, metadata, tensors):
    """metadata: dict of key -> value; tensors: list of (name, ggml type name, shape, raw bytes)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, value in metadata.items():
        kind, body = pack_value(value)
        out += pack_string(key) + struct.pack("<I", kind) + body
    offset = 0
    placed = []
    for name, kind, shape, raw in tensors:
        dims = list(reversed(shape))  # ggml lists the contiguous dimension first
        out += pack_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", GGML_TYPES[kind], offset)
        placed.append((offset, raw))
        offset += (len(raw) + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    out += b"\0" * (-len(out) % ALIGNMENT)
    data_start = len(out)
    for place, raw in placed:
        out += b"\0" * (data_start + place - len(out))
        out += raw
    with open(path, "wb") as f:
        f.write(out)


# ---------------------------------------------------------------------------
# Quantization (ggml's reference quantizers) and dequantization
# ---------------------------------------------------------------------------

def quantize_q8_0(x):
    """Blocks of 32: scale d = max|x| / 127 as f16, codes round(x / d) as int8."""
    blocks = x.astype(np.float32).reshape(-1, QK)
    amax = np.max(np.abs(blocks), axis=1)
    d = amax / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    scaled = blocks * inv[:, None]
    codes = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)  # roundf
    raw = bytearray()
    for scale, row in zip(d.astype(np.float16), codes):
        raw += scale.tobytes() + row.tobytes()
    return bytes(raw)


def dequantize_q8_0(raw, n):
    rec = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("q", "i1", QK)]), count=n // QK)
    return (rec["d"].astype(np.float32)[:, None] * rec["q"].astype(np.float32)).reshape(-1)


def quantize_q4_0(x):
    """Blocks of 32: d = (the value of largest magnitude) / -8 as f16; codes
    min(15, trunc(x / d + 8.5)); element j in the low nibble of byte j, element
    16 + j in its high nibble."""
    blocks = x.astype(np.float32).reshape(-1, QK)
    pick = np.argmax(np.abs(blocks), axis=1)  # first index of the largest |x|, as ggml's strict '<'
    signed_max = blocks[np.arange(len(blocks)), pick]
    d = signed_max / np.float32(-8)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    codes = np.minimum(15, np.trunc(blocks * inv[:, None] + np.float32(8.5))).astype(np.uint8)
    packed = codes[:, :16] | (codes[:, 16:] << 4)
    raw = bytearray()
    for scale, row in zip(d.astype(np.float16), packed):
        raw += scale.tobytes() + row.tobytes()
    return bytes(raw)


def dequantize_q4_0(raw, n):
    rec = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("q", "u1", QK // 2)]), count=n // QK)
    low = (rec["q"] & 0x0F).astype(np.float32) - 8
    high = (rec["q"] >> 4).astype(np.float32) - 8
    return (rec["d"].astype(np.float32)[:, None] * np.concatenate([low, high], axis=1)).reshape(-1)


def encode_tensor(array, kind):
    """Return (ggml type, raw bytes, float32 values as stored) for array in kind.
    Only matrices whose rows are whole blocks are quantized; the rest stay F32,
    as llama.cpp keeps norms and odd-shaped tensors in a float type."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    if kind in ("Q8_0", "Q4_0") and (array.ndim != 2 or array.shape[1] % QK):
        kind = "F32"
    if kind == "F16" and array.ndim != 2:
        kind = "F32"
    if kind == "F32":
        return kind, array.tobytes(), array
    if kind == "F16":
        half = array.astype(np.float16)
        return kind, half.tobytes(), half.astype(np.float32)
    quantize, dequantize = {"Q8_0": (quantize_q8_0, dequantize_q8_0),
                            "Q4_0": (quantize_q4_0, dequantize_q4_0)}[kind]
    raw = quantize(array.reshape(-1))
    return kind, raw, dequantize(raw, array.size).reshape(array.shape)


# ---------------------------------------------------------------------------
# Hugging Face weights -> llama.cpp layout
# ---------------------------------------------------------------------------

def permute_rows(w, n_head):
    """llama.cpp's q/k row order: within each head, rows (half, i) become (i, half)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


LLAMA_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
GPT2_NAMES = {
    "ln_1": "attn_norm", "ln_2": "ffn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}


def llama_tensors(cfg, weights, arch):
    """Map Hugging Face llama/qwen2 names and layouts to llama.cpp's."""
    out = {"token_embd.weight": weights["model.embed_tokens.weight"],
           "output_norm.weight": weights["model.norm.weight"]}
    if "lm_head.weight" in weights:
        out["output.weight"] = weights["lm_head.weight"]
    for name, w in weights.items():
        if not name.startswith("model.layers."):
            continue
        layer, rest = name[len("model.layers."):].split(".", 1)
        for hf, gg in LLAMA_NAMES.items():
            if rest.startswith(hf):
                new = f"blk.{layer}.{gg}{rest[len(hf):]}"
                break
        else:
            raise ValueError(f"no llama.cpp name for {name}")
        if arch == "llama" and rest.startswith("self_attn.q_proj"):
            w = permute_rows(w, cfg["num_attention_heads"])
        elif arch == "llama" and rest.startswith("self_attn.k_proj"):
            w = permute_rows(w, cfg["num_key_value_heads"])
        out[new] = w
    return out


def gpt2_tensors(weights):
    prefix = "transformer." if "transformer.wte.weight" in weights else ""
    out = {"token_embd.weight": weights[prefix + "wte.weight"],
           "position_embd.weight": weights[prefix + "wpe.weight"],
           "output_norm.weight": weights[prefix + "ln_f.weight"],
           "output_norm.bias": weights[prefix + "ln_f.bias"],
           "output.weight": weights[prefix + "wte.weight"]}
    for name, w in weights.items():
        if not name.startswith(prefix + "h."):
            continue
        layer, rest = name[len(prefix + "h."):].split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module == "attn":  # the causal-mask buffers some checkpoints store
            continue
        if param == "weight" and module in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            w = w.T  # Conv1D (in, out) -> (out, in)
        out[f"blk.{layer}.{GPT2_NAMES[module]}.{param}"] = w
    return out


def llama3_rope_divisors(cfg):
    """Per-frequency divisors that turn plain RoPE frequencies into llama3-scaled ones."""
    plain = ref_llama.rope_inv_freq(dict(cfg, rope_type="default"))
    scaled = ref_llama.rope_inv_freq(cfg)
    return (plain / scaled).numpy().astype(np.float32)


def llama_metadata(cfg, arch, context_length):
    meta = {
        "general.architecture": arch,
        "general.name": "cpeft test fixture",
        f"{arch}.context_length": context_length,
        f"{arch}.embedding_length": cfg["hidden_size"],
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": cfg["num_attention_heads"],
        f"{arch}.attention.head_count_kv": cfg["num_key_value_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        f"{arch}.rope.freq_base": float(cfg["rope_theta"]),
        f"{arch}.rope.dimension_count": cfg["head_dim"],
    }
    if cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]:
        meta[f"{arch}.attention.key_length"] = cfg["head_dim"]
        meta[f"{arch}.attention.value_length"] = cfg["head_dim"]
    if cfg["rope_type"] == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(cfg["rope_scaling"]["factor"])
    return meta


def convert(model_dir, kind, extra_metadata=None):
    """Return (metadata, tensor list, stored float32 values by GGUF name) for an HF folder."""
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    weights = ref_llama.read_safetensors(os.path.join(model_dir, "model.safetensors"))
    if raw["model_type"] == "gpt2":
        meta = {
            "general.architecture": "gpt2",
            "general.name": "cpeft test fixture",
            "gpt2.context_length": raw["n_positions"],
            "gpt2.embedding_length": raw["n_embd"],
            "gpt2.block_count": raw["n_layer"],
            "gpt2.feed_forward_length": raw.get("n_inner") or 4 * raw["n_embd"],
            "gpt2.attention.head_count": raw["n_head"],
            "gpt2.attention.layer_norm_epsilon": float(raw["layer_norm_epsilon"]),
        }
        named = gpt2_tensors(weights)
    else:
        cfg = ref_llama.parse_config(raw)
        arch = "qwen2" if cfg["model_type"] == "qwen2" else "llama"
        meta = llama_metadata(cfg, arch, raw.get("max_position_embeddings", 2048))
        named = llama_tensors(cfg, weights, arch)
        if cfg["rope_type"] == "llama3":
            named["rope_freqs.weight"] = llama3_rope_divisors(cfg)
    meta.update(extra_metadata or {})
    tensors, stored = [], {}
    for name, array in named.items():
        stored_kind, raw_bytes, values = encode_tensor(array, kind)
        tensors.append((name, stored_kind, list(array.shape), raw_bytes))
        stored[name] = values
    return meta, tensors, stored


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

# Pieces of the toy SentencePiece vocabulary of tiny-llama-q, most frequent
# first; the three specials and 256 byte pieces come before them.
TOY_PIECES = ["\u2581", "e", "t", "a", "o", "h", "n", "s", "i", "r", "d", "l", "\u2581t", "\u2581a", "he",
              "\u2581the", "\u2581s", "in", "er", "\u2581w", "u", "m", "c", "y", "g", ".", ",", "\u2581b",
              "\u2581he", "\u2581o", "\u2581and", "nd", "an"]

TINY_Q_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 3 + 256 + len(TOY_PIECES), "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}


def toy_tokenizer_metadata():
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + TOY_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(TOY_PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(TOY_PIECES))]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ("str", tokens),
        "tokenizer.ggml.scores": ("f32", scores),
        "tokenizer.ggml.token_type": ("i32", types),
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
    }


def float_rows(logits):
    return [[ref_llama.float9(v) for v in row] for row in logits.tolist()]


def logits_from_stored(raw_config, stored, ids):
    """Float64 logits of a llama-layout model from the values the GGUF stores,
    mapped back to Hugging Face names with the inverse permutation."""
    cfg = ref_llama.parse_config(raw_config)
    back = {"model.embed_tokens.weight": stored["token_embd.weight"],
            "model.norm.weight": stored["output_norm.weight"],
            "lm_head.weight": stored["output.weight"]}
    inverse = {gg: hf for hf, gg in LLAMA_NAMES.items()}
    for name, values in stored.items():
        if not name.startswith("blk."):
            continue
        _, layer, rest = name.split(".", 2)
        module, tail = rest.split(".", 1)
        hf_module = inverse.get(rest) or inverse[module] + "." + tail
        if module in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if module == "attn_q" else cfg["num_key_value_heads"]
            shape = values.shape
            values = values.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
        back[f"model.layers.{layer}.{hf_module}"] = values
    weights = {n: torch.from_numpy(np.array(v, dtype=np.float64)) for n, v in back.items()}
    with torch.no_grad():
        return ref_llama.forward(cfg, weights, torch.tensor([ids]), ref_llama.rope_inv_freq(cfg))[0]


def make_tiny_q(out_dir):
    cfg = ref_llama.parse_config(TINY_Q_CONFIG)
    generator = torch.Generator().manual_seed(2024)
    arrays = ref_llama.random_weights(cfg, generator)
    ids = torch.randint(0, cfg["vocab_size"], (8,), generator=generator).tolist()
    tmp = os.path.join(out_dir, "tiny-llama-q.tmp")
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(TINY_Q_CONFIG, f)
    ref_llama.write_safetensors(os.path.join(tmp, "model.safetensors"), arrays)

    expected = {
        "description": "tiny-llama-q: random llama weights (seed 2024) with a toy SentencePiece vocabulary, "
                       "written by tools/make_gguf.py as F16, Q8_0 and Q4_0; logits computed in float64 by "
                       "PyTorch from the values each file stores (dequantized in Python).",
        "regenerate": "/usr/bin/python3 tools/make_gguf.py make-fixtures",
        "input_ids": ids,
    }
    full = None
    for kind in ("F32", "F16", "Q8_0", "Q4_0"):
        meta, tensors, stored = convert(tmp, kind, toy_tokenizer_metadata())
        logits = logits_from_stored(TINY_Q_CONFIG, stored, ids)
        if kind == "F32":
            full = logits
            continue
        path = os.path.join(out_dir, f"tiny-llama-q.{kind.lower()}.gguf")
        write_gguf(path, meta, tensors)
        expected[f"logits_{kind.lower()}"] = float_rows(logits)
        drift = float(torch.max(torch.abs(logits - full)))
        expected[f"max_abs_diff_vs_f32_{kind.lower()}"] = drift
        print(f"{path}: {os.path.getsize(path)} bytes, logits differ from f32 by up to {drift:.3g}")
    for name in os.listdir(tmp):
        os.remove(os.path.join(tmp, name))
    os.rmdir(tmp)
    with open(os.path.join(out_dir, "tiny-llama-q.json"), "w") as f:
        f.write(ref_llama.dumps_compact_arrays(expected))


def cmd_make_fixtures(args):
    out_dir = os.path.join(args.out_dir, "gguf")
    os.makedirs(out_dir, exist_ok=True)
    for name in ("tiny-llama3", "tiny-linear", "tiny-qwen2", "tiny-llama-bias", "tiny-gpt2"):
        meta, tensors, _ = convert(os.path.join(args.out_dir, name), "F32")
        path = os.path.join(out_dir, f"{name}.gguf")
        write_gguf(path, meta, tensors)
        print(f"{path}: {os.path.getsize(path)} bytes")
    make_tiny_q(out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-fixtures", help="write tests/fixtures/gguf/")
    p.add_argument("--out-dir", default="tests/fixtures", help="the fixtures folder (default tests/fixtures)")
    p.set_defaults(func=cmd_make_fixtures)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
