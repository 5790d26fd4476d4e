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


def test_sd15_real_size_learning_step_on_cpu(tmp_path):
    """One real CIDM learning step (forward and backward) through SD-1.5's UNet and text encoder at their real
    sizes, random weights, fp32 on the CPU, at an 8×8 latent; then generation with the saved LoRA and tokens."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cidm.models import describe
    from cidm.studio import Studio
    from conftest import make_tiny_pipeline
    from test_core import learn

    torch.manual_seed(0)
    tiny = make_tiny_pipeline()
    unet = UNet2DConditionModel.from_config({**SD15_UNET, "sample_size": 8})
    text_encoder = CLIPTextModel(CLIPTextConfig(  # openai/clip-vit-large-patch14's text tower, as SD-1.5 uses
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    pipe = StableDiffusionPipeline(vae=tiny.vae, text_encoder=text_encoder, tokenizer=tiny.tokenizer, unet=unet,
                                   scheduler=tiny.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    info = describe(pipe, "sd15-architecture-random-weights")
    assert info.num_cross_attn_layers == 16 and info.text_hidden_size == 768
    studio = Studio(tmp_path / "lib", pipe=pipe, info=info)
    studio.record_forgetting = False
    result = learn(studio, "medic", steps=1)
    assert result.steps_done == 1 and result.final_terms["diffusion"] == result.final_terms["diffusion"]  # finite
    lora = studio.loras["medic"]
    assert len(lora.modules) == 16 * 4  # q, k, v, out of every cross-attention layer
    assert studio.tokens.rows("medic").shape == (2 * 16, 768)
    assert studio.library.manifest["base_model"]["n_layers"] == 16
    assert studio.generate("a photo of a <medic>", steps=1)[0].size == (32, 32)
