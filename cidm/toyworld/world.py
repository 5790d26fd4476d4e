"""The toy world: a procedural 64×64 image domain with captions, deterministic from a seed.

Every image is one or two *glyphs* (a stack of coloured shape layers) on a *context* (a textured scene or a plain
colour). Base-vocabulary glyphs are one shape in one colour with an optional base style (striped, dotted, outlined);
personal concepts (see `concepts.py`) are glyphs or whole-image styles that the base vocabulary cannot express.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SIZE = 64  # image side in pixels
SS = 2  # supersampling factor for anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 190),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
CONTEXTS = {  # context name -> caption phrase
    "beach": "on a beach",
    "grass": "on grass",
    "night": "in the night sky",
    "snow": "in the snow",
    "brick": "on a brick wall",
    "water": "in the water",
}
BASE_STYLES = ("striped", "dotted", "outlined")
# colours that vanish into a context; never drawn there
EXCLUDED = {("green", "grass"), ("white", "snow"), ("blue", "water"), ("black", "night")}

WORDS = (
    ["a", "an", "photo", "of", "on", "in", "the", "and", "background", "sky", "wall", "thing", "style", "with"]
    + list(SHAPES) + list(COLOURS) + list(BASE_STYLES) + ["beach", "grass", "night", "snow", "brick", "water"]
)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One filled shape of a glyph; `scale` and `offset` are relative to the glyph radius (offset y points down)."""

    shape: str
    rgb: tuple[int, int, int]
    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)
    pattern: str = "plain"  # plain | striped | dotted | outlined | diagonal
    pattern_rgb: tuple[int, int, int] | None = None


@dataclasses.dataclass(frozen=True)
class Placed:
    """A glyph placed at centre (cx, cy) with radius r, in pixels."""

    layers: tuple[Layer, ...]
    cx: float
    cy: float
    r: float


def base_glyph(shape: str, colour: str, style: str | None = None) -> tuple[Layer, ...]:
    """The base vocabulary: one shape in one colour, optionally striped, dotted or outlined."""
    rgb = COLOURS[colour]
    contrast = (20, 20, 20) if colour in ("white", "yellow") else (245, 245, 245)
    return (Layer(shape, rgb, pattern=style or "plain", pattern_rgb=contrast),)


# ---------------------------------------------------------------------------------------------------------------
# shapes as masks on a (supersampled) pixel grid


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of `shape` with radius r; (u, v) are pixel offsets from the centre, v pointing up."""
    if shape == "circle":
        return u * u + v * v < r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.82 * r
    if shape == "triangle":
        v = v + 0.15 * r  # centre the triangle's mass
        return (v > -0.55 * r) & (v < 1.1 * r - math.sqrt(3) * np.abs(u))
    if shape == "star":
        theta = np.arctan2(u, v)  # 0 points up, at a tip
        a = math.pi / 5  # half the angle between two tips
        phi = np.abs(((theta + a) % (2 * a)) - a)  # angle from the nearest tip, in [0, a]
        tip, valley = 1.08 * r, 0.45 * r
        by, bx = valley * math.sin(a), valley * math.cos(a)
        edge = by * tip / (by * np.cos(phi) - (bx - tip) * np.sin(phi))  # straight edge from tip to valley
        return np.hypot(u, v) < edge
    if shape == "heart":
        s = r / 1.15
        x, y = u / s, v / s + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 < 0
    if shape == "cross":
        w = 0.32 * r
        return ((np.abs(u) < w) & (np.abs(v) < r)) | ((np.abs(v) < w) & (np.abs(u) < r))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n) + 0.5) / SS
    return np.meshgrid(c, c)  # x (columns), y (rows), in output-pixel units


_XX, _YY = _grid(SIZE * SS)


def draw_glyph(canvas: np.ndarray, placed: Placed) -> None:
    """Paint a glyph onto a supersampled float canvas (H·SS, W·SS, 3), in place."""
    for layer in placed.layers:
        r = placed.r * layer.scale
        cx = placed.cx + layer.offset[0] * placed.r
        cy = placed.cy + layer.offset[1] * placed.r
        u, v = _XX - cx, cy - _YY
        mask = shape_mask(layer.shape, u, v, r)
        rgb = np.array(layer.rgb, np.float32)
        if layer.pattern == "outlined":
            inner = shape_mask(layer.shape, u * 1.0 / 0.62, v * 1.0 / 0.62, r)
            canvas[mask & ~inner] = rgb
            continue
        canvas[mask] = rgb
        if layer.pattern == "plain":
            continue
        prgb = np.array(layer.pattern_rgb or (245, 245, 245), np.float32)
        if layer.pattern == "striped":
            sub = mask & (((_YY - cy) / max(r * 0.28, 1.5)) % 2 < 1)
        elif layer.pattern == "diagonal":
            sub = mask & ((((_XX - cx) + (_YY - cy)) / max(r * 0.3, 1.5)) % 2 < 1)
        elif layer.pattern == "dotted":
            p = max(r * 0.42, 3.0)
            du, dv = ((_XX - cx) % p) - p / 2, ((_YY - cy) % p) - p / 2
            sub = mask & (du * du + dv * dv < (0.28 * p) ** 2)
        else:
            raise ValueError(f"unknown pattern {layer.pattern!r}")
        canvas[sub] = prgb


# ---------------------------------------------------------------------------------------------------------------
# contexts (backgrounds)


def render_background(context: str, rng: np.random.Generator) -> np.ndarray:
    """A supersampled float background: a named context or `bg:<colour>` for a plain colour."""
    n = SIZE * SS
    if context.startswith("bg:"):
        return np.broadcast_to(np.array(COLOURS[context[3:]], np.float32), (n, n, 3)).copy()
    img = np.zeros((n, n, 3), np.float32)
    jitter = rng.normal(0, 1, (n, n, 1)).astype(np.float32)
    if context == "beach":
        horizon = int(n * rng.uniform(0.35, 0.45))
        img[:horizon] = (135, 200, 240)
        img[horizon:] = (230, 205, 150)
        img[horizon:] += jitter[horizon:] * 12
    elif context == "grass":
        img[:] = (60, 150, 50)
        for _ in range(90):
            x, y = rng.integers(0, n, 2)
            h = rng.integers(6, 16)
            img[max(0, y - h):y, x:x + 2] = (30, 100, 25)
    elif context == "night":
        img[:] = (15, 20, 60)
        for _ in range(40):
            x, y = rng.integers(1, n - 2, 2)
            img[y - 1:y + 1, x - 1:x + 1] = (250, 250, 230)
    elif context == "snow":
        img[:] = (235, 240, 248)
        img += jitter * 8
        for _ in range(60):
            x, y = rng.integers(1, n - 2, 2)
            img[y:y + 2, x:x + 2] = (175, 180, 195)
    elif context == "brick":
        img[:] = (200, 200, 195)  # mortar
        bh, bw = 12, 26
        for row in range(n // bh + 1):
            shift = (bw // 2) * (row % 2)
            for col in range(-1, n // bw + 2):
                x0, y0 = col * bw + shift + 1, row * bh + 1
                shade = rng.uniform(-12, 12)
                img[y0:y0 + bh - 2, max(0, x0):max(0, x0 + bw - 2)] = (165 + shade, 65 + shade / 2, 45)
    elif context == "water":
        img[:] = (40, 120, 190)
        yy = np.arange(n)[:, None]
        xx = np.arange(n)[None, :]
        phase = rng.uniform(0, 2 * math.pi)
        waves = np.sin(xx / 7.0 + phase + (yy % 16) / 3.0) > 0.85
        img[waves & (yy % 10 < 2)] = (150, 205, 240)
    else:
        raise ValueError(f"unknown context {context!r}; known: {', '.join(CONTEXTS)} or bg:<colour>")
    return np.clip(img, 0, 255)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def context_phrase(context: str) -> str:
    return f"on {with_article(context[3:])} background" if context.startswith("bg:") else CONTEXTS[context]


# ---------------------------------------------------------------------------------------------------------------
# scenes


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one image shows; `objects` are (shape, colour, style) triples of the base vocabulary."""

    objects: tuple[tuple[str, str, str | None], ...]
    context: str  # a CONTEXTS key or "bg:<colour>"
    placements: tuple[tuple[float, float, float], ...]  # (cx, cy, r) per object
    seed: int

    @property
    def caption(self) -> str:
        parts = [with_article(" ".join(w for w in (style, colour, shape) if w)) for shape, colour, style in self.objects]
        return f"a photo of {' and '.join(parts)} {context_phrase(self.context)}"


