"""The pieces every sampler shares: latent size, initial noise, the VAE's way in and out, classifier-free guidance
and the scheduler loop. Plain generation, regions (compose and edit) and LFS's teacher all denoise with `denoise`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image

SEED_MAX = 2 ** 63 - 1  # the largest seed torch.Generator.manual_seed takes


def vae_scale(vae) -> int:
    """Pixels per latent cell."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """(height, width, vae scale) of the output: the UNet's native size unless given; checked against the VAE."""
    scale = vae_scale(pipe.vae)
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    if height % scale or width % scale:
        raise ValueError(f"height and width must be multiples of {scale} (got {height}×{width})")
    return height, width, scale


def initial_latents(pipe, scheduler, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """(n, C, h, w) noise from `generator`, scaled for the scheduler (call after `set_timesteps`)."""
    unet = pipe.unet
    scale = vae_scale(pipe.vae)
    noise = torch.randn((n, unet.config.in_channels, height // scale, width // scale), generator=generator)
    return noise.to(unet.device, unet.dtype) * scheduler.init_noise_sigma


def partial_timesteps(scheduler, strength: float) -> torch.Tensor:
    """The last `strength` share of the scheduler's timesteps (at least one): where image-to-image starts."""
    steps = len(scheduler.timesteps)
    return scheduler.timesteps[steps - max(1, int(round(steps * strength))):]


def encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Latents of a batch of pixels in [-1, 1], sampled from the VAE's posterior (training: the global RNG)."""
    return vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor


def encode_image(vae, image: Image.Image) -> torch.Tensor:
    """(1, C, h, w) latents of an RGB image (the distribution's mode, scaled as the UNet sees them)."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    pixels = pixels.to(vae.device, vae.dtype)
    return vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor


def decode(vae, latents: torch.Tensor) -> list[Image.Image]:
    pixels = vae.decode(latents / vae.config.scaling_factor).sample.float()
    array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def predict_noise(unet, x: torch.Tensor, t, text: torch.Tensor, **cross_attention_kwargs) -> torch.Tensor:
    """ε_θ(x_t | c, t) with layer-wise text (B, L, N, D): cross-attention layer l reads text[:, l]."""
    return unet(x, t, encoder_hidden_states=text[:, 0],
                cross_attention_kwargs={"layerwise_text": text, **cross_attention_kwargs}).sample


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    # ε̃ = ε(∅) + s·(ε(c) − ε(∅))
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def denoise(scheduler, latents: torch.Tensor, timesteps, guided_eps: Callable, generator=None,
            after_step: Callable | None = None, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The scheduler loop: at each t, `guided_eps(model_input, t)` gives the guided noise estimate of the batch,
    the scheduler steps, and `after_step(i, latents)` may replace the latents (edit's blending)."""
    extra = {} if generator is None else {"generator": generator}  # not every scheduler's step takes one (PNDM)
    for i, t in enumerate(timesteps):
        eps = guided_eps(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, **extra).prev_sample
        if after_step is not None:
            latents = after_step(i, latents)
        if callback is not None:
            callback(i + 1, len(timesteps))
    return latents
