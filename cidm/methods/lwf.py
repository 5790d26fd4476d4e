"""LwF (Li & Hoiem 2017) for diffusion: one LoRA carried across tasks; at each step the current model matches the
previous task's model (the teacher) on an earlier concept's prompt (its kind's first template), at the batch's noisy
latents."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import torch

from ..ewa import merged
from ..losses import diffusion_loss
from ..lora import LoRAWeights
from ..sampling import predict_noise
from ..templates import probe_prompt
from .lora_merge import Finetune


@dataclasses.dataclass
class LwF(Finetune):
    lwf_lambda: float = 10.0  # weight of the distillation from the previous task's model

    training_cost: ClassVar[float] = 2.0  # a teacher's pass beside every step

    def loss(self, task, batch) -> dict[str, tuple[float, torch.Tensor]]:
        if self.lwf_lambda <= 0 or not task.past:
            return {}
        unet = task.pipe.unet
        old = list(task.past)[int(torch.randint(0, len(task.past), (1,), generator=task.generator))]
        old_text = task.tokens.encode([probe_prompt(old, task.kinds[old])] * task.config.batch_size)
        old_text = old_text.to(unet.dtype)
        with torch.no_grad(), previous_model(unet, task.layers, list(task.past.values())[-1]):
            teacher = predict_noise(unet, batch.noisy, batch.t, old_text)
        student = predict_noise(unet, batch.noisy, batch.t, old_text)
        return {"lwf": (self.lwf_lambda, diffusion_loss(student, teacher))}


@contextlib.contextmanager
def previous_model(unet, layers, lora: LoRAWeights):
    """The model before this task, as LwF's and LFS's teacher: θ0 + the previous task's LoRA merged in, the
    current task's adapter off; all undone on exit."""
    unet.disable_adapters()
    try:
        with merged(unet, layers, [lora], torch.ones(len(layers), 1)):
            yield
    finally:
        unet.enable_adapters()
