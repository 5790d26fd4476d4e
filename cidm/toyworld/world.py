"""The toy world (version 2): a procedural 64×64 image domain with captions, deterministic from a seed.

Every image is one or two *glyphs* on a *context* (a textured scene or a plain colour), optionally in a whole-image
*style*. A glyph is an outer shape in a colour, optionally with an inner part: a smaller shape in a second colour
("a white square with a red cross") or a pattern in a second colour ("an orange triangle with black stripes").

Captions describe a glyph coarsely, by *named* attributes (shape, one of 12 colours, inner shape or pattern, second
colour), while continuous details are left to the picture: the exact shade (hue and brightness jitter), the inner
part's scale and offset, the stripes' angle and spacing, an occasional unnamed third layer. A personal concept is one
such detailed instance (`concepts.py`); the base learns the *family*. Combinations that personal concepts use are
held out of base training altogether (`is_personal`): the base has seen white squares, red crosses and squares with
crosses, never a white square with a red cross.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math
import zlib

import numpy as np

SIZE = 64  # image side in pixels
SS = 2  # supersampling factor for anti-aliased edges

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = {  # name -> the named colour's centre; drawn colours jitter around it (`jitter`)
    "red": (220, 30, 30),
    "orange": (250, 130, 20),
    "yellow": (245, 215, 30),
    "green": (40, 170, 50),
    "teal": (0, 150, 150),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (250, 140, 190),
    "brown": (120, 70, 30),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
}
PATTERNS = ("stripes", "dots")  # inner parts that are patterns, not shapes
INNERS = SHAPES + PATTERNS
CONTEXTS = {  # context name -> caption phrase
    "beach": "on a beach",
    "grass": "on grass",
    "night": "in the night sky",
    "snow": "in the snow",
    "brick": "on a brick wall",
    "water": "in the water",
}
STYLES = ("grayscale", "blurred", "inverted", "pixelated")  # the base's whole-image styles
# colours that vanish into a context; never drawn there
EXCLUDED = {("green", "grass"), ("white", "snow"), ("grey", "snow"), ("blue", "water"), ("teal", "water"),
            ("black", "night"), ("brown", "brick")}
PREFIXES = ("a photo of", "a close-up photo of", "a picture of", "an image of", "a painting of")  # all equivalent

WORDS = (
    ["a", "an", "photo", "close", "up", "picture", "image", "painting", "of", "on", "in", "the", "and", "with",
     "background", "sky", "wall", "thing", "style", "plain", "inside"]
    + list(SHAPES) + list(COLOURS) + list(PATTERNS) + list(STYLES) + ["beach", "grass", "night", "snow", "brick",
                                                                      "water"]
)


# ---------------------------------------------------------------------------------------------------------------
# what a glyph is (named) and how it is drawn (exact)


@dataclasses.dataclass(frozen=True)
class Glyph:
    """A glyph's named attributes: what a full caption says about it."""

    shape: str
    colour: str
    inner: str | None = None  # a shape, "stripes", "dots", or None
    inner_colour: str | None = None

    @property
    def combination(self) -> tuple:
        return (self.shape, self.colour, self.inner, self.inner_colour)

    def phrase(self, keep: dict | None = None) -> str:
        """'a white square with a red cross'; `keep` drops attributes (coarse captions): shape, colour, inner,
        inner_colour -> bool."""
        k = {"shape": True, "colour": True, "inner": True, "inner_colour": True, **(keep or {})}
        noun = " ".join(w for w in (self.colour if k["colour"] else None, self.shape if k["shape"] else "thing") if w)
        text = with_article(noun)
        if self.inner is None or not (k["inner"] or k["inner_colour"]):
            return text
        colour = self.inner_colour if k["inner_colour"] else None
        if not k["inner"]:
            return f"{text} with {colour} inside"
        if self.inner in PATTERNS:
            return f"{text} with {' '.join(w for w in (colour, self.inner) if w)}"
        return f"{text} with {with_article(' '.join(w for w in (colour, self.inner) if w))}"


