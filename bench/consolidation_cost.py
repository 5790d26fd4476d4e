"""The cost of consolidation, side by side in one process: a CIDM task learned on top of a copy of the demo library
(R1 and R2 over its ten tasks) against the same task with R1 and R2 off (a plain LoRA task), and against CIDM with
Eq. 7's two steps in the printed order (a second pass for step 2), alternating, five times each (best and median).

    python bench/consolidation_cost.py [steps, default 150] [threads, default 2]
"""

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from cidm.bench.results import EXAMPLES, load_concept_set
from cidm.demo import DEMO_LIBRARY
from cidm.studio import Studio


def main(steps: int = 150, repeats: int = 5) -> dict:
    concept = load_concept_set(EXAMPLES)["concepts"]["target"]  # a tuning-sequence concept, not in the demo
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(DEMO_LIBRARY, Path(tmp) / "library")
        studio = Studio(Path(tmp) / "library")
        studio.record_forgetting = False
        seconds = {"cidm": [], "plain": [], "alternating": []}
        for _ in range(repeats):
            for label, switches in (("cidm", {}), ("plain", {"use_r1": False, "use_r2": False}),
                                    ("alternating", {"r2_update": "alternating"})):
                result = studio.learn("target", concept["reference_images"], concept["class_word"], concept["kind"],
                                      replace=True, steps=steps, **switches)
                seconds[label].append(round(result.seconds, 2))
                print(label, seconds[label][-1], flush=True)
    best = {k: min(v) for k, v in seconds.items()}
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {"steps": steps, "past_tasks": len(studio.names) - 1, "seconds": seconds, "best": best, "median": median,
            "ratio": round(best["cidm"] / best["plain"], 3),
            "ratio_median": round(median["cidm"] / median["plain"], 3),
            "ratio_alternating": round(best["alternating"] / best["plain"], 3)}


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)))
