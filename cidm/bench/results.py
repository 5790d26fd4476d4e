"""What the benchmarks share: the concept set, the protocol, timing, and the results files and tables (which the
app's method comparison also reads)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from PIL import Image

from ..plots import ia_lines

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "concepts"


def load_concept_set(path: Path = EXAMPLES) -> dict:
    spec = json.loads((Path(path) / "concepts.json").read_text())
    for name, c in spec["concepts"].items():
        c["reference_images"] = [Image.open(Path(path) / f).convert("RGB") for f in c["images"]]
    return spec


def timed(fn, repeats: int) -> float:
    """Mean seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def format_settings(settings: dict, sep: str = ", ") -> str:
    """`key=value` pairs for labels and tables: numbers in their shortest form (1e-3, 10), other values as given."""
    return sep.join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def make_protocol(order, steps, prompts, images, seed, gen_steps, guidance, precision: str = "no") -> dict:
    """What every method of one comparison shares (and `--merge` checks); the generation's precision only when not
    the default. Learning uses the base's defaults (batch, rates), as `cidm learn` does."""
    protocol = {"tasks": order, "steps": steps, "prompts": prompts, "images_per_prompt": images, "seed": seed,
                "gen_steps": gen_steps, "guidance": guidance}
    if precision != "no":
        protocol["gen_precision"] = precision
    return protocol


def load_results(path: Path) -> dict:
    """A results.json written by `run_methods_bench`, with its task numbers as ints again (JSON keys are strings)."""
    results = json.loads(Path(path).read_text())
    for r in results["methods"].values():
        for metric in ("ia", "ta"):
            r[metric] = {n: {int(t): v for t, v in row.items()} for n, row in r[metric].items()}
    return results


def ia_curves(results: dict) -> dict[str, list[float]]:
    """Per method: the average IA of the concepts learned so far, after each task."""
    order = results["protocol"]["tasks"]
    return {m: [sum(r["ia"][n][t] for n in order[:t]) / t for t in range(1, len(order) + 1)]
            for m, r in results["methods"].items()}


def results_markdown(results: dict, order: list[str]) -> str:
    """IA and TA after the last task (columns V1..Vn, Avg last), forgetting, and wall time per method."""
    last = len(order)
    cols = [f"V{i + 1} <{n}>" for i, n in enumerate(order)]
    lines = [f"Protocol: {json.dumps(results['protocol'])}", ""]
    for metric, title in (("ia", "IA (×100) after the last task"), ("ta", "TA (CLIPScore ×100) after the last task")):
        rows = []
        for m, r in results["methods"].items():
            vals = [r[metric][n][last] for n in order]
            rows.append([m, *vals, sum(vals) / len(vals)])
        lines += [f"### {title}", "", markdown_table(["method", *cols, "Avg"], rows), ""]
    rows = []
    for m, r in results["methods"].items():
        drops = [r["ia"][n][i + 1] - r["ia"][n][last] for i, n in enumerate(order)]
        rows.append([m, *drops, sum(drops) / len(drops)])
    lines += ["### Forgetting: IA right after learning minus IA after the last task", "",
              markdown_table(["method", *cols, "mean"], rows), ""]
    rows = []
    for m, r in results["methods"].items():
        fresh = [r["ia"][n][i + 1] for i, n in enumerate(order)]
        rows.append([m, *fresh, sum(fresh) / len(fresh)])
    lines += ["### Plasticity: IA right after learning (the diagonal of each heatmap)", "",
              markdown_table(["method", *cols, "Avg"], rows), ""]
    run = results.get("run")
    lines += ["### Wall time", "", "Methods that learn identically (one training run) share its learning time.", "",
              *([f"The whole run took {run['wall_seconds'] / 60:.1f} min in {run['workers']} processes of "
                 f"{run['threads_each']} thread(s).", ""] if run else []),
              *([f"Run again afterwards on their own and merged in (`--merge`), with that run's times: "
                 f"{', '.join(run['rerun']['methods'])}.", ""] if run and run.get("rerun") else []),
              markdown_table(["method", "learning (s)", "evaluation (s)"],
                             [[m, r["learn_seconds"], r["eval_seconds"]] for m, r in results["methods"].items()]),
              "", "### Method settings (TaskConfig overrides)", "",
              markdown_table(["method", "settings"], [[m, json.dumps(r["settings"])]
                                                     for m, r in results["methods"].items()]), ""]
    return "\n".join(lines)


def merge_results(folders: list[Path], out: Path, run: dict | None = None) -> dict:
    """One results table from method runs made separately (other processes or machines) under one protocol.
    `run`: how the parts were run together (workers, wall time), written with the results."""
    parts = [load_results(Path(f) / "results.json") for f in folders]
    protocol = parts[0]["protocol"]
    for f, part in zip(folders[1:], parts[1:]):
        if part["protocol"] != protocol:
            raise ValueError(f"{f} was run with another protocol ({part['protocol']}); merge only runs of one "
                             f"protocol ({protocol})")
    results = {"protocol": protocol, "methods": {}, **({"run": run} if run else {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f, part in zip(folders, parts):
        clash = set(part["methods"]) & set(results["methods"])
        if clash:
            raise ValueError(f"{f} repeats method(s) {', '.join(sorted(clash))}; give each method once")
        results["methods"].update(part["methods"])
        for png in Path(f).glob("ia_heatmap_*.png"):
            if png.resolve() != (out / png.name).resolve():
                shutil.copy(png, out / png.name)
    ia_lines(ia_curves(results)).savefig(out / "ia_over_tasks.png", dpi=100)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_markdown(results, protocol["tasks"]))
    return results
