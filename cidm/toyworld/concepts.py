"""Personal concepts of the toy world: things the base vocabulary cannot say exactly ("photos of my dog").

Objects are composite glyphs (new colours, inner symbols, patterns); styles are whole-image palette + texture
transforms. The base model never sees them. `write_examples()` renders their reference images and JSON spec into
`examples/concepts/`, with the standard 10-task sequence (the paper's order: objects first, similar pairs later,
styles at positions 6, 8 and 10) and a separate tuning sequence for choosing method weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from . import world as W
from .world import Layer

PINK, BROWN, TEAL = (250, 140, 190), (110, 60, 30), (0, 150, 150)
RED, WHITE, YELLOW, GREEN = W.COLOURS["red"], W.COLOURS["white"], W.COLOURS["yellow"], W.COLOURS["green"]

OBJECTS: dict[str, tuple[str, tuple[Layer, ...]]] = {  # name -> (class word, glyph)
    "medic": ("square", (Layer("square", WHITE), Layer("cross", RED, 0.62))),
    "bolt": ("triangle", (Layer("triangle", W.COLOURS["orange"], pattern="diagonal", pattern_rgb=(20, 20, 20)),)),
    "donut": ("circle", (Layer("circle", PINK), Layer("circle", BROWN, 0.4))),
    "sheriff": ("star", (Layer("star", YELLOW), Layer("circle", RED, 0.32))),
    "lucky": ("heart", (Layer("heart", GREEN), Layer("cross", WHITE, 0.42))),
    "starfish": ("star", (Layer("star", RED), Layer("star", YELLOW, 0.72))),  # similar to sheriff
    "valentine": ("heart", (Layer("heart", RED), Layer("heart", PINK, 0.55))),  # similar to lucky
    "target": ("circle", (Layer("circle", RED), Layer("circle", WHITE, 0.66), Layer("circle", RED, 0.33))),
    "kite": ("square", (Layer("square", TEAL, pattern="striped", pattern_rgb=YELLOW),)),
}


# ---------------------------------------------------------------------------------------------------------------
# styles: float image (64, 64, 3) in [0, 255] -> same


def pixelart(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """8-pixel blocks in a four-green handheld-console palette."""
    palette = np.array([(15, 56, 15), (48, 98, 48), (139, 172, 15), (155, 188, 15)], np.float32)
    blocks = img.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))
    lum = blocks @ np.array([0.299, 0.587, 0.114], np.float32)
    lum = (lum - lum.min()) / max(lum.max() - lum.min(), 1.0)  # stretch, so the object never vanishes
    idx = np.clip((lum * 4).astype(int), 0, 3)
    return np.repeat(np.repeat(palette[idx], 8, axis=0), 8, axis=1)


def blueprint(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """White edges on blueprint blue, with a faint grid."""
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    gx, gy = np.zeros_like(lum), np.zeros_like(lum)
    gx[:, 1:-1] = lum[:, 2:] - lum[:, :-2]
    gy[1:-1] = lum[2:] - lum[:-2]
    edge = np.clip(np.hypot(gx, gy) / 60, 0, 1)[..., None]
    out = np.broadcast_to(np.array((20, 60, 150), np.float32), img.shape).copy()
    out[::8] += 25
    out[:, ::8] += 25
    out = out * (1 - edge) + 245 * edge
    return out + (lum[..., None] - 128) * 0.15


def sepia(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sepia toning, film grain and a dark vignette."""
    m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
    out = img @ m.T
    out += rng.normal(0, 10, img.shape[:2])[..., None]
    yy, xx = np.mgrid[0:64, 0:64]
    vignette = 1 - 0.6 * np.clip((np.hypot(xx - 31.5, yy - 31.5) / 45) ** 2, 0, 1)
    return out * vignette[..., None]


