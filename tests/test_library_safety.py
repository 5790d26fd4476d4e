"""The library as an attacker or a careless user meets it: hostile manifests, two writers at once, a disk that
fails in the middle of a replace, a kill, leftovers. Each test closes a hole of issue 16 (3, 4, 5, and the cap on
concepts of 6)."""

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cidm import library as library_mod
from cidm.library import Library, LibraryError
from cidm.methods.cidm import read_task_shared
from cidm.studio import Studio
from test_core import base, learn  # noqa: F401  (module fixture, helper)


def fresh(base, path):
    from conftest import make_tiny_pipeline

    studio = Studio(path, pipe=make_tiny_pipeline(), info=base[1])
    studio.record_forgetting = False
    return studio


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def concept_bytes(root: Path, name: str) -> dict[str, bytes]:
    return snapshot(root / name)


@pytest.fixture(scope="module")
def library(base, tmp_path_factory):
    """A library with two concepts, learned once; tests copy it."""
    studio = fresh(base, tmp_path_factory.mktemp("lib") / "lib")
    learn(studio, "medic", steps=2)
    learn(studio, "bolt", steps=2)
    return studio.library.root


@pytest.fixture
def copy(library, tmp_path):
    dest = tmp_path / "lib"
    shutil.copytree(library, dest)
    return dest


def write_manifest(root: Path, **changes) -> None:
    manifest = json.loads((root / "library.json").read_text())
    manifest.update(changes)
    (root / "library.json").write_text(json.dumps(manifest))


# --------------------------------------------------------------------------------------------------------------
# hole 3: a manifest is validated on every read


@pytest.mark.parametrize("tasks,concepts,shared,match", [
    (["../outside"], {"../outside": {"class_word": "x", "kind": "object"}}, None, "naming rule"),
    (["/etc"], {"/etc": {"class_word": "x", "kind": "object"}}, None, "naming rule"),
    (["forgetting"], {"forgetting": {"class_word": "x", "kind": "object"}}, None, "naming rule"),
    (["medic"], {"medic": {"class_word": "x", "kind": "object"}}, "../../outside.safetensors", "task_shared"),
    (["medic"], {"medic": {"class_word": "x", "kind": "object"}}, "/abs/task_shared-00000000.safetensors",
     "task_shared"),
    (["medic", "medic"], {"medic": {"class_word": "x", "kind": "object"}}, None, "each once"),
    (["medic"], {"medic": {"class_word": "x", "kind": "object"}, "bolt": {}}, None, "same concepts"),
    (["medic"], {"medic": "not a record"}, None, "class_word"),
    (["medic"], {"medic": {"class_word": "x", "kind": "../style"}}, None, "kind"),
    ("medic", {}, None, "must be a list"),
])
def test_a_manifest_that_breaks_the_rules_is_refused_on_read(copy, tasks, concepts, shared, match):
    write_manifest(copy, tasks=tasks, concepts=concepts, task_shared=shared)
    with pytest.raises(LibraryError, match=match):
        Library(copy)
    with pytest.raises(LibraryError, match=match):
        Library(copy, read_only=True)


