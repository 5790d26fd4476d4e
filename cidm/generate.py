"""Generation with every learned concept: layer-wise prompts, EWA-merged LoRAs (Eq. 3), and (optionally) regions."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .attention import install_processors
from .ewa import ewa_weights, merged
from .lora import LoRAWeights


@dataclasses.dataclass
class GenerateConfig:
    steps: int = 25
    guidance: float = 5.0  # classifier-free guidance s
    num_images: int = 1
    seed: int = 0
    psi: str = "paper"  # EWA ψ: "paper" M²/‖M²‖ | "code" 0.8·M⁴/ΣM⁴
    ewa_space: str = "token"  # similarities between token embeddings ("token") or text-encoder outputs ("encoded")
    # how the task LoRAs meet at inference: "ewa" (Eq. 3); "mean" 1/T each (LoRA-Merge, cidm-no-ewa);
    # "sum" 1 each (C-LoRA's merged deltas); "last" the latest only (Finetuning); "composite" one UNet pass per
    # LoRA, noise predictions averaged (LoRA-Composite); "none" no LoRA (the tokens alone, a diagnostic)
    merge: str = "ewa"
    height: int | None = None
    width: int | None = None
    context_strength: float = 0.6  # LFS in-context generation: how much of a concept's vision context is re-noised


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
def generate(pipe, tokens, loras: dict[str, LoRAWeights], prompt: str, negative_prompt: str = "",
             config: GenerateConfig | None = None, callback: Callable[[int, int], None] | None = None,
             contexts: dict[str, Image.Image] | None = None) -> list[Image.Image]:
    """Images for one prompt that may name any learned `<concept>`.

    `contexts` (LFS in-context generation): vision contexts by concept; a prompt naming one starts from its latents.
    """
    config = config or GenerateConfig()
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device, dtype = unet.device, unet.dtype

    # 1. Check inputs
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty; describe the image, e.g. 'a photo of a <name> on a beach'")
    named = [n for n in tokens.check_prompt(prompt) if n in (contexts or {})]  # LFS: concepts with a context
    tokens.check_prompt(negative_prompt)
    if config.steps < 1 or config.num_images < 1:
        raise ValueError(f"steps and num_images must be at least 1 (got {config.steps}, {config.num_images})")
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    height = config.height or unet.config.sample_size * scale
    width = config.width or unet.config.sample_size * scale
    if height % scale or width % scale:
        raise ValueError(f"height and width must be multiples of {scale} (got {height}×{width})")

    # 2. Bind the prompt into layer-wise embeddings: (1, L, N, D) each
    cond = tokens.encode([prompt]).to(dtype)
    uncond = tokens.encode([negative_prompt]).to(dtype)
    text = torch.cat([uncond.expand(config.num_images, -1, -1, -1), cond.expand(config.num_images, -1, -1, -1)])

    # 3. EWA weights (Eq. 3), once per prompt
    weights = layer_weights(tokens, loras, prompt, config)

    # 4. Processors that give each cross-attention layer its own text
    layers = install_processors(unet)

    # 5. Denoising loop, with the merged weights
    generator = torch.Generator().manual_seed(config.seed)
    latents = torch.randn((config.num_images, unet.config.in_channels, height // scale, width // scale),
                          generator=generator).to(device, dtype)
    scheduler.set_timesteps(config.steps, device=device)
    timesteps = scheduler.timesteps
    latents = latents * scheduler.init_noise_sigma
    if named:  # in-context generation: the first named concept's vision context, noised to context_strength
        timesteps = partial_timesteps(scheduler, config.context_strength)
        z_context = encode_image(vae, contexts[named[0]].resize((width, height))).to(device, dtype)
        latents = scheduler.add_noise(z_context.expand_as(latents), latents, timesteps[:1])
    def predict(x, t):
        return unet(x, t, encoder_hidden_states=text[:, 0], cross_attention_kwargs={"layerwise_text": text}).sample

    composite = config.merge == "composite" and len(loras) > 1
    with merged(unet, layers, [] if composite else list(loras.values()), weights):
        for i, t in enumerate(timesteps):
            x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            if composite:  # LoRA-Composite: each LoRA alone, predictions averaged (uncond and cond separately)
                eps = 0
                for lora in loras.values():
                    with merged(unet, layers, [lora], torch.ones(len(layers), 1)):
                        eps = eps + predict(x, t) / len(loras)
            else:
                eps = predict(x, t)
            eps_uncond, eps_cond = eps.chunk(2)
            eps = eps_uncond + config.guidance * (eps_cond - eps_uncond)  # classifier-free guidance
            latents = scheduler.step(eps, t, latents).prev_sample
            if callback is not None:
                callback(i + 1, len(timesteps))

    # 6. Decode
    return decode(vae, latents)


def decode(vae, latents: torch.Tensor) -> list[Image.Image]:
    pixels = vae.decode(latents / vae.config.scaling_factor).sample.float()
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def partial_timesteps(scheduler, strength: float) -> torch.Tensor:
    """The last `strength` share of the scheduler's timesteps (at least one): where image-to-image starts."""
    steps = len(scheduler.timesteps)
    return scheduler.timesteps[steps - max(1, int(round(steps * strength))):]


def encode_image(vae, image: Image.Image) -> torch.Tensor:
    """(1, C, h, w) latents of an RGB image (the distribution's mode, scaled as the UNet sees them)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    pixels = pixels.to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
