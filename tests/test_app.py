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


def learned(app, *args):
    """What the Learn tab shows at the end of a learning (its last update): message, loss curve, samples."""
    return list(app.learn(*args))[-1]


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
        learned(app, ["a.png"], "x", "dog", "object", 5, 0, False)


def test_learning_streams_the_step_the_time_left_the_loss_and_previews_before_its_result(app, tmp_path,
                                                                                        monkeypatch):
    monkeypatch.setattr(app, "STREAM_EVERY", 0.01)
    updates = list(app.learn(photos(tmp_path, "medic"), "medic", "square", "object", 60, 0, False))
    during = updates[:-2]  # the last two: learned (samples being drawn), then the samples
    assert any("Step" in status and "left" in status for status, _, _ in during)
    assert [len(plot) for _, plot, _ in during] == sorted(len(plot) for _, plot, _ in during)  # the curve grows
    previews = [gallery for _, plot, gallery in during if gallery and plot["step"].max() < 60]
    assert previews and previews[0][0][1] == "step 50" and previews[0][0][0].size == (64, 64)  # before the end
    assert [caption for _, caption in updates[-2][2]] == ["step 50", "step 60"]
    status, plot, samples = updates[-1]
    assert "Learned `<medic>`" in status and len(samples) == 2
    each, mean = (plot[plot["curve"] == c]["loss"].to_numpy() for c in ("each step", f"mean of {app.SMOOTH} steps"))
    assert len(each) == len(mean) == 60 and mean[0] == each[0] and abs(mean[-1] - each[-app.SMOOTH:].mean()) < 1e-9


def test_a_stream_closed_early_stops_its_learning_and_keeps_the_library(app, tmp_path):
    import threading

    stream = app.learn(photos(tmp_path, "medic"), "medic", "square", "object", 1000, 0, False)
    next(stream)  # learning has begun in its own thread
    assert [t for t in threading.enumerate() if t.name == "cidm-learn"]
    stream.close()  # the visitor left: the learning is cancelled and waited for
    assert not [t for t in threading.enumerate() if t.name == "cidm-learn"] and not app._CANCEL
    assert "medic" not in app.studio(None).names


def test_time_left_is_the_steps_to_go_at_the_pace_measured_so_far(app):
    import threading

    clock = iter([100.0, 100.5, 101.0, 101.5])
    view = app.LearnView(100, threading.Event(), clock=lambda: next(clock))
    view.step(1, {"diffusion": 0.25})
    view.step(2, {"diffusion": 0.25})
    assert view.seconds_left() is None and "measuring" in view.status()
    view.step(3, {"diffusion": 0.25})
    view.step(4, {"diffusion": 0.125})
    assert view.seconds_left() == 48.0  # 0.5 s a step, 96 steps to go
    assert view.status() == "**Step 4 of 100** · loss 0.1250 · about 48 s left"
    assert [app.duration(s) for s in (0.4, 59, 61, 200, 3600)] == ["0 s", "59 s", "1 min", "3 min 20 s", "60 min"]
    view.cancel.set()
    assert view.status().startswith("Stopping")
    slowed = app.LearnView(200, threading.Event(), clock=iter([0.1 * i for i in range(100)]
                                                               + [10 + 1.0 * i for i in range(60)]).__next__)
    for step in range(1, 161):
        slowed.step(step, {"diffusion": 0.25})
    assert slowed.seconds_left() == pytest.approx(40.0)  # the pace of the last 50 steps (1 s), not the mean


def test_uploads_show_as_thumbnails_and_unusable_files_are_named(app, tmp_path):
    from conftest import huge_png

    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    uploads = photos(tmp_path, "medic", 3) + [str(text), str(huge_png(tmp_path / "huge.png"))]
    with pytest.warns(UserWarning) as warned:
        thumbnails = app.photo_thumbnails(uploads)
    assert [t.size for t in thumbnails] == [(128, 128)] * 3
    messages = " ".join(str(w.message) for w in warned)
    assert "notes.png is not an image" in messages and "12000×12000 pixels" in messages
    with pytest.warns(UserWarning, match="11 photos: Learn takes 3 to 10; remove 1"):
        assert len(app.photo_thumbnails(photos(tmp_path, "bolt", 11))) == 10
    assert app.photo_thumbnails(None) == []


def test_a_toy_example_fills_the_form_with_its_photos(app):
    from types import SimpleNamespace

    files, name, class_word, kind = app.pick_example(SimpleNamespace(index=1))
    assert (name, class_word, kind) == ("bolt", "triangle", "object")
    assert len(files) == 5 and all(Path(f).is_file() for f in files)
    assert [t.size for t in app.photo_thumbnails(files)] == [(128, 128)] * 5


def test_learn_then_use_compose_forget_and_manage_the_library(app, tmp_path):
    import gradio as gr

    status, plot, samples = learned(app, photos(tmp_path, "medic"), "medic", "square", "object", 4, 0, False)
    assert "Learned `<medic>`" in status and list(plot["step"]) == [1, 2, 3, 4] * 2 and len(samples) == 2
    status, _, samples = learned(app, photos(tmp_path, "bolt"), "bolt", "triangle", "object", 4, 0, False)
    assert len(samples) == 3  # two of the new concept, one earlier concept
    with pytest.raises(gr.Error, match="already exists"):
        learned(app, photos(tmp_path, "bolt"), "bolt", "triangle", "object", 4, 0, False)
    with pytest.raises(gr.Error, match="not allowed"):
        learned(app, photos(tmp_path, "bolt"), "../x", "triangle", "object", 4, 0, False)

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

    learned(app, photos(tmp_path, "medic"), "medic", "square", "object", 2, 0, False)
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
