"""The core benchmark (`python -m cidm bench --core`): learn the standard sequence; time per task, IA against the
base model, EWA routing and its cost."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..ewa import ewa_weights
from ..metrics import Evaluator, image_alignment
from ..studio import Studio
from ..templates import region_prompt
from .methods import generate_set
from .results import EXAMPLES, load_concept_set, markdown_table, timed


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
    matrix = torch.stack([ewa_weights(studio.tokens, studio.names, region_prompt(n)).mean(0)
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
    return {f"CIDM, EWA over {len(names)} concepts": ours, "diffusers, one plain LoRA": single,
            "ratio": ours / single}
