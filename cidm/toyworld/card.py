"""Measure the embedded toy-world models and write their model card (`python -m cidm.toyworld.card MODEL_DIR`).

The identity figures (concepts learned one after another through the user's path, then recognised) come from
`cidm bench --core`; the card shows the latest run's when its `core.json` is given.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import quality
from .train import LATENT_CHANNELS, save_grid


def measure(model_dir: Path, n_eval: int = 1000, n_prompts: int = 200) -> dict:
    """Evaluator zero-shot accuracy, generator prompt-following, and speed on this machine."""
    from diffusers import StableDiffusionPipeline

    from ..models import find_evaluator, load_evaluator

    model_dir = Path(model_dir)
    clip, tok = load_evaluator(find_evaluator(str(model_dir)), "cpu")
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    report = {"evaluator_zero_shot": quality.evaluator_accuracy(clip, tok, n=n_eval)}
    acc, images, prompts = quality.generator_accuracy(pipe, clip, tok, n=n_prompts)
    report["generator_prompt_following"] = acc
    save_grid(images[:64], model_dir / "samples.png")
    (model_dir / "samples.txt").write_text("\n".join(prompts[:64]) + "\n")
    report["seconds_8_images_25_steps"] = speed(pipe)
    report["model_folder_mb"] = round(sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file()) / 2**20, 1)
    return report


def speed(pipe, repeats: int = 3) -> float:
    """Best of `repeats`: 8 images, 25 DDIM steps, guidance 5 (CFG: a batch of 16 per UNet call)."""
    g = torch.Generator().manual_seed(0)
    prompts = ["a photo of a red star with a white circle on a beach"] * 8
    pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=g)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=g)
        times.append(time.perf_counter() - t0)
    return round(min(times), 2)


CARD = """---
library_name: diffusers
tags: [text-to-image, diffusers, cidm, toy-world]
---

# CIDM Studio's embedded toy world (version 2)

A complete text-to-image model, trained from scratch on a 2-core CPU, with no downloads: tokenizer, VAE, text encoder,
UNet and a CLIP evaluator. CIDM Studio runs on it through the same code path as Stable Diffusion:
`StableDiffusionPipeline.from_pretrained(this folder)` and, after `import cidm.toyworld.evaluator` (which registers
its image tower), `AutoModel.from_pretrained(this folder/evaluator)`.

