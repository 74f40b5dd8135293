#!/usr/bin/env python3
"""The transformers side of `medgemma bench-vision`.

Makes (once) a full-size MedGemma 4B vision checkpoint with seeded random weights — SigLIP
so400m-patch14 at 896 px (27 layers, 1152 wide, 4096 patches) and the Gemma 3 projector to a
2560-wide decoder, 256 soft tokens per image — in the hub's legacy layout
(`vision_tower.vision_model.*`, `multi_modal_projector.*`) with its config.json, then times
transformers' own modules on it (CPU, float32, `torch.inference_mode`), and writes one seeded
image's pixel values and embeddings so the Rust side can check parity at full size.

Prints one JSON object on stdout. Needs torch + transformers + safetensors (tools/fixtures/
requirements.txt pins them); never run by CI.

  python tools/bench/vision_transformers.py --dir /tmp/so400m --images 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import Gemma3Config, SiglipVisionConfig, SiglipVisionModel
from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

VISION = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_channels=3,
    image_size=896,
    patch_size=14,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
    vision_use_head=False,
    model_type="siglip_vision_model",
)
TEXT_HIDDEN = 2560
MM_TOKENS = 256


def config_json() -> dict:
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "boi_token_index": 255999,
        "eoi_token_index": 256000,
        "image_token_index": 262144,
        "mm_tokens_per_image": MM_TOKENS,
        "text_config": {"model_type": "gemma3_text", "hidden_size": TEXT_HIDDEN},
        "vision_config": VISION,
    }


def build(dir_: Path, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    vcfg = SiglipVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"})
    vcfg._attn_implementation = "sdpa"
    tower = SiglipVisionModel(vcfg).eval()
    cfg = Gemma3Config(
        text_config={"hidden_size": TEXT_HIDDEN},
        vision_config={k: v for k, v in VISION.items() if k != "model_type"},
        mm_tokens_per_image=MM_TOKENS,
    )
    proj = Gemma3MultiModalProjector(cfg).eval()
    with torch.no_grad():
        # The projector is a plain nn.Module: its weight starts at zero; give it real values.
        torch.nn.init.normal_(proj.mm_input_projection_weight, std=0.02)
        torch.nn.init.normal_(proj.mm_soft_emb_norm.weight, std=0.1)
        # SigLIP initialises LayerNorms to 1/0 and biases to 0: perturb them so a missing
        # bias or a wrong LayerNorm in the port cannot hide.
        for name, p in tower.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.02)
    weights = dir_ / "model.safetensors"
    if weights.exists():
        state = load_file(str(weights))
        tower.load_state_dict({k[len("vision_tower.vision_model."):]: v for k, v in state.items() if k.startswith("vision_tower.")}, strict=False)
        proj.load_state_dict({k[len("multi_modal_projector."):]: v for k, v in state.items() if k.startswith("multi_modal_projector.")})
        return tower, proj
    dir_.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in tower.state_dict().items():
        k = k[len("vision_model."):] if k.startswith("vision_model.") else k
        out["vision_tower.vision_model." + k] = v.contiguous()
    for k, v in proj.state_dict().items():
        out["multi_modal_projector." + k] = v.contiguous()
    save_file(out, str(weights), metadata={"format": "pt"})
    (dir_ / "config.json").write_text(json.dumps(config_json(), indent=2) + "\n")
    return tower, proj


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tower, proj = build(args.dir, args.seed)
    g = torch.Generator().manual_seed(1234)
    pixels = torch.rand((1, 3, 896, 896), generator=g) * 2 - 1

    def run(px: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return proj(tower(pixel_values=px).last_hidden_state)

    emb = run(pixels)  # warm-up, and the parity reference
    save_file({"pixel_values": pixels.contiguous(), "embeddings": emb[0].contiguous()}, str(args.dir / "reference.safetensors"))
    rss_loaded = rss_kib("VmRSS")
    reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    per_image = []
    for _ in range(args.images):
        t = time.perf_counter()
        run(pixels)
        per_image.append(time.perf_counter() - t)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    weight_bytes = sum(p.numel() * p.element_size() for p in list(tower.parameters()) + list(proj.parameters()))
    print(json.dumps({
        "impl": f"transformers {transformers.__version__} / torch {torch.__version__} (sdpa, f32)",
        "threads": torch.get_num_threads(),
        "images": args.images,
        "seconds": dt,
        "images_per_s": args.images / dt,
        "image_seconds": per_image,
        "cpu_seconds_per_image": cpu / args.images,
        "weight_bytes": weight_bytes,
        "rss_after_load_bytes": rss_loaded * 1024,
        "peak_rss_bytes": rss_kib("VmHWM") * 1024,
    }))


if __name__ == "__main__":
    main()
