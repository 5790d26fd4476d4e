"""The methods the benchmark compares, each a set of training switches and an inference merge over one loop.

LFS-Diffusion (distillation along the teacher's sampling trajectory, in-context generation) is not in this
table yet.
"""

from __future__ import annotations

import dataclasses

KV_TARGETS = r".*attn2\.(to_k|to_v)$"


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    train: dict = dataclasses.field(default_factory=dict)  # TaskConfig overrides
    merge: str = "ewa"  # GenerateConfig.merge
    psi: str = "paper"


NO_REG = {"use_r1": False, "use_r2": False}

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("cidm", "CIDM: per-task LoRA + layer-wise tokens, R1 + R2, elastic weight aggregation"),
    Method("cidm-no-r1", "CIDM without the orthogonal-subspace regulariser R1", {"use_r1": False}),
    Method("cidm-no-r2", "CIDM without the task-shared regulariser R2", {"use_r2": False}),
    Method("cidm-no-ewa", "CIDM with LoRAs merged at equal weights instead of EWA", merge="mean"),
    Method("cidm-code-psi", "CIDM with the official code's EWA weighting 0.8·m⁴/Σm⁴", psi="code"),
    Method("lora-m", "LoRA Merge: per-task LoRAs, merged with equal weights", NO_REG, merge="mean"),
    Method("lora-c", "LoRA Composite: per-task LoRAs, noise predictions averaged over LoRAs", NO_REG,
           merge="composite"),
    Method("finetune", "Finetuning: one LoRA carried from task to task, no regulariser",
           {**NO_REG, "init_from_previous": True}, merge="last"),
    Method("ewc", "EWC: one LoRA carried from task to task, diagonal-Fisher penalty (online EWC)",
           {**NO_REG, "init_from_previous": True, "ewc_lambda": 1.0}, merge="last"),
    Method("lwf", "LwF: one LoRA carried across tasks, distilled from the previous model on old concepts' prompts",
           {**NO_REG, "init_from_previous": True, "lwf_lambda": 1.0}, merge="last"),
    Method("c-lora", "C-LoRA: K/V LoRA on the merged past deltas, self-regularised, random tokens",
           {**NO_REG, "lora_targets": KV_TARGETS, "token_init": "random", "train_on_merged_past": True,
            "clora_lambda": 1.0}, merge="sum"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
