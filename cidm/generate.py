"""Generation with every learned concept: layer-wise prompts, EWA-merged LoRAs (Eq. 3), and (optionally) regions."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from PIL import Image

from .attention import install_processors
from .ewa import ewa_weights, merged
from .lora import LoRAWeights
from .models import precision_context
from .sampling import (SEED_MAX, classifier_free_guidance, decode, denoise, encode_image, initial_latents,
                       latent_size, partial_timesteps, predict_noise)


@dataclasses.dataclass
class GenerateConfig:
    steps: int = 25
    guidance: float = 5.0  # classifier-free guidance s
    num_images: int = 1
    seed: int = 0
    psi: str = "paper"  # EWA ψ: "paper" M²/‖M²‖ | "code" 0.8·M⁴/ΣM⁴ | "sharp" M⁸/‖M⁸‖
    ewa_space: str = "token"  # similarities between token embeddings ("token") or text-encoder outputs ("encoded")
    # how the task LoRAs meet at inference: "ewa" (Eq. 3); "mean" 1/T each (LoRA-Merge, cidm-no-ewa);
    # "sum" 1 each (C-LoRA's merged deltas); "last" the latest only (Finetuning); "composite" one UNet pass per
    # LoRA, noise predictions averaged (LoRA-Composite); "none" no LoRA (the tokens alone, a diagnostic)
    merge: str = "ewa"
    height: int | None = None
    width: int | None = None
    context_strength: float = 0.6  # LFS in-context generation: how much of a concept's vision context is re-noised
    mixed_precision: str = "no"  # autocast of the UNet passes: "no" | "fp16" | "bf16" (CPU bf16: ~1.4× faster)

    def __post_init__(self):
        for field in ("steps", "num_images"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a whole number of at least 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be a whole number from 0 to {SEED_MAX}, got {self.seed!r}")
        if not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance):
            raise ValueError(f"guidance must be a finite number, got {self.guidance!r}: NaN or infinity would give a "
                             f"black image")


MERGES = ("ewa", "mean", "sum", "last", "composite", "none")


def layer_weights(tokens, loras: dict[str, LoRAWeights], prompt: str, config: GenerateConfig) -> torch.Tensor:
    """(L, T) merge weights of the tasks for a prompt."""
    names, L = list(loras), tokens.n_layers
    if config.merge == "ewa":
        return ewa_weights(tokens, names, prompt, config.psi, config.ewa_space)
    if config.merge == "mean":
        return torch.full((L, len(names)), 1.0 / max(1, len(names)))
    if config.merge in ("sum", "composite"):
        return torch.ones(L, len(names))
    if config.merge == "none":
        return torch.zeros(L, len(names))
    if config.merge == "last":
        w = torch.zeros(L, len(names))
        if names:
            w[:, -1] = 1.0
        return w
    raise ValueError(f"merge must be one of {', '.join(MERGES)}; got {config.merge!r}")


@torch.no_grad()
def generate(pipe, tokens, loras: dict[str, LoRAWeights], prompt: str | list[str], negative_prompt: str = "",
             config: GenerateConfig | None = None, callback: Callable[[int, int], None] | None = None,
             contexts: dict[str, Image.Image] | None = None) -> list[Image.Image]:
    """Images for one prompt that may name any learned `<concept>`; `config.num_images` each, prompt by prompt.

    A list of prompts is generated as one batch: each prompt starts from the same `config.seed` noise and keeps its
    own EWA weights, so the images equal those of one call per prompt (up to float rounding), in less time.
    `contexts` (LFS in-context generation): vision contexts by concept; a prompt naming one starts from its latents.
    """
    config = config or GenerateConfig()
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device, dtype = unet.device, unet.dtype
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = config.num_images

    # 1. Check inputs
    if not prompts or any(not p or not p.strip() for p in prompts):
        raise ValueError("the prompt is empty; describe the image, e.g. 'a photo of a <name> on a beach'")
    named = [[c for c in tokens.check_prompt(p) if c in (contexts or {})][:1] for p in prompts]  # LFS contexts
    if any(named) and not all(named):
        raise ValueError("prompts with and without a vision context start at different steps; generate them apart")
    tokens.check_prompt(negative_prompt)
    if config.steps < 1 or n < 1:
        raise ValueError(f"steps and num_images must be at least 1 (got {config.steps}, {n})")
    height, width, _ = latent_size(pipe, config.height, config.width)

    # 2. Bind the prompts into layer-wise embeddings: (P·n, L, N, D) each, uncond first
    cond = tokens.encode(prompts).to(dtype).repeat_interleave(n, dim=0)
    uncond = tokens.encode([negative_prompt]).to(dtype).expand_as(cond)
    text = torch.cat([uncond, cond])

    # 3. EWA weights (Eq. 3), once per prompt: (2·P·n, L, T), one row per sample of the batch
    weights = torch.stack([layer_weights(tokens, loras, p, config) for p in prompts]).repeat_interleave(n, dim=0)
    weights = torch.cat([weights, weights])

    # 4. Processors that give each cross-attention layer its own text
    layers = install_processors(unet)

    # 5. Denoising loop, with the merged weights
    scheduler.set_timesteps(config.steps, device=device)
    timesteps = scheduler.timesteps
    generator = torch.Generator().manual_seed(config.seed)
    latents = initial_latents(pipe, scheduler, n, height, width, generator).repeat(len(prompts), 1, 1, 1)
    if any(named):  # in-context generation: each prompt's first named concept's vision context, noised
        timesteps = partial_timesteps(scheduler, config.context_strength)
        z_context = torch.cat([encode_image(vae, contexts[c[0]].resize((width, height))) for c in named])
        z_context = z_context.to(device, dtype).repeat_interleave(n, dim=0)
        latents = scheduler.add_noise(z_context, latents, timesteps[:1])

    def predict(x, t):
        return predict_noise(unet, x, t, text).to(dtype)  # out of autocast's precision

    def guided_eps(x, t):
        x = torch.cat([x, x])
        if composite:  # LoRA-Composite: each LoRA alone, predictions averaged (uncond and cond separately)
            eps = 0
            for lora in loras.values():
                with merged(unet, layers, [lora], torch.ones(len(layers), 1)):
                    eps = eps + predict(x, t) / len(loras)
        else:
            eps = predict(x, t)
        return classifier_free_guidance(*eps.chunk(2), config.guidance)

    composite = config.merge == "composite" and len(loras) > 1
    autocast = precision_context(config.mixed_precision, device)
    with merged(unet, layers, [] if composite else list(loras.values()), weights), autocast():
        latents = denoise(scheduler, latents, timesteps, guided_eps, callback=callback)

    # 6. Decode
    return decode(vae, latents)
