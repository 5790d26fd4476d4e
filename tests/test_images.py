"""cidm.images: every upload becomes correct 8-bit RGB, bad uploads are refused clearly, tensors are ready."""

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cidm.images import (Augment, ImageInputError, fit_square, load_image, load_images, prepare_training_images,
                         to_tensor)


def gradient(w=48, h=32):
    """An RGB image whose pixels differ, so orientation and cropping are observable."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8), "RGB")


def pixel(image, x, y):
    return np.asarray(image)[y, x].astype(int)


def test_module_does_not_import_gradio_or_torchvision():
    import subprocess

    code = "import sys, cidm.images; print('gradio' in sys.modules, 'torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("fmt,ext,tol", [("JPEG", "jpg", 12), ("PNG", "png", 0), ("WEBP", "webp", 0),
                                         ("BMP", "bmp", 0), ("TIFF", "tif", 0), ("GIF", "gif", 40)])
def test_common_formats_load_as_rgb_with_same_content(tmp_path, fmt, ext, tol):
    src = gradient()
    path = tmp_path / f"photo.{ext}"
    src.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == src.size
    assert np.abs(np.asarray(img).astype(int) - np.asarray(src).astype(int)).max() <= tol


def test_all_source_kinds_give_the_same_pixels(tmp_path):
    src = gradient()
    path = tmp_path / "p.png"
    src.save(path)
    data = path.read_bytes()
    expected = np.asarray(src)
    with open(path, "rb") as fh:
        from_file = load_image(fh)
    for img in [load_image(str(path)), load_image(path), load_image(data), load_image(io.BytesIO(data)), from_file,
                load_image(src), load_image(np.asarray(src)), load_image((str(path), "a caption"))]:
        assert img.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(img), expected)


def test_gif_uses_first_frame(tmp_path):
    red, blue = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    path = tmp_path / "anim.gif"
    red.save(path, save_all=True, append_images=[blue], duration=100, loop=0)
    assert tuple(pixel(load_image(path), 10, 10)) == (255, 0, 0)


def test_rgba_png_transparent_region_becomes_white(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200  # a red-ish colour that must NOT show through where alpha is 0
    rgba[:, :16, 3] = 255  # left half opaque, right half fully transparent
    rgba[:, 24:, 3] = 128  # ...except a half-transparent stripe on the far right
    path = tmp_path / "logo.png"
    Image.fromarray(rgba, "RGBA").save(path)
    img = load_image(path)
    assert img.mode == "RGB"
    assert tuple(pixel(img, 4, 4)) == (200, 0, 0)  # opaque: unchanged
    assert tuple(pixel(img, 20, 4)) == (255, 255, 255)  # transparent: white, not black, not red
    half = pixel(img, 28, 4)  # 50% alpha over white: between the colour and white
    assert abs(half[0] - 228) <= 2 and abs(half[1] - 127) <= 2


def test_palette_with_transparency_and_la_composite_on_white(tmp_path):
    p = Image.new("P", (20, 20), 0)
    p.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    p.paste(1, (0, 0, 10, 20))
    path = tmp_path / "pal.png"
    p.save(path, transparency=0)
    img = load_image(path)
    assert tuple(pixel(img, 5, 5)) == (10, 200, 10)
    assert tuple(pixel(img, 15, 5)) == (255, 255, 255)  # palette index 0 is transparent

    la = Image.new("LA", (20, 20), (0, 0))  # black, fully transparent
    assert tuple(pixel(load_image(la), 3, 3)) == (255, 255, 255)


def test_greyscale_and_bilevel_become_grey_rgb(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (20, 20), 90).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and tuple(pixel(img, 1, 1)) == (90, 90, 90)
    assert tuple(pixel(load_image(Image.new("1", (20, 20), 1)), 0, 0)) == (255, 255, 255)
    assert tuple(pixel(load_image(np.full((20, 20), 7, np.uint8)), 0, 0)) == (7, 7, 7)


def test_cmyk_jpeg_converts_to_correct_rgb(tmp_path):
    cmyk = Image.new("CMYK", (32, 32), (255, 0, 0, 0))  # pure cyan
    cmyk.paste((0, 0, 0, 255), (16, 0, 32, 32))  # pure black on the right
    path = tmp_path / "print.jpg"
    cmyk.save(path, "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB"
    r, g, b = pixel(img, 4, 16)
    assert r < 30 and g > 225 and b > 225  # cyan
    assert pixel(img, 28, 16).max() < 30  # black, not inverted to white


def test_ycbcr_converts(tmp_path):
    img = load_image(Image.new("RGB", (20, 20), (10, 120, 240)).convert("YCbCr"))
    assert img.mode == "RGB" and np.abs(pixel(img, 0, 0) - [10, 120, 240]).max() <= 3


@pytest.mark.parametrize("value,expected", [(32768, 128), (65535, 255), (0, 0), (1000, 4)])
def test_16bit_png_is_scaled_not_clipped(tmp_path, value, expected):
    path = tmp_path / "scan16.png"
    Image.fromarray(np.full((20, 24), value, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit greyscale file
    img = load_image(path)
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img).astype(int) - expected).max() <= 1


def test_16bit_gradient_keeps_its_range_and_other_wide_modes():
    ramp = np.linspace(0, 65535, 64).round().astype(np.uint16)[None].repeat(20, 0)
    out = np.asarray(load_image(Image.fromarray(ramp)))[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255 and np.all(np.diff(out) >= 0) and out[32] in range(125, 135)
    for mode in ("I;16B", "I"):
        assert tuple(pixel(load_image(Image.new(mode, (20, 20), 32768)), 0, 0)) == (128, 128, 128)
    assert tuple(pixel(load_image(Image.new("F", (20, 20), 0.5)), 0, 0)) == (128, 128, 128)  # float in 0..1
    with pytest.raises(ImageInputError, match="NaN"):
        load_image(Image.new("F", (20, 20), float("nan")))


def test_exif_orientation_6_is_applied(tmp_path):
    src = gradient(48, 32)  # wide; orientation 6 means "rotate 90° clockwise to display"
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    src.save(path, "JPEG", exif=exif, quality=95)
    assert Image.open(path).size == (48, 32)
    img = load_image(path)
    assert img.size == (32, 48)
    # Clockwise rotation: the stored top-left corner (red≈0, green≈0) ends at the displayed top-right.
    tr, tl = pixel(img, 31, 0), pixel(img, 0, 0)
    assert tr[0] < 40 and tr[1] < 40
    assert tl[1] > 200  # stored bottom-left (green high) ends at displayed top-left


def test_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "holiday_photo.jpg"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageInputError) as err:
        load_image(path)
    msg = str(err.value)
    assert "holiday_photo.jpg" in msg and "not an image Pillow can read" in msg and "JPEG, PNG or WebP" in msg
    assert isinstance(err.value, ValueError)


def test_truncated_and_missing_files_are_refused(tmp_path):
    good = tmp_path / "cut.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(good)
    good.write_bytes(good.read_bytes()[:4000])  # header intact, pixel data cut short
    with pytest.raises(ImageInputError, match="cut.png"):
        load_image(good)
    with pytest.raises(ImageInputError, match="nowhere.png"):
        load_image(tmp_path / "nowhere.png")
    with pytest.raises(ImageInputError, match="uint8"):
        load_image(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ImageInputError):
        load_image(12345)


def test_tiny_image_is_refused(tmp_path):
    path = tmp_path / "icon.png"
    Image.new("RGB", (8, 8), "red").save(path)
    with pytest.raises(ImageInputError, match=r"icon\.png.*8×8.*16 px"):
        load_image(path)
    assert load_image(Image.new("RGB", (16, 16))).size == (16, 16)  # the limit itself is fine
    with pytest.raises(ImageInputError):
        load_image(Image.new("RGB", (100, 15)))


def test_load_images_enforces_counts(tmp_path):
    path = tmp_path / "a.png"
    gradient().save(path)
    assert len(load_images([path, path, path], min_count=2, max_count=3)) == 3
    with pytest.raises(ImageInputError, match=r"got 1 image\b.*3 to 5"):
        load_images([path], min_count=3, max_count=5)
    with pytest.raises(ImageInputError, match=r"got 4 images.*1 to 3"):
        load_images([path] * 4, max_count=3)
    with pytest.raises(ImageInputError, match="got 0 images"):
        load_images([])
    with pytest.raises(ImageInputError, match="got 0 images"):
        load_images(None)
    assert len(load_images(str(path))) == 1  # a single path is one image, not a string of characters
    with pytest.raises(ValueError):
        load_images([path], min_count=3, max_count=2)


def test_load_images_error_names_the_bad_file(tmp_path):
    good, bad = tmp_path / "good.png", tmp_path / "bad.webp"
    gradient().save(good)
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageInputError, match="bad.webp"):
        load_images([good, bad])


def test_fit_square_exact_size_and_centre_crop():
    wide = Image.new("RGB", (300, 100), (255, 0, 0))
    wide.paste((0, 255, 0), (90, 0, 210, 100))  # green centre (a little wider than the crop), red sides
    out = fit_square(wide, 64)
    assert out.size == (64, 64)
    assert np.abs(np.asarray(out).astype(int) - [0, 255, 0]).max() <= 2  # only the centre square survives
    left = fit_square(wide.crop((0, 0, 150, 100)), 50)  # the centre of a 150×100 image is columns 25..125
    assert (np.asarray(left)[:, 0, 0] > 250).all() and (np.asarray(left)[:, -1, 1] > 250).all()
    tall = fit_square(gradient(20, 50), 128)  # upscales small images too
    assert tall.size == (128, 128)
    assert fit_square(gradient(37, 37), 37).size == (37, 37)
    with pytest.raises(ValueError):
        fit_square(wide, 0)


def test_to_tensor_range_shape_and_values():
    img = Image.new("RGB", (20, 10), (0, 255, 0))
    img.putpixel((3, 2), (255, 128, 0))
    t = to_tensor(img)
    assert t.shape == (3, 10, 20) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    assert torch.allclose(t[:, 2, 3], torch.tensor([1.0, 128 / 127.5 - 1, -1.0]), atol=1e-6)
    assert torch.equal(t[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(Image.new("L", (4, 4)))


def batch():
    return torch.stack([to_tensor(fit_square(gradient(40, 40), 32)), to_tensor(fit_square(gradient(60, 30), 32))])


def test_augment_deterministic_for_seed_and_shape_preserving():
    x = batch()
    aug = Augment()
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert torch.equal(x, batch())  # input not modified in place


def test_augment_uses_only_the_generator():
    x = batch()
    torch.manual_seed(0)
    a = Augment()(x, torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    b = Augment()(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_augment_identity_settings_and_flip():
    x = batch()
    assert torch.equal(Augment(hflip=0.0, scale=(1.0, 1.0), shift=0.0)(x, torch.Generator().manual_seed(0)), x)
    flipped = Augment(hflip=1.0, scale=(1.0, 1.0), shift=0.0)(x, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, x.flip(-1))


def test_augment_rejects_bad_settings():
    for kwargs in ({"hflip": 1.5}, {"scale": (0.0, 1.0)}, {"scale": (0.9, 0.5)}, {"scale": (0.5, 1.2)},
                   {"shift": -0.1}):
        with pytest.raises(ValueError):
            Augment(**kwargs)
    with pytest.raises(ValueError):
        Augment()(torch.zeros(3, 8, 8), torch.Generator())


def test_prepare_training_images_shape_dtype_range(tmp_path):
    paths = []
    for i, (size, fmt) in enumerate([((300, 100), "JPEG"), ((64, 200), "PNG"), ((40, 40), "WEBP")]):
        paths.append(tmp_path / f"img{i}.{fmt.lower()}")
        gradient(*size).save(paths[-1], fmt)
    t = prepare_training_images(paths, 32)
    assert t.shape == (3, 3, 32, 32) and t.dtype == torch.float32
    assert t.min() >= -1.0 and t.max() <= 1.0 and t.std() > 0.1
    with pytest.raises(ImageInputError):
        prepare_training_images([], 32)


def test_embedded_srgb_icc_profile_keeps_colours(tmp_path):
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = gradient()
    path = tmp_path / "tagged.png"
    src.save(path, icc_profile=icc)
    assert Image.open(path).info.get("icc_profile")
    img = load_image(path)
    assert img.mode == "RGB" and "icc_profile" not in img.info
    assert np.abs(np.asarray(img).astype(int) - np.asarray(src).astype(int)).max() <= 3
