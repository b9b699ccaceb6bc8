#!/usr/bin/env python3
"""Write the reference pre-token splits that tests/test_bpe_pretokenizers.c
checks the hand-written matchers in src/tokenizer/bpe.c against.

For each pattern (GPT-2, Llama-3, Qwen2) it splits a list of hard strings and
a few hundred lines of tinyshakespeare with Python's third-party `regex`
module (Debian: python3-regex), which supports \\p{L}, \\p{N} and (?i:...)
as the Hugging Face tokenizers library's Oniguruma patterns do, and writes
tests/fixtures/pretokenize/<pattern>.json:

    {"pattern": "llama3", "regex": "...", "cases": [
        {"text": "...", "pieces": ["...", ...]}, ...]}

The regex strings are the ones in GPT-2's, Meta-Llama-3's and Qwen2's
tokenizer.json files. The regex module is needed only here, never by cpeft.

Usage: /usr/bin/python3 tools/ref_pretokenize.py [SHARED_DIR]
"""
import json
import os
import sys
import unicodedata

import regex

PATTERNS = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}

# Hard cases for the three patterns. No NUL (the C test reads the fixture
# with cJSON, whose strings end at NUL) and no character assigned after
# Unicode 14.0, the version of bpe.c's letter and number tables.
HARD_CASES = [
    "Hello world",
    "",
    " ",
    "a",
    # Contractions in both cases, inside and after words.
    "it's we'll I'M they'RE you'Ve she'D don'T",
    "x's x'S x'sa x'Sa x'll x'LL x'lL x'Ll x're x'rE x've x'VE x'm x'M x'd x'D x't x'T",
    "'S at the start",
    "'LLama 'Rex 'Vex 'x",
    "''s '''ll 'x 'l 'r 'v ' s",
    "I'm Bob's friend, y'all'd've known",
    "\u017f x'\u017f x'\u017fa",  # LATIN SMALL LETTER LONG S folds to s under (?i)
    "x'\u212a K'\u212a",  # KELVIN SIGN folds to k, which no contraction uses
    # Digit runs of 1 to 7 and digits next to letters and spaces.
    "1 12 123 1234 12345 123456 1234567",
    "x1 x12 x123 x1234 1x 12x 123x 1234x",
    " 1  22   333 4444\t55555\n666666",
    "3.14159 -42 +7 1,000,000 0x1F 2nd 3rd",
    "\u00bd \u00b2\u00b3 \u2167\u2168 \u0663\u0664\u0665\u0666 \uff11\uff12\uff13\uff14",  # No, Nl, Nd
    # CJK, accented and combining letters, other scripts.
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u6211\u662f\u4e00\u4e2a\u6a21\u578b\u3002",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u3068 \ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8",
    "caf\u00e9 na\u00efve \u00c4pfel \u00f8re \u00df \u0130stanbul",
    "cafe\u0301 e\u0301e\u0301 a\u0308b",  # combining marks are not \p{L}
    "\u0417\u0434\u0440\u0430\u0432\u0441\u0442\u0432\u0443\u0439, \u043c\u0438\u0440! \u039a\u03b1\u03bb\u03b7\u03bc\u03ad\u03c1\u03b1",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u05e9\u05dc\u05d5\u05dd \u0928\u092e\u0938\u094d\u0924\u0947",
    # Emoji, symbols, joiners and variation selectors.
    "\U0001f600 \U0001f600\U0001f601 a\U0001f600b \U0001f44d\U0001f3fd \u2764\ufe0f",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1fa\U0001f1f8 x\u200by",
    "\u20ac5 \u00a9 2024 \u2192 \u2211 \u221e \u2605\u2606",
    # Whitespace of every kind, newlines, tabs and trailing spaces.
    "a  b   c    d",
    "  leading and trailing  ",
    "end   ",
    "tab\there\t\tand\t \tthere\t",
    "line1\nline2\n\nline4\n\n\n",
    "\n",
    "\n\n",
    "\r\n",
    "a\r\nb\r\n\r\nc",
    "x  \n  y",
    "x \n \n y",
    " \n",
    "  \n\t\n  z",
    "\t\n",
    "a\n b\n  c\n   d",
    "a\u00a0b \u00a0c\u3000d\u2003e \u2028f\u2029g\u0085h",
    "a\x0bb\x0cc\x1cd\x1fe",
    "\u00a0\u00a0x",
    "a \u00a0",
    # Punctuation runs, with spaces and newlines after them.
    "Hello, world! How are you?",
    "...!!!???",
    "wait...\nwhat?!\n\n",
    "end.\r\n\r\nNext",
    "a ,b , c ,\n d",
    "!!\n \n!",
    "(a) [b] {c} <d> \"e\" 'f'",
    "'hello' \"quoted\" `code`",
    "foo_bar-baz/qux\\quux",
    "#include <stdio.h>\nint main(void) { return 0; }\n",
    "def f(x):\n    return x ** 2  # square\n",
    "    indented\n\tcode\n",
    "http://example.com/path?q=1&r=two#frag",
    "email@example.com, 555-1234",
    "$$$ %%% ^^^ &&& *** ___",
    "a!b?c.d,e;f:g",
    " !x ! x  !x",
    "\t!x\n!x",
    "x'y 'z 'S' ''",
]


def check_unicode_version(text):
    """Reject characters unassigned in Python's Unicode version (14.0 on
    Debian 12), because bpe.c's tables stop there."""
    for ch in text:
        if unicodedata.category(ch) == "Cn":
            raise SystemExit(f"U+{ord(ch):04X} is unassigned in Unicode "
                             f"{unicodedata.unidata_version}; drop it from the cases")
        if ch == "\0":
            raise SystemExit("a case contains NUL, which cJSON strings cannot hold")


def shakespeare_cases(shared, n_lines=300, lines_per_case=10):
    """Chunks of the first n_lines lines, with their newlines."""
    path = os.path.join(shared, "data", "tinyshakespeare", "input.txt")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[:n_lines]
    return ["\n".join(lines[i:i + lines_per_case]) + "\n"
            for i in range(0, len(lines), lines_per_case)]


def split(pattern, text):
    pieces = [m.group(0) for m in pattern.finditer(text)]
    if "".join(pieces) != text:
        raise SystemExit(f"the pattern does not cover {text!r}: {pieces!r}")
    return pieces


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shared = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "..", "shared")
    cases = HARD_CASES + shakespeare_cases(shared)
    for text in cases:
        check_unicode_version(text)

    out_dir = os.path.join(root, "tests", "fixtures", "pretokenize")
    os.makedirs(out_dir, exist_ok=True)
    for name, source in PATTERNS.items():
        pattern = regex.compile(source)
        header = {
            "pattern": name,
            "regex": source,
            "generator": f"tools/ref_pretokenize.py, regex {regex.__version__}",
        }
        # One case per line keeps the file small and its diffs readable.
        lines = [json.dumps({"text": t, "pieces": split(pattern, t)}, ensure_ascii=False)
                 for t in cases]
        path = os.path.join(out_dir, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(header, ensure_ascii=False)[:-1])
            f.write(', "cases": [\n' + ",\n".join(lines) + "\n]}\n")
        print(f"{path}: {len(cases)} cases, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