@dataclasses.dataclass(frozen=True)
class Layer:
    """One filled shape of a glyph; `scale` and `offset` are relative to the glyph radius (offset y points down).

    A pattern (stripes at `angle` degrees with `period` × radius spacing, or dots) in `pattern_rgb` covers the layer.
    """

    shape: str
    rgb: tuple[int, int, int]
    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)
    pattern: str = "plain"  # plain | stripes | dots
    pattern_rgb: tuple[int, int, int] | None = None
    angle: float = 0.0
    period: float = 0.3


@dataclasses.dataclass(frozen=True)
class Thing:
    """One object of a scene: its named glyph and the exact layers that draw it."""

    glyph: Glyph
    layers: tuple[Layer, ...]


def jitter(colour: str, rng: np.random.Generator, amount: float = 1.0) -> tuple[int, int, int]:
    """A shade of a named colour: small hue, saturation and brightness jitter (an exact shade is a detail)."""
    r, g, b = (c / 255 for c in COLOURS[colour])
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if s < 0.1:  # white, grey, black: brightness only
        v = float(np.clip(v + rng.uniform(-0.06, 0.06) * amount, 0.03, 0.98))
    else:
        h = (h + rng.uniform(-0.018, 0.018) * amount) % 1.0
        s = float(np.clip(s * (1 + rng.uniform(-0.1, 0.06) * amount), 0, 1))
        v = float(np.clip(v * (1 + rng.uniform(-0.1, 0.06) * amount), 0, 1))
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))


def draw_layers(glyph: Glyph, rng: np.random.Generator, third_layer_prob: float = 0.0) -> tuple[Layer, ...]:
    """Exact layers for a named glyph: jittered shades, a random inner scale, offset, stripe angle and spacing."""
    outer = Layer(glyph.shape, jitter(glyph.colour, rng))
    if glyph.inner is None:
        return (outer,)
    inner_rgb = jitter(glyph.inner_colour, rng)
    if glyph.inner in PATTERNS:
        return (dataclasses.replace(outer, pattern=glyph.inner, pattern_rgb=inner_rgb,
                                    angle=float(rng.choice([0.0, 45.0, 90.0, 135.0]) + rng.uniform(-10, 10)),
                                    period=float(rng.uniform(0.24, 0.36))),)
    scale = float(rng.uniform(0.42, 0.62))
    offset = (float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1)))
    layers = [outer, Layer(glyph.inner, inner_rgb, scale, offset)]
    if rng.random() < third_layer_prob:  # an unnamed detail: a small third layer in the outer colour or another
        third = str(rng.choice([c for c in COLOURS if c != glyph.inner_colour]))
        layers.append(Layer(str(rng.choice(SHAPES)), jitter(third, rng), scale * 0.45, offset))
    return tuple(layers)


# ---------------------------------------------------------------------------------------------------------------
# personal combinations, held out of base training


def is_personal(glyph: Glyph) -> bool:
    """Whether a (shape, colour, inner, inner colour) combination is reserved for personal concepts: about one in
    seven of all inner-part combinations, chosen by a hash so that new concepts of the same kind can be drawn from
    it (`concepts.random_object`), plus the shipped concepts' own (`concepts.OBJECTS`)."""
    if glyph.inner is None:
        return False
    from .concepts import SHIPPED_COMBINATIONS

    key = "|".join(glyph.combination)
    return glyph.combination in SHIPPED_COMBINATIONS or zlib.crc32(key.encode()) % 7 == 0


def random_glyph(rng: np.random.Generator, inner_prob: float = 0.7, personal: bool = False) -> Glyph:
    """A random named glyph of the base vocabulary (personal=True: of the held-out combinations)."""
    while True:
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        if rng.random() >= inner_prob and not personal:
            return Glyph(shape, colour)
        inner = str(rng.choice(INNERS)) if rng.random() < 0.75 else str(rng.choice(PATTERNS))
        inner_colour = str(rng.choice([c for c in COLOURS if c != colour]))
        glyph = Glyph(shape, colour, inner, inner_colour)
        if is_personal(glyph) == personal:
            return glyph


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


