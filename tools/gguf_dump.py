#!/usr/bin/python3
"""Print the header, metadata and tensor descriptions of a GGUF file.

Written with the standard library only, independently of cpeft's C reader,
to cross-check the values that tests/test_gguf.c expects.

Usage:
  tools/gguf_dump.py FILE                 header, every key, arrays cut to 5 elements
  tools/gguf_dump.py FILE KEY I [I ...]   elements I of the array under KEY
"""
import struct
import sys

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self):
        n = self.take("<Q")
        raw = self.data[self.pos:self.pos + n]
        if len(raw) != n:
            raise ValueError(f"string of {n} bytes at byte {self.pos - 8} runs past the end")
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.take("<I"), self.take("<Q")
            return [self.value(etype) for _ in range(n)]
        return self.take(SCALARS[vtype])


def parse(path):
    with open(path, "rb") as f:
        r = Reader(f.read())
    if r.data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    r.pos = 4
    version, n_tensors, n_kv = r.take("<I"), r.take("<Q"), r.take("<Q")
    kv = {}
    for _ in range(n_kv):
        key = r.string()
        kv[key] = r.value(r.take("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        tensors.append((name, dims, r.take("<I"), r.take("<Q")))
    return version, kv, tensors


def main():
    version, kv, tensors = parse(sys.argv[1])
    if len(sys.argv) > 3:
        values = kv[sys.argv[2]]
        for i in sys.argv[3:]:
            print(i, repr(values[int(i)]))
        return
    print(f"version {version}, {len(kv)} keys, {len(tensors)} tensors")
    for key, value in kv.items():
        if isinstance(value, list):
            print(f"{key}: array of {len(value)}: {value[:5]!r}")
        else:
            print(f"{key}: {value!r}")
    for name, dims, ttype, offset in tensors:
        print(f"tensor {name}: dims {dims}, type {ttype}, offset {offset}")


if __name__ == "__main__":
    main()
