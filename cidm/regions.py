"""Context-controllable synthesis (CIDM §4.3): concepts in user-drawn boxes, region noise estimation, editing.

`compose` runs, per denoising step, one batched UNet call over U+2 conditionings: the unconditional one, the global
prompt with every box's regional cross-attention (Eq. 4), and one per region u with only box u's attention; then
region noise estimation (Eq. 5) combines them.

Choices the paper leaves open (also in the README's table):
- EWA and regions: the UNet is merged once with EWA weights (Eq. 3) of the union of all prompts (global + regions),
  and each region's K/V are projected with weights merged by that region's own prompt. A region's text is fixed
  during sampling, so its K/V are computed once, before the loop: per-region EWA costs nothing per step.
- Boxes at each UNet resolution: nearest-neighbour on the latent-resolution mask (a position belongs to a box when
  its centre does); see `attention.masks_at`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from PIL import Image

from .attention import install_processors
from .ewa import merged
from .generate import GenerateConfig, layer_weights
from .images import load_image
from .sampling import (classifier_free_guidance, decode, denoise, encode_image, initial_latents, latent_size,
                       partial_timesteps, predict_noise, vae_scale)

MAX_REGIONS = 8


@dataclasses.dataclass
class Region:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1: pixels of the output image, or all in [0, 1]
    prompt: str
    negative_prompt: str = ""


def pixel_box(box, width: int, height: int) -> tuple[float, float, float, float]:
    """A box in pixels, checked: normalised boxes (all values ≤ 1) are scaled; partly outside is clipped."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError) as err:
        raise ValueError(f"a box needs 4 numbers x0, y0, x1, y1; got {box!r}") from err
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box {box!r} has a number that is not finite; give 4 numbers x0, y0, x1, y1")
    if max(abs(x0), abs(y0), abs(x1), abs(y1)) <= 1.0:
        x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {box!r} is empty or inverted; give x0 < x1 and y0 < y1")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ValueError(f"box {box!r} lies outside the {width}×{height} image; draw it on the canvas")
    return max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)


def region_masks(boxes, width: int, height: int, latent_w: int, latent_h: int) -> torch.Tensor:
    """Binary masks (U, h, w) at the latent resolution: a latent cell is in a box when its centre is."""
    ys = (torch.arange(latent_h) + 0.5) * height / latent_h
    xs = (torch.arange(latent_w) + 0.5) * width / latent_w
    masks = []
    for x0, y0, x1, y1 in boxes:
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        if not inside.any():  # a box thinner than one latent cell still covers the cell its centre falls in
            cy = min(int((y0 + y1) / 2 / height * latent_h), latent_h - 1)
            cx = min(int((x0 + x1) / 2 / width * latent_w), latent_w - 1)
            inside[cy, cx] = True
        masks.append(inside.float())
    return torch.stack(masks)


def region_noise_estimation(eps_uncond, eps_global, eps_regions, masks, guidance: float, alpha: float = 0.1,
                            mode: str = "normalised"):
    # Eq. 5: E = ε + s(ε_c − ε), E_u = ε + s(ε_u − ε); E* = αE + Σ_u (1−α) E_u ⊙ m_u
    """Implements Eq. 5 (region noise estimation) of Dong et al., NeurIPS 2024.

    eps_* (B, C, h, w); eps_regions (B, U, C, h, w); masks (U, h, w). mode="literal": the printed equation (the
    background is scaled by α, overlapping boxes add up); mode="normalised": background keeps E, inside boxes
    αE + (1−α)E_u, overlaps averaged.
    """
    E = eps_uncond + guidance * (eps_global - eps_uncond)
    E_u = eps_uncond.unsqueeze(1) + guidance * (eps_regions - eps_uncond.unsqueeze(1))  # (B, U, C, h, w)
    m = masks[None, :, None].to(E)  # (1, U, 1, h, w)
    if mode == "literal":
        return alpha * E + ((1 - alpha) * E_u * m).sum(1)
    if mode == "normalised":
        cover = m.sum(1)  # (1, 1, h, w)
        inside = alpha * E + (1 - alpha) * (E_u * m).sum(1) / cover.clamp(min=1)
        return torch.where(cover > 0, inside, E)
    raise ValueError(f"region noise mode must be 'literal' or 'normalised', got {mode!r}")


