#!/usr/bin/python3
"""Check a safetensors file against the format, independently of cpeft's C reader.

Usage:
  tools/check_safetensors.py FILE                 check the format, print a summary
  tools/check_safetensors.py FILE --writer        also check the layout cpeft's writer
                                                  promises (see below)
  tools/check_safetensors.py FILE --values NAME I [I ...]
                                                  print elements I of tensor NAME
                                                  (flat, row-major) as float32

Format rules checked (huggingface/safetensors README, "Format"): an 8-byte
little-endian header length N (at most 100,000,000), N bytes of UTF-8 JSON that
start with '{' and may be padded with trailing spaces, an object mapping tensor
names to {dtype, shape, data_offsets} plus an optional "__metadata__" object of
strings, no duplicate keys, and data_offsets that tile the data section exactly
(no overlaps, gaps or trailing bytes), each matching numel(shape) * dtype size.

The --writer rules: "__metadata__" first, tensors ordered by decreasing element
size then by name, data offsets increasing from 0, compact JSON, padding with
spaces so that the data section starts at a multiple of 8.

Needs only the standard library and numpy. Exits 1 with a message on the first
violation.
"""
import json
import struct
import sys

import numpy as np

MAX_HEADER = 100_000_000
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


class FormatError(Exception):
    pass


def reject_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate key {key!r}")
        out[key] = value
    return out


def reject_float(text):
    raise FormatError(f"number {text} is not an integer")


def reject_constant(text):
    raise FormatError(f"{text} is not allowed")


def parse_header(blob):
    if len(blob) < 8:
        raise FormatError(f"file is {len(blob)} bytes, shorter than 8")
    (n,) = struct.unpack("<Q", blob[:8])
    if n == 0 or n > MAX_HEADER or n > len(blob) - 8:
        raise FormatError(f"header length {n} is 0, above {MAX_HEADER} or past the file end")
    raw = blob[8:8 + n]
    if raw[:1] != b"{":
        raise FormatError("header does not start with '{'")
    text = raw.decode("utf-8")  # raises UnicodeDecodeError on bad bytes
    stripped = text.rstrip(" ")
    header = json.loads(stripped, object_pairs_hook=reject_duplicates,
                        parse_float=reject_float, parse_constant=reject_constant)
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    return n, text, header


def check_entry(name, info, data_size):
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{name}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise FormatError(f"{name}: unknown dtype {dtype!r}")
    ints = [x for x in shape + offsets if isinstance(x, int) and not isinstance(x, bool) and x >= 0]
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2 \
            or len(ints) != len(shape) + 2:
        raise FormatError(f"{name}: shape and data_offsets must hold non-negative integers")
    begin, end = offsets
    numel = 1
    for dim in shape:
        numel *= dim  # Python integers do not overflow
    if begin > end or end - begin != numel * DTYPE_SIZES[dtype] or end > data_size:
        raise FormatError(f"{name}: data_offsets {offsets} do not fit shape {shape} {dtype} "
                          f"inside a {data_size}-byte data section")
    return begin, end


def check_file(path, writer):
    with open(path, "rb") as f:
        blob = f.read()
    n, text, header = parse_header(blob)
    data_size = len(blob) - 8 - n

    metadata = header.get("__metadata__")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(v, str) for v in metadata.values())):
        raise FormatError("__metadata__ must be an object of strings")

    ranges = []
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = check_entry(name, info, data_size)
            ranges.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(ranges):
        if begin != pos:
            raise FormatError(f"{name}: begins at {begin}, expected {pos} (overlap or gap)")
        pos = end
    if pos != data_size:
        raise FormatError(f"tensors cover {pos} of {data_size} data bytes")

    if writer:
        check_writer_layout(header, text, n)
    return header, n, blob


def check_writer_layout(header, text, n):
    keys = list(header)
    if "__metadata__" in header and keys[0] != "__metadata__":
        raise FormatError("writer layout: __metadata__ is not the first key")
    names = [k for k in keys if k != "__metadata__"]
    expected = sorted(names, key=lambda k: (-DTYPE_SIZES[header[k]["dtype"]], k.encode()))
    if names != expected:
        raise FormatError(f"writer layout: tensor order {names} != {expected}")
    offsets = [header[k]["data_offsets"][0] for k in names]
    if offsets != sorted(offsets):
        raise FormatError("writer layout: data offsets do not increase in header order")
    compact = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    if text.rstrip(" ") != compact:
        raise FormatError("writer layout: header JSON is not compact")
    if (8 + n) % 8 != 0:
        raise FormatError(f"writer layout: data starts at {8 + n}, not a multiple of 8")


def tensor_values(header, n, blob, name, indices):
    info = header[name]
    begin, end = info["data_offsets"]
    raw = blob[8 + n + begin:8 + n + end]
    dtype = info["dtype"]
    if dtype == "F32":
        values = np.frombuffer(raw, dtype="<f4")
    elif dtype == "F16":
        values = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif dtype == "BF16":
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise SystemExit(f"--values supports F32, F16 and BF16, not {dtype}")
    return [values[i] for i in indices]


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = argv[1]
    try:
        header, n, blob = check_file(path, "--writer" in argv)
    except (FormatError, UnicodeDecodeError, json.JSONDecodeError) as e:
        print(f"{path}: INVALID: {e}", file=sys.stderr)
        return 1
    if "--values" in argv:
        at = argv.index("--values")
        name, indices = argv[at + 1], [int(x) for x in argv[at + 2:]]
        for i, v in zip(indices, tensor_values(header, n, blob, name, indices)):
            print(f"{name}[{i}] = {float(v):.9g}")
        return 0
    count = len([k for k in header if k != "__metadata__"])
    print(f"{path}: OK: {count} tensors, header {n} bytes, data starts at byte {8 + n}"
          f" ({'8-byte aligned' if (8 + n) % 8 == 0 else 'not 8-byte aligned'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
