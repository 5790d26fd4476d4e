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
        assert f"{name}/pytorch_lora_weights.safetensors" in files and f"{name}/tokens.safetensors" in files
        card = front_matter(files[f"{name}/README.md"].decode())
        assert {"text-to-image", "diffusers", "lora", "cidm"} <= set(card["tags"])
        assert f"<{name}>" in card["instance_prompt"]
    assert json.loads(files["library.json"])["tasks"] == ["medic", "pixelart"]
    assert "cidm" in front_matter(files["README.md"].decode())["tags"]
    assert not any(p.startswith(".staging") for p in files)


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
