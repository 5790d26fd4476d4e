import numpy as np
import pytest
import torch

from cidm import models


def generate(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a photo of a red star on a beach", num_inference_steps=3, guidance_scale=5.0, generator=g,
                output_type="np").images


def test_load_base_round_trip_gives_identical_image(tiny_model_dir):
    from conftest import make_tiny_pipeline

    original = make_tiny_pipeline()
    pipe, info = models.load_base(str(tiny_model_dir), device="cpu")
    a, b = generate(original), generate(pipe)
    assert a.shape == (1, 64, 64, 3)
    assert a.std() > 0  # not a blank image
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(generate(pipe, seed=1), b)  # the seed matters, so equality above is meaningful


def test_description_lists_cross_attention_layers_in_forward_order(tiny_model_dir):
    pipe, info = models.load_base(str(tiny_model_dir), device="cpu")
    assert info.pipeline_class == "StableDiffusionPipeline"
    assert info.text_hidden_size == 32
    assert info.resolution == 64
    # 2 down (1 per block), 1 mid, 4 up (2 per block): down -> mid -> up, not the registration order
    assert info.cross_attn_layers == (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    )


def test_missing_local_folder_says_what_to_do(tmp_path):
    with pytest.raises(models.BaseModelError, match=r"no local folder at .*CIDM_BASE_MODEL"):
        models.load_base(str(tmp_path / "nowhere"))


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(models.BaseModelError, match="model_index.json"):
        models.load_base(str(tmp_path))


def test_unreachable_hub_id_names_the_hub_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.BaseModelError, match=r"Hub.*CIDM_BASE_MODEL"):
        models.load_base("no-such-org/no-such-model")


def test_default_model_follows_env_then_device(monkeypatch):
    monkeypatch.setenv("CIDM_BASE_MODEL", "/some/folder")
    assert models.default_model() == "/some/folder"
    monkeypatch.delenv("CIDM_BASE_MODEL")
    expected = models.SD15 if torch.cuda.is_available() else str(models.EMBEDDED_MODEL)
    assert models.default_model() == expected


def test_evaluator_is_found_beside_a_local_model(tmp_path):
    (tmp_path / "evaluator").mkdir()
    (tmp_path / models.EVALUATOR_POINTER).write_text('{"evaluator": "evaluator"}')
    assert models.find_evaluator(str(tmp_path)) == str((tmp_path / "evaluator").resolve())
    assert models.find_evaluator("stable-diffusion-v1-5/stable-diffusion-v1-5") == models.HUB_EVALUATOR


def test_a_pipeline_that_is_not_text_to_image_is_refused(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 32),
                       norm_num_groups=32, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(models.BaseModelError, match="loads as DDPMPipeline.*Stable Diffusion"):
        models.load_base(str(tmp_path / "ddpm"), device="cpu")


def test_a_unet_without_cross_attention_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from conftest import make_tiny_pipeline

    pipe = make_tiny_pipeline()
    pipe.unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                     block_out_channels=(32, 64), cross_attention_dim=32, norm_num_groups=32,
                                     down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                                     mid_block_type="UNetMidBlock2D")
    pipe.save_pretrained(tmp_path / "no-xattn")
    with pytest.raises(models.BaseModelError, match="no cross-attention layers"):
        models.load_base(str(tmp_path / "no-xattn"), device="cpu")


def test_base_models_are_named_for_people_without_server_paths(tmp_path):
    from cidm.models import EMBEDDED_MODEL, display_name

    assert display_name(str(EMBEDDED_MODEL)) == "embedded toy world (64 px)"
    assert display_name(str(tmp_path / "my-base")) == "my-base"
    assert display_name("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
