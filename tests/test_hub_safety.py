"""Pulling and pushing as an attacker meets them: hostile manifests and repos too large are refused before anything
else is fetched, a pull moves in by renames, no token is lent silently, an unreachable Hub is a clear error (issue 16,
holes 1, 2, 3, 6 and 9)."""

import json
from pathlib import Path

import pytest

from cidm import hub
from cidm import library as library_mod
from cidm.library import Library
from fake_hub import FakeHub
from test_core import base  # noqa: F401  (module fixture)
from test_library_safety import library  # noqa: F401  (fixture)


@pytest.fixture
def online(monkeypatch, tmp_path_factory):
    """The Hub reachable (the fake one), with the Hub's own cache in a folder that must stay empty: a pull keeps
    everything it downloads, bookkeeping included, inside the library's staging folder."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    yield
    assert not list(cache.iterdir()), "a pull wrote into the Hub's cache, outside the library"


# --------------------------------------------------------------------------------------------------------------
# holes 1, 3, 6, 9 on the Hub side: pull


def hostile_repo(fake: FakeHub, library: Path, repo: str, **changes) -> None:
    files = {str(p.relative_to(library)): p.read_bytes() for p in library.rglob("*")
             if p.is_file() and not p.name.startswith(".")}
    manifest = json.loads(files["library.json"])
    manifest.update(changes)
    files["library.json"] = json.dumps(manifest).encode()
    fake.repos[repo] = files


@pytest.mark.parametrize("changes,match", [
    (dict(tasks=["../outside"], concepts={"../outside": {"class_word": "x", "kind": "object"}}), "naming rule"),
    (dict(task_shared="../../x.safetensors"), "task_shared"),
    (dict(format=2), "format 2"),
])
def test_pull_refuses_a_hostile_manifest_and_fetches_nothing_else(library, base, tmp_path, online, changes, match):
    fake = FakeHub()
    hostile_repo(fake, library, "evil/lib", **changes)
    with pytest.raises(ValueError, match=match):
        hub.pull_library("evil/lib", tmp_path / "dest", endpoint=fake.url)
    assert fake.served == ["evil/lib/library.json"]
    assert not (tmp_path / "dest").exists() and not list(tmp_path.glob(".pull-*"))


def test_pull_checks_the_size_before_downloading(library, tmp_path, online, monkeypatch):
    fake = FakeHub()
    hostile_repo(fake, library, "big/lib")
    fake.repos["big/lib"]["medic/images/huge.png"] = b"\0" * 3_000_000  # a name a library may hold
    monkeypatch.setattr(hub, "MAX_PULL_BYTES", 2_000_000)
    with pytest.raises(ValueError, match="too large to load here"):
        hub.pull_library("big/lib", tmp_path / "dest", endpoint=fake.url)
    assert fake.served == ["big/lib/library.json"]
    monkeypatch.setattr(library_mod, "MAX_CONCEPTS", 1)
    hostile_repo(fake, library, "many/lib")
    with pytest.raises(ValueError, match="holds 2 concepts, more than the 1"):
        hub.pull_library("many/lib", tmp_path / "dest", endpoint=fake.url)


def test_pull_moves_in_by_rename_and_keeps_what_is_not_the_library(library, base, tmp_path, online):
    fake = FakeHub()
    hostile_repo(fake, library, "me/lib")
    fake.repos["me/lib"]["unrelated.txt"] = b"not named by the manifest"
    dest = tmp_path / "dest"
    (dest / "forgetting").mkdir(parents=True)  # left by concepts deleted earlier: replaced
    (dest / "mine.txt").write_text("a file of the user's")
    hub.pull_library("me/lib", dest, endpoint=fake.url, base=(base[1].source, base[1].num_cross_attn_layers))
    assert Library(dest).names == ["medic", "bolt"] and (dest / "mine.txt").read_text() == "a file of the user's"
    assert not (dest / "unrelated.txt").exists() and "me/lib/unrelated.txt" not in fake.served
    assert not list(tmp_path.glob(".pull-*")) and not list(dest.glob(".trash-*"))


def test_pull_fetches_only_files_a_library_may_hold(library, tmp_path, online):
    fake = FakeHub()
    hostile_repo(fake, library, "me/lib")
    stray = ["medic/payload.pkl", "medic/images/x.exe", "medic/deep/er/a.png", "medic/.hidden.png",
             "medic/samples/a b.png", "forgetting/notes.txt", "bolt/lora.bin", "donut/tokens.safetensors"]
    for path in stray:
        fake.repos["me/lib"][path] = b"not a library file"
    kept = ["medic/samples/0.png", "medic/learned_embeds.safetensors", "medic/context.png"]
    assert all(p in fake.repos["me/lib"] for p in kept[:2])  # what learning writes now
    fake.repos["me/lib"]["medic/context.png"] = b"a method's image"
    hub.pull_library("me/lib", tmp_path / "dest", endpoint=fake.url)
    assert not [p for p in stray if f"me/lib/{p}" in fake.served or (tmp_path / "dest" / p).exists()]
    assert all((tmp_path / "dest" / p).is_file() for p in kept)


def test_pull_and_push_never_pick_up_a_token_silently(library, tmp_path, online, monkeypatch):
    fake = FakeHub()
    hostile_repo(fake, library, "me/lib")
    monkeypatch.setenv("HF_TOKEN", "hf_server_owner")
    hub.pull_library("me/lib", tmp_path / "dest", token=None, endpoint=fake.url)
    assert fake.tokens == set()


def test_an_unreachable_hub_is_a_clear_error(library, tmp_path, online):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ValueError, match="could not reach the Hub to push 'me/lib'"):
        hub.push_library(library, "me/lib", token="hf_x", endpoint=closed)
    with pytest.raises(ValueError, match="could not download 'me/lib'"):
        hub.pull_library("me/lib", tmp_path / "dest", endpoint=closed)


@pytest.mark.parametrize("repo_id", ["../x", "me/../x", "me/x/y", "me/.x", "me/x--y", "me/" + "x" * 200, "", "me/"])
def test_a_repo_id_that_is_not_one_is_refused(repo_id, tmp_path):
    with pytest.raises(ValueError, match="should look like"):
        hub.pull_library(repo_id, tmp_path / "dest")
