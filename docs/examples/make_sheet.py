"""Regenerate the example sheet from a library learned on the standard sequence, with the `cidm` command line.

    python docs/examples/make_sheet.py runs/core/library

The library comes from `python -m cidm bench --core --out runs/core`. One row per learned object concept: two of its
reference photos | the concept alone in four scenes | in a learned style | beside another concept, each in its own
box. Every generated image is made by `cidm generate` or `cidm compose` exactly as `commands()` lists them (they are
printed, so the sheet can be reproduced command by command).
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from cidm.cli import main as cidm
from cidm.toyworld import concepts as C

HERE = Path(__file__).resolve().parent
SCALE = 2  # 64-px images shown at 128 px, nearest-neighbour
SCENES = ("on a beach", "on grass", "in the night sky", "on a brick wall")


def commands(name: str, styles: list[str], partner: str, out: Path) -> list[list[str]]:
    """The row of concept `name`: four scenes, one style, two boxes."""
    style = styles[sum(map(ord, name)) % len(styles)]
    rows = [["generate", *[a for s in SCENES for a in ("--prompt", f"a photo of a <{name}> {s}")],
             "--seed", "1", "--out", str(out / f"{name}.png")],
            ["generate", "--prompt", f"a photo of a <{name}> on grass in <{style}> style", "--seed", "1",
             "--out", str(out / f"{name}-{style}.png")],
            ["compose", "--prompt", "a photo in the snow", "--region", f"0,8,32,56:a photo of a <{name}>",
             "--region", f"32,8,64,56:a photo of a <{partner}>", "--seed", "1",
             "--out", str(out / f"{name}-{partner}.png")]]
    return rows


def run(library: str, args: list[str]) -> list[Image.Image]:
    print("python -m cidm " + " ".join(shlex.quote(a) for a in [args[0], "--library", library, *args[1:]]))
    if cidm([args[0], "--library", library, *args[1:]]) != 0:
        raise SystemExit(f"cidm {args[0]} failed")
    out = Path(args[args.index("--out") + 1])
    many = sorted(out.parent.glob(f"{out.stem}-[0-9].png"))
    return [Image.open(p).convert("RGB") for p in (many or [out])]


def main(library: str) -> None:
    manifest = json.loads((Path(library) / "library.json").read_text())
    kinds = {n: manifest["concepts"][n]["kind"] for n in manifest["tasks"]}
    objects = [n for n, k in kinds.items() if k == "object"]
    styles = [n for n, k in kinds.items() if k == "style"]
    side, pad, text_h = 64 * SCALE, 6, 16
    columns = ["reference photos", "", *[f"alone, {s}" for s in SCENES], "in a learned style", "two boxes"]
    sheet = Image.new("RGB", (len(columns) * (side + pad), text_h + len(objects) * (side + text_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, label in enumerate(columns):
        draw.text((i * (side + pad), 2), label, fill="black")
    with tempfile.TemporaryDirectory() as tmp:
        for row, name in enumerate(objects):
            partner = objects[(row + 1) % len(objects)]
            refs = [Image.fromarray(a) for a in C.reference_images(name)[0][:2]]
            images = refs + [im for args in commands(name, styles, partner, Path(tmp)) for im in run(library, args)]
            y = text_h + row * (side + text_h + pad)
            draw.text((0, y), f"<{name}>" + (f"  (right box: <{partner}>)" if partner else ""), fill="black")
            for i, image in enumerate(images):
                sheet.paste(image.resize((side, side), Image.NEAREST), (i * (side + pad), y + text_h))
    sheet.save(HERE / "sheet.png")
    print(HERE / "sheet.png")


if __name__ == "__main__":
    main(sys.argv[1])
