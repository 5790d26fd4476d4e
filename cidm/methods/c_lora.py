"""C-LoRA (Smith et al. 2023): each task's K/V LoRA trains on W0 + Σ_past ΔW, regularised by its overlap with the
past deltas, with random concept tokens; at inference every LoRA is merged into the base at weight 1."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..ewa import merged
from .base import Method

KV_TARGETS = r".*attn2\.(to_k|to_v)$"


@dataclasses.dataclass
class CLoRA(Method):
    merge: str = "sum"
    clora_lambda: float = 0.1  # weight of the self-regularisation

    task_settings: ClassVar[dict] = {"lora_targets": KV_TARGETS, "token_init": "random"}

    def __post_init__(self):
        self.past_sum: dict = {}  # Σ_past ΔW per module

    def before_task(self, task) -> None:
        self.past_sum = {}
        if not task.past:
            return
        past, device = list(task.past.values()), task.pipe.unet.device
        if self.clora_lambda > 0:
            self.past_sum = {m: sum(p.delta(m) for p in past if m in p.up).to(device) for m in task.current.modules}
        # W = W0 + Σ_past ΔW + ΔW_g while training
        task.context.enter_context(merged(task.pipe.unet, task.layers, past, torch.ones(len(task.layers), len(past))))

    def loss(self, task, batch) -> dict[str, tuple[float, torch.Tensor]]:
        if not self.past_sum:
            return {}
        # ‖ |Σ_past ΔW| ⊙ ΔW_g ‖², normalised by the mean square of Σ_past ΔW
        clora = sum(((self.past_sum[m] * task.current.delta(m)) ** 2).sum()
                    / (self.past_sum[m] ** 2).mean().clamp(min=1e-12) for m in self.past_sum)
        return {"clora": (self.clora_lambda, clora)}
