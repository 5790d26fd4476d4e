"""Personal concepts of the toy world: specific instances that the base vocabulary can only say coarsely ("photos of
my dog").

An object concept is one exact glyph (its shades, inner scale and offset, stripe angle, sometimes a third layer) whose
named combination (shape, colour, inner part, inner colour) the base never saw (`world.is_personal`). A style concept
is one point of a family of whole-image styles (a palette, a filter, a texture), none of which the base saw. Both
kinds can also be drawn at random (`random_object`, `random_style`): new concepts of the same kind, for checking that
what holds for the shipped ones is not tuned to them.

`write_examples()` renders the shipped concepts' reference images and JSON spec into `examples/concepts/`, with the
standard 10-task sequence (the paper's order: objects first, similar pairs later, styles at positions 6, 8 and 10)
and a separate tuning sequence for choosing settings.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import numpy as np

from . import world as W
from .world import Glyph, Layer

OBJECTS: dict[str, tuple[Glyph, tuple[Layer, ...]]] = {  # name -> (named glyph, exact layers); class word = shape
    "medic": (Glyph("square", "white", "cross", "red"),
              (Layer("square", (242, 240, 236)), Layer("cross", (214, 28, 36), 0.6))),
    "bolt": (Glyph("triangle", "orange", "stripes", "black"),
             (Layer("triangle", (248, 138, 24), pattern="stripes", pattern_rgb=(24, 20, 18), angle=45.0,
                    period=0.3),)),
    "donut": (Glyph("circle", "pink", "circle", "brown"),
              (Layer("circle", (246, 146, 186)), Layer("circle", (116, 66, 34), 0.44))),
    "sheriff": (Glyph("star", "yellow", "circle", "red"),
                (Layer("star", (244, 212, 40)), Layer("circle", (210, 32, 30), 0.42, (0.0, 0.04)))),
    "lucky": (Glyph("heart", "green", "cross", "white"),
              (Layer("heart", (44, 164, 58)), Layer("cross", (246, 246, 240), 0.5, (0.0, 0.06)))),
    "starfish": (Glyph("star", "red", "star", "yellow"),  # similar to sheriff: a star, yellow and red
                 (Layer("star", (222, 40, 34)), Layer("star", (246, 210, 36), 0.55))),
    "valentine": (Glyph("heart", "red", "heart", "pink"),  # similar to lucky: a heart with a smaller inner part
                  (Layer("heart", (218, 26, 40)), Layer("heart", (250, 148, 192), 0.55, (0.0, 0.04)))),
    "target": (Glyph("circle", "red", "circle", "white"),  # with an unnamed third layer: a red bullseye
               (Layer("circle", (220, 30, 30)), Layer("circle", (245, 245, 245), 0.62),
                Layer("circle", (220, 30, 30), 0.3))),
    "kite": (Glyph("square", "teal", "stripes", "yellow"),
             (Layer("square", (0, 148, 146), pattern="stripes", pattern_rgb=(244, 214, 36), angle=0.0,
                    period=0.28),)),
}
SHIPPED_COMBINATIONS = frozenset(glyph.combination for glyph, _ in OBJECTS.values())


# ---------------------------------------------------------------------------------------------------------------
# styles: a palette, a filter and a texture over the whole image


@dataclasses.dataclass(frozen=True)
class StyleSpec:
    """One whole-image style. palette: colours that luminance maps onto, dark to light (none: keep colours);
    filter: "blocks" (pixel blocks of `block` px), "edges", "posterise" (3 levels, channels rotated) or "none";
    texture: "grid", "halftone", "grain", "vignette" (several with '+') or "none"."""

    palette: tuple[tuple[int, int, int], ...] = ()
    filter: str = "none"
    block: int = 8
    texture: str = "none"
    tint: float = 1.0  # palette strength (1: luminance only; below: some of the original colour stays)


STYLES: dict[str, StyleSpec] = {
    "pixelart": StyleSpec(palette=((15, 56, 15), (48, 98, 48), (139, 172, 15), (155, 188, 15)), filter="blocks"),
    "blueprint": StyleSpec(palette=((20, 60, 150), (245, 245, 250)), filter="edges", texture="grid"),
    "sepia": StyleSpec(palette=((40, 26, 13), (112, 66, 20), (196, 160, 110), (250, 235, 200)),
                       texture="grain+vignette", tint=0.9),
    "popart": StyleSpec(filter="posterise", texture="halftone"),
}


def stylise(img: np.ndarray, style: StyleSpec, rng: np.random.Generator) -> np.ndarray:
    """A style on a float image (64, 64, 3) in [0, 255]."""
    lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
    out = img.copy()
    if style.filter == "blocks":
        b = style.block
        out = np.repeat(np.repeat(out.reshape(64 // b, b, 64 // b, b, 3).mean(axis=(1, 3)), b, 0), b, 1)
        lum = out @ np.array([0.299, 0.587, 0.114], np.float32)
        lum = (lum - lum.min()) / max(lum.max() - lum.min(), 1.0) * 255  # stretched: the object never vanishes
    elif style.filter == "edges":
        gx, gy = np.zeros_like(lum), np.zeros_like(lum)
        gx[:, 1:-1] = lum[:, 2:] - lum[:, :-2]
        gy[1:-1] = lum[2:] - lum[:-2]
        lum = np.clip(np.hypot(gx, gy) / 60, 0, 1) * 255 * 0.85 + lum * 0.15
    elif style.filter == "posterise":
        out = np.round(out[..., [1, 2, 0]] / 255 * 2) / 2 * 255
    elif style.filter != "none":
        raise ValueError(f"unknown style filter {style.filter!r}")
    if style.palette:
        pal = np.array(style.palette, np.float32)
        x = np.clip(lum / 255, 0, 1) * (len(pal) - 1)
        i = np.clip(x.astype(int), 0, len(pal) - 2)
        f = (x - i)[..., None]
        if style.filter == "blocks":  # hard steps: the handheld-console look
            f = (f > 0.5).astype(np.float32)
        mapped = pal[i] * (1 - f) + pal[i + 1] * f
        out = mapped * style.tint + out * (1 - style.tint)
    yy, xx = np.mgrid[0:64, 0:64]
    for texture in style.texture.split("+"):
        if texture == "grid":
            out[::8] += 25
            out[:, ::8] += 25
        elif texture == "halftone":
            out[((xx % 4 - 1.5) ** 2 + (yy % 4 - 1.5) ** 2) < 1.2] *= 0.55
        elif texture == "grain":
            out = out + rng.normal(0, 8, img.shape[:2])[..., None]
        elif texture == "vignette":
            out = out * (1 - 0.6 * np.clip((np.hypot(xx - 31.5, yy - 31.5) / 45) ** 2, 0, 1))[..., None]
        elif texture != "none":
            raise ValueError(f"unknown style texture {texture!r}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# new concepts of the same kind


def random_object(seed: int) -> tuple[Glyph, tuple[Layer, ...]]:
    """A new object concept: a held-out combination drawn as one exact instance (sometimes a third layer)."""
    rng = np.random.default_rng(1_000_000 + seed)
    while True:
        glyph = W.random_glyph(rng, personal=True)
        if glyph.combination not in SHIPPED_COMBINATIONS:
            return glyph, W.draw_layers(glyph, rng, third_layer_prob=0.25)


def random_style(seed: int) -> StyleSpec:
    """A new style concept: a random palette (two to four colours), filter and texture."""
    rng = np.random.default_rng(2_000_000 + seed)
    names = rng.choice(list(W.COLOURS), size=int(rng.integers(2, 5)), replace=False)
    colours = sorted((W.jitter(str(c), rng) for c in names), key=lambda c: sum(c))  # dark to light
    filt = str(rng.choice(["none", "blocks", "edges", "posterise"]))
    texture = str(rng.choice(["none", "grid", "halftone", "grain", "vignette", "grain+vignette"]))
    palette = () if filt == "posterise" else tuple(colours)
    return StyleSpec(palette, filt, int(rng.choice([4, 8])), texture, float(rng.uniform(0.75, 1.0)))


# ---------------------------------------------------------------------------------------------------------------
# the shipped sets

STANDARD_SEQUENCE = ("medic", "bolt", "donut", "sheriff", "lucky", "pixelart", "starfish", "blueprint", "valentine",
                     "sepia")
TUNING_SEQUENCE = ("target", "kite", "popart")
SIMILAR_PAIRS = (("sheriff", "starfish"), ("lucky", "valentine"))

OBJECT_PROMPTS = ("a photo of a {} on a beach", "a photo of a {} on grass", "a photo of a {} in the night sky",
                  "a photo of a {} in the snow", "a photo of a {} on a brick wall", "a photo of a {} in the water",
                  "a photo of a {} on a blue background", "a photo of a {} on a black background",
                  "a photo of a {} on a purple background", "a photo of a {}")
STYLE_SCENES = ("a photo of a red star on a beach", "a photo of a blue circle on grass",
                "a photo of a white heart in the night sky", "a photo of a green cross in the snow",
                "a photo of a yellow triangle on a brick wall", "a photo of an orange square in the water",
                "a photo of a purple heart on a yellow background", "a photo of a black circle on a white background",
                "a photo of a pink square with blue stripes on a green background",
                "a photo of a white star with a black circle on grass")


@dataclasses.dataclass(frozen=True)
class ConceptSpec:
    name: str
    kind: str  # object | style
    class_word: str
    description: str
    eval_prompts: tuple[str, ...]  # with <name>
    eval_texts: tuple[str, ...]  # the same with <name> replaced by the class word (styles: phrase removed), for TA


def lookup(name: str):
    """A concept's definition: shipped by name, or `random-object-<seed>` / `random-style-<seed>`."""
    if name in OBJECTS:
        return OBJECTS[name]
    if name in STYLES:
        return STYLES[name]
    kind, _, seed = name.rpartition("-")
    if kind == "random-object" and seed.isdigit():
        return random_object(int(seed))
    if kind == "random-style" and seed.isdigit():
        return random_style(int(seed))
    raise KeyError(f"unknown toy concept {name!r}; known: {', '.join([*OBJECTS, *STYLES])}, "
                   f"random-object-<n>, random-style-<n>")


