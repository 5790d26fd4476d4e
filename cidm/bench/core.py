"""The core benchmark (`python -m cidm bench --core`): learn the standard sequence through the user's path, then
measure whether each learned concept is recognisable (identity), how much it gains over the base prompted with its
class word, EWA's routing, and the speed of learning and generation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..ewa import ewa_weights
from ..metrics import Evaluator, identity_confusion, image_alignment
from ..studio import Studio
from ..templates import region_prompt
from .methods import generate_set
from .results import EXAMPLES, load_concept_set, markdown_table, timed


def run_core_bench(out: Path, base_model: str | None = None, concepts: Path = EXAMPLES, tasks: int = 10,
                   steps: int | None = None, prompts: int = 10, seeds: int = 2, gen_steps: int = 25,
                   guidance: float = 5.0, seed: int = 0) -> dict:
    """Learn the standard sequence as `cidm learn` does (its defaults, no captions); measure identity, IA against
    the base, EWA routing and timings. `steps`: None keeps the learning default."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_concept_set(concepts)
    order = spec["standard_sequence"][:tasks]
    studio = Studio(out / "library", base_model=base_model)
    if studio.names:
        raise ValueError(f"{out / 'library'} already holds concepts; give an empty --out")
    studio.record_forgetting = False
    evaluator = Evaluator(studio.info.evaluator, str(studio.pipe.device))
    report: dict = {"base_model": studio.info.source, "tasks": order, "learn_seconds": {}, "ia_fresh": {}}

    def sample(c: dict, named: bool) -> list:
        """A concept's evaluation prompts (named=True) or the same with its class word instead (the base)."""
        return generate_set(studio, c["eval_prompts" if named else "eval_texts"][:prompts], seeds, gen_steps,
                            guidance, seed)

    # 1. Learn the sequence as a user would, timing each task; IA right after learning against the base
    for name in order:
        c = spec["concepts"][name]
        t0 = time.perf_counter()
        result = studio.learn(name, c["reference_images"], c["class_word"], c["kind"], seed=seed,
                              **({"steps": steps} if steps else {}))
        report["learn_seconds"][name] = time.perf_counter() - t0
        report["steps"] = result.steps_done
        report["ia_fresh"][name] = {"cidm": image_alignment(evaluator, sample(c, True), c["reference_images"]),
                                    "base_class_word": image_alignment(evaluator, sample(c, False),
                                                                       c["reference_images"])}
        print(f"learned <{name}> in {report['learn_seconds'][name]:.1f} s; IA right after learning "
              f"{report['ia_fresh'][name]['cidm']:.1f} (base with '{c['class_word']}': "
              f"{report['ia_fresh'][name]['base_class_word']:.1f})", flush=True)

    # 2. Identity after the whole sequence: each concept alone, recognised among the learned ones of its kind
    generated = {n: sample(spec["concepts"][n], True) for n in order}
    for n, images in generated.items():
        images[0].save(out / f"sample_{n}.png")
    report["identity"] = identity_report(evaluator, spec, order, generated)
    print_identity(report)

    # 3. EWA routing after the whole sequence: which task gets the largest weight for a prompt naming <V_k>
    matrix = torch.stack([ewa_weights(studio.tokens, studio.names, region_prompt(n)).mean(0)
                          for n in studio.names])  # (prompt concept, task)
    routed = [studio.names[i] for i in matrix.argmax(1).tolist()]
    report["ewa_matrix"] = matrix.tolist()
    report["ewa_routed_correctly"] = sum(r == n for r, n in zip(routed, studio.names))
    print(markdown_table(["prompt \\ task", *studio.names],
                         [[n, *[float(100 * v) for v in row]] for n, row in zip(studio.names, matrix.tolist())]))
    print(f"EWA routes to the named concept's task in {report['ewa_routed_correctly']}/{len(studio.names)} cases")

    # 4. Speed: generation with the whole library against one plain LoRA in a stock diffusers pipeline
    report["timing"] = ewa_timing(studio, gen_steps, guidance)
    print(markdown_table(["timing", "seconds"], [[k, v] for k, v in report["timing"].items()]))
    (out / "core.json").write_text(json.dumps(report, indent=1))
    return report


def identity_report(evaluator: Evaluator, spec: dict, order: list[str], generated: dict) -> dict:
    """Confusion among the learned concepts of each kind; the share identified overall, per concept, per similar
    pair (told apart from its partner), and of the styles."""
    confusion = {}
    for kind in ("object", "style"):
        names = [n for n in order if spec["concepts"][n]["kind"] == kind]
        if len(names) > 1:
            confusion.update(identity_confusion(evaluator, {n: generated[n] for n in names},
                                                {n: spec["concepts"][n]["reference_images"] for n in names}))
    per = {n: confusion[n][n] for n in confusion}
    pairs = {}
    for a, b in spec.get("similar_pairs", []):
        if a in confusion and b in confusion:  # told apart: recognised as itself when only the pair competes
            two = identity_confusion(evaluator, {a: generated[a], b: generated[b]},
                                     {n: spec["concepts"][n]["reference_images"] for n in (a, b)})
            pairs[f"{a}/{b}"] = (two[a][a] + two[b][b]) / 2
    styles = [n for n in per if spec["concepts"][n]["kind"] == "style"]
    return {"overall": sum(per.values()) / max(1, len(per)), "per_concept": per, "pairs": pairs,
            "styles": sum(per[n] for n in styles) / max(1, len(styles)), "confusion": confusion}


def print_identity(report: dict) -> None:
    identity = report["identity"]
    names = list(identity["confusion"])
    print(markdown_table(["prompted \\ recognised", *names],
                         [[n, *[100.0 * identity["confusion"][n].get(m, 0.0) for m in names]] for n in names]))
    print(markdown_table(["concept", "identified (%)", "IA right after learning", "IA base (class word)"],
                         [[n, 100.0 * v, report["ia_fresh"][n]["cidm"], report["ia_fresh"][n]["base_class_word"]]
                          for n, v in identity["per_concept"].items()]))
    print(f"identified overall: {100 * identity['overall']:.1f} %; styles among styles: "
          f"{100 * identity['styles']:.1f} %; similar pairs told apart: "
          + ", ".join(f"{p} {100 * v:.1f} %" for p, v in identity["pairs"].items()), flush=True)


def ewa_timing(studio: Studio, steps: int, guidance: float, repeats: int = 5) -> dict:
    names = studio.names
    prompt = f"{region_prompt(names[0])} on a beach"
    ours = timed(lambda: studio.generate(prompt, steps=steps, guidance=guidance, seed=0), repeats)
    plain = StableDiffusionPipeline.from_pretrained(studio.info.source, safety_checker=None,
                                                    requires_safety_checker=False).to(studio.pipe.device)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(studio.library.concept_dir(names[0])), adapter_name=names[0])
    g = torch.Generator().manual_seed(0)
    single = timed(lambda: plain("a photo of a square on a beach", num_inference_steps=steps,
                                 guidance_scale=guidance, generator=g), repeats)
    eight = timed(lambda: studio.generate(prompt, steps=steps, guidance=guidance, seed=0, num_images=8), 2)
    return {f"CIDM, EWA over {len(names)} concepts (1 image)": ours, "diffusers, one plain LoRA (1 image)": single,
            "ratio": ours / single, f"CIDM, 8 images at {steps} steps": eight}
