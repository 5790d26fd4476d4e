"""Benchmarks, printed as tables: `python -m cidm bench --core` measures CIDM's core claims on a concept set.

Concept sets use the `examples/concepts` format (concepts.json + images), so the same command runs on real photos
with SD-1.5 on a GPU.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image

from .generate import GenerateConfig
from .metrics import Evaluator, image_alignment
from .studio import Studio

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "concepts"


def load_concept_set(path: Path = EXAMPLES) -> dict:
    spec = json.loads((Path(path) / "concepts.json").read_text())
    for name, c in spec["concepts"].items():
        c["reference_images"] = [Image.open(Path(path) / f).convert("RGB") for f in c["images"]]
    return spec


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = [lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt[0](v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def generate_set(studio: Studio, prompts: list[str], n_images: int, steps: int, guidance: float, seed: int = 0,
                 **settings):
    """n_images per prompt, all prompts in one batch from `seed` (the same initial noise for every prompt and
    method)."""
    return studio.generate(list(prompts), steps=steps, guidance=guidance, seed=seed, num_images=n_images, **settings)


def run_core_bench(out: Path, base_model: str | None = None, concepts: Path = EXAMPLES, tasks: int = 10,
                   steps: int = 300, prompts: int = 10, seeds: int = 2, gen_steps: int = 25, guidance: float = 5.0,
                   batch_size: int = 4, seed: int = 0) -> dict:
    """Learn the standard sequence; measure time per task, IA against the base model, EWA routing and its cost."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_concept_set(concepts)
    order = spec["standard_sequence"][:tasks]
    studio = Studio(out / "library", base_model=base_model)
    if studio.names:
        raise ValueError(f"{out / 'library'} already holds concepts; give an empty --out")
    evaluator = Evaluator(studio.info.evaluator, str(studio.pipe.device))
    report: dict = {"base_model": studio.info.source, "steps": steps, "tasks": order, "learn_seconds": {}}

    # 1. Learn the sequence, timing each task
    for name in order:
        c = spec["concepts"][name]
        t0 = time.perf_counter()
        studio.learn(name, c["reference_images"], c["class_word"], c["kind"], captions=c["captions"], steps=steps,
                     batch_size=batch_size, seed=seed)
        report["learn_seconds"][name] = time.perf_counter() - t0
        print(f"learned <{name}> in {report['learn_seconds'][name]:.1f} s", flush=True)
        if len(studio.names) == 3:  # 2. IA of the first three, against the base prompted with the class word
            rows = []
            for n in studio.names:
                cn = spec["concepts"][n]
                gen = generate_set(studio, cn["eval_prompts"][:prompts], seeds, gen_steps, guidance, seed)
                plain = generate_set(studio, cn["eval_texts"][:prompts], seeds, gen_steps, guidance, seed)
                rows.append([n, image_alignment(evaluator, gen, cn["reference_images"]),
                             image_alignment(evaluator, plain, cn["reference_images"])])
                gen[0].save(out / f"sample_{n}.png")
            report["ia_after_3"] = {r[0]: {"cidm": r[1], "base_class_word": r[2]} for r in rows}
            print(markdown_table(["concept", "IA CIDM", "IA base (class word)"], rows), flush=True)

    # 3. EWA routing after the whole sequence: which task gets the largest weight for a prompt naming <V_k>
    from .ewa import ewa_weights

    matrix = torch.stack([ewa_weights(studio.tokens, studio.names, f"a photo of a <{n}>").mean(0)
                          for n in studio.names])  # (prompt concept, task)
    routed = [studio.names[i] for i in matrix.argmax(1).tolist()]
    report["ewa_matrix"] = matrix.tolist()
    report["ewa_routed_correctly"] = sum(r == n for r, n in zip(routed, studio.names))
    print(markdown_table(["prompt \\ task", *studio.names],
                         [[n, *[float(100 * v) for v in row]] for n, row in zip(studio.names, matrix.tolist())]))
    print(f"EWA routes to the named concept's task in {report['ewa_routed_correctly']}/{len(studio.names)} cases")

    # 4. Cost of EWA: the whole library vs one plain LoRA in a stock diffusers pipeline, same steps and batch
    report["timing"] = ewa_timing(studio, gen_steps, guidance)
    print(markdown_table(["generation (1 image, %d steps)" % gen_steps, "seconds"],
                         [[k, v] for k, v in report["timing"].items()]))
    (out / "core.json").write_text(json.dumps(report, indent=1))
    return report