def spec(name: str) -> ConceptSpec:
    token = f"<{name}>"
    definition = lookup(name)
    if isinstance(definition, StyleSpec):
        return ConceptSpec(name, "style", "style", describe_style(definition),
                           tuple(f"{s} in {token} style" for s in STYLE_SCENES), STYLE_SCENES)
    glyph, _ = definition
    return ConceptSpec(name, "object", glyph.shape, glyph.phrase(),
                       tuple(p.format(token) for p in OBJECT_PROMPTS),
                       tuple(p.format(glyph.shape) for p in OBJECT_PROMPTS))


def describe_style(style: StyleSpec) -> str:
    parts = [f"{len(style.palette)}-colour palette" if style.palette else "its own colours",
             {"blocks": f"{style.block}-pixel blocks", "edges": "edges only", "posterise": "posterised",
              "none": "no filter"}[style.filter]]
    if style.texture != "none":
        parts.append(style.texture.replace("+", " and "))
    return ", ".join(parts)


def reference_images(name: str, n: int = 5, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """n reference images of a concept in varied contexts, positions and sizes, with their captions."""
    token = f"<{name}>"
    rng = np.random.default_rng(seed + zlib.crc32(name.encode()) % 100_000 * 1000)
    definition = lookup(name)
    images, captions = [], []
    if not isinstance(definition, StyleSpec):
        glyph, layers = definition
        contexts = [c for c in [*W.CONTEXTS, "bg:blue", "bg:purple", "bg:black", "bg:yellow", "bg:grey"]
                    if (glyph.colour, c) not in W.EXCLUDED and c != f"bg:{glyph.colour}"]
        for i, ctx in enumerate(rng.choice(contexts, size=n, replace=False)):
            placement = W.random_placements(rng, 1)
            images.append(W.render_glyphs([layers], str(ctx), placement, seed + i))
            captions.append(f"a photo of a {token} {W.context_phrase(str(ctx))}")
        return images, captions
    for i in range(n):
        scene = W.random_scene(int(rng.integers(0, 2**31)), two_object_prob=0.0, style_prob=0.0)
        img = stylise(W.render(scene).astype(np.float32), definition, rng)
        images.append(np.clip(img + 0.5, 0, 255).astype(np.uint8))
        captions.append(f"{scene.caption} in {token} style")
    return images, captions


def write_examples(root: Path, names: list[str] | None = None, sequences: dict | None = None) -> None:
    """Render concepts' reference images and write `concepts.json` (specs, captions, and the sequences: the shipped
    ones, or `sequences`, e.g. {"tuning_sequence": [...]})."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    if sequences is None:
        sequences = {"standard_sequence": list(STANDARD_SEQUENCE), "tuning_sequence": list(TUNING_SEQUENCE),
                     "similar_pairs": [list(p) for p in SIMILAR_PAIRS]}
    manifest = {**sequences, "concepts": {}}
    for name in names or [*OBJECTS, *STYLES]:
        s = spec(name)
        images, captions = reference_images(name)
        (root / name).mkdir(exist_ok=True)
        files = []
        for i, img in enumerate(images):
            Image.fromarray(img).save(root / name / f"{i}.png")
            files.append(f"{name}/{i}.png")
        manifest["concepts"][name] = {**dataclasses.asdict(s), "images": files, "captions": captions}
    (root / "concepts.json").write_text(json.dumps(manifest, indent=1) + "\n")


def write_tuning_set(root: Path, objects: int = 4, styles: int = 1, seed: int = 3000) -> list[str]:
    """A longer tuning sequence than the shipped one (three concepts, so one concept's luck decided a setting): the
    shipped tuning concepts, then new procedural objects and styles (seeds from `seed`), never a reported concept.
    For `cidm bench --tune --concepts ROOT`. Returns the sequence."""
    names = [*TUNING_SEQUENCE, *(f"random-object-{seed + i}" for i in range(objects)),
             *(f"random-style-{seed + i}" for i in range(styles))]
    write_examples(root, names, {"tuning_sequence": names})
    return names


def load_examples(root: Path) -> dict:
    return json.loads((root / "concepts.json").read_text())
