"""EWC (Kirkpatrick et al. 2017), online: one LoRA carried across tasks, pulled towards the previous task's by
λ·Σ F̂ (θ − θ*)², F̂ the cumulative diagonal Fisher of the LoRA parameters, normalised by its mean."""

from __future__ import annotations

import dataclasses

import torch

from ..losses import diffusion_loss
from ..sampling import predict_noise
from ..train import noised_batch
from .lora_merge import Finetune

FISHER_FILE = "ewc_fisher.safetensors"  # beside each concept: the cumulative diagonal Fisher up to its task


@dataclasses.dataclass
class EWC(Finetune):
    ewc_lambda: float = 10.0  # weight of Σ F̂ (θ − θ*)²
    fisher_batches: int = 16  # batches used to estimate a task's diagonal Fisher

    def __post_init__(self):
        self.library = None
        self.previous_fisher: dict | None = None  # cumulative up to the previous task, "<module>.up|down"
        self.fisher: dict | None = None  # cumulative up to this task, once learned
        self.anchor: dict = {}  # (module, part) -> (θ*, F̂)

    def load(self, library) -> None:
        self.library = library

    def before_task(self, task) -> None:
        super().before_task(task)
        self.previous_fisher, self.fisher, self.anchor = None, None, {}
        if self.ewc_lambda <= 0 or not task.past:
            return
        self.previous_fisher = read_fisher(self.library, list(task.past)[-1])
        if not self.previous_fisher:
            return
        previous = list(task.past.values())[-1]
        device = task.pipe.unet.device
        mean_f = torch.cat([f.flatten() for f in self.previous_fisher.values()]).mean().clamp(min=1e-20)
        self.anchor = {(m, part): ((previous.up if part == "up" else previous.down)[m].to(device),
                                   (self.previous_fisher[f"{m}.{part}"] / mean_f).to(device))
                       for m in task.current.modules for part in ("up", "down")}

    def loss(self, task, batch) -> dict[str, tuple[float, torch.Tensor]]:
        if not self.anchor:
            return {}
        current = task.current
        ewc = sum((f * ((current.up if part == "up" else current.down)[m] - anchor) ** 2).sum()
                  for (m, part), (anchor, f) in self.anchor.items())  # Σ F̂ (θ − θ*)²
        return {"ewc": (self.ewc_lambda, ewc)}

    def after_task(self, task) -> None:
        if self.ewc_lambda <= 0:
            return
        fisher = diagonal_fisher(task, self.fisher_batches)
        for key, value in (self.previous_fisher or {}).items():
            fisher[key] = fisher[key] + value.to(fisher[key])
        self.fisher = fisher

    def concept_files(self, studio, config) -> dict:
        return {} if self.fisher is None else {FISHER_FILE: self.fisher}


def diagonal_fisher(task, batches: int) -> dict:
    """EWC's diagonal Fisher of the LoRA parameters: mean squared gradient of the diffusion loss on the task."""
    current = task.current
    params = {f"{m}.{part}": (current.up if part == "up" else current.down)[m]
              for m in current.modules for part in ("up", "down")}
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for _ in range(batches):
        batch = noised_batch(task, 1)
        with torch.no_grad():
            text = task.tokens.encode([task.captions[batch.idx.item()]])
        pred = predict_noise(task.pipe.unet, batch.noisy, batch.t, text)
        grads = torch.autograd.grad(diffusion_loss(pred, batch.noise), list(params.values()))
        for k, g in zip(params, grads):
            total[k] += g.detach() ** 2 / batches
    return {k: v.cpu() for k, v in total.items()}


def read_fisher(library, name: str) -> dict | None:
    """The cumulative Fisher stored beside concept `name`, or None."""
    return library.read_tensors(name, FISHER_FILE)