@torch.no_grad()
def region_keys_values(unet, layers, loras, tokens, prompts: list[str], weights_per_prompt) -> dict:
    """Each region's K/V per cross-attention layer, projected with that region's EWA-merged weights: layer ->
    (keys (U, M, C), values (U, M, C))."""
    modules = dict(unet.named_modules())
    by_index = {i: modules[name] for name, i in layers.items()}
    text = tokens.encode(prompts).to(unet.dtype)  # (U, L, M, D)
    keys = {l: [] for l in by_index}
    values = {l: [] for l in by_index}
    for u, weights in enumerate(weights_per_prompt):
        with merged(unet, layers, list(loras.values()), weights):
            for l, attn in by_index.items():
                keys[l].append(attn.to_k(text[u, l]))
                values[l].append(attn.to_v(text[u, l]))
    return {l: (torch.stack(keys[l]), torch.stack(values[l])) for l in by_index}


@torch.no_grad()
def compose(pipe, tokens, loras, prompt: str, regions: list[Region], negative_prompt: str = "",
            config: GenerateConfig | None = None, alpha: float = 0.1, region_noise: str = "normalised",
            callback=None):
    """Images where each region's prompt (e.g. `a <dog>`) appears inside its box, the global prompt elsewhere."""
    config = config or GenerateConfig()
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device, dtype = unet.device, unet.dtype

    # 1. Check inputs
    height, width, scale = latent_size(pipe, config.height, config.width)
    if not prompt or not prompt.strip():
        raise ValueError("the global prompt is empty; describe the whole scene, e.g. 'a photo on a beach'")
    if not regions:
        raise ValueError("no regions: draw at least one box with a prompt (or use plain generation)")
    if len(regions) > MAX_REGIONS:
        raise ValueError(f"{len(regions)} regions; at most {MAX_REGIONS} are supported")
    for i, r in enumerate(regions):
        if not r.prompt or not r.prompt.strip():
            raise ValueError(f"region {i + 1} has an empty prompt; say what goes in its box, e.g. 'a <name>'")
    for text in [prompt, negative_prompt, *(r.prompt for r in regions), *(r.negative_prompt for r in regions)]:
        tokens.check_prompt(text)
    boxes = [pixel_box(r.box, width, height) for r in regions]
    U, n = len(regions), config.num_images
    masks = region_masks(boxes, width, height, width // scale, height // scale).to(device)  # (U, h, w)

    # 2. Layer-wise embeddings of the global prompts: (1, L, M, D)
    cond = tokens.encode([prompt]).to(dtype)
    uncond = tokens.encode([negative_prompt]).to(dtype)

    # 3. EWA: the UNet merged for the union of all prompts; each region's K/V with its own weights
    union = " ".join([prompt, *(r.prompt for r in regions)])
    weights = layer_weights(tokens, loras, union, config)
    layers = install_processors(unet)
    region_w = [layer_weights(tokens, loras, r.prompt, config) for r in regions]
    negative_w = [layer_weights(tokens, loras, r.negative_prompt or "a", config) for r in regions]
    pos = region_keys_values(unet, layers, loras, tokens, [r.prompt for r in regions], region_w)  # from θ0 + ΔŴ_u
    neg = region_keys_values(unet, layers, loras, tokens, [r.negative_prompt for r in regions], negative_w)
    with merged(unet, layers, list(loras.values()), weights):
        # 4. One batch of U+2 conditionings per image: uncond (negatives in boxes), global (all boxes), each region
        text = torch.cat([uncond, cond] + [cond] * U).repeat_interleave(n, 0)  # ((U+2)·n, L, M, D)
        active = torch.cat([torch.ones(2, U), torch.eye(U)]).to(device)  # which boxes each conditioning uses
        batch_masks = (active[:, :, None, None] * masks[None]).repeat_interleave(n, 0)  # ((U+2)·n, U, h, w)
        kv = {}
        for l in pos:
            k = torch.stack([neg[l][0]] + [pos[l][0]] * (U + 1)).repeat_interleave(n, 0)  # ((U+2)·n, U, M, C)
            v = torch.stack([neg[l][1]] + [pos[l][1]] * (U + 1)).repeat_interleave(n, 0)
            kv[l] = (k, v)

        # 5. Denoising loop: one UNet call over the U+2 conditionings, then Eq. 5
        def guided_eps(x, t):
            eps = predict_noise(unet, x.repeat(U + 2, 1, 1, 1), t, text, region_masks=batch_masks, region_kv=kv)
            eps = eps.view(U + 2, n, *eps.shape[1:])
            return region_noise_estimation(eps[0], eps[1], eps[2:].transpose(0, 1), masks, config.guidance, alpha,
                                           region_noise)

        scheduler.set_timesteps(config.steps, device=device)
        latents = initial_latents(pipe, scheduler, n, height, width, torch.Generator().manual_seed(config.seed))
        latents = denoise(scheduler, latents, scheduler.timesteps, guided_eps, callback=callback)

    # 6. Decode
    return decode(vae, latents)


@torch.no_grad()
def edit(pipe, tokens, loras, image, box, prompt: str, negative_prompt: str = "", strength: float = 0.8,
         config: GenerateConfig | None = None):
    """Regenerate inside `box` only: img2img from the image's latents, blending the known latents outside the box
    back at every step (masked latent blending), then compositing in pixels on the latent-cell grid: the VAE decoder
    (its mid-block attention sees the whole latent) would otherwise change pixels outside the box too, so outside
    the box the result is the input image, exactly."""
    config = config or GenerateConfig()
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device, dtype = unet.device, unet.dtype
    scale = vae_scale(vae)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty; say what goes in the box, e.g. 'a photo of a <name>'")
    tokens.check_prompt(prompt)
    image = load_image(image)
    width, height = image.size
    if width % scale or height % scale:
        raise ValueError(f"the image is {width}×{height}; edit images whose sides are multiples of {scale}")
    box = pixel_box(box, width, height)
    mask = region_masks([box], width, height, width // scale, height // scale)[0].to(device, dtype)  # (h, w)

    z0 = encode_image(vae, image).to(device, dtype)
    cond = tokens.encode([prompt]).to(dtype)
    uncond = tokens.encode([negative_prompt]).to(dtype)
    text = torch.cat([uncond, cond])
    weights = layer_weights(tokens, loras, prompt, config)
    layers = install_processors(unet)

    generator = torch.Generator().manual_seed(config.seed)
    scheduler.set_timesteps(config.steps, device=device)
    timesteps = partial_timesteps(scheduler, strength)
    noise = torch.randn(z0.shape, generator=generator).to(device, dtype)
    latents = scheduler.add_noise(z0, noise, timesteps[:1])

    def guided_eps(x, t):
        return classifier_free_guidance(*predict_noise(unet, torch.cat([x, x]), t, text).chunk(2), config.guidance)

    def blend(i, latents):  # outside the box: the image, at this step's noise level
        known = z0 if i == len(timesteps) - 1 else scheduler.add_noise(z0, noise, timesteps[i + 1:i + 2])
        return mask * latents + (1 - mask) * known

    with merged(unet, layers, list(loras.values()), weights):
        latents = denoise(scheduler, latents, timesteps, guided_eps, after_step=blend)
    generated = np.asarray(decode(vae, latents)[0])
    inside = np.kron(mask.cpu().numpy(), np.ones((scale, scale)))[..., None] > 0.5  # latent cells, in pixels
    return Image.fromarray(np.where(inside, generated, np.asarray(image)))
