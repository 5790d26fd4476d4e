"""The plain LoRA baselines: a fresh LoRA per task merged at inference (LoRA-M: equal weights; LoRA-C: one UNet pass
per LoRA, noise predictions averaged), and Finetuning: one LoRA carried from task to task.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import Method


@dataclasses.dataclass
class LoRAMerge(Method):
    """Per-task LoRAs without any regulariser; `merge` says how they meet: "mean" (LoRA-M) or "composite" (LoRA-C)."""

    merge: str = "mean"


@dataclasses.dataclass
class Finetune(Method):
    """One LoRA carried from task to task: each task's LoRA starts from the previous task's; the latest is used."""

    merge: str = "last"

    def before_task(self, task) -> None:
        if not task.past:
            return
        previous = list(task.past.values())[-1]
        with torch.no_grad():
            for module in task.current.modules:
                task.current.up[module].copy_(previous.up[module])
                task.current.down[module].copy_(previous.down[module])
