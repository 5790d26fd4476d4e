"""Reading uploaded photos and preparing them for concept training.

Everything here is plain Pillow + numpy + torch (no gradio, no torchvision), so the app, the CLI and the
tests share one loader. ``load_image`` turns any upload into an 8-bit RGB ``PIL.Image`` (EXIF orientation
applied, transparency flattened on white, 16-bit/float images rescaled, embedded ICC profiles converted to
sRGB when Pillow has LittleCMS); ``prepare_training_images`` turns a list of uploads into a (N, 3, S, S)
tensor in [-1, 1]; ``Augment`` is the light, generator-driven augmentation used during few-shot training.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

try:  # colour management is optional in Pillow builds
    from PIL import ImageCms
except ImportError:  # pragma: no cover - depends on how Pillow was built
    ImageCms = None

__all__ = ["ImageInputError", "load_image", "load_images", "fit_square", "to_tensor", "Augment",
           "prepare_training_images", "training_square", "with_parameters", "save_png"]

MIN_SIDE = 16
# The most pixels (width × height) an upload may decode to. Checked from the file's header, before decoding: a larger
# JPEG is decoded at a reduced scale (its DCT allows 1/2, 1/4, 1/8), anything else is refused. A 435 KB PNG can hold
# 12000×12000 pixels (432 MB as RGB); Pillow's own limit only starts at 89 M pixels (a warning) and 179 M (an error).
MAX_PIXELS = 25_000_000
# Formats we let Pillow decode from uploads ("JPEG" also opens phone cameras' multi-picture MPO files).
# Restricting the list keeps Pillow from handing untrusted files to plugins such as EPS, which runs Ghostscript.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ADVICE = "upload a JPEG, PNG or WebP"
# Errors Pillow's decoders raise on corrupt or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, struct.error,
                  ZeroDivisionError)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageInputError(ValueError):
    """An upload that cannot be used; the message names the file and says what to do."""


# ----------------------------------------------------------------------------------------------- loading


def load_image(source, reduce_to: int | None = None) -> Image.Image:
    """Open one upload and return it as an 8-bit RGB image.

    ``source`` may be a path (str/Path), bytes, a binary file-like object, a PIL image, a uint8 numpy array
    shaped (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or a gradio-gallery style ``(image, caption)`` pair.
    Raises ImageInputError for unreadable files, images smaller than 16 px on a side, and files that would decode to
    more than ``MAX_PIXELS`` (a JPEG is decoded reduced instead). ``reduce_to``: a JPEG may be decoded at a reduced
    scale whose sides stay at least this many pixels (the caller resizes to that size anyway).
    """
    return _load(source, fallback_name="uploaded image", reduce_to=reduce_to)


def load_images(sources, min_count: int = 1, max_count: int = 50) -> list[Image.Image]:
    """``load_image`` for each source; raises ImageInputError unless min_count <= count <= max_count."""
    sources = _counted(sources, min_count, max_count)
    return [_load(s, fallback_name=f"image {i + 1} of {len(sources)}") for i, s in enumerate(sources)]


def _counted(sources, min_count: int, max_count: int) -> list:
    """The uploads as a list, or ImageInputError unless min_count <= count <= max_count."""
    if min_count < 0 or max_count < min_count:
        raise ValueError(f"need 0 <= min_count <= max_count, got min_count={min_count}, max_count={max_count}")
    if sources is None:
        sources = []
    elif isinstance(sources, (str, bytes, bytearray, os.PathLike, Image.Image)) or (
            isinstance(sources, np.ndarray) and sources.ndim < 4):
        sources = [sources]  # a single upload, not a sequence of them
    else:
        sources = list(sources)
    n = len(sources)
    if not min_count <= n <= max_count:
        limits = f"at least {min_count}" if n < min_count else f"at most {max_count}"
        raise ImageInputError(f"got {n} image{'s' if n != 1 else ''}, but {limits} are needed "
                              f"(allowed: {min_count} to {max_count}): upload between {min_count} and "
                              f"{max_count} images")
    return sources


def _load(source, fallback_name: str, reduce_to: int | None = None) -> Image.Image:
    if isinstance(source, tuple) and len(source) == 2 and (source[1] is None or isinstance(source[1], str)):
        source = source[0]  # (image, caption) as a gr.Gallery gives it
    name = _name_of(source, fallback_name)

    if isinstance(source, np.ndarray):
        image = _from_array(source, name)
    elif isinstance(source, Image.Image):
        _check_pixels(source, name)
        try:
            source.load()
            image = _first_frame(source)
        except _DECODE_ERRORS as exc:
            raise _unreadable(name, exc) from exc
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageInputError(f"{name} was not found: upload the file again")
        image = _decode(path, name, reduce_to)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        image = _decode(io.BytesIO(bytes(source)), name, reduce_to)
    elif hasattr(source, "read"):
        image = _decode(source, name, reduce_to)
    else:
        raise ImageInputError(f"{name} is a {type(source).__name__}, not an image: pass a file path, bytes, a "
                              "file object, a PIL image or a uint8 numpy array")

    w, h = image.size
    if w < MIN_SIDE or h < MIN_SIDE:
        raise ImageInputError(f"{name} is only {w}×{h} px; images must be at least {MIN_SIDE} px on each side: "
                              "upload a larger photo")
    return _to_rgb(image, name)


def _name_of(source, fallback: str) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name or str(source)
    raw = getattr(source, "filename", None) or getattr(source, "name", None)  # PIL images / file objects
    if isinstance(raw, (str, os.PathLike)) and str(raw):
        return Path(raw).name or str(raw)
    return fallback


def _unreadable(name: str, exc: BaseException) -> ImageInputError:
    reason = str(exc).strip() or type(exc).__name__
    return ImageInputError(f"{name} is not an image Pillow can read ({reason}): {_ADVICE}")


def _decode(fp, name: str, reduce_to: int | None = None) -> Image.Image:
    """Open, check the size in the header, decode (a JPEG reduced where allowed) and detach the first frame, so the
    file can be closed afterwards."""
    try:
        with warnings.catch_warnings():  # Pillow's warning above 89 M pixels: the budget below is stricter
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(fp, formats=ACCEPTED_FORMATS)
        with opened:
            w, h = opened.size
            if opened.format in ("JPEG", "MPO"):  # decoded at 1/s of its size, s in 1, 2, 4, 8
                s = 1
                while s < 8 and w * h > MAX_PIXELS * s * s:  # within the budget
                    s *= 2
                while reduce_to and s < 8 and min(w, h) // (2 * s) >= reduce_to:  # no larger than needed
                    s *= 2
                if s > 1:
                    opened.draft(opened.mode, (w // s, h // s))
            _check_pixels(opened, name)
            return _first_frame(opened)
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{name} is too large to open safely ({exc}): upload a smaller image") from exc
    except _DECODE_ERRORS as exc:
        raise _unreadable(name, exc) from exc


def _check_pixels(image: Image.Image, name: str) -> None:
    w, h = image.size
    if w * h > MAX_PIXELS:
        raise ImageInputError(f"{name} is {w}×{h} pixels ({w * h / 1e6:.0f} M), more than the "
                              f"{MAX_PIXELS / 1e6:.0f} M pixels an upload may have: upload a smaller image (a JPEG "
                              f"of any size is reduced while it is read)")


def _first_frame(image: Image.Image) -> Image.Image:
    """A loaded, independent copy of frame 0 with EXIF orientation applied."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image.load()
    try:
        return ImageOps.exif_transpose(image)  # a copy, also when there is nothing to rotate
    except (SyntaxError, ValueError, TypeError, KeyError, struct.error, OSError):
        return image.copy()  # malformed EXIF: the pixels are still fine, keep them as stored


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageInputError(f"{name} is a numpy array of {array.dtype}; expected uint8 values 0-255: "
                              "convert it with (array * 255).round().astype('uint8') or pass the file instead")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageInputError(f"{name} is a numpy array of shape {array.shape}; expected (H, W), (H, W, 3) "
                              "or (H, W, 4)")
    return Image.fromarray(np.ascontiguousarray(array))


# --------------------------------------------------------------------------------------------- colour


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: alpha on white, 16-bit and float rescaled, ICC converted to sRGB."""
    icc = image.info.get("icc_profile")
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_wide_to_uint8(np.asarray(image), mode, name), "L").convert("RGB")
    if mode == "CMYK":
        return _icc_to_srgb(image, icc) or image.convert("RGB")
    if mode == "La":
        image = image.convert("LA")
    if mode == "P" or (mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")  # palette transparency, or a colour-keyed L/RGB PNG (tRNS chunk)
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
    elif image.mode != "RGB":
        try:
            image = image.convert("RGB")  # L, 1, YCbCr, LAB, HSV
        except ValueError as exc:
            raise ImageInputError(f"{name} has colour mode {image.mode}, which cannot be converted to RGB: "
                                  f"{_ADVICE}") from exc
        return image  # greyscale/other profiles do not describe an RGB image; skip ICC
    return _icc_to_srgb(image, icc) or image


def _icc_to_srgb(image: Image.Image, icc) -> Image.Image | None:
    """Convert RGB/CMYK pixels with an embedded ICC profile to sRGB; None when not possible."""
    if not icc or ImageCms is None:
        return None
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out = ImageCms.profileToProfile(image, src, _srgb_profile(), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None  # a profile LittleCMS cannot use: fall back to Pillow's plain conversion
    out.info.pop("icc_profile", None)
    return out


@functools.lru_cache(maxsize=1)
def _srgb_profile():
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _wide_to_uint8(values: np.ndarray, mode: str, name: str) -> np.ndarray:
    """16-bit, 32-bit int or float greyscale -> uint8, scaling (never clipping) to 0-255.

    16-bit modes are mapped 0..65535 -> 0..255. For 'I' (32-bit int) values in 0..255 are kept, values in
    0..65535 are treated as 16-bit, anything else is stretched from its min..max. For 'F' values in 0..1 are
    multiplied by 255, values in 0..255 kept, anything else stretched from min..max.
    """
    if mode in _SIXTEEN_BIT_MODES:
        wide = values.astype(np.uint32)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)  # rounded, 32768 -> 128, 65535 -> 255
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ImageInputError(f"{name} contains NaN or infinite pixel values: {_ADVICE}")
    lo, hi = float(values.min()), float(values.max())
    if lo >= 0 and hi <= (1.0 if mode == "F" else 255.0):
        scaled = values * (255.0 if mode == "F" else 1.0)
    elif mode == "I" and lo >= 0 and hi <= 65535:
        scaled = values / 257.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        scaled = values
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.rint(scaled).astype(np.uint8)


# -------------------------------------------------------------------------------------- preparing


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to ``size`` (LANCZOS) and centre-crop to size×size; upscales small images.

    Done as one resample of the centred square (sub-pixel exact), which is the same as resizing then cropping.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    return image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))



def fit_model_side(image: Image.Image, side: int, multiple: int) -> Image.Image:
    """The image resized so that its longer side is `side`, both sides multiples of `multiple` (the VAE's factor)."""
    w, h = image.size
    scale = side / max(w, h)
    size = tuple(max(multiple, round(v * scale / multiple) * multiple) for v in (w, h))
    return image if size == (w, h) else image.resize(size, Image.Resampling.LANCZOS)

def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [-1, 1]."""
    if image.mode != "RGB":
        raise ValueError(f"to_tensor needs an RGB image, got mode {image.mode}; open it with load_image first")
    array = np.array(image, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.float32) / 127.5 - 1.0


@dataclasses.dataclass
class Augment:
    """Light augmentation for few-shot concept learning, deterministic for a torch.Generator.

    Per sample: a random crop covering ``scale`` of the area (same aspect ratio) resized back to H×W, a
    horizontal flip with probability ``hflip``, and a translation of up to ``shift`` × side in x and y whose
    uncovered border repeats the edge pixels. Set ``hflip=0`` for concepts with text or asymmetry.
    """

    hflip: float = 0.5
    scale: tuple[float, float] = (0.75, 1.0)
    shift: float = 0.05

    def __post_init__(self):
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}")
        if len(self.scale) != 2 or not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high <= 1, got {self.scale}")
        if not 0.0 <= self.shift < 0.5:
            raise ValueError(f"shift is a fraction of the side in [0, 0.5), got {self.shift}")

    def __call__(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> same shape, dtype and device; randomness comes only from ``generator``."""
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or not pixels.is_floating_point():
            raise ValueError("Augment expects a float tensor shaped (B, 3, H, W), got "
                             f"{getattr(pixels, 'shape', type(pixels).__name__)}")
        b, _, h, w = pixels.shape
        # Always six draws per sample, whatever the settings, so a seed gives the same stream every time.
        draws = torch.rand((b, 6), generator=generator, device=generator.device).cpu().tolist()
        lo, hi = self.scale
        out = []
        for x, (u_area, u_left, u_top, u_flip, u_dx, u_dy) in zip(pixels, draws):
            side_frac = math.sqrt(lo + (hi - lo) * u_area)
            ch, cw = max(1, min(h, round(h * side_frac))), max(1, min(w, round(w * side_frac)))
            top, left = min(h - ch, int(u_top * (h - ch + 1))), min(w - cw, int(u_left * (w - cw + 1)))
            x = x[:, top:top + ch, left:left + cw]
            if (ch, cw) != (h, w):
                x = torch.nn.functional.interpolate(x[None], size=(h, w), mode="bilinear",
                                                    align_corners=False)[0]
            if u_flip < self.hflip:
                x = x.flip(-1)
            dx, dy = round((2 * u_dx - 1) * self.shift * w), round((2 * u_dy - 1) * self.shift * h)
            if dx or dy:
                rows = (torch.arange(h, device=x.device) - dy).clamp_(0, h - 1)  # edge-replicating shift
                cols = (torch.arange(w, device=x.device) - dx).clamp_(0, w - 1)
                x = x[:, rows][:, :, cols]
            out.append(x)
        return torch.stack(out).contiguous()


def training_square(source, size: int, fallback_name: str = "uploaded image") -> Image.Image:
    """One upload as learning sees it: read within the pixel budget (a JPEG no larger than it needs to be), its
    centre square at size×size. The app shows uploads this way before learning."""
    return fit_square(_load(source, fallback_name, reduce_to=size), size)


def prepare_training_images(sources, size: int) -> torch.Tensor:
    """Uploads -> (N, 3, size, size) float32 tensor in [-1, 1] (training_square, to_tensor), one upload at a time,
    so that at most one is held at full size."""
    sources = _counted(sources, 1, 50)
    return torch.stack([to_tensor(training_square(s, size, f"image {i + 1} of {len(sources)}"))
                        for i, s in enumerate(sources)])


def with_parameters(images: list[Image.Image], prompts: list[str], **parameters) -> list[Image.Image]:
    """Each image carries how it was made, as PNG text 'parameters' (JSON): its prompt (images come prompt by prompt,
    equally many each) and the shared settings. `save_png` writes it; so does Gradio's image output as PNG."""
    per_prompt = max(1, len(images) // max(1, len(prompts)))
    for i, image in enumerate(images):
        prompt = prompts[min(i // per_prompt, len(prompts) - 1)]
        image.info["parameters"] = json.dumps({"prompt": prompt, **parameters}, ensure_ascii=False)
    return images


def save_png(image: Image.Image, path) -> None:
    """Save as PNG, keeping the image's text metadata (`with_parameters`)."""
    info = PngInfo()
    for key, value in image.info.items():
        if isinstance(value, str):
            info.add_text(key, value)
    image.save(path, format="PNG", pnginfo=info)