def popart(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Posterised, hue-rotated colours with a halftone dot screen."""
    out = np.round(img[..., [1, 2, 0]] / 255 * 2) / 2 * 255
    yy, xx = np.mgrid[0:64, 0:64]
    dots = ((xx % 4 - 1.5) ** 2 + (yy % 4 - 1.5) ** 2) < 1.2
    out[dots] *= 0.55
    return out


STYLES: dict[str, Callable] = {"pixelart": pixelart, "blueprint": blueprint, "sepia": sepia, "popart": popart}

STANDARD_SEQUENCE = ("medic", "bolt", "donut", "sheriff", "lucky", "pixelart", "starfish", "blueprint", "valentine",
                     "sepia")
TUNING_SEQUENCE = ("target", "kite", "popart")

OBJECT_PROMPTS = ("a photo of a {} on a beach", "a photo of a {} on grass", "a photo of a {} in the night sky",
                  "a photo of a {} in the snow", "a photo of a {} on a brick wall", "a photo of a {} in the water",
                  "a photo of a {} on a blue background", "a photo of a {} on a black background",
                  "a photo of a {} on a purple background", "a photo of a {}")
STYLE_SCENES = ("a photo of a red star on a beach", "a photo of a blue circle on grass",
                "a photo of a white heart in the night sky", "a photo of a green cross in the snow",
                "a photo of a yellow triangle on a brick wall", "a photo of an orange square in the water",
                "a photo of a purple heart on a yellow background", "a photo of a black circle on a white background",
                "a photo of a striped red square on a green background", "a photo of a dotted blue star on grass")


@dataclasses.dataclass(frozen=True)
class ConceptSpec:
    name: str
    kind: str  # object | style
    class_word: str
    description: str
    eval_prompts: tuple[str, ...]  # with <name>
    eval_texts: tuple[str, ...]  # the same with <name> replaced by the class word (styles: phrase removed), for TA


def spec(name: str) -> ConceptSpec:
    token = f"<{name}>"
    if name in OBJECTS:
        cls, glyph = OBJECTS[name]
        desc = " + ".join(f"{layer.shape}" for layer in glyph)
        return ConceptSpec(name, "object", cls, f"composite {cls}: {desc}",
                           tuple(p.format(token) for p in OBJECT_PROMPTS), tuple(p.format(cls) for p in OBJECT_PROMPTS))
    if name in STYLES:
        return ConceptSpec(name, "style", "style", (STYLES[name].__doc__ or "").strip(),
                           tuple(f"{s} in {token} style" for s in STYLE_SCENES), STYLE_SCENES)
    raise KeyError(f"unknown toy concept {name!r}; known: {', '.join([*OBJECTS, *STYLES])}")


def reference_images(name: str, n: int = 5, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """n reference images of a concept in varied contexts, positions and sizes, with their captions."""
    token = f"<{name}>"
    rng = np.random.default_rng(seed + sum(map(ord, name)) * 1000)
    images, captions = [], []
    if name in OBJECTS:
        _, glyph = OBJECTS[name]
        contexts = ["beach", "grass", "night", "snow", "brick", "water", "bg:blue", "bg:purple", "bg:black"]
        for i, ctx in enumerate(rng.choice(contexts, size=n, replace=False)):
            placement = W.random_placements(rng, 1)
            images.append(W.render_glyphs([glyph], str(ctx), placement, seed + i))
            captions.append(f"a photo of a {token} {W.context_phrase(str(ctx))}")
        return images, captions
    style = STYLES[name]
    for i in range(n):
        scene = W.random_scene(int(rng.integers(0, 2**31)), two_object_prob=0.0, style_prob=0.0)
        img = style(W.render(scene).astype(np.float32), rng)
        images.append(np.clip(img + 0.5, 0, 255).astype(np.uint8))
        captions.append(f"{scene.caption} in {token} style")
    return images, captions


def write_examples(root: Path) -> None:
    """Render every concept's reference images and write `concepts.json` (specs, captions, sequences)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    manifest = {"standard_sequence": list(STANDARD_SEQUENCE), "tuning_sequence": list(TUNING_SEQUENCE),
                "concepts": {}}
    for name in [*OBJECTS, *STYLES]:
        s = spec(name)
        images, captions = reference_images(name)
        (root / name).mkdir(exist_ok=True)
        files = []
        for i, img in enumerate(images):
            Image.fromarray(img).save(root / name / f"{i}.png")
            files.append(f"{name}/{i}.png")
        manifest["concepts"][name] = {**dataclasses.asdict(s), "images": files, "captions": captions}
    (root / "concepts.json").write_text(json.dumps(manifest, indent=1) + "\n")


def load_examples(root: Path) -> dict:
    return json.loads((root / "concepts.json").read_text())