def ewa_timing(studio: Studio, steps: int, guidance: float, repeats: int = 5) -> dict:
    from diffusers import StableDiffusionPipeline

    names = studio.names
    prompt = f"a photo of a <{names[0]}> on a beach"

    def timed(fn):
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats

    ours = timed(lambda: studio.generate(prompt, steps=steps, guidance=guidance, seed=0))
    plain = StableDiffusionPipeline.from_pretrained(studio.info.source, safety_checker=None,
                                                    requires_safety_checker=False).to(studio.pipe.device)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(studio.library.concept_dir(names[0])), adapter_name=names[0])
    g = torch.Generator().manual_seed(0)
    single = timed(lambda: plain("a photo of a square on a beach", num_inference_steps=steps,
                                 guidance_scale=guidance, generator=g))
    return {f"CIDM, EWA over {len(names)} concepts": ours, "diffusers, one plain LoRA": single,
            "ratio": ours / single}


def run_compose_bench(out: Path, library: Path, base_model: str | None = None, layouts: int = 50,
                      steps: int = 25, guidance: float = 5.0, seed: int = 0) -> dict:
    """Concept neglect over random two- and three-box layouts, for three ways of putting concepts in one image."""
    import random

    from .regions import Region

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    studio = Studio(library, base_model=base_model)
    studio.record_forgetting = False
    objects = [n for n in studio.names if studio.library.record(n)["kind"] == "object"]
    if len(objects) < 3:
        raise ValueError(f"the library needs at least 3 object concepts; it has {objects}")
    evaluator = Evaluator(studio.info.evaluator, str(studio.pipe.device))
    refs = {n: evaluator.image_embeddings([Image.open(p).convert("RGB") for p in
                                           sorted((studio.library.concept_dir(n) / "images").glob("*.png"))]).mean(0)
            for n in objects}
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
            f"a photo {s}", [Region(bx, f"a photo of a <{n}>") for n, bx in zip(c, b)], steps=steps,
            guidance=guidance, seed=sd)[0],
        "regional attention only (Eq. 4, no Eq. 5)": lambda c, b, s, sd: studio.compose(
            f"a photo {s}", [Region(bx, f"a photo of a <{n}>") for n, bx in zip(c, b)], alpha=1.0, steps=steps,
            guidance=guidance, seed=sd)[0],
        "one global prompt, all LoRAs (EWA)": lambda c, b, s, sd: studio.generate(
            "a photo of " + " and ".join(f"a <{n}>" for n in c) + f" {s}", steps=steps, guidance=guidance,
            seed=sd)[0],
    }
    # control: how often a concept generated alone (whole image) is recognised among the learned objects; neglect
    # in boxes cannot be told apart from this floor
    alone = []
    for i in range(layouts):
        n = objects[i % len(objects)]
        image = studio.generate(f"a photo of a <{n}> {scenes[i % len(scenes)]}", steps=steps, guidance=guidance,
                                seed=seed + i)[0]
        alone += neglected(image, [n], [(0, 0, size, size)])
    results = {"one concept alone, whole image (control)": {"1 box": 100.0 * sum(alone) / len(alone)}}
    print(f"control, one concept alone: not recognised {results[next(iter(results))]['1 box']:.1f} %", flush=True)
    for k in (2, 3):
        plans = [layout(k) for _ in range(layouts)]
        for method, run in methods.items():
            flags = []
            for i, (chosen, boxes, scene) in enumerate(plans):
                image = run(chosen, boxes, scene, seed + i)
                flags += neglected(image, chosen, boxes)
                if i == 0:
                    image.resize((size * 4, size * 4), Image.NEAREST).save(
                        out / f"compose_{k}boxes_{method.split()[0].lower()}.png")
            results.setdefault(method, {})[f"{k} boxes"] = 100.0 * sum(flags) / len(flags)
            print(f"{method}, {k} boxes: neglect {results[method][f'{k} boxes']:.1f} %", flush=True)
    print(markdown_table(["method", "neglect, 1 (%)", "neglect, 2 boxes (%)", "neglect, 3 boxes (%)"],
                         [[m, r.get("1 box", ""), r.get("2 boxes", ""), r.get("3 boxes", "")]
                          for m, r in results.items()]))

    # cost of U regions against plain generation, same steps
    prompt = f"a photo {scenes[0]}"
    def timed(fn, repeats=3):
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats
    plain = timed(lambda: studio.generate(prompt, steps=steps, guidance=guidance))
    costs = {}
    for u in (1, 2, 3):
        chosen, boxes, _ = layout(u) if u > 1 else (objects[:1], [(0, 0, size / 2, size)], None)
        costs[u] = timed(lambda: studio.compose(prompt, [Region(b, f"a photo of a <{n}>")
                                                         for n, b in zip(chosen, boxes)], steps=steps,
                                                guidance=guidance)) / plain
    print(markdown_table(["regions U", "time / plain generation", "budget (U+1)"],
                         [[u, c, float(u + 1)] for u, c in costs.items()]))
    report = {"neglect_percent": results, "cost_ratio": costs, "layouts": layouts, "steps": steps}
    (out / "compose.json").write_text(json.dumps(report, indent=1))
    return report


