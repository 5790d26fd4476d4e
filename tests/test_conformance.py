"""Real-size architectures, built from their published configs on the meta device (no weights, no download):
layer discovery, LoRA targeting and attention processors cover every cross-attention layer."""

import pytest
import torch

from cidm.attention import LayerwiseTextAttnProcessor, SelfAttnProcessor, install_processors
from cidm.lora import add_task_lora, lora_modules
from cidm.models import cross_attn_layers

SD15_UNET = {  # stable-diffusion-v1-5 unet/config.json
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {  # stable-diffusion-xl-base-1.0 unet/config.json
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}


def empty_unet(config):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize("config, n_layers", [(SD15_UNET, 16), (SDXL_UNET, 70)], ids=["sd15", "sdxl"])
def test_every_cross_attention_layer_is_found_in_forward_order(config, n_layers):
    unet = empty_unet(config)
    layers = cross_attn_layers(unet)
    assert len(layers) == n_layers
    blocks = [name.split(".")[0] for name in layers]
    assert blocks == sorted(blocks, key=["down_blocks", "mid_block", "up_blocks"].index)  # down -> mid -> up
    assert all(name.endswith("attn2") for name in layers)


@pytest.mark.parametrize("config, n_layers", [(SD15_UNET, 16), (SDXL_UNET, 70)], ids=["sd15", "sdxl"])
def test_processors_cover_every_attention_and_index_every_cross_attention(config, n_layers):
    unet = empty_unet(config)
    mapping = install_processors(unet)
    procs = unet.attn_processors
    cross = {k: p for k, p in procs.items() if isinstance(p, LayerwiseTextAttnProcessor)}
    assert len(cross) == n_layers
    assert sorted(p.layer for p in cross.values()) == list(range(n_layers))
    assert all(isinstance(p, SelfAttnProcessor) for k, p in procs.items() if k not in cross)
    assert sorted(mapping.values()) == list(range(n_layers))


@pytest.mark.parametrize("config, n_layers", [(SD15_UNET, 16), (SDXL_UNET, 70)], ids=["sd15", "sdxl"])
def test_task_lora_targets_q_k_v_out_of_every_cross_attention(config, n_layers):
    unet = empty_unet(config)
    add_task_lora(unet, "concept", rank=4)
    mods = lora_modules(unet, "concept")
    assert len(mods) == 4 * n_layers
    assert {name.rsplit(".attn2.", 1)[1] for name in mods} == {"to_q", "to_k", "to_v", "to_out.0"}
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_sd15_layerwise_token_count_is_16_per_slot():
    from cidm.tokens import token_strings

    assert len(token_strings("dog", 2, 16)) == 32
