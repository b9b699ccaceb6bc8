#!/usr/bin/python3
"""Generate the small SentencePiece models and expected ids in tests/fixtures/sentencepiece/.

The models cover what the Llama-2 and stories260K tokenizers do not: no byte
fallback (unknown characters become <unk>), USER_DEFINED pieces, UNUSED pieces,
no dummy prefix, and special ids other than 0/1/2. expected.json stores the ids
and decoded text that Python's sentencepiece (the reference) gives for each case.

Run from the repository root with Debian's python3-sentencepiece:
    /usr/bin/python3 tools/gen_sentencepiece_fixtures.py [SHARED]
SHARED (default ../shared) is the folder with data/tinyshakespeare/input.txt.
Training is single-threaded and so repeatable, but another sentencepiece version may
train different models; the tests only compare against the committed files.
"""
import json
import os
import random
import sys
import tempfile

import sentencepiece as spm

OUT_DIR = "tests/fixtures/sentencepiece"


def read_varint(buf, pos):
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def write_varint(value):
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def parse_fields(buf):
    """Split a protobuf message into (field, wire type, raw value) triples."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            length, pos = read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise ValueError(f"wire type {wire} is not used by SentencePiece models")
        fields.append((field, wire, value))
    return fields


def build_fields(fields):
    out = bytearray()
    for field, wire, value in fields:
        out += write_varint(field << 3 | wire)
        if wire == 0:
            out += write_varint(value)
        elif wire == 2:
            out += write_varint(len(value)) + bytes(value)
        else:
            out += bytes(value)
    return bytes(out)


def rewrite_model(src, dst, mark_unused):
    """Copy model src to dst without the training input and output paths in
    trainer_spec, which name a temporary folder, so reruns give the same bytes.
    With mark_unused, every 4th multi-character NORMAL piece of at most 8 bytes
    becomes UNUSED, so the encoder must split those pieces again."""
    fields, normal_seen = [], 0
    for field, wire, value in parse_fields(open(src, "rb").read()):
        if field == 2:
            spec = [f for f in parse_fields(value) if f[0] not in (1, 2)]
            value = build_fields(spec)
        if field == 1 and mark_unused:
            piece = parse_fields(value)
            text = next(v for f, _, v in piece if f == 1)
            is_normal = not any(f == 3 for f, _, _ in piece)
            if is_normal:
                if len(text.decode()) >= 2 and len(text) <= 8 and normal_seen % 4 == 0:
                    piece.append((3, 0, 5))
                normal_seen += 1
            value = build_fields(piece)
        fields.append((field, wire, value))
    with open(dst, "wb") as f:
        f.write(build_fields(fields))


def train_models(corpus, tmp):
    common = dict(input=corpus, model_type="bpe", normalization_rule_name="identity",
                  num_threads=1, minloglevel=2)
    spm.SentencePieceTrainer.train(
        model_prefix=os.path.join(tmp, "nofallback"), vocab_size=400, byte_fallback=False,
        user_defined_symbols=["<sep>", "\u2581ROMEO"], remove_extra_whitespaces=False,
        add_dummy_prefix=False, character_coverage=0.98, **common)
    spm.SentencePieceTrainer.train(
        model_prefix=os.path.join(tmp, "special"), vocab_size=500, byte_fallback=True,
        remove_extra_whitespaces=True, add_dummy_prefix=False, unk_id=3, bos_id=0,
        eos_id=-1, pad_id=1, control_symbols=["<ctl>"], **common)


def make_cases(text):
    rng = random.Random(1)
    cases = [
        "", " ", "  ", "Hello world", " Hello  world ", "ROMEO: the king<sep>QUEEN",
        "<sep><sep>", "caf\u00e9 na\u00efve \u4e2d\u6587 \U0001F999", "tab\there\nnew line",
        "\u2581ROMEO and ROMEO", "<s> </s> <unk> <ctl>", "\u0416\u0416\u0416 zzz \u00df",
    ]
    alphabet = list(" \t\nabcdeXYZ019.,'!?-") + ["\u00e9", "\u00df", "\u4e2d", "\U0001F600",
                                                 "\u2581", "<sep>", "ROMEO", "\u00a0"]
    for _ in range(16):
        cases.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))))
    for _ in range(8):
        start = rng.randrange(len(text) - 300)
        cases.append(text[start:start + rng.randint(20, 150)])
    return cases


def ids_summary(sp, text):
    """Return the id count and a 64-bit polynomial hash of the ids of text,
    written as hex because JSON numbers lose bits past 2**53."""
    ids = sp.encode(text)
    digest = 0
    for i in ids:
        digest = (digest * 1000003 + i + 1) & 0xFFFFFFFFFFFFFFFF
    return {"n_ids": len(ids), "hash": "%016x" % digest}


def main():
    shared = sys.argv[1] if len(sys.argv) > 1 else "../shared"
    text = open(os.path.join(shared, "data/tinyshakespeare/input.txt"), encoding="utf-8").read()
    os.makedirs(OUT_DIR, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write(text[:300000])
            f.write("caf\u00e9 na\u00efve \u4e2d\u6587 \u65e5\u672c\u8a9e \U0001F999 \u00df\n")
        train_models(corpus, tmp)
        for name in ("nofallback", "special"):
            rewrite_model(os.path.join(tmp, name + ".model"),
                          os.path.join(OUT_DIR, name + ".model"), mark_unused=False)
        rewrite_model(os.path.join(tmp, "nofallback.model"),
                      os.path.join(OUT_DIR, "unused.model"), mark_unused=True)

    cases = make_cases(text)
    expected = {"generator": "tools/gen_sentencepiece_fixtures.py",
                "sentencepiece_version": spm.__version__, "models": {}}
    # Whole-text ids for tinyshakespeare: the fixture models and the two
    # tokenizers under SHARED, named by their path there.
    expected["shakespeare"] = {}
    for path in ("tokenizers/llama2/tokenizer.model", "models/stories260K/tokenizer.model"):
        sp = spm.SentencePieceProcessor(model_file=os.path.join(shared, path))
        expected["shakespeare"][path] = ids_summary(sp, text)
    for name in ("nofallback", "special", "unused"):
        sp = spm.SentencePieceProcessor(model_file=os.path.join(OUT_DIR, name + ".model"))
        expected["shakespeare"][name + ".model"] = ids_summary(sp, text)

    for name in ("nofallback", "special", "unused"):
        sp = spm.SentencePieceProcessor(model_file=os.path.join(OUT_DIR, name + ".model"))
        entries = []
        for case in cases:
            ids = sp.encode(case)
            # cpeft decodes <unk> to nothing where SentencePiece writes " \u2047 ",
            # which is the same as leaving the <unk> ids out.
            decoded = sp.decode([i for i in ids if i != sp.unk_id()])
            entries.append({"text": case, "ids": ids, "decoded": decoded})
        expected["models"][name + ".model"] = {
            "vocab_size": sp.vocab_size(), "unk_id": sp.unk_id(), "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
            "unused_pieces": sum(sp.is_unused(i) for i in range(sp.vocab_size())),
            "cases": entries,
        }
    # One case per line keeps the file small and its diffs readable.
    all_cases = {}
    for name, model in expected["models"].items():
        all_cases[name] = model["cases"]
        model["cases"] = "@CASES:" + name
    text = json.dumps(expected, ensure_ascii=True, indent=1)
    for name, cases in all_cases.items():
        lines = ",\n    ".join(json.dumps(case, ensure_ascii=True) for case in cases)
        text = text.replace(json.dumps("@CASES:" + name), "[\n    " + lines + "\n   ]")
    with open(os.path.join(OUT_DIR, "expected.json"), "w", encoding="utf-8") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