## The world
64×64 procedural images (`cidm/toyworld/world.py`). A *glyph* is an outer shape (circle, square, triangle, star,
heart, cross) in one of 12 colours, optionally with an inner part: a smaller shape in a second colour ("a white
square with a red cross") or stripes or dots in a second colour ("an orange triangle with black stripes"). Glyphs sit
in 6 scenes or on plain backgrounds, one or two per image, sometimes in a whole-image style (grayscale, blurred,
inverted, pixelated). Captions name attributes coarsely; continuous details are left to the picture: the exact shade
(hue and brightness jitter), the inner part's scale and offset, the stripes' angle and spacing, an unnamed third
layer. Training captions often say less than the picture shows ("a photo of a square with a cross", "a painting in
grayscale style"), and vary their opening ("a photo of", "a close-up photo of", "a picture of", …), so the learning
templates are in the model's vocabulary.

**Personal concepts stay personal.** About one in seven (shape, colour, inner part, inner colour) combinations, and
every shipped concept's, never appear in base training (`world.is_personal`, tested). The base knows white squares,
red crosses and squares with crosses, never a white square with a red cross: learning `<medic>` is learning a point
near what the model knows, as learning *your* dog is for Stable Diffusion.

## Parts
- **Tokenizer:** a `CLIPTokenizer` whose BPE gives one token per world word, built deterministically.
- **VAE:** `AutoencoderKL`, 64×64×3 → {latent_channels}×16×16, {vae_psnr} dB PSNR on 256 held-out images.
- **Evaluator:** a CLIP-style `VisionTextDualEncoderModel`: a small CNN image tower (`GlyphCNNModel`: 3×3
  convolutions with batch norm at 64, 32, 16 and 8 px, max- and mean-pooled) and a CLIP text tower (width 128),
  trained with a multi-positive contrastive loss over captions naming random subsets of the attributes, groups of
  four images that differ in one attribute only (hard negatives), and cross-entropy of each image against the
  zero-shot prompts of its attributes ({evaluator_steps} steps). The first version's image tower, a ViT with 8-px
  patches, never read the outer shape (38 %); the shipped evaluator continued its text tower.
- **Text encoder:** the evaluator's text tower (SD's is CLIP's too), trained on with the UNet.
- **UNet:** `UNet2DConditionModel`, {unet_params:.2f} M parameters, channels {unet_channels}, cross-attention at 8×8
  and 4×4 ({n_layers} layers), epsilon objective, Min-SNR-5, 10 % empty captions. The shipped checkpoint is the one
  with the best measured prompt-following, not the lowest loss: {unet_weights} weights at step {unet_step}.

## Measured quality (held-out seeds)

| measure | outer shape | outer colour | inner part | inner colour | context |
|---|---|---|---|---|---|
| evaluator zero-shot accuracy, {n_eval} images (target ≥ 95 % each) | {ev} |
| generator: the evaluator finds the prompted attribute, {n_prompts} prompts, 25 DDIM steps, guidance 5 | {gen} |

Generator targets: outer shape ≥ 85 %, colour ≥ 90 %, inner part ≥ 75 %, inner colour ≥ 75 %, context ≥ 90 %.
Inner colour counts only prompts with an inner part. The generator's figures are read by this evaluator, so they are
limited by what it reads: an attribute it misreads in real images is misread in generated ones too.

Speed on this machine (2 CPU cores): 8 images at 25 steps in {speed} s. Folder size: {size} MB.
{identity}
![samples](samples.png)

## How it was trained

`python -m cidm toyworld train --out DIR` (resumable: run it again to continue): {training}.
"""

IDENTITY = """
## How often learned concepts are recognised

The standard sequence learned one concept after another with CIDM's defaults through the user's path (`cidm learn`,
no captions), each concept then generated with its evaluation prompts alone; *identified* when the evaluator ranks
it first among all learned concepts of its kind (nearest references): **{overall:.1%}** of images (target ≥ 90 %).
Per concept: {per_concept}. From `cidm bench --core` ({core}).
"""


def write_card(model_dir: Path, report: dict, core: dict | None = None, core_path: str = "") -> None:
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    info = json.loads((model_dir / "training.json").read_text())
    ev, gen = report["evaluator_zero_shot"], report["generator_prompt_following"]
    cols = ("shape", "colour", "inner", "inner_colour", "context")
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    weights = load_file(str(model_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    n_params = sum(t.numel() for t in weights.values())
    n_layers = sum(1 for k in weights if k.endswith("attn2.to_q.weight"))
    stages = [f"VAE {info['vae']['steps']} steps", f"evaluator {info['evaluator']['steps']} steps",
              f"UNet + text encoder {info['unet']['steps']} steps at batch {info['config']['unet_batch']}"]
    identity = ""
    if core and "identity" in core:
        per = core["identity"]["per_concept"]
        identity = IDENTITY.format(overall=core["identity"]["overall"], core=core_path,
                                   per_concept=", ".join(f"`<{n}>` {v:.0%}" for n, v in per.items()))
    text = CARD.format(vae_psnr=info["vae"]["psnr_db"], unet_weights=info["unet"]["best"]["weights"],
                       unet_step=info["unet"]["best"]["step"], evaluator_steps=info["evaluator"]["steps"],
                       n_eval=1000, n_prompts=200,
                       ev=" | ".join(f"{ev[c]:.1%}" for c in cols), gen=" | ".join(f"{gen[c]:.1%}" for c in cols),
                       speed=report["seconds_8_images_25_steps"], size=report["model_folder_mb"],
                       training="; ".join(stages), unet_params=n_params / 1e6, identity=identity,
                       unet_channels="/".join(map(str, unet_config["block_out_channels"])),
                       n_layers=n_layers, latent_channels=LATENT_CHANNELS)
    (model_dir / "README.md").write_text(text)
    (model_dir / "quality.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    import sys

    folder = Path(sys.argv[1])
    core_file = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    result = measure(folder)
    print(json.dumps(result, indent=1))
    core_report = json.loads(core_file.read_text()) if core_file else None
    write_card(folder, result, core_report, str(core_file or ""))
