"""Shared fixtures: a tiny random Stable Diffusion pipeline built in code (no download), and offline settings."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import copy

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is fastest and never oversubscribes the CPU


def make_tiny_pipeline(seed: int = 0):
    """A ~1M-parameter SD pipeline with 64×64 images, two cross-attention resolutions and a world tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cidm.toyworld.train import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                                norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                        sample_size=64, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_tiny_sdxl_pipeline(seed: int = 0):
    """A tiny SDXL pipeline: two text encoders (the second with a projection: pooled embedding), added time ids."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from cidm.toyworld.train import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    te = CLIPTextModel(CLIPTextConfig(**text))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=24))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=64, attention_head_dim=8,
                                norm_num_groups=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=2,
                                addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=24 + 6 * 8)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                        sample_size=64, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=copy.deepcopy(tok), unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random pipeline saved in diffusers layout."""
    path = tmp_path_factory.mktemp("tiny-sd")
    make_tiny_pipeline().save_pretrained(path)
    return path


def write_photos(folder, name: str, n: int = 3) -> list[str]:
    """n reference images of a toy-world concept written as PNG files (what a user uploads)."""
    from PIL import Image

    from cidm.toyworld import concepts as C

    paths = []
    for i, img in enumerate(C.reference_images(name, n=n)[0]):
        paths.append(str(folder / f"{name}-{i}.png"))
        Image.fromarray(img).save(paths[-1])
    return paths


def huge_png(path, side: int = 12000):
    """A valid greyscale PNG of side×side pixels, written row by row (a few hundred KB; 144 MB once decoded)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    packer, row = zlib.compressobj(9), b"\x00" * (side + 1)  # filter byte 0, then black pixels
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path