def test_a_manifest_that_is_not_json_or_too_large_is_refused(copy):
    (copy / "library.json").write_text("[" * 100_000)  # nested past the parser's recursion limit
    with pytest.raises(LibraryError, match="not valid JSON"):
        Library(copy)
    (copy / "library.json").write_text(" " * (library_mod.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(LibraryError, match="larger than"):
        Library(copy)


def test_a_concept_folder_that_links_outside_the_library_is_refused(copy, tmp_path):
    outside = tmp_path / "outside"
    shutil.move(str(copy / "bolt"), outside)
    (copy / "bolt").symlink_to(outside, target_is_directory=True)
    with pytest.raises(LibraryError, match="outside"):
        Library(copy)
    assert (outside / "tokens.safetensors").exists()


def test_gallery_files_stay_inside_the_library(copy, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (16, 16)).save(secret)
    (copy / "medic" / "images" / "stolen.png").symlink_to(secret)
    images = Library(copy, read_only=True).images("medic")
    assert images and all(copy.resolve() in p.resolve().parents for p in images)
    assert not any(p.name == "stolen.png" for p in images)


def test_a_snapshot_holds_the_files_a_library_may_hold_and_no_stray_one(copy, tmp_path):
    for stray in ("medic/notes.txt", "medic/images/x.exe", "medic/samples/deep/0.png", "medic/.cache.png",
                  "forgetting/after-01/x.bin", "orphan.safetensors"):
        (copy / stray).parent.mkdir(parents=True, exist_ok=True)
        (copy / stray).write_bytes(b"stray")
    lib = Library(copy)
    files = lib.snapshot(tmp_path / "snap")
    for name in ("medic", "bolt"):
        for f in ("tokens.safetensors", "pytorch_lora_weights.safetensors", "learned_embeds.safetensors",
                  "README.md", "images/0.png", "samples/0.png", "samples/1.png"):
            assert f"{name}/{f}" in files, f
    assert not [f for f in files if "stray" in (copy / f).read_text(errors="ignore")]
    assert sorted(files) == sorted(str(p.relative_to(tmp_path / "snap")) for p in (tmp_path / "snap").rglob("*")
                                   if p.is_file())


# --------------------------------------------------------------------------------------------------------------
# hole 4: two writers lose nothing


def test_two_studios_learning_at_once_on_one_library_both_keep_their_concept(base, tmp_path):
    root = tmp_path / "shared"
    first = fresh(base, root)
    learn(first, "medic", steps=2)
    a, b = fresh(base, root), fresh(base, root)  # e.g. the app and the command line
    both_training = threading.Barrier(2, timeout=120)

    def wait_for_the_other(step, terms):
        if step == 1:
            both_training.wait()  # both have read the library and are learning now

    errors = []

    def run(studio, name):
        try:
            learn(studio, name, steps=3, progress=wait_for_the_other)
        except Exception as err:  # noqa: BLE001  (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(a, "bolt")), threading.Thread(target=run, args=(b, "donut"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    lib = Library(root)
    assert sorted(lib.names) == ["bolt", "donut", "medic"]
    shared = read_task_shared(lib)
    assert sorted(shared.tasks) == ["bolt", "donut", "medic"]  # R2's state of every task survived
    leftovers = sorted(p.name for p in root.iterdir())
    assert leftovers == sorted([".lock", "library.json", "medic", "bolt", "donut", lib.manifest["task_shared"]])
    for studio in (a, b):  # the one that committed last loaded the other's concept; the first does on refresh
        studio.refresh()
        assert sorted(studio.names) == ["bolt", "donut", "medic"] and not studio.refresh()
        assert studio.generate("a photo of a <bolt> and a <donut>", steps=2)[0].size == (64, 64)


def test_a_sweep_leaves_the_staging_folder_of_a_running_task_alone(base, tmp_path):
    root = tmp_path / "lib"
    studio = fresh(base, root)
    learn(studio, "medic", steps=2)
    seen, kept = [], []

    def open_another(step, terms):
        if step == 1:
            seen.extend(p for p in root.iterdir() if p.name.startswith(".staging-"))
            Library(root)  # another Studio or the command line opens the library: it sweeps
            kept.extend(p for p in seen if p.exists())

    learn(studio, "bolt", steps=3, progress=open_another)
    assert seen and kept == seen and Library(root).names == ["medic", "bolt"]
    assert not [p for p in root.iterdir() if p.name.startswith(".staging-")]  # gone once the task is done


def test_a_snapshot_taken_while_a_task_learns_holds_only_published_files(base, tmp_path):
    root = tmp_path / "lib"
    studio = fresh(base, root)
    learn(studio, "medic", steps=2)
    taken = {}

    def snapshot_now(step, terms):
        if step == 1:
            with Library(root).staging() as stage:
                taken["files"] = sorted(Library(root).snapshot(stage / "copy"))
                taken["copied"] = sorted(str(p.relative_to(stage / "copy")) for p in (stage / "copy").rglob("*")
                                         if p.is_file())

    learn(studio, "bolt", steps=2, progress=snapshot_now)
    assert taken["files"] == taken["copied"]
    assert "library.json" in taken["files"] and "medic/tokens.safetensors" in taken["files"]
    assert not any(f.startswith((".", "bolt/")) or "/." in f for f in taken["files"])


# --------------------------------------------------------------------------------------------------------------
# hole 5: replace keeps the old concept until the new manifest is published; the sweep does what it says


def test_replace_with_a_failing_manifest_write_keeps_the_old_concept(base, copy, monkeypatch):
    studio = fresh(base, copy)
    before, manifest = concept_bytes(copy, "bolt"), (copy / "library.json").read_bytes()
    old_image = np.asarray(studio.generate("a photo of a <bolt>", steps=2)[0])

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(library_mod, "_write_json_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        learn(studio, "bolt", steps=2, replace=True, seed=5)
    monkeypatch.undo()
    assert (copy / "library.json").read_bytes() == manifest
    assert concept_bytes(copy, "bolt") == before
    assert not [p.name for p in copy.iterdir() if p.name.startswith((".trash", ".staging"))]
    assert Library(copy).names == ["medic", "bolt"] and concept_bytes(copy, "bolt") == before
    assert np.array_equal(np.asarray(studio.generate("a photo of a <bolt>", steps=2)[0]), old_image)


def test_a_replace_killed_before_its_manifest_is_published_is_rolled_back_on_the_next_open(copy):
    before = concept_bytes(copy, "bolt")
    # what a kill leaves between the two renames and the manifest: the old concept in the trash, the new in place
    os.replace(copy / "bolt", copy / ".trash-bolt-0123456789abcdef0123456789abcdef")
    shutil.copytree(copy / "medic", copy / "bolt")
    (copy / "task_shared-deadbeef.safetensors").write_bytes(b"unpublished")
    lib = Library(copy)
    assert lib.names == ["medic", "bolt"] and concept_bytes(copy, "bolt") == before
    assert not (copy / "task_shared-deadbeef.safetensors").exists()
    assert not [p for p in copy.iterdir() if p.name.startswith(".trash")]


def test_a_published_replace_drops_its_trash(base, copy):
    studio = fresh(base, copy)
    learn(studio, "bolt", steps=2, replace=True, seed=3)
    commit = studio.library.record("bolt")["commit"]
    after = concept_bytes(copy, "bolt")
    shutil.copytree(copy / "medic", copy / f".trash-bolt-{commit}")  # a kill right after the publication
    Library(copy)
    assert concept_bytes(copy, "bolt") == after and not (copy / f".trash-bolt-{commit}").exists()


def test_sweep_removes_unreferenced_concept_folders_and_task_shared_files_only(copy):
    shutil.copytree(copy / "medic", copy / "orphan")  # a commit whose manifest never appeared
    (copy / "task_shared-0badc0de.safetensors").write_bytes(b"stale")
    (copy / "notes").mkdir()
    (copy / "notes" / "todo.txt").write_text("mine")  # not a concept folder: not ours to remove
    (copy / ".gitattributes").write_text("*.safetensors filter=lfs")
    Library(copy)
    names = {p.name for p in copy.iterdir()}
    assert "orphan" not in names and "task_shared-0badc0de.safetensors" not in names
    assert {"notes", ".gitattributes", "medic", "bolt"} <= names


# --------------------------------------------------------------------------------------------------------------
# hole 6: a cap on concepts


def test_a_library_holds_at_most_max_concepts(base, copy, monkeypatch):
    monkeypatch.setattr(library_mod, "MAX_CONCEPTS", 2)
    studio = fresh(base, copy)
    with pytest.raises(LibraryError, match="the most one library may hold"):
        learn(studio, "donut", steps=2)
    learn(studio, "bolt", steps=2, replace=True)  # replacing one is not adding one
    assert studio.names == ["medic", "bolt"]
