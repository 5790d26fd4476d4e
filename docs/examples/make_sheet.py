"""Regenerate the example images from a ten-concept library and tile them into sheet.png.

    python docs/examples/make_sheet.py runs/core/library

The library comes from `python -m cidm bench --core --out runs/core`. Each image is made by the `cidm` command line
exactly as listed in this folder's README.
"""

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from cidm.cli import main as cidm
from cidm.toyworld import concepts as C

HERE = Path(__file__).resolve().parent
SCALE = 2.5


def commands(library: str) -> list[tuple[str, list[str]]]:
    return [
        ("a photo of a <medic> on a beach",
         ["generate", "--prompt", "a photo of a <medic> on a beach", "--num-images", "4", "--out", "medic.png"]),
        ("a photo of a <medic> in <pixelart> style",
         ["generate", "--prompt", "a photo of a <medic> in <pixelart> style", "--num-images", "4",
          "--out", "medic-pixelart.png"]),
        ("a photo of a <bolt> in <sepia> style",
         ["generate", "--prompt", "a photo of a <bolt> in <sepia> style", "--num-images", "4", "--out", "bolt-sepia.png"]),
        ("boxes: <medic> left, <donut> right, on grass | <bolt>, <lucky>, <sheriff> in the snow",
         ["compose", "--prompt", "a photo on grass", "--region", "0,8,32,56:a photo of a <medic>",
          "--region", "32,8,64,56:a photo of a <donut>", "--out", "compose-medic-donut.png"]),
        ("", ["compose", "--prompt", "a photo in the snow", "--region", "0,4,22,60:a photo of a <bolt>",
              "--region", "22,4,43,60:a photo of a <lucky>", "--region", "43,4,64,60:a photo of a <sheriff>",
              "--out", "compose-three.png"]),
    ]


def outputs(name: str) -> list[Path]:
    """The files a command wrote: NAME.png, or NAME-0.png … for several images."""
    many = sorted(HERE.glob(Path(name).stem + "-[0-9].png"))
    return many or [HERE / name]


def main(library: str) -> None:
    rows = [("<medic> reference photos", [Image.fromarray(a) for a in C.reference_images("medic")[0][:4]])]
    for label, args in commands(library):
        args = [*args[:-1], str(HERE / args[-1])]
        if cidm([args[0], "--library", library, *args[1:]]) != 0:
            raise SystemExit(f"cidm {' '.join(args)} failed")
        images = [Image.open(p) for p in outputs(Path(args[-1]).name)]
        if label:
            rows.append((label, images))
        else:  # a second image on the previous row
            rows[-1] = (rows[-1][0], rows[-1][1] + images)
    side = int(64 * SCALE)
    pad, text_h = 8, 18
    width = 4 * side + 3 * pad
    sheet = Image.new("RGB", (width, len(rows) * (side + text_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for label, images in rows:
        draw.text((0, y + 3), label, fill="black")
        for i, image in enumerate(images[:4]):
            sheet.paste(image.resize((side, side), Image.NEAREST), (i * (side + pad), y + text_h))
        y += side + text_h + pad
    sheet.save(HERE / "sheet.png")


if __name__ == "__main__":
    main(sys.argv[1])
