"""The tuning benchmark (`python -m cidm bench --tune`): each method's weight (λ of EWC, LwF, LFS, C-LoRA; CIDM's γ1)
chosen on the concept set's tuning sequence, which shares no concept with the reported one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..ewa import PSI
from ..generate import MERGES
from ..methods import Method, get_method
from ..train import TaskConfig
from .methods import run_sequence
from .results import EXAMPLES, format_settings, load_concept_set, make_protocol, markdown_table


def run_tuning(out: Path, methods: list[str], base_model: str | None = None, concepts: Path = EXAMPLES,
               grid=None, steps: int = 300, prompts: int = 5, images: int = 2, seed: int = 0,
               gen_steps: int = 25, guidance: float = 5.0, extra: dict[str, list[dict]] | None = None) -> dict:
    """Choose each method's weight (its `Method.weight` parameter: λ of EWC, LwF, LFS, C-LoRA) on the concept set's
    tuning sequence, which shares no concept with the reported one: the value with the best average IA after the
    last tuning task. `grid`: the values to try for every method (default: each method's own `Method.grid`).
    `extra`: more trials per method, each one or more settings, e.g. {"cidm": [{"lr_lora": 1e-3}]}; the chosen
    settings are the best trial's, whichever it is."""
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
    check_settings(trials)
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
    chosen = {}  # per method, the settings of its best trial (a grid value or an --also-try trial)
    for m in dict.fromkeys(r["method"] for r in rows):
        chosen[m] = max((r for r in rows if r["method"] == m), key=lambda r: r["ia"])["settings"]
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


def check_settings(trials: list[tuple[str, dict]]) -> None:
    """Before any training, not after the first trials: every setting names a TaskConfig field, a parameter of
    its method or how it generates (`merge`, `psi`, with a known value)."""
    task = {f.name for f in dataclasses.fields(TaskConfig)} - {"name", "class_word", "kind"}
    choices = {"merge": MERGES, "psi": PSI}
    for m, settings in trials:
        known = task | set(get_method(m).parameters()) | set(Method.INFERENCE)
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; a trial sets fields of TaskConfig "
                             f"(cidm/train.py), parameters of the method (cidm/methods/) or merge / psi, e.g. "
                             f"{', '.join(sorted(known)[:6])}")
        for key, allowed in choices.items():
            if key in settings and settings[key] not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {settings[key]!r}")
