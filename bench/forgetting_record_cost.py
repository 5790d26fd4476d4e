"""The forgetting record's cost after a task on the demo library (ten concepts): every concept re-generated one call per
concept and seed, as before the record was bounded, against `Studio.regenerate_all` with the budget. Run from the
repository root: `python bench/forgetting_record_cost.py`."""
import time, shutil, tempfile, torch
from pathlib import Path
from cidm.studio import Studio
from cidm.metrics import image_alignment, text_alignment
tmp = tempfile.mkdtemp(); shutil.copytree("examples/demo-library", tmp + "/lib")
s = Studio(tmp + "/lib"); ev = s.evaluator()
def before():  # every concept, one generate call per concept and seed (the record before this change)
    for n in s.names:
        imgs = [s.generate(s.probe_prompt(n), seed=k, steps=25)[0] for k in (0, 1)]
        image_alignment(ev, imgs, s.library.reference_images(n))
        text_alignment(ev, imgs, [s.probe_prompt(n).replace(f"<{n}>", s.library.record(n)["class_word"])] * 2)
def after():
    s.regenerate_all(budget=s.forgetting_budget)
for f in (before, after, before, after):
    t = time.perf_counter(); f(); print(f.__name__, round(time.perf_counter() - t, 2), flush=True)
