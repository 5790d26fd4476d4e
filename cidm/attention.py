"""Attention processors: layer-wise text in cross-attention (CIDM §4.1), regional cross-attention (Eq. 4).

Processors are small classes without weights. They read `attn.to_q/to_k/to_v/to_out`, so LoRA layers that peft put
on those projections (training) and EWA-merged weights (inference) both apply. Install them by name with
`install_processors`, never by position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .models import cross_attn_layers


def multi_head_attention(attn, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d)V of `attn`'s projections, before the output projection: (B, N, C)."""
    B, N, _ = hidden_states.shape
    query = attn.to_q(hidden_states)
    key = attn.to_k(context)
    value = attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(B, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
    key = key.view(B, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, M, d)
    value = value.view(B, -1, attn.heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value)  # (B, heads, N, d)
    return out.transpose(1, 2).reshape(B, N, attn.heads * head_dim)


def output_projection(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class SelfAttnProcessor:
    """Plain self-attention; accepts (and ignores) the cross-attention kwargs so diffusers does not warn."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 layerwise_text=None, region_masks=None, region_kv=None):
        residual = hidden_states
        if attn.norm_cross is not None and encoder_hidden_states is not None:
            raise NotImplementedError("cross-normalised self-attention is not used by SD / SDXL UNets")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        return output_projection(attn, multi_head_attention(attn, hidden_states, context), residual)


class LayerwiseTextAttnProcessor:
    """Cross-attention of layer `layer` reading its own text embedding (layer-wise concept tokens), and, when
    regions are given, regional cross-attention inside their boxes (Eq. 4)."""

    def __init__(self, layer: int):
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 layerwise_text=None, region_masks=None, region_kv=None):
        residual = hidden_states
        context = encoder_hidden_states if layerwise_text is None else layerwise_text[:, self.layer]  # (B, M, D)
        out = multi_head_attention(attn, hidden_states, context)
        if region_masks is not None:
            keys, values = region_kv[self.layer]
            out = regional_cross_attention(attn, hidden_states, out, region_masks, keys, values)
        return output_projection(attn, out, residual)


def regional_cross_attention(attn, hidden_states, global_out, region_masks, keys, values):
    """Implements Eq. 4 (layer-wise regional cross-attention) of Dong et al., NeurIPS 2024.

    Positions inside box u take softmax(Q K_uᵀ/√d) V_u, with K_u, V_u projected from region u's layer-wise prompt
    (precomputed once per generation); overlaps are averaged; positions outside every box keep the global output.
    hidden_states, global_out (B, N, C); region_masks (B, U, H0, W0); keys, values (B, U, M, C).
    """
    B, N, C = hidden_states.shape
    U = region_masks.shape[1]
    masks = masks_at(region_masks, N).to(hidden_states.dtype)  # (B, U, N) at this layer's resolution
    query = attn.to_q(hidden_states)
    head_dim = query.shape[-1] // attn.heads
    q = query.view(B, 1, -1, attn.heads, head_dim).transpose(2, 3)  # (B, 1, heads, N, d)
    k = keys.view(B, U, -1, attn.heads, head_dim).transpose(2, 3)  # (B, U, heads, M, d)
    v = values.view(B, U, -1, attn.heads, head_dim).transpose(2, 3)
    region_out = F.scaled_dot_product_attention(q.expand(-1, U, -1, -1, -1), k, v)  # (B, U, heads, N, d)
    region_out = region_out.transpose(2, 3).reshape(B, U, -1, attn.heads * head_dim)  # (B, U, N, C')
    cover = masks.sum(1).unsqueeze(-1)  # (B, N, 1): how many boxes cover each position
    inside = (masks.unsqueeze(-1) * region_out).sum(1) / cover.clamp(min=1)  # overlaps averaged
    return torch.where(cover > 0, inside, global_out)


def masks_at(region_masks: torch.Tensor, n_positions: int) -> torch.Tensor:
    """Box masks (B, U, H0, W0) at the resolution with n_positions = h·w, same aspect: (B, U, h·w).

    Rounding: nearest-neighbour on the box grid (`F.interpolate(mode="nearest-exact")`) — a position belongs to a box
    when its centre does.
    """
    B, U, H0, W0 = region_masks.shape
    scale = (H0 * W0 / n_positions) ** 0.5
    h, w = round(H0 / scale), round(W0 / scale)
    m = F.interpolate(region_masks.float(), size=(h, w), mode="nearest-exact")
    return m.view(B, U, h * w)


def install_processors(unet) -> dict[str, int]:
    """Give every attention module of the UNet its CIDM processor; returns {cross-attn module name: layer index}."""
    layers = {name: i for i, name in enumerate(cross_attn_layers(unet))}
    processors = {}
    for key in unet.attn_processors:  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
        module = key.removesuffix(".processor")
        processors[key] = LayerwiseTextAttnProcessor(layers[module]) if module in layers else SelfAttnProcessor()
    unet.set_attn_processor(processors)
    if unet.config.get("addition_embed_type") == "text_time" and not hasattr(unet, "_cidm_added_conditions"):
        unet._cidm_added_conditions = unet.register_forward_pre_hook(sdxl_added_conditions, with_kwargs=True)
    return layers


SDXL_VAE_SCALE = 8  # SDXL's VAE: pixels per latent cell


def sdxl_added_conditions(unet, args, kwargs):
    """SDXL's added conditions from the layer-wise text: the pooled embedding that `ConceptTokens.encode` put in its
    last slot, and the time ids (original size, crop (0, 0), target size: the generated size, as SDXL's pipeline
    does by default). Every CIDM call of the UNet passes `layerwise_text`, so one hook serves them all."""
    text = (kwargs.get("cross_attention_kwargs") or {}).get("layerwise_text")
    if text is None or kwargs.get("added_cond_kwargs") is not None:
        return None
    sample = args[0] if args else kwargs["sample"]
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    h, w = sample.shape[-2] * SDXL_VAE_SCALE, sample.shape[-1] * SDXL_VAE_SCALE
    time_ids = torch.tensor([h, w, 0, 0, h, w], device=sample.device, dtype=text.dtype).expand(len(text), 6)
    kwargs["added_cond_kwargs"] = {"text_embeds": text[:, -1, 0, :pooled_dim], "time_ids": time_ids}
    return args, kwargs
