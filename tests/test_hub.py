"""Push and pull a library through the real huggingface_hub client against a local fake Hub endpoint."""

import json

import pytest
import yaml

from cidm import hub
from cidm.studio import Studio
from fake_hub import FakeHub
from test_core import base, learn  # noqa: F401  (module fixture, helper)


@pytest.fixture(scope="module")
def library(base, tmp_path_factory):
    from conftest import make_tiny_pipeline

    studio = Studio(tmp_path_factory.mktemp("lib"), pipe=make_tiny_pipeline(), info=base[1])
    studio.record_forgetting = False
    learn(studio, "medic", steps=2)
    learn(studio, "pixelart", steps=2)
    return studio.library.root


@pytest.fixture(autouse=True)
def online_to_the_fake_hub(monkeypatch):
    """HF_HUB_OFFLINE=1 (set for every test) also blocks a local endpoint; these tests only reach the fake one."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def front_matter(text: str) -> dict:
    return yaml.safe_load(text.split("---", 2)[1])


def test_push_uploads_the_library_with_cards_and_the_token(library):
    fake = FakeHub()
    url = hub.push_library(library, "me/my-concepts", token="hf_secret", endpoint=fake.url)
    assert url.endswith("me/my-concepts")
    assert [(c["organization"], c["name"], c["visibility"]) for c in fake.created] == [("me", "my-concepts", "private")]
    assert fake.tokens == {"hf_secret"}
    files = fake.repos["me/my-concepts"]
    for name in ("medic", "pixelart"):
        for f in ("pytorch_lora_weights.safetensors", "tokens.safetensors", "learned_embeds.safetensors",
                  "samples/0.png", "samples/1.png"):
            assert f"{name}/{f}" in files, f
        text = files[f"{name}/README.md"].decode()
        card = front_matter(text)
        assert {"text-to-image", "diffusers", "lora", "cidm"} <= set(card["tags"])
        assert f"<{name}>" in card["instance_prompt"]
        assert [w["output"]["url"] for w in card["widget"]] == ["samples/0.png", "samples/1.png"]
        assert "](samples/0.png)" in text and "](samples/1.png)" in text
        assert f'pipe.load_textual_inversion(f"{{folder}}/learned_embeds.safetensors", token="<{name}>")' in text
    assert json.loads(files["library.json"])["tasks"] == ["medic", "pixelart"]
    library_card = files["README.md"].decode()
    assert "cidm" in front_matter(library_card)["tags"]
    assert 'snapshot_download("me/my-concepts", allow_patterns="medic/*")' in library_card
    assert "[`<pixelart>`](pixelart/README.md)" in library_card
    assert not any(p.startswith(".staging") for p in files)


def test_cards_link_the_paper_and_the_space_and_never_a_placeholder(library, monkeypatch):
    import re

    from cidm.cards import concept_card

    links = re.compile(r"\]\((https?://[^)]*)\)")
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("CIDM_PROJECT_URL", raising=False)
    text = (library / "medic" / "README.md").read_text()
    assert set(links.findall(text)) == {"https://arxiv.org/abs/2410.17594", "https://github.com/JiahuaDong/CIFC"}
    monkeypatch.setenv("SPACE_ID", "someone/cidm-studio")
    monkeypatch.setenv("CIDM_PROJECT_URL", "https://example.org/cidm-studio")
    text = str(concept_card("medic", "square", "object", "/srv/models/my-sd"))
    assert {"https://huggingface.co/spaces/someone/cidm-studio", "https://example.org/cidm-studio"} <= \
        set(links.findall(text))
    assert "/srv/models" not in text and "`my-sd`" in text  # the server's path is never shown


def test_pull_restores_a_pushed_library_into_an_empty_one_only(library, base, tmp_path):
    fake = FakeHub()
    hub.push_library(library, "me/my-concepts", token="hf_secret", endpoint=fake.url)
    dest = hub.pull_library("me/my-concepts", tmp_path / "pulled", token="hf_secret", endpoint=fake.url,
                            base=(base[1].source, base[1].num_cross_attn_layers))
    from conftest import make_tiny_pipeline

    studio = Studio(dest, pipe=make_tiny_pipeline(), info=base[1])
    assert studio.names == ["medic", "pixelart"]
    assert studio.generate("a photo of a <medic>", steps=2)[0].size == (64, 64)
    with pytest.raises(ValueError, match="already has concepts"):  # never overwrites what the user has
        hub.pull_library("me/my-concepts", dest, endpoint=fake.url)
    assert Studio(dest, pipe=make_tiny_pipeline(), info=base[1]).names == ["medic", "pixelart"]


def test_pull_refuses_a_repo_that_is_not_a_library_or_another_base(library, base, tmp_path):
    fake = FakeHub()
    fake.repos["me/not-a-library"] = {"README.md": b"hello"}
    with pytest.raises(ValueError, match="not a CIDM Studio library"):
        hub.pull_library("me/not-a-library", tmp_path / "a", endpoint=fake.url)
    with pytest.raises(ValueError, match="could not download"):
        hub.pull_library("me/missing", tmp_path / "b", endpoint=fake.url)
    hub.push_library(library, "me/my-concepts", token="hf_secret", endpoint=fake.url)
    with pytest.raises(ValueError, match="learned on base model"):
        hub.pull_library("me/my-concepts", tmp_path / "c", endpoint=fake.url, base=("stabilityai/sdxl", 70))
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))
    with pytest.raises(ValueError, match="should look like"):
        hub.pull_library("no-slash", tmp_path / "d", endpoint=fake.url)