def pattern_mask(layer: Layer, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Where a layer's pattern colour shows (before clipping to the layer's shape)."""
    period = max(layer.period * r, 2.0)
    if layer.pattern == "stripes":
        a = math.radians(layer.angle)
        along = u * math.sin(a) + v * math.cos(a)
        return (along / period) % 2 < 0.7  # thinner than the gaps: the layer's own colour stays the main one
    if layer.pattern == "dots":
        p = period * 1.5
        du, dv = (u % p) - p / 2, (v % p) - p / 2
        return du * du + dv * dv < (0.3 * p) ** 2
    raise ValueError(f"unknown pattern {layer.pattern!r}; known: plain, {', '.join(PATTERNS)}")


def draw_glyph(canvas: np.ndarray, layers: tuple[Layer, ...], cx: float, cy: float, r: float) -> None:
    """Paint a glyph centred at (cx, cy) with radius r (pixels) onto a supersampled float canvas, in place."""
    for layer in layers:
        lr = r * layer.scale
        lx, ly = cx + layer.offset[0] * r, cy + layer.offset[1] * r
        # only the window around the layer: masks of a 128×128 grid per layer were most of the rendering time
        y0, x0 = max(0, int((ly - 1.2 * lr) * SS)), max(0, int((lx - 1.2 * lr) * SS))
        y1, x1 = min(SIZE * SS, int((ly + 1.2 * lr) * SS) + 2), min(SIZE * SS, int((lx + 1.2 * lr) * SS) + 2)
        u, v = _XX[y0:y1, x0:x1] - lx, ly - _YY[y0:y1, x0:x1]
        mask = shape_mask(layer.shape, u, v, lr)
        window = canvas[y0:y1, x0:x1]
        window[mask] = layer.rgb
        if layer.pattern != "plain":
            window[mask & pattern_mask(layer, u, v, lr)] = layer.pattern_rgb or (245, 245, 245)


# ---------------------------------------------------------------------------------------------------------------
# contexts (backgrounds) and styles


def smooth_noise(rng: np.random.Generator, n: int, cell: int = 8) -> np.ndarray:
    """Low-frequency noise in about [-1, 1], (n, n, 1): texture a VAE can reproduce (i.i.d. pixel noise it cannot)."""
    coarse = rng.normal(0, 1, (n // cell + 2, n // cell + 2)).astype(np.float32)
    t = (np.arange(n, dtype=np.float32) + 0.5) / cell  # bilinear interpolation of the coarse grid
    i = t.astype(int)
    f = (t - i)[:, None]
    rows = coarse[i] * (1 - f) + coarse[i + 1] * f  # (n, m)
    fx = f.T
    return (rows[:, i] * (1 - fx) + rows[:, i + 1] * fx)[..., None]


def render_background(context: str, rng: np.random.Generator) -> np.ndarray:
    """A supersampled float background: a named context or `bg:<colour>` for a plain colour (jittered)."""
    n = SIZE * SS
    if context.startswith("bg:"):
        return np.broadcast_to(np.array(jitter(context[3:], rng, 0.5), np.float32), (n, n, 3)).copy()
    img = np.zeros((n, n, 3), np.float32)
    if context == "beach":
        horizon = int(n * rng.uniform(0.35, 0.45))
        img[:horizon] = (135, 200, 240)
        img[horizon:] = (230, 205, 150)
        img[horizon:] += smooth_noise(rng, n)[horizon:] * 14
    elif context == "grass":
        img[:] = (60, 150, 50)
        img += smooth_noise(rng, n) * 10
        for _ in range(70):
            x, y = rng.integers(0, n, 2)
            h = rng.integers(8, 18)
            img[max(0, y - h):y, x:x + 3] = (30, 100, 25)
    elif context == "night":
        img[:] = (15, 20, 60)
        for _ in range(30):
            x, y = rng.integers(2, n - 3, 2)
            img[y - 2:y + 2, x - 2:x + 2] = (250, 250, 230)
    elif context == "snow":
        img[:] = (235, 240, 248)
        img += smooth_noise(rng, n) * 6
        for _ in range(45):
            x, y = rng.integers(1, n - 3, 2)
            img[y:y + 3, x:x + 3] = (175, 180, 195)
    elif context == "brick":
        img[:] = (200, 200, 195)  # mortar
        bh, bw = 12, 26
        for row in range(n // bh + 1):
            shift = (bw // 2) * (row % 2)
            for col in range(-1, n // bw + 2):
                x0, y0 = col * bw + shift + 2, row * bh + 2
                shade = rng.uniform(-12, 12)
                img[y0:y0 + bh - 4, max(0, x0):max(0, x0 + bw - 4)] = (165 + shade, 65 + shade / 2, 45)
    elif context == "water":
        img[:] = (40, 120, 190)
        yy = np.arange(n)[:, None]
        xx = np.arange(n)[None, :]
        phase = rng.uniform(0, 2 * math.pi)
        waves = np.sin(xx / 7.0 + phase + (yy % 16) / 3.0) > 0.8
        img[waves & (yy % 12 < 3)] = (150, 205, 240)
    else:
        raise ValueError(f"unknown context {context!r}; known: {', '.join(CONTEXTS)} or bg:<colour>")
    return np.clip(img, 0, 255)


def apply_style(img: np.ndarray, style: str) -> np.ndarray:
    """A base style on a float image (64, 64, 3) in [0, 255]."""
    if style == "grayscale":
        return np.repeat(img @ np.array([[0.299], [0.587], [0.114]], np.float32), 3, axis=-1)
    if style == "blurred":
        k = np.array([1, 4, 6, 4, 1], np.float32) / 16
        out = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="edge")
        out = sum(w * out[i:i + SIZE] for i, w in enumerate(k))
        return sum(w * out[:, i:i + SIZE] for i, w in enumerate(k))
    if style == "inverted":
        return 255.0 - img
    if style == "pixelated":
        blocks = img.reshape(SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(1, 3))
        return np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)
    raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def context_phrase(context: str) -> str:
    return f"on {with_article(context[3:])} background" if context.startswith("bg:") else CONTEXTS[context]


# ---------------------------------------------------------------------------------------------------------------
# scenes


@dataclasses.dataclass(frozen=True)
class Scene:
    """What one image shows: things on a context, in an optional base style."""

    things: tuple[Thing, ...]
    context: str  # a CONTEXTS key or "bg:<colour>"
    placements: tuple[tuple[float, float, float], ...]  # (cx, cy, r) per thing
    seed: int
    style: str | None = None

    @property
    def glyphs(self) -> tuple[Glyph, ...]:
        return tuple(t.glyph for t in self.things)

    @property
    def caption(self) -> str:
        """The full caption: every named attribute, the first prefix."""
        return caption(self)


def caption(scene: Scene, prefix: str = PREFIXES[0], keep: dict | None = None, context: bool = True,
            objects: bool = True) -> str:
    """A caption of a scene: `keep` drops glyph attributes, `context` / `objects` drop those phrases."""
    parts = [prefix]
    if objects:
        parts.append(" and ".join(g.phrase(keep) for g in scene.glyphs))
    elif prefix.endswith(" of"):
        parts[0] = prefix[:-3]  # "a photo" (of nothing named)
    if context:
        parts.append(context_phrase(scene.context))
    if scene.style:
        parts.append(f"in {scene.style} style")
    return " ".join(parts)


def coarse_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A training caption that says less than the picture shows, as people's captions do: a random prefix, and
    some of the named attributes, the context or the objects left out."""
    prefix = str(rng.choice(PREFIXES))
    keep = {k: rng.random() < 0.6 for k in ("colour", "inner", "inner_colour")}
    keep["shape"] = rng.random() < 0.85
    objects = not (scene.style and rng.random() < 0.3)  # "a painting in grayscale style"
    return caption(scene, prefix, keep, context=rng.random() < 0.6, objects=objects)


