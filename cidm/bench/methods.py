"""The methods benchmark (`python -m cidm bench`): every method on one protocol. After every task t, every learned
concept (≤ t) is generated with its evaluation prompts × seeds and scored (IA against its references, TA against its
prompt with the class word). Methods that learn alike share one training run; training groups may run in parallel
processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from ..methods import Method, get_method
from ..metrics import Evaluator, image_alignment, text_alignment
from ..plots import ia_heatmap
from ..studio import Studio
from .results import (EXAMPLES, ia_curves, ia_lines, load_concept_set, load_results, make_protocol, merge_results,
                      results_markdown)

__all__ = ["generate_set", "load_results", "run_methods_bench", "run_sequence", "training_groups"]


def generate_set(studio: Studio, prompts: list[str], n_images: int, steps: int, guidance: float, seed: int = 0,
                 **settings):
    """n_images per prompt, all prompts in one batch from `seed` (the same initial noise for every prompt and
    method)."""
    return studio.generate(list(prompts), steps=steps, guidance=guidance, seed=seed, num_images=n_images, **settings)


def training_groups(methods: list[str]) -> list[list[str]]:
    """Methods that learn with the same switches (e.g. lora-m and lora-c, cidm and cidm-no-ewa) differ only at
    inference: they share one training run, so they see identical adapters and the benchmark trains each once."""
    groups: dict[tuple, list[str]] = {}
    for m in methods:
        groups.setdefault(get_method(m).training_key(), []).append(m)
    return list(groups.values())


def run_sequence(out: Path, methods: list[str], spec: dict, order: list[str], protocol: dict, evaluator,
                 base_model: str | None = None, overrides: dict | None = None, label: str | None = None) -> dict:
    """Learn `order` once with the first method's training (plus `overrides`), and after every task t score every
    learned concept (≤ t) under each method's inference. Returns {method: {"ia", "ta", "learn_seconds",
    "eval_seconds", "settings"}}. `overrides` may also set the inference (`merge`, `psi`), for every method."""
    overrides = dict(overrides or {})
    inference = {k: overrides.pop(k) for k in Method.INFERENCE if k in overrides}
    library = Path(out) / (label or methods[0]) / "library"
    if (library / "library.json").exists():
        raise ValueError(f"{library} already holds a library; give an empty --out")
    studio = Studio(library, base_model=base_model, method=methods[0])
    studio.record_forgetting = False
    evaluator = evaluator or Evaluator(studio.info.evaluator, str(studio.pipe.device))
    p = protocol
    runs = {m: {"ia": {n: {} for n in order}, "ta": {n: {} for n in order}, "learn_seconds": 0.0,
                "eval_seconds": 0.0, "settings": {**get_method(m).parameters(), **overrides, **inference}}
            for m in methods}
    for t, name in enumerate(order, start=1):
        c = spec["concepts"][name]
        t0 = time.perf_counter()
        studio.learn(name, c["reference_images"], c["class_word"], c["kind"], steps=p["steps"], seed=p["seed"],
                     **overrides)  # as `cidm learn` does: no captions, the base's learning defaults
        learn_seconds = time.perf_counter() - t0
        for m in methods:
            method, run = get_method(m), runs[m]
            run["learn_seconds"] += learn_seconds  # shared by the group
            t0 = time.perf_counter()
            for n in order[:t]:
                cn = spec["concepts"][n]
                gen = generate_set(studio, cn["eval_prompts"][:p["prompts"]], p["images_per_prompt"], p["gen_steps"],
                                   p["guidance"], p["seed"], merge=inference.get("merge", method.merge),
                                   psi=inference.get("psi", method.psi),
                                   mixed_precision=p.get("gen_precision", "no"))
                texts = [text for text in cn["eval_texts"][:p["prompts"]] for _ in range(p["images_per_prompt"])]
                run["ia"][n][t] = image_alignment(evaluator, gen, cn["reference_images"])
                run["ta"][n][t] = text_alignment(evaluator, gen, texts)
            run["eval_seconds"] += time.perf_counter() - t0
            print(f"{label or m}: after task {t} ({name}) avg IA "
                  f"{sum(run['ia'][n][t] for n in order[:t]) / t:.1f}", flush=True)
    return runs


def run_methods_bench(out: Path, methods: list[str], base_model: str | None = None, concepts: Path = EXAMPLES,
                      tasks: int = 10, steps: int = 300, prompts: int = 5, images: int = 2, seed: int = 0,
                      gen_steps: int = 25, guidance: float = 5.0, precision: str = "no",
                      workers: int = 1) -> dict:
    """Every method on one protocol: after every task t, every learned concept (≤ t) is generated with its
    evaluation prompts × seeds and scored (IA against its references, TA against its prompt with the class word).

    workers > 1: the training groups run in that many processes at once (the costliest first, each process on its
    share of the CPU threads), each into OUT/parts/<group>, and their results are merged into OUT."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_concept_set(concepts)
    order = spec["standard_sequence"][:tasks]
    for m in methods:
        get_method(m)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    groups = training_groups(methods)
    if workers > 1 and len(groups) > 1:
        settings = dict(base_model=base_model, concepts=concepts, tasks=tasks, steps=steps, prompts=prompts,
                        images=images, seed=seed, gen_steps=gen_steps, guidance=guidance,
                        precision=precision)
        return run_in_workers(out, groups, workers, settings)
    protocol = make_protocol(order, steps, prompts, images, seed, gen_steps, guidance, precision)
    results: dict = {"protocol": protocol, "methods": {}}
    evaluator = None
    for group in groups:
        runs = run_sequence(out, group, spec, order, protocol, evaluator, base_model)
        for m, run in runs.items():
            results["methods"][m] = run
            ia = run["ia"]
            fig = ia_heatmap({t: {n: ia[n][t] for n in order[:t]} for t in range(1, len(order) + 1)}, order,
                             title=f"IA after each task: {m}")
            fig.savefig(out / f"ia_heatmap_{m}.png", dpi=100)
        # after every group, so that a long run stopped early keeps what it measured (`--merge` tables any parts)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        (out / "results.md").write_text(results_markdown(results, order))
    ia_lines(ia_curves(results)).savefig(out / "ia_over_tasks.png", dpi=100)
    print((out / "results.md").read_text())
    return results


