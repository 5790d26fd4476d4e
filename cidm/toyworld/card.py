"""Measure the embedded toy-world models and write their model card (the figures the issue asks for)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import quality
from .train import save_grid


def measure(model_dir: Path, n_eval: int = 1000, n_prompts: int = 200) -> dict:
    """Evaluator zero-shot accuracy, generator prompt-following, and speed on this machine."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, CLIPTokenizer

    from ..models import find_evaluator

    model_dir = Path(model_dir)
    evaluator = find_evaluator(str(model_dir))
    clip = CLIPModel.from_pretrained(evaluator).eval()
    tok = CLIPTokenizer.from_pretrained(evaluator)
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    report = {"evaluator_zero_shot": quality.evaluator_accuracy(clip, tok, n=n_eval)}
    acc, images, prompts = quality.generator_accuracy(pipe, clip, tok, n=n_prompts)
    report["generator_prompt_following"] = acc
    save_grid(images[:64], model_dir / "samples.png")
    (model_dir / "samples.txt").write_text("\n".join(prompts[:64]) + "\n")
    g = torch.Generator().manual_seed(0)
    pipe(["a photo of a red star on a beach"] * 8, num_inference_steps=25, guidance_scale=5.0, generator=g)
    t0 = time.perf_counter()
    pipe(["a photo of a red star on a beach"] * 8, num_inference_steps=25, guidance_scale=5.0, generator=g)
    report["seconds_8_images_25_steps"] = round(time.perf_counter() - t0, 2)
    return report


CARD = """---
library_name: diffusers
tags: [text-to-image, diffusers, cidm, toy-world]
---

# CIDM Studio's embedded toy world

It is a complete text-to-image model, trained from scratch on a 2-core CPU. There are no downloads: the tokenizer, VAE,
UNet and CLIP evaluator are all here. It lets CIDM Studio run on any machine through the same code path as Stable
Diffusion: `StableDiffusionPipeline.from_pretrained(this folder)` and `CLIPModel.from_pretrained(this folder/evaluator)`.

- **World:** 64×64 procedural images (`cidm/toyworld/world.py`) of 6 shapes in 8 colours, in 6 scenes or on plain
  backgrounds, with optional striped, dotted or outlined styles. Captions read like "a photo of a striped blue heart
  in the snow".
- **Tokenizer:** a `CLIPTokenizer` whose BPE gives one token per world word. It is built deterministically.
- **VAE:** an `AutoencoderKL` mapping 64×64×3 to 4×16×16, at {vae_psnr} dB PSNR on held-out images.
- **Evaluator:** a `CLIPModel` (ViT with patch 8 on 64 px; text width 128) trained contrastively with multi-positive
  targets, shape-only captions and auxiliary linear probes (discarded). Half of each batch comes in groups of four
  scenes that differ only in the shape: colour and context tell random scenes apart so easily that, without these
  hard negatives, shape stayed near chance. Its text tower initialises the diffusion model's text encoder (SD uses
  CLIP's), which then trains jointly with the UNet; the evaluator's later continuations change only the evaluator.
- **UNet:** a `UNet2DConditionModel` ({unet_params:.2f} M parameters, channels {unet_channels}, {unet_heads}
  attention heads) with 7 cross-attention layers at 16×16, 8×8 and 4×4. It is trained with the epsilon objective,
  Min-SNR-5 weighting and 10 % empty captions. The shipped checkpoint is gated on measured prompt-following, not on
  the loss. Shipped: {unet_weights} weights at step {unet_step}.
- **Learning concepts on it:** `cidm_task_defaults.json` sets the LoRA learning rate to 1e-3. At the paper's 1e-4
  (tuned for SD-1.5) a toy concept's LoRA stays near zero and only its tokens are learned.

## Measured quality (held-out seeds)

| measure | shape | colour | context |
|---|---|---|---|
| evaluator zero-shot accuracy, {n_eval} images | {ev_shape:.1%} | {ev_colour:.1%} | {ev_context:.1%} |
| generator: evaluator finds the prompted attribute, {n_prompts} prompts, 25 DDIM steps, guidance 5 | {gen_shape:.1%} | {gen_colour:.1%} | {gen_context:.1%} |

The targets are ≥ 95 % for the evaluator, and ≥ 80 % shape, ≥ 80 % colour and ≥ 70 % context for the generator.
A batch of 8 images at 25 steps took {speed} s on this machine (2 CPU cores).

![samples](samples.png)

## How it was trained

`python -m cidm toyworld train --out DIR`: {training}. Training resumes from this folder with `--resume-from`.
"""


def write_card(model_dir: Path, report: dict) -> None:
    info = json.loads((Path(model_dir) / "training.json").read_text())
    ev, gen = report["evaluator_zero_shot"], report["generator_prompt_following"]
    unet = info["unet"]["best"]
    stages = [f"VAE {info['vae']['steps']} steps + {info.get('vae_finetune', {}).get('steps', 0)} fine-tuning steps",
              f"evaluator {info['evaluator']['steps']} + {info.get('evaluator_more', {}).get('steps', 0)} steps",
              *[f"evaluator continuation {i + 1}: {r['steps']} steps with shape groups"
                f"{'' if r.get('shipped', True) else ' (not shipped: no better)'}"
                for i, r in enumerate(info.get("evaluator_runs", []))],
              f"UNet {info['unet']['steps']} steps (batch 32"
              + ("; a new architecture trained from scratch with `--new-unet` on the tokenizer, VAE, evaluator and "
                 "text encoder above)" if info.get("new_unet") else ")")]
    unet_config = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    n_params = sum(t.numel() for t in load_file(str(Path(model_dir) / "unet" / "diffusion_pytorch_model.safetensors"))
                   .values())
    text = CARD.format(vae_psnr=info.get("vae_finetune", info["vae"])["psnr_db"], unet_weights=unet["weights"],
                       unet_step=unet["step"], n_eval=1000, n_prompts=200, ev_shape=ev["shape"],
                       ev_colour=ev["colour"], ev_context=ev["context"], gen_shape=gen["shape"],
                       gen_colour=gen["colour"], gen_context=gen["context"],
                       speed=report["seconds_8_images_25_steps"], training="; ".join(stages),
                       unet_params=n_params / 1e6, unet_channels="/".join(map(str, unet_config["block_out_channels"])),
                       unet_heads=unet_config["attention_head_dim"])
    (Path(model_dir) / "README.md").write_text(text)
    (Path(model_dir) / "quality.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    import sys

    folder = Path(sys.argv[1])
    result = measure(folder)
    print(json.dumps(result, indent=1))
    write_card(folder, result)