def random_placements(rng: np.random.Generator, k: int) -> tuple[tuple[float, float, float], ...]:
    """k placements; single objects are large (radius 26–38 % of the side), two sit side by side."""
    if k == 1:
        r = rng.uniform(0.26, 0.38) * SIZE
        lo, hi = 0.8 * r, SIZE - 0.8 * r
        return ((rng.uniform(lo, hi), rng.uniform(lo, hi), r),)
    out = []
    left = rng.random() < 0.5  # two objects side by side, in either order
    for i in range(k):
        r = rng.uniform(0.18, 0.23) * SIZE
        half = (i == 0) == left
        x0, x1 = (r * 0.9, SIZE / 2) if half else (SIZE / 2, SIZE - r * 0.9)
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


def random_scene(seed: int, two_object_prob: float = 0.15, style_prob: float = 0.15, inner_prob: float = 0.7,
                 third_layer_prob: float = 0.05) -> Scene:
    """A random base-vocabulary scene, fully determined by `seed`; never a personal combination."""
    rng = np.random.default_rng(seed)
    k = 2 if rng.random() < two_object_prob else 1
    glyphs = [random_glyph(rng, inner_prob) for _ in range(k)]
    things = tuple(Thing(g, draw_layers(g, rng, third_layer_prob)) for g in glyphs)
    context = random_context(rng, {g.colour for g in glyphs})
    style = str(rng.choice(STYLES)) if rng.random() < style_prob else None
    return Scene(things, context, random_placements(rng, k), seed, style)


