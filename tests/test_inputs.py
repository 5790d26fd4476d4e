"""Inputs that would hurt: images too large to decode, numbers that are not (issue 16, holes 7 and 9)."""

import math
import time

import pytest
from PIL import Image

from cidm.images import ImageInputError, load_image, prepare_training_images
from cidm.library import Library
from conftest import huge_png
from test_core import base, learn  # noqa: F401  (module fixture, helper)
from test_library_safety import copy, fresh, library  # noqa: F401  (fixtures, helper)


# --------------------------------------------------------------------------------------------------------------
# hole 7: huge images


def test_a_huge_png_is_refused_from_its_header_before_it_is_decoded(tmp_path):
    path = huge_png(tmp_path / "huge.png")
    assert path.stat().st_size < 1_000_000
    started = time.perf_counter()
    with pytest.raises(ImageInputError, match=r"12000×12000 pixels \(144 M\), more than the 25 M"):
        load_image(path)
    with pytest.raises(ImageInputError, match="12000×12000"):
        prepare_training_images([path, path, path], 64)
    assert time.perf_counter() - started < 2.0  # decoding 144 M pixels would take longer (and 432 MB)


def test_a_large_jpeg_is_decoded_reduced(tmp_path, monkeypatch):
    import cidm.images

    monkeypatch.setattr(cidm.images, "MAX_PIXELS", 1_000_000)
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1500), (200, 30, 30)).save(path, quality=90)
    image = load_image(path)
    assert image.size == (1000, 750) and image.getpixel((500, 375))[0] > 150  # DCT scale 1/2, within the budget
    assert load_image(path, reduce_to=64).size == (250, 188)  # 1/8: still ≥ 64 on the short side
    png = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500)).save(png)
    with pytest.raises(ImageInputError, match="more than the 1 M pixels"):
        load_image(png)


def test_edit_brings_an_upload_to_the_model_resolution_first(base, copy, tmp_path):
    studio = fresh(base, copy)
    photo = tmp_path / "photo.png"
    Image.new("RGB", (640, 480), (0, 90, 200)).save(photo)
    seen = []
    encode = studio.pipe.vae.encode
    studio.pipe.vae.encode = lambda x, *a, **k: (seen.append(tuple(x.shape[-2:])), encode(x, *a, **k))[1]
    edited = studio.edit(str(photo), (320, 240, 640, 480), "a photo of a <medic>", steps=2)
    assert edited.size == (64, 48) and seen == [(48, 64)]
    assert edited.getpixel((8, 8)) == Image.open(photo).resize((64, 48)).getpixel((8, 8))  # outside the box: kept
    with pytest.raises(ImageInputError, match="more than the 25 M"):
        studio.edit(str(huge_png(tmp_path / "huge.png")), (0, 0, 1, 1), "a photo of a <medic>", steps=2)


# --------------------------------------------------------------------------------------------------------------
# hole 9: numbers through the Python API and the command line


def test_steps_below_one_are_refused_before_anything_is_saved(base, copy, tiny_model_dir, tmp_path, capsys):
    from cidm import cli
    from conftest import write_photos

    studio = fresh(base, copy)
    manifest = (copy / "library.json").read_bytes()
    for steps in (0, -5):
        with pytest.raises(ValueError, match="steps must be a whole number of at least 1"):
            learn(studio, "donut", steps=steps)
    assert (copy / "library.json").read_bytes() == manifest and not (copy / "donut").exists()
    code = cli.main(["learn", "--library", str(tmp_path / "cli-lib"), "--name", "medic", "--class-word", "square",
                     "--steps", "0", "--base-model", str(tiny_model_dir),
                     "--images", *write_photos(tmp_path, "medic")])
    assert code == 2 and "steps must be a whole number of at least 1" in capsys.readouterr().err
    assert not Library(tmp_path / "cli-lib", read_only=True).names


@pytest.mark.parametrize("settings,match", [
    (dict(guidance=math.nan), "guidance must be a finite number"),
    (dict(guidance=math.inf), "guidance must be a finite number"),
    (dict(seed=2 ** 70), "seed must be a whole number"),
    (dict(seed=-1), "seed must be a whole number"),
    (dict(steps=0), "steps must be a whole number"),
    (dict(num_images=0), "num_images must be a whole number"),
])
def test_bad_generation_numbers_are_clear_errors(base, copy, settings, match):
    studio = fresh(base, copy)
    with pytest.raises(ValueError, match=match):
        studio.generate("a photo of a <medic>", **{"steps": 2, **settings})
    with pytest.raises(ValueError, match=match):
        studio.compose("a photo", [((0, 0, 32, 32), "a <medic>")], **{"steps": 2, **settings})


def test_a_box_with_a_number_that_is_not_finite_is_a_clear_error(base, copy):
    studio = fresh(base, copy)
    with pytest.raises(ValueError, match="not finite"):
        studio.compose("a photo", [((0, 0, math.nan, 32), "a <medic>")], steps=2)