def estimated_cost(group: list[str], tasks: int) -> float:
    """A group's rough cost in units of one concept's evaluation set: learning a task costs about 9 units (twice
    that with a teacher's passes, LwF and LFS), and after task t a method generates t concepts (LoRA-Composite t
    times over, one UNet pass per LoRA)."""
    learn = 9.0 * tasks * get_method(group[0]).training_cost
    evaluate = sum(t * (t if get_method(m).merge == "composite" else 1) for m in group for t in range(1, tasks + 1))
    return learn + evaluate


def exit_with_parent(parent: int, every: float = 1.0) -> None:
    """A worker process's initializer: it stops when the bench that started it is gone (killed), instead of learning on
    and writing into OUT/parts, where the next run would find its libraries."""
    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _run_group(out: Path, group: list[str], threads: int, settings: dict) -> Path:
    torch.set_num_threads(threads)
    part = out / "parts" / group[0]
    run_methods_bench(part, group, **settings)
    return part


def run_in_workers(out: Path, groups: list[list[str]], workers: int, settings: dict) -> dict:
    """The training groups in `workers` processes, costliest first (each next group goes to the first free process),
    then one table from their parts. A group that fails stops the run after the others have finished and been
    merged, so what was measured is kept."""
    start = time.perf_counter()
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    ordered = sorted(groups, key=lambda g: -estimated_cost(g, settings["tasks"]))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {tuple(g): pool.submit(_run_group, out, g, threads, settings) for g in ordered}
    parts, failed = [], []
    for g in groups:  # the table keeps the methods' order
        try:
            parts.append(futures[tuple(g)].result())
        except Exception as err:  # noqa: BLE001 (reported below, after the others are merged)
            failed.append(f"{', '.join(g)}: {err}")
    results = merge_results(parts, out, run={"workers": workers, "threads_each": threads,
                                             "wall_seconds": time.perf_counter() - start}) if parts else {}
    if failed:
        raise RuntimeError("some methods did not finish (the others are in results.md): " + "; ".join(failed))
    print((out / "results.md").read_text())
    return results
