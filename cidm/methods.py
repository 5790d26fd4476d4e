"""The methods the benchmark compares, each a set of training switches and an inference merge over one loop.

LFS-Diffusion (Song et al. 2024) is built from its abstract and figure captions only (the body is not public; see
`research/peers.md` §2). Our design choices, each a switch here or in `TaskConfig`:
- one LoRA carried from task to task (it is a fine-tuning method, with no per-task adapters);
- data-free distillation: every `lfs_refresh` steps the teacher (the model before this task) samples a 25-step DDPM
  trajectory from noise, alternately for the new concept's class ("relevant concepts") and for a random earlier
  concept ("previous concepts"); each step, the student matches the teacher's ε at one of the teacher's own latents;
- In-Context Generation: right after a task, one image of the concept is sampled and kept as its vision context
  (`context.png`, generated, so no user photo is stored); a later prompt naming the concept starts from that
  context's latents noised to `context_strength` (SDEdit-style conditioning on the vision context).
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
    icgen: bool = False  # LFS: keep a vision context per concept and condition its later generation on it
    weight: str | None = None  # the TaskConfig weight chosen on the tuning sequence (`cidm bench --tune`)
    diagnostic: bool = False  # not a method of the comparison: run only when named (`--methods`)
    grid: tuple[float, ...] = (0.1, 1.0, 10.0)  # the values of `weight` tried there


NO_REG = {"use_r1": False, "use_r2": False}
# The λ of EWC, LwF, C-LoRA and LFS were chosen among 0.1, 1 and 10 on the tuning sequence (no concept of the reported
# one): `python -m cidm bench --tune`, results in bench/results/tuning/. CIDM's R1 weight γ1 was chosen the same way
# among the paper's 0.1 and the two decades below it (R1 as printed pulls A_g towards 0, see losses.py); γ2 stays 1.
# CIDM's ablations that differ from it only at inference share its training (and so its γ1).
CIDM = {"gamma1": 0.1}

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("cidm", "CIDM: per-task LoRA + layer-wise tokens, R1 + R2, elastic weight aggregation", CIDM,
           weight="gamma1", grid=(0.001, 0.01, 0.1)),
    Method("cidm-no-r1", "CIDM without the orthogonal-subspace regulariser R1", {**CIDM, "use_r1": False}),
    Method("cidm-no-r2", "CIDM without the task-shared regulariser R2", {**CIDM, "use_r2": False}),
    Method("cidm-no-ewa", "CIDM with LoRAs merged at equal weights instead of EWA", CIDM, merge="mean"),
    Method("cidm-code-psi", "CIDM with the official code's EWA weighting 0.8·m⁴/Σm⁴", CIDM, psi="code"),
    Method("cidm-tokens-only", "diagnostic: CIDM's layer-wise tokens with every LoRA off (what tokens alone carry)",
           CIDM, merge="none", diagnostic=True),
    Method("lora-m", "LoRA Merge: per-task LoRAs, merged with equal weights", NO_REG, merge="mean"),
    Method("lora-c", "LoRA Composite: per-task LoRAs, noise predictions averaged over LoRAs", NO_REG,
           merge="composite"),
    Method("finetune", "Finetuning: one LoRA carried from task to task, no regulariser",
           {**NO_REG, "init_from_previous": True}, merge="last"),
    Method("ewc", "EWC: one LoRA carried from task to task, diagonal-Fisher penalty (online EWC)",
           {**NO_REG, "init_from_previous": True, "ewc_lambda": 10.0}, merge="last", weight="ewc_lambda"),
    Method("lwf", "LwF: one LoRA carried across tasks, distilled from the previous model on old concepts' prompts",
           {**NO_REG, "init_from_previous": True, "lwf_lambda": 10.0}, merge="last", weight="lwf_lambda"),
    Method("c-lora", "C-LoRA: K/V LoRA on the merged past deltas, self-regularised, random tokens",
           {**NO_REG, "lora_targets": KV_TARGETS, "token_init": "random", "train_on_merged_past": True,
            "clora_lambda": 0.1}, merge="sum", weight="clora_lambda"),
    Method("lfs", "LFS-Diffusion: one LoRA carried across tasks, distilled along the teacher's own sampling "
                  "trajectory, in-context generation from a vision context per concept",
           {**NO_REG, "init_from_previous": True, "lfs_lambda": 1.0}, merge="last", icgen=True,
           weight="lfs_lambda"),
]}


def compared_methods() -> list[str]:
    """The methods of the comparison (`cidm bench` without --methods): all but the diagnostics."""
    return [name for name, method in METHODS.items() if not method.diagnostic]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
