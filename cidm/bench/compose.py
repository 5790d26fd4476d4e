"""The compose benchmark (`python -m cidm bench --compose`): concept neglect over random two- and three-box layouts
for three ways of putting concepts in one image, and the cost of regions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image

from ..metrics import Evaluator
from ..regions import Region
from ..studio import Studio
from ..templates import region_prompt, scene_prompt, together_prompt
from .results import markdown_table, timed


def run_compose_bench(out: Path, library: Path, base_model: str | None = None, layouts: int = 50,
                      steps: int = 25, guidance: float = 5.0, seed: int = 0) -> dict:
    """Concept neglect over random two- and three-box layouts, for three ways of putting concepts in one image."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    studio = Studio(library, base_model=base_model)
    studio.record_forgetting = False
    objects = [n for n in studio.names if studio.library.record(n)["kind"] == "object"]
    if len(objects) < 3:
        raise ValueError(f"the library needs at least 3 object concepts; it has {objects}")
    evaluator = Evaluator(studio.info.evaluator, str(studio.pipe.device))
    refs = {n: evaluator.image_embeddings(studio.library.reference_images(n)).mean(0) for n in objects}
    names = list(refs)
    ref_matrix = torch.nn.functional.normalize(torch.stack([refs[n] for n in names]), dim=-1)
    size = studio.info.resolution
    rng = random.Random(seed)
    scenes = ["on a beach", "on grass", "in the snow", "on a brick wall", "in the water", "in the night sky"]

    def layout(k):
        chosen = rng.sample(objects, k)
        width = size / k
        boxes = []
        for i in range(k):
            x0 = i * width + rng.uniform(0, width * 0.1)
            x1 = (i + 1) * width - rng.uniform(0, width * 0.1)
            y0 = rng.uniform(0, size * 0.3)
            y1 = min(size, y0 + rng.uniform(0.55, 0.7) * size)
            boxes.append((x0, y0, x1, y1))
        return chosen, boxes, rng.choice(scenes)

    def neglected(image, chosen, boxes) -> list[bool]:
        crops = [image.crop(tuple(int(round(v)) for v in b)) for b in boxes]
        emb = evaluator.image_embeddings(crops) @ ref_matrix.T  # (boxes, concepts)
        return [names[i] != c for i, c in zip(emb.argmax(1).tolist(), chosen)]

    methods = {
        "CIDM compose (Eq. 4 + Eq. 5)": lambda c, b, s, sd: studio.compose(
            scene_prompt(s), [Region(bx, region_prompt(n)) for n, bx in zip(c, b)], steps=steps,
            guidance=guidance, seed=sd)[0],
        "regional attention only (Eq. 4, no Eq. 5)": lambda c, b, s, sd: studio.compose(
            scene_prompt(s), [Region(bx, region_prompt(n)) for n, bx in zip(c, b)], alpha=1.0, steps=steps,
            guidance=guidance, seed=sd)[0],
        "one global prompt, all LoRAs (EWA)": lambda c, b, s, sd: studio.generate(
            together_prompt(c, s), steps=steps, guidance=guidance, seed=sd)[0],
    }
    # control: how often a concept generated alone (whole image) is recognised among the learned objects; neglect
    # in boxes cannot be told apart from this floor
    alone = []
    for i in range(layouts):
        n = objects[i % len(objects)]
        image = studio.generate(f"{region_prompt(n)} {scenes[i % len(scenes)]}", steps=steps, guidance=guidance,
                                seed=seed + i)[0]
        alone += neglected(image, [n], [(0, 0, size, size)])
    results = {"one concept alone, whole image (control)": {"1 box": 100.0 * sum(alone) / len(alone)}}
    print(f"control, one concept alone: not recognised {results[next(iter(results))]['1 box']:.1f} %", flush=True)
    # second control: each layout's boxes one at a time, alone (box i % k of layout i): what a box of that size and
    # place costs a concept without neighbours, so that the neglect above it is what the neighbours cost
    alone_in_box = "one concept alone in one of the layout's boxes (control, CIDM compose)"
    for k in (2, 3):
        plans = [layout(k) for _ in range(layouts)]
        singles = [([c[i % k]], [b[i % k]], s) for i, (c, b, s) in enumerate(plans)]
        runs = [(alone_in_box, "alone", methods["CIDM compose (Eq. 4 + Eq. 5)"], singles)]
        runs += [(method, method.split()[0].lower(), run, plans) for method, run in methods.items()]
        for method, short, run, plan_set in runs:
            flags = []
            for i, (chosen, boxes, scene) in enumerate(plan_set):
                image = run(chosen, boxes, scene, seed + i)
                flags += neglected(image, chosen, boxes)
                if i == 0:
                    image.resize((size * 4, size * 4), Image.NEAREST).save(out / f"compose_{k}boxes_{short}.png")
            results.setdefault(method, {})[f"{k} boxes"] = 100.0 * sum(flags) / len(flags)
            print(f"{method}, {k} boxes: neglect {results[method][f'{k} boxes']:.1f} %", flush=True)
    print(markdown_table(["method", "neglect, 1 (%)", "neglect, 2 boxes (%)", "neglect, 3 boxes (%)"],
                         [[m, r.get("1 box", ""), r.get("2 boxes", ""), r.get("3 boxes", "")]
                          for m, r in results.items()]))

    costs = region_cost(studio, scene_prompt(scenes[0]), layout, objects[0], steps, guidance)
    report = {"neglect_percent": results, "cost_ratio": costs, "layouts": layouts, "steps": steps}
    (out / "compose.json").write_text(json.dumps(report, indent=1))
    return report


def region_cost(studio: Studio, prompt: str, layout, first: str, steps: int, guidance: float) -> dict[int, float]:
    """Time of compose with U = 1, 2, 3 regions against plain generation, same steps (`layout(u)` draws boxes)."""
    size = studio.info.resolution
    plain = timed(lambda: studio.generate(prompt, steps=steps, guidance=guidance), 3)
    costs = {}
    for u in (1, 2, 3):
        chosen, boxes, _ = layout(u) if u > 1 else ([first], [(0, 0, size / 2, size)], None)
        costs[u] = timed(lambda: studio.compose(prompt, [Region(b, region_prompt(n)) for n, b in zip(chosen, boxes)],
                                                steps=steps, guidance=guidance), 3) / plain
    print(markdown_table(["regions U", "time / plain generation", "budget (U+1)"],
                         [[u, c, float(u + 1)] for u, c in costs.items()]))
    return costs
