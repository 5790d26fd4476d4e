"""The app: it serves its page, and every tab's handler works end to end on a tiny model (errors are gr.Error)."""

import socket
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from cidm.toyworld import concepts as C


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_progress(*args, **kwargs):
    return None


@pytest.fixture
def app(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("CIDM_BASE_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("CIDM_LIBRARY", str(tmp_path / "library"))
    import app as app_module

    app_module._BASE.clear()
    app_module._ACTIVE.clear()
    return app_module


def photos(tmp_path, name, n=4):
    from conftest import write_photos

    return write_photos(tmp_path, name, n)


def test_app_serves_its_page(app):
    demo = app.build_app()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as r:
            assert r.status == 200
            assert "CIDM Studio" in r.read().decode()
    finally:
        demo.close()


def test_generate_returns_images_of_the_model_size(app):
    images = app.generate("a photo of a red star on a beach", "", 2, 2, 5.0, 0)
    assert len(images) == 2 and images[0].size == (64, 64)


def test_bad_input_is_a_clear_error_and_not_a_traceback(app):
    import gradio as gr

    with pytest.raises(gr.Error, match="prompt is empty"):
        app.generate("   ", "", 1, 2, 5.0, 0)
    with pytest.raises(gr.Error, match="unknown concept <dog>"):
        app.generate("a <dog>", "", 1, 2, 5.0, 0)
    with pytest.raises(gr.Error, match="between 3 and 10 photos"):
        app.learn(["a.png"], "x", "dog", "object", 5, 0, False, progress=no_progress)


def test_learn_then_use_compose_forget_and_manage_the_library(app, tmp_path):
    import gradio as gr

    status, plot, samples = app.learn(photos(tmp_path, "medic"), "medic", "square", "object", 4, 0, False,
                                      progress=no_progress)
    assert "Learned `<medic>`" in status and len(plot) == 4 and len(samples) == 2
    status, _, samples = app.learn(photos(tmp_path, "bolt"), "bolt", "triangle", "object", 4, 0, False,
                                   progress=no_progress)
    assert len(samples) == 3  # two of the new concept, one earlier concept
    with pytest.raises(gr.Error, match="already exists"):
        app.learn(photos(tmp_path, "bolt"), "bolt", "triangle", "object", 4, 0, False, progress=no_progress)
    with pytest.raises(gr.Error, match="not allowed"):
        app.learn(photos(tmp_path, "bolt"), "../x", "triangle", "object", 4, 0, False, progress=no_progress)

    image, (_, boxes) = app.compose({"boxes": [{"xmin": 0, "ymin": 0, "xmax": 32, "ymax": 32, "label": "medic"}]},
                                    "a photo on a beach", "", 2, 5.0, 0)
    assert image.size == (64, 64) and boxes[0] == ((0, 0, 32, 32), "a photo of a <medic>")
    blank = app.blank_canvas().value["image"]  # drawn large, read relative to its size
    assert Image.open(blank["path"] if isinstance(blank, dict) else blank).size == (512, 512)
    canvas = Image.new("RGB", (512, 512))
    _, (_, boxes) = app.compose({"image": canvas, "boxes": [{"xmin": 256, "ymin": 0, "xmax": 512, "ymax": 128,
                                                             "label": "medic"}]}, "a photo on a beach", "", 2, 5.0, 0)
    assert boxes[0][0] == (32, 0, 64, 16)
    with pytest.raises(gr.Error, match="No boxes"):
        app.compose({"boxes": []}, "a photo", "", 2, 5.0, 0)

    table, grid, _, _ = app.forgetting()
    assert [row[0] for row in table["value"]] == ["<medic>", "<bolt>"]
    assert grid.size == (110 + 2 * 96, 22 + 2 * 96)  # 2 concepts × after tasks 1 and 2
    assert grid.getpixel((110 + 96 + 48, 22 + 96 + 48)) != (255, 255, 255)  # bolt after task 2 is drawn
    assert grid.getpixel((110 + 48, 22 + 96 + 48)) == (255, 255, 255)  # bolt did not exist after task 1

    rows, refs, _ = app.library_view()
    assert [r[0] for r in rows] == ["medic", "bolt"] and refs
    archive = app.download()
    assert archive.endswith(".zip")
    rows, _, _ = app.delete("bolt")
    assert [r[0] for r in rows] == ["medic"]


def test_push_uses_the_given_token_and_uploads_the_library(app, tmp_path, monkeypatch):
    from cidm import hub

    app.learn(photos(tmp_path, "medic"), "medic", "square", "object", 2, 0, False, progress=no_progress)
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls["create"] = (repo_id, kw["private"])
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kw):  # what the Hub would receive, read while the upload runs
            folder = Path(kw["folder_path"])
            calls["upload"] = {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}

    root = app.studio(None).library.root
    url = hub.push_library(root, "me/my-concepts", token="hf_test", api=FakeApi())
    assert url.endswith("me/my-concepts") and calls["create"] == ("me/my-concepts", True)
    # the uploaded folder is the library: each of its files, byte for byte, and no lock or staging file
    library_files = {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*")
                     if f.is_file() and not f.name.startswith(".") and ".staging-" not in str(f)}
    assert calls["upload"] == library_files and "medic/pytorch_lora_weights.safetensors" in library_files
    assert (root / "README.md").read_text().count("cidm") >= 1
    with pytest.raises(ValueError, match="no Hugging Face token"):
        hub.push_library(root, "me/my-concepts", token="")


def test_edit_tab_keeps_pixels_outside_the_box(app, tmp_path):
    import numpy as np

    import gradio as gr
    from cidm.toyworld import world as W

    original = Image.fromarray(W.render(W.random_scene(5, two_object_prob=0.0)))
    edited = np.asarray(app.edit(original, "32,32,64,64", "a photo of a red star", 1.0, 2, 5.0, 0))
    np.testing.assert_array_equal(edited[:32], np.asarray(original)[:32])
    with pytest.raises(gr.Error, match="No image"):
        app.edit(None, "0,0,1,1", "x", 0.5, 2, 5.0, 0)


def test_a_first_visit_can_start_from_a_copy_of_the_demo_library(app, tmp_path, monkeypatch):
    import os

    from cidm import demo
    from cidm.library import Library, LibraryError
    from cidm.studio import Studio

    shipped = tmp_path / "demo-library"  # a demo learned on the test's tiny base (the real one: embedded world)
    s = Studio(shipped, pipe=app.base()[0], info=app.base()[1])
    for name in ("medic", "bolt", "pixelart"):
        spec = C.spec(name)
        s.learn(name, photos(tmp_path, name), spec.class_word, spec.kind, steps=1)
    monkeypatch.setattr(app, "DEMO_LIBRARY", shipped)
    monkeypatch.setattr(demo, "DEMO_LIBRARY", shipped)
    monkeypatch.setattr(app, "start_from_demo", lambda dest: demo.start_from_demo(dest, shipped))
    before = sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())

    assert app.welcome()["visible"] is True
    hidden, message, prompt, canvas, table, grid, _, _ = app.start_demo()
    assert hidden["visible"] is False and "`<medic>`, `<bolt>`, `<pixelart>`" in message
    assert prompt == "a photo of a <medic> on a beach"
    assert [b["label"] for b in canvas.value["boxes"]] == ["medic", "bolt"]  # two objects, side by side
    assert [row[0] for row in table["value"]] == ["<medic>", "<bolt>", "<pixelart>"] and grid is not None
    assert app.welcome()["visible"] is False

    mine = tmp_path / "library"
    assert Library(mine).names == ["medic", "bolt", "pixelart"]
    assert os.stat(mine / "medic" / "tokens.safetensors").st_ino != os.stat(shipped / "medic" / "tokens.safetensors").st_ino
    app.delete("bolt")  # the visitor's copy changes; the shipped library does not
    assert Library(mine).names == ["medic", "pixelart"]
    assert sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file()) == before
    with pytest.raises(LibraryError, match="already holds 2 concepts"):
        demo.start_from_demo(mine, shipped)
    with pytest.raises(LibraryError, match="no demo library"):
        demo.start_from_demo(tmp_path / "other", tmp_path / "missing")