def random_placements(rng: np.random.Generator, k: int) -> tuple[tuple[float, float, float], ...]:
    """k non-overlapping-ish placements; single objects are large (radius 22–34 % of the side)."""
    if k == 1:
        r = rng.uniform(0.22, 0.34) * SIZE
        return ((rng.uniform(r, SIZE - r), rng.uniform(r, SIZE - r), r),)
    out = []
    left = rng.random() < 0.5  # two objects side by side, in either order
    for i in range(k):
        r = rng.uniform(0.15, 0.21) * SIZE
        half = (i == 0) == left
        x0, x1 = (r, SIZE / 2) if half else (SIZE / 2, SIZE - r)
        out.append((rng.uniform(x0, x1), rng.uniform(r, SIZE - r), r))
    return tuple(out)


def random_context(rng: np.random.Generator, avoid: set[str]) -> str:
    while True:
        if rng.random() < 0.5:
            ctx = str(rng.choice(list(CONTEXTS)))
            if not any((c, ctx) in EXCLUDED for c in avoid):
                return ctx
        else:
            c = str(rng.choice(list(COLOURS)))
            if c not in avoid:
                return f"bg:{c}"


def random_scene(seed: int, two_object_prob: float = 0.15, style_prob: float = 0.2) -> Scene:
    """A random base-vocabulary scene, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    k = 2 if rng.random() < two_object_prob else 1
    objects = []
    for _ in range(k):
        style = str(rng.choice(BASE_STYLES)) if rng.random() < style_prob else None
        objects.append((str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), style))
    context = random_context(rng, {c for _, c, _ in objects})
    return Scene(tuple(objects), context, random_placements(rng, k), seed)


def render_glyphs(glyphs: list[tuple[Layer, ...]], context: str, placements, seed: int) -> np.ndarray:
    """Render glyphs on a context; returns uint8 (64, 64, 3)."""
    rng = np.random.default_rng(seed + 7919)
    canvas = render_background(context, rng)
    for layers, (cx, cy, r) in zip(glyphs, placements):
        draw_glyph(canvas, Placed(layers, cx, cy, r))
    img = canvas.reshape(SIZE, SS, SIZE, SS, 3).mean(axis=(1, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render(scene: Scene) -> np.ndarray:
    """Render a base-vocabulary scene to uint8 (64, 64, 3)."""
    glyphs = [base_glyph(*obj) for obj in scene.objects]
    return render_glyphs(glyphs, scene.context, scene.placements, scene.seed)


def batch(seeds, **kw) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Render many scenes: (N, 64, 64, 3) uint8, captions, scenes."""
    scenes = [random_scene(int(s), **kw) for s in seeds]
    return np.stack([render(s) for s in scenes]), [s.caption for s in scenes], scenes