def training_groups(methods: list[str]) -> list[list[str]]:
    """Methods that learn with the same switches (e.g. lora-m and lora-c, cidm and cidm-no-ewa) differ only at
    inference: they share one training run, so they see identical adapters and the benchmark trains each once."""
    from .methods import get_method

    groups: dict[tuple, list[str]] = {}
    for m in methods:
        method = get_method(m)
        groups.setdefault((json.dumps(method.train, sort_keys=True), method.icgen), []).append(m)
    return list(groups.values())


def make_protocol(order, steps, prompts, images, seed, gen_steps, guidance, batch_size: int = 4,
                  precision: str = "no") -> dict:
    """What every method of one comparison shares (and `--merge` checks); batch_size and the generation's
    precision only when not the default."""
    protocol = {"tasks": order, "steps": steps, "prompts": prompts, "images_per_prompt": images, "seed": seed,
                "gen_steps": gen_steps, "guidance": guidance}
    if batch_size != 4:
        protocol["batch_size"] = batch_size
    if precision != "no":
        protocol["gen_precision"] = precision
    return protocol


def run_sequence(out: Path, methods: list[str], spec: dict, order: list[str], protocol: dict, evaluator,
                 base_model: str | None = None, overrides: dict | None = None, label: str | None = None) -> dict:
    """Learn `order` once with the first method's training (plus `overrides`), and after every task t score every
    learned concept (≤ t) under each method's inference. Returns {method: {"ia", "ta", "learn_seconds",
    "eval_seconds", "settings"}}."""
    from .methods import get_method
    from .metrics import text_alignment

    overrides = overrides or {}
    library = Path(out) / (label or methods[0]) / "library"
    if (library / "library.json").exists():
        raise ValueError(f"{library} already holds a library; give an empty --out")
    studio = Studio(library, base_model=base_model, method=methods[0])
    studio.record_forgetting = False
    evaluator = evaluator or Evaluator(studio.info.evaluator, str(studio.pipe.device))
    p = protocol
    runs = {m: {"ia": {n: {} for n in order}, "ta": {n: {} for n in order}, "learn_seconds": 0.0,
                "eval_seconds": 0.0, "settings": {**get_method(m).train, **overrides}} for m in methods}
    for t, name in enumerate(order, start=1):
        c = spec["concepts"][name]
        t0 = time.perf_counter()
        studio.learn(name, c["reference_images"], c["class_word"], c["kind"], captions=c["captions"],
                     steps=p["steps"], batch_size=p.get("batch_size", 4), seed=p["seed"], **overrides)
        learn_seconds = time.perf_counter() - t0
        for m in methods:
            method, run = get_method(m), runs[m]
            run["learn_seconds"] += learn_seconds  # shared by the group
            t0 = time.perf_counter()
            for n in order[:t]:
                cn = spec["concepts"][n]
                gen = generate_set(studio, cn["eval_prompts"][:p["prompts"]], p["images_per_prompt"], p["gen_steps"],
                                   p["guidance"], p["seed"], merge=method.merge, psi=method.psi,
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
                      gen_steps: int = 25, guidance: float = 5.0, batch_size: int = 4, precision: str = "no",
                      workers: int = 1) -> dict:
    """Every method on one protocol: after every task t, every learned concept (≤ t) is generated with its
    evaluation prompts × seeds and scored (IA against its references, TA against its prompt with the class word).

    workers > 1: the training groups run in that many processes at once (the costliest first, each process on its
    share of the CPU threads), each into OUT/parts/<group>, and their results are merged into OUT."""
    from .methods import get_method
    from .plots import ia_heatmap, ia_lines

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
                        images=images, seed=seed, gen_steps=gen_steps, guidance=guidance, batch_size=batch_size,
                        precision=precision)
        return run_in_workers(out, groups, workers, settings)
    protocol = make_protocol(order, steps, prompts, images, seed, gen_steps, guidance, batch_size, precision)
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
    from .methods import get_method

    train = get_method(group[0]).train
    learn = 9.0 * tasks * (2.0 if train.get("lwf_lambda") or train.get("lfs_lambda") else 1.0)
    evaluate = sum(t * (t if get_method(m).merge == "composite" else 1) for m in group for t in range(1, tasks + 1))
    return learn + evaluate


def _run_group(out: Path, group: list[str], threads: int, settings: dict) -> Path:
    torch.set_num_threads(threads)
    part = out / "parts" / group[0]
    run_methods_bench(part, group, **settings)
    return part


