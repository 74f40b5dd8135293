"""Regenerates the tiny test tokenizer in this folder (run with a Python that has `tokenizers`
and `transformers`; the output is committed, tests never run this).

`gguf_metadata.json` is what a Gemma GGUF would carry (`tokenizer.ggml.tokens`, `scores`,
`token_type`, with llama.cpp's spellings: real spaces, -1000 for control/user-defined pieces).
`tokenizer.json` is the Hugging Face tokenizer of the same vocabulary, built like Gemma 3's:
merges from transformers' `generate_merges` over SentencePiece scores (0 for control and
user-defined pieces), the same normalizer, pre-tokenizer, decoder and post-processor.
`tokenizer_config.json` carries the real Gemma 3 chat template, copied from the Gemma 3
`tokenizer_config.json`.
"""

import json
import sys

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers.tokenization_utils_base import generate_merges

CONTROL, USER, BYTE, NORMAL = 3, 4, 6, 1

pieces = [
    ("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL),
    ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL),
    ("\n", USER), ("\n\n", USER), ("\n\n\n", USER), ("  ", USER), ("   ", USER),
    ("<start_of_image>", CONTROL), ("<end_of_image>", CONTROL),
]
pieces += [(f"<0x{b:02X}>", BYTE) for b in range(256)]
normal = (
    "▁ e l h o t n i s a r d u m p : . , x y c g"
    " ▁t he ll ▁the lo ▁h hel hello ▁hello ▁s er ▁a in ▁i is ▁is us ▁us user od del ▁mod mo model"
    " ▁▁▁▁ 病 患 胸 悶 病患 主 訴 主訴 。 ， 三 天 三天 呼 吸 呼吸 困 難 困難 ▁x ▁y ra ▁ra ray"
).split(" ")
pieces += [(p, NORMAL) for p in normal]

tokens = [p for p, _ in pieces]
types = [t for _, t in pieces]
n_special = sum(1 for t in types if t != NORMAL)
gguf_scores = []
rank = 0
for t in types:
    if t in (CONTROL, USER):
        gguf_scores.append(-1000.0)
    elif t == BYTE:
        gguf_scores.append(0.0)
    else:
        gguf_scores.append(float(-rank))
        rank += 1

# llama.cpp writes pieces made only of spaces with real spaces, whatever their type.
gguf_tokens = [" " * len(p) if p and set(p) == {"▁"} else p for p in tokens]
json.dump(
    {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": gguf_tokens,
     "tokenizer.ggml.scores": gguf_scores, "tokenizer.ggml.token_type": types,
     "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
     "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
     "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": False},
    open("gguf_metadata.json", "w"), ensure_ascii=False, indent=0,
)

# tokenizer.json spells space runs with ▁, as SentencePiece does.
hf_tokens = ["▁" * len(p) if p and set(p) <= {" "} else p for p in tokens]
vocab = {p: i for i, p in enumerate(hf_tokens)}
assert len(vocab) == len(hf_tokens), "duplicate pieces"
sp_scores = {p: (0.0 if t in (CONTROL, USER) else s) for p, t, s in zip(hf_tokens, types, gguf_scores)}
merges = generate_merges(vocab, sp_scores)

tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
tok.normalizer = normalizers.Replace(" ", "▁")
tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
tok.post_processor = processors.TemplateProcessing(
    single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", 2)]
)
tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p, t in zip(hf_tokens, types) if t == CONTROL])
tok.add_tokens([AddedToken(p, normalized=False, special=False) for p, t in zip(hf_tokens, types) if t == USER])
tok.add_special_tokens([AddedToken("<image_soft_token>", normalized=False, special=True)])
tok.save("tokenizer.json")

real = json.load(open(sys.argv[1])) if len(sys.argv) > 1 else None
config = {
    "add_bos_token": True,
    "bos_token": "<bos>",
    "eos_token": "<end_of_turn>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
    "chat_template": real["chat_template"] if real else None,
}
json.dump(config, open("tokenizer_config.json", "w"), ensure_ascii=False, indent=2)
print(len(hf_tokens), "pieces,", len(merges), "merges")
