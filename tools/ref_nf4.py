#!/usr/bin/python3
r"""Reference NF4 quantization of real stories260K weights, for tests/test_nf4.c.

An independent numpy implementation of 4-bit NormalFloat quantization (NF4,
from the QLoRA paper, Dettmers et al. 2023) as bitsandbytes implements it in
csrc/kernels.cu (kQuantizeBlockwise, dQuantizeNF4) and bitsandbytes/
functional.py (quantize_4bit with compress_statistics, create_dynamic_map):

  - blocks of 64 consecutive elements of the flattened weight, each with its
    float32 absmax (a last, partial block takes the max over its own elements);
  - x = w * float32(1 / absmax), then the index of the nearest NF4 value, where
    the thresholds are the midpoints of neighboring values and x equal to a
    midpoint takes the lower index (bitsandbytes tests x > midpoint);
  - two codes a byte, element 2i in the high nibble of byte i;
  - double quantization: the absmax array minus its mean, quantized in blocks
    of 256 with the signed 8-bit dynamic map and a float32 absmax per block.

A block of zeros gets absmax 0 and code 7 (the NF4 zero), as in cpeft.
bitsandbytes stores code 0 there, and both dequantize to zero.

The script also counts, over every quantized element, how often two variants
would pick another code: dividing by absmax instead of multiplying by its
reciprocal, and torch.argmin of the distances instead of the midpoint tests.
It prints the double quantization errors, which the fixture records too.

Regenerate the fixture from the repository root:

    /usr/bin/python3 tools/ref_nf4.py --model ../shared/models/stories260K \
        --out tests/fixtures/nf4/stories260K_nf4.json
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ref_llama import read_safetensors, sha256_file  # noqa: E402  (needs the sys.path line)

BLOCK = 64
SCALE_BLOCK = 256

# The 16 NF4 values published with QLoRA, as float32 (bitsandbytes' table).
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
NF4_ZERO_CODE = 7

# The decision thresholds of bitsandbytes' dQuantizeNF4, in code order.
BNB_NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]

# Whole matrices of layers 0 and 4, and one top-left slice with an element
# count that is neither a multiple of 64 nor even.
MATRICES = [f"model.layers.0.{m}.weight" for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + [
    "model.layers.4.self_attn.q_proj.weight", "model.layers.4.mlp.down_proj.weight"]
SLICE = ("model.layers.0.mlp.gate_proj.weight", 37, 63)


def midpoints(values):
    """Return the midpoints of neighboring sorted values, in double, rounded once to float32."""
    v = values.astype(np.float64)
    return ((v[:-1] + v[1:]) * 0.5).astype(np.float32)


def dynamic_map():
    """Return the signed dynamic map, sorted: for decade k = 0..6, the 2^k midpoints
    of equal subintervals of [0.1, 1] times 10^(k-6), both signs, plus 0 and 1."""
    decades = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    values = [0.0, 1.0]
    for k, decade in enumerate(decades):
        count = 2 ** k
        for j in range(count):
            value = decade * (0.1 + 0.9 * (2 * j + 1) / (2.0 * count))
            values += [value, -value]
    assert len(values) == 256
    return np.sort(np.array(values, dtype=np.float32))


def nearest_codes(x, thresholds):
    """Return the index of the nearest value: how many thresholds are strictly below x."""
    return np.searchsorted(thresholds, x, side="left").astype(np.uint8)


def blocks_of(flat, size):
    """Return flat as (n_blocks, size), the last block padded with zeros."""
    n_blocks = -(-flat.size // size)
    padded = np.zeros(n_blocks * size, dtype=np.float32)
    padded[:flat.size] = flat
    return padded.reshape(n_blocks, size)


def quantize_nf4(weight):
    """Return (codes per element, absmax per block, x = w * (1 / absmax) per element)."""
    flat = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1)
    blocks = blocks_of(flat, BLOCK)
    absmax = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore"):
        inverse = np.float32(1.0) / absmax
    x = (blocks * inverse[:, None]).astype(np.float32)
    codes = nearest_codes(x, midpoints(NF4_VALUES))
    codes[absmax == 0] = NF4_ZERO_CODE
    return codes.reshape(-1)[:flat.size], absmax, x.reshape(-1)[:flat.size]


def pack(codes):
    """Pack two codes a byte, the first in the high nibble. An odd count ends with a 0 nibble."""
    padded = np.zeros(codes.size + codes.size % 2, dtype=np.uint8)
    padded[:codes.size] = codes
    return (padded[0::2] << 4) | padded[1::2]


def dequantize(codes, scales):
    per_element = np.repeat(scales, BLOCK)[:codes.size]
    return (NF4_VALUES[codes] * per_element).astype(np.float32)


def double_quantize(absmax):
    """Return (scale codes, float32 absmax per 256 scales, mean, decoded scales)."""
    total = 0.0
    for value in absmax:  # a sequential sum in double, as cpeft does
        total += float(value)
    mean = np.float32(total / absmax.size)
    centered = (absmax - mean).astype(np.float32)

    groups = blocks_of(centered, SCALE_BLOCK)
    group_max = np.abs(groups).max(axis=1)
    with np.errstate(divide="ignore"):
        inverse = np.where(group_max > 0, np.float32(1.0) / group_max, np.float32(0.0)).astype(np.float32)
    x = (groups * inverse[:, None]).astype(np.float32)
    table = dynamic_map()
    codes = nearest_codes(x, midpoints(table))
    codes[group_max == 0] = int(np.nonzero(table == 0.0)[0][0])
    codes = codes.reshape(-1)[:absmax.size]

    decoded = (table[codes] * np.repeat(group_max, SCALE_BLOCK)[:absmax.size]).astype(np.float32)
    decoded = (decoded + mean).astype(np.float32)
    return codes, group_max, mean, decoded


def variant_differences(weight, codes, absmax):
    """Count elements where division by absmax, or argmin of |x - value|, picks another code."""
    flat = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32).reshape(-1))
    scales = torch.from_numpy(np.repeat(absmax, BLOCK)[:flat.numel()].copy())
    table = torch.from_numpy(NF4_VALUES)
    nonzero = scales > 0

    divided = flat[nonzero] / scales[nonzero]
    by_division = nearest_codes(divided.numpy(), midpoints(NF4_VALUES))
    recip = torch.from_numpy(codes.astype(np.int64))[nonzero]
    division = int((torch.from_numpy(by_division.astype(np.int64)) != recip).sum())

    x = flat[nonzero] * (1.0 / scales[nonzero])
    by_argmin = torch.argmin((x[:, None] - table[None, :]).abs(), dim=1)
    argmin = int((by_argmin != recip).sum())
    return division, argmin


def rms(a, b):
    return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def matrix_entry(name, weight, checks):
    codes, absmax, _ = quantize_nf4(weight)
    scale_codes, group_max, mean, decoded = double_quantize(absmax)

    diff = decoded.astype(np.float64) - absmax.astype(np.float64)
    positive = absmax > 0
    division, argmin = variant_differences(weight, codes, absmax)
    checks["elements"] += int(codes.size)
    checks["division_instead_of_reciprocal"] += division
    checks["argmin_instead_of_midpoints"] += argmin

    flat = weight.reshape(-1)
    return {
        "name": name,
        "rows": int(weight.shape[0]),
        "cols": int(weight.shape[1]),
        "codes": pack(codes).tobytes().hex(),
        "absmax": [float(v) for v in absmax],
        "double_quant": {
            "scale_codes": scale_codes.tobytes().hex(),
            "scale_absmax": [float(v) for v in group_max],
            "scale_mean": float(mean),
            "scale_rms_error": float(np.sqrt(np.mean(diff ** 2))),
            "scale_max_rel_error": float(np.max(np.abs(diff[positive]) / absmax[positive])),
            "weight_rms_error": rms(dequantize(codes, decoded), flat),
            "weight_rms_error_fp32_scales": rms(dequantize(codes, absmax), flat),
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="../shared/models/stories260K")
    parser.add_argument("--out", default="tests/fixtures/nf4/stories260K_nf4.json")
    args = parser.parse_args()

    # The thresholds of bitsandbytes' decision tree are the float32 midpoints.
    assert np.array_equal(midpoints(NF4_VALUES), np.array(BNB_NF4_THRESHOLDS, dtype=np.float32))

    path = os.path.join(args.model, "model.safetensors")
    tensors = read_safetensors(path)
    checks = {"elements": 0, "division_instead_of_reciprocal": 0, "argmin_instead_of_midpoints": 0}
    entries = [matrix_entry(name, tensors[name], checks) for name in MATRICES]
    name, rows, cols = SLICE
    entry = matrix_entry(name, tensors[name][:rows, :cols], checks)
    entry["slice"] = [rows, cols]
    entries.append(entry)

    fixture = {
        "format": "cpeft NF4 reference",
        "version": 1,
        "generator": "tools/ref_nf4.py",
        "source": "models/stories260K/model.safetensors",
        "source_sha256": sha256_file(path),
        "block": BLOCK,
        "scale_block": SCALE_BLOCK,
        "nf4_values": [float(v) for v in NF4_VALUES],
        "variant_checks": checks,
        "matrices": entries,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")

    print(f"{args.out}: {len(entries)} matrices, {checks['elements']} elements")
    print(f"codes that change when dividing by absmax: {checks['division_instead_of_reciprocal']}")
    print(f"codes that change with argmin of distances: {checks['argmin_instead_of_midpoints']}")
    for e in entries:
        dq = e["double_quant"]
        print(f"{e['name']:40s} {e['rows']:4d}x{e['cols']:<4d} double quant: scale rms error "
              f"{dq['scale_rms_error']:.3g}, max rel {dq['scale_max_rel_error']:.3g}; weight rms "
              f"error {dq['weight_rms_error']:.6g} (fp32 scales {dq['weight_rms_error_fp32_scales']:.6g})")


if __name__ == "__main__":
    main()