def run_in_workers(out: Path, groups: list[list[str]], workers: int, settings: dict) -> dict:
    """The training groups in `workers` processes, costliest first (each next group goes to the first free process),
    then one table from their parts. A group that fails stops the run after the others have finished and been
    merged, so what was measured is kept."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    ordered = sorted(groups, key=lambda g: -estimated_cost(g, settings["tasks"]))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
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


def run_tuning(out: Path, methods: list[str], base_model: str | None = None, concepts: Path = EXAMPLES,
               grid=None, steps: int = 300, prompts: int = 5, images: int = 2, seed: int = 0,
               gen_steps: int = 25, guidance: float = 5.0, extra: dict[str, list[dict]] | None = None) -> dict:
    """Choose each method's weight (its `Method.weight` switch: λ of EWC, LwF, LFS, C-LoRA) on the concept set's
    tuning sequence, which shares no concept with the reported one: the value with the best average IA after the
    last tuning task. `grid`: the values to try for every method (default: each method's own `Method.grid`).
    `extra`: more settings to try per method, e.g. {"cidm": [{"lr_lora": 1e-3}]}."""
    from .methods import get_method

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_concept_set(concepts)
    order = spec["tuning_sequence"]
    protocol = make_protocol(order, steps, prompts, images, seed, gen_steps, guidance)
    trials = []
    for m in methods:
        weight = get_method(m).weight
        values = (grid or get_method(m).grid) if weight else []
        trials += [(m, {weight: v}) for v in values] + [(m, o) for o in (extra or {}).get(m, [])]
    if not trials:
        raise ValueError(f"none of {', '.join(methods)} has a weight to tune or an extra setting to try")
    import dataclasses

    from .train import TaskConfig

    known = {f.name for f in dataclasses.fields(TaskConfig)} - {"name", "class_word", "kind"}
    unknown = sorted({k for _, settings in trials for k in settings} - known)
    if unknown:  # before any training, not after the first trials
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; a trial sets fields of TaskConfig "
                         f"(cidm/train.py), e.g. {', '.join(sorted(known)[:6])}")
    rows, evaluator = [], None
    for m, settings in trials:
        label = f"{m}_{format_settings(settings, '_')}"
        run = run_sequence(out, [m], spec, order, protocol, evaluator, base_model, overrides=settings,
                           label=label)[m]
        last = len(order)
        rows.append({"method": m, "settings": settings, "ia": sum(run["ia"][n][last] for n in order) / last,
                     "ta": sum(run["ta"][n][last] for n in order) / last,
                     "forgetting": sum(run["ia"][n][i + 1] - run["ia"][n][last] for i, n in enumerate(order)) / last,
                     "run": run})
    chosen = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        weight = get_method(m).weight
        candidates = [r for r in rows if r["method"] == m and weight in r["settings"]]
        if candidates:
            best = max(candidates, key=lambda r: r["ia"])
            chosen[m] = {weight: best["settings"][weight]}
    report = {"protocol": protocol, "chosen": chosen, "trials": rows}
    (out / "tuning.json").write_text(json.dumps(report, indent=1))
    table = markdown_table(["method", "setting", "avg IA", "avg TA", "mean forgetting", "chosen"],
                           [[r["method"], format_settings(r["settings"]), r["ia"], r["ta"], r["forgetting"],
                             "yes" if chosen.get(r["method"]) == r["settings"] else ""] for r in rows])
    text = (f"Tuning sequence: {', '.join(order)} (no concept of the reported sequence). Protocol: "
            f"{json.dumps(protocol)}\n\nAverage IA and TA after the last tuning task; forgetting is IA right after "
            f"learning minus IA after the last task.\n\n{table}\n")
    (out / "results.md").write_text(text)
    print(text)
    return report


def format_settings(settings: dict, sep: str = ", ") -> str:
    """`key=value` pairs for labels and tables: numbers in their shortest form (1e-3, 10), other values as given."""
    return sep.join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def merge_results(folders: list[Path], out: Path, run: dict | None = None) -> dict:
    """One results table from method runs made separately (other processes or machines) under one protocol.
    `run`: how the parts were run together (workers, wall time), written with the results."""
    import shutil

    from .plots import ia_lines

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
              markdown_table(["method", "learning (s)", "evaluation (s)"],
                             [[m, r["learn_seconds"], r["eval_seconds"]] for m, r in results["methods"].items()]),
              "", "### Method settings (TaskConfig overrides)", "",
              markdown_table(["method", "settings"], [[m, json.dumps(r["settings"])]
                                                     for m, r in results["methods"].items()]), ""]
    return "\n".join(lines)
