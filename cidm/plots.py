"""Pictures of forgetting: the concept × task grid of stored re-generations, an IA heatmap and IA lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def forgetting_grid(library_root: Path, names: list[str], tasks: list[int], cell: int = 96,
                    measured_at: dict[int, dict[str, int]] | None = None) -> Image.Image:
    """Rows: concepts; columns: "after task t". Empty where a concept did not exist yet. With `measured_at`
    (`Library.forgetting_record`), a concept not re-generated after task t shows its last image, faded and marked
    with the task it comes from."""
    label_w, label_h = 110, 22
    grid = Image.new("RGB", (label_w + cell * len(tasks), label_h + cell * len(names)), "white")
    draw = ImageDraw.Draw(grid)
    for j, t in enumerate(tasks):
        draw.text((label_w + j * cell + 4, 4), f"after task {t}", fill="black")
    for i, n in enumerate(names):
        draw.text((4, label_h + i * cell + cell // 2 - 6), f"<{n}>", fill="black")
        for j, t in enumerate(tasks):
            source = (measured_at or {}).get(t, {}).get(n, t)
            f = Path(library_root) / "forgetting" / f"after-{source:02d}" / f"{n}-0.png"
            if not f.exists():
                continue
            image = Image.open(f).convert("RGB").resize((cell, cell), Image.NEAREST)
            x, y = label_w + j * cell, label_h + i * cell
            if source != t:  # carried from an earlier re-generation
                image = Image.blend(image, Image.new("RGB", image.size, "white"), 0.55)
            grid.paste(image, (x, y))
            if source != t:
                draw.text((x + 4, y + cell - 14), f"= task {source}", fill="black")
    return grid


def ia_matrix(scores: dict[int, dict[str, float]], names: list[str]) -> np.ndarray:
    """(concepts, tasks) IA, NaN where a concept was not learned yet."""
    tasks = sorted(scores)
    return np.array([[scores[t].get(n, np.nan) for t in tasks] for n in names], dtype=float)


def ia_heatmap(scores: dict[int, dict[str, float]], names: list[str], title: str = "IA after each task"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = ia_matrix(scores, names)
    tasks = sorted(scores)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.6 * len(tasks)), max(2.5, 1.0 + 0.45 * len(names))))
    im = ax.imshow(m, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), [str(t) for t in tasks])
    ax.set_yticks(range(len(names)), [f"<{n}>" for n in names])
    ax.set_xlabel("after task")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def ia_lines(curves: dict[str, list[float] | dict[int, float]], title: str = "average IA of learned concepts"):
    """One line per method (or per concept): a value after each task; a list starts at task 1, a dict names its
    tasks (a concept's line starts at the task that learned it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10 lines
    markers = "osD^v<>"
    for i, (label, values) in enumerate(curves.items()):
        points = values if isinstance(values, dict) else dict(enumerate(values, start=1))
        ax.plot(list(points), list(points.values()), marker=markers[i % len(markers)], markersize=4,
                color=colours[(2 * i) % 20 if len(curves) <= 10 else i % 20], label=label,
                linewidth=2.5 if label == "cidm" else 1.2)
    ax.set_xlabel("after task")
    ax.set_ylabel("IA")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig
