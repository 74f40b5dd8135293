#!/usr/bin/env python3
"""transformers on the random 4B-shaped checkpoint `medgemma bench-device` writes: prefill and
decode tokens/s at the same batch sizes, prompt length and decode steps, bf16, SDPA, on CUDA.

Run by tools/device/check.sh when torch with CUDA is importable; prints and writes JSON that
`medgemma bench-device --transformers-json` puts beside its own rows. Prompts are the same
token ids (the same formula as the Rust side); decode is greedy with a static KV cache, eos
ignored.
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def prompts(batch, length, vocab):
    return [[3 + (b * 7919 + i * 104729) % (vocab - 3) for i in range(length)] for b in range(batch)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    m = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.bfloat16, attn_implementation="sdpa").to(dev).eval()
    vocab = m.config.vocab_size
    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        ids = torch.tensor(prompts(b, a.prompt_tokens, vocab), device=dev)
        with torch.inference_mode():
            m(ids[:1, :16])  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            for lo in range(0, b, max(1, 8192 // a.prompt_tokens)):
                m(ids[lo : lo + max(1, 8192 // a.prompt_tokens)], logits_to_keep=1)
            torch.cuda.synchronize()
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=a.decode_steps, min_new_tokens=a.decode_steps, do_sample=False,
                       cache_implementation="static")
            torch.cuda.synchronize()
            total = time.perf_counter() - t
        # generate() prefills again: take that prefill's time off.
        decode = max(total - prefill, 1e-9)
        rows.append({"batch": b, "prefill_tok_s": b * a.prompt_tokens / prefill,
                     "decode_tok_s": b * a.decode_steps / decode, "decode_step_ms": decode / a.decode_steps * 1e3})
        print(json.dumps(rows[-1]), flush=True)
    res = {"engine": f"transformers {transformers.__version__} / torch {torch.__version__} (sdpa, bf16)",
           "device": torch.cuda.get_device_name(0), "decoder": rows}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
