"""A look, not a measurement: do boxes near the base's own size let it draw concepts side by side? Two boxes of
56 × 48 px on a 128 × 64 canvas over the demo library, four seeds, each row one seed:
(1) <sheriff> alone in the right box, (2) <donut> left and <sheriff> right (CIDM compose, Eq. 4 + Eq. 5),
(3) the same with regional attention only (α = 1), (4) the same pair in two boxes of the 64-px canvas.

    PYTHONPATH=. python bench/compose_wide_canvas.py OUT.png
"""

import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from cidm.demo import DEMO_LIBRARY
from cidm.regions import Region
from cidm.studio import Studio
from cidm.templates import region_prompt, scene_prompt

LEFT, RIGHT = (4, 8, 60, 56), (68, 8, 124, 56)


def rows(studio: Studio, seeds=range(4)) -> list[list[Image.Image]]:
    scene, donut, sheriff = scene_prompt("on grass"), region_prompt("donut"), region_prompt("sheriff")
    pair = [Region(LEFT, donut), Region(RIGHT, sheriff)]
    small = [Region((2, 10, 30, 52), donut), Region((34, 8, 62, 50), sheriff)]
    return [[studio.compose(scene, [Region(RIGHT, sheriff)], seed=s, width=128)[0],
             studio.compose(scene, pair, seed=s, width=128)[0],
             studio.compose(scene, pair, seed=s, width=128, alpha=1.0)[0],
             studio.compose(scene, small, seed=s)[0]] for s in seeds]


def sheet(grid: list[list[Image.Image]], zoom: int = 3, gap: int = 8) -> Image.Image:
    width = sum(im.width for im in grid[0]) * zoom + gap * (len(grid[0]) - 1)
    height = grid[0][0].height * zoom
    out = Image.new("RGB", (width, len(grid) * (height + gap) - gap), "white")
    for r, row in enumerate(grid):
        x = 0
        for im in row:
            out.paste(im.resize((im.width * zoom, im.height * zoom), Image.NEAREST), (x, r * (height + gap)))
            x += im.width * zoom + gap
    return out


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(DEMO_LIBRARY, Path(tmp) / "library", ignore=shutil.ignore_patterns(".lock"))
        studio = Studio(Path(tmp) / "library")
        studio.record_forgetting = False
        sheet(rows(studio)).save(sys.argv[1] if len(sys.argv) > 1 else "compose_wide_canvas.png")
