"""Regenerates corpus_ids.json: the ids the Python `tokenizers` library gives for each line of
corpus.txt (escapes \\n, \\t, \\\\ undone) and for all lines joined by newlines, with the real
Gemma 3 tokenizer.json. Usage: python make_corpus_ids.py ~/.cache/medgemma/demo/tokenizer/tokenizer.json
"""

import json
import sys

import tokenizers
from tokenizers import Tokenizer


def unescape(line):
    out, i = [], 0
    while i < len(line):
        if line[i] == "\\" and i + 1 < len(line):
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[line[i + 1]])
            i += 2
        else:
            out.append(line[i])
            i += 1
    return "".join(out)


tok = Tokenizer.from_file(sys.argv[1])
lines = [unescape(l) for l in open("corpus.txt", encoding="utf-8").read().split("\n") if l]
json.dump(
    {
        "source": f"tokenizers (Python) {tokenizers.__version__}, Tokenizer.from_file(gemma3 "
        "tokenizer.json).encode(line, add_special_tokens=False)",
        "lines": [tok.encode(l, add_special_tokens=False).ids for l in lines],
        "whole": tok.encode("\n".join(lines), add_special_tokens=False).ids,
    },
    open("corpus_ids.json", "w"),
    separators=(",", ":"),
)