def render_glyphs(glyphs: list[tuple[Layer, ...]], context: str, placements, seed: int,
                  style: str | None = None) -> np.ndarray:
    """Render glyphs (their layers) on a context, in an optional base style; returns uint8 (64, 64, 3)."""
    rng = np.random.default_rng(seed + 7919)
    canvas = render_background(context, rng)
    for layers, (cx, cy, r) in zip(glyphs, placements):
        draw_glyph(canvas, layers, cx, cy, r)
    img = sum(canvas[i::SS, j::SS] for i in range(SS) for j in range(SS)) / (SS * SS)
    if style:
        img = apply_style(img, style)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def glyph_masks(scene: Scene) -> np.ndarray:
    """Where the glyphs are: coverage in [0, 1] of the outer shapes and of the inner parts (inner layers and pattern
    marks), (2, 64, 64) float32. The evaluator learns to draw them (dense supervision of shape)."""
    canvas = np.zeros((SIZE * SS, SIZE * SS, 3), np.float32)  # channel 0: outer, 1: inner
    for thing, (cx, cy, r) in zip(scene.things, scene.placements):
        outer, *inner = thing.layers
        draw_glyph(canvas, (dataclasses.replace(outer, rgb=(1, 0, 0), pattern_rgb=(1, 1, 0)),), cx, cy, r)
        draw_glyph(canvas, tuple(dataclasses.replace(layer, rgb=(1, 1, 0)) for layer in inner), cx, cy, r)
    cover = sum(canvas[i::SS, j::SS] for i in range(SS) for j in range(SS)) / (SS * SS)
    return np.ascontiguousarray(cover[..., :2].transpose(2, 0, 1))


def render(scene: Scene) -> np.ndarray:
    """Render a scene to uint8 (64, 64, 3)."""
    return render_glyphs([t.layers for t in scene.things], scene.context, scene.placements, scene.seed, scene.style)


def batch(seeds, **kw) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Render many scenes: (N, 64, 64, 3) uint8, full captions, scenes."""
    scenes = [random_scene(int(s), **kw) for s in seeds]
    return np.stack([render(s) for s in scenes]), [s.caption for s in scenes], scenes
