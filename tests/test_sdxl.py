"""SDXL on the same code path: two text encoders, the pooled embedding and time ids reach the UNet, and every
feature (learning, EWA, regions, editing, the diffusers LoRA file) runs on a tiny random SDXL pipeline."""

import numpy as np
import pytest
import torch

from cidm import models
from cidm.studio import Studio
from test_core import learn


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from conftest import make_tiny_sdxl_pipeline

    path = tmp_path_factory.mktemp("tiny-sdxl")
    make_tiny_sdxl_pipeline().save_pretrained(path)
    return models.load_base(str(path), device="cpu")


@pytest.fixture(scope="module")
def studio(sdxl, tmp_path_factory):
    pipe, info = sdxl
    studio = Studio(tmp_path_factory.mktemp("lib-xl"), pipe=pipe, info=info)
    studio.record_forgetting = False
    learn(studio, "medic", steps=3)
    learn(studio, "pixelart", steps=3)
    return studio


def test_load_base_picks_the_sdxl_pipeline_and_describes_it(sdxl):
    pipe, info = sdxl
    assert info.pipeline_class == "StableDiffusionXLPipeline"
    assert info.text_hidden_size == 64  # 32 + 32: both text encoders side by side, as SDXL's cross-attention reads
    assert info.num_cross_attn_layers == 2 + 2 + 4  # 2 transformer layers each: down 1 attention, mid 1, up 2
    assert len(info.cross_attn_layers) == len({*info.cross_attn_layers})


def test_concept_rows_span_both_text_encoders_and_only_new_rows_train(studio):
    rows = studio.tokens.rows("medic")
    assert rows.shape == (2 * studio.info.num_cross_attn_layers, 64)
    for embedding, encoder in zip(studio.tokens.embeddings, (studio.pipe.text_encoder, studio.pipe.text_encoder_2)):
        assert encoder.get_input_embeddings() is embedding
        assert not embedding.base.weight.requires_grad
    ids = studio.pipe.tokenizer_2("<medic.0.0>").input_ids[1]
    second = studio.pipe.text_encoder_2.get_input_embeddings()(torch.tensor([ids]))[0]
    assert torch.equal(second, rows[0, 32:].to(second.dtype))  # encoder 2 reads its own columns of the row


def test_pooled_embedding_and_time_ids_condition_the_unet(studio):
    from cidm.attention import install_processors

    pipe = studio.pipe
    text = studio.tokens.encode(["a photo of a <medic>"])
    assert text.shape[1] == studio.info.num_cross_attn_layers + 1  # L layers + the pooled slot
    install_processors(pipe.unet)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        a = pipe.unet(x, t, encoder_hidden_states=text[:, 0], cross_attention_kwargs={"layerwise_text": text}).sample
        no_pool = text.clone()
        no_pool[:, -1] = 0
        b = pipe.unet(x, t, encoder_hidden_states=text[:, 0], cross_attention_kwargs={"layerwise_text": no_pool}).sample
    assert not torch.allclose(a, b)


def test_generate_compose_and_edit_run_on_sdxl(studio):
    plain = studio.generate("a photo of a <medic>", steps=3)[0]
    styled = studio.generate("a photo of a <medic> in <pixelart> style", steps=3)[0]
    assert plain.size == (64, 64) and not np.array_equal(np.asarray(plain), np.asarray(styled))
    composed = studio.compose("a photo on a beach", [((0, 0, 32, 64), "a <medic>"), ((32, 0, 64, 64), "a star")],
                              steps=3)[0]
    assert composed.size == (64, 64)
    edited = np.asarray(studio.edit(plain, (16, 16, 48, 48), "a <medic>", steps=3, strength=0.6))
    outside = np.ones((64, 64), bool)
    outside[16:48, 16:48] = False
    assert np.array_equal(edited[outside], np.asarray(plain)[outside])


def test_sdxl_lora_file_loads_in_a_plain_sdxl_pipeline(studio, sdxl):
    from conftest import make_tiny_sdxl_pipeline

    plain = make_tiny_sdxl_pipeline()
    plain.load_lora_weights(str(studio.library.concept_dir("medic")), adapter_name="medic")
    assert "medic" in plain.get_list_adapters()["unet"]


def test_textual_inversion_file_loads_in_a_plain_sdxl_pipeline_as_the_card_says(studio):
    from conftest import make_tiny_sdxl_pipeline
    from safetensors.torch import load_file

    plain = make_tiny_sdxl_pipeline()
    folder = studio.library.concept_dir("medic")
    assert 'load_textual_inversion(embeddings["clip_g"], token="<medic>"' in (folder / "README.md").read_text()
    embeddings = load_file(str(folder / "learned_embeds.safetensors"))
    plain.load_textual_inversion(embeddings["clip_l"], token="<medic>", text_encoder=plain.text_encoder,
                                 tokenizer=plain.tokenizer)
    plain.load_textual_inversion(embeddings["clip_g"], token="<medic>", text_encoder=plain.text_encoder_2,
                                 tokenizer=plain.tokenizer_2)
    mean = studio.tokens.rows("medic").view(2, studio.info.num_cross_attn_layers, 64).mean(1)  # (slots, D)
    for tokenizer, encoder, columns in ((plain.tokenizer, plain.text_encoder, slice(0, 32)),
                                        (plain.tokenizer_2, plain.text_encoder_2, slice(32, 64))):
        ids = tokenizer.convert_tokens_to_ids(["<medic>", "<medic>_1"])  # one token per slot
        assert torch.allclose(encoder.get_input_embeddings().weight[ids], mean[:, columns])
    images = plain("a photo of a <medic>", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
