"""Per-task LoRA on the UNet's cross-attention projections, through peft, saved in the diffusers LoRA format.

Naming, once: the paper writes ΔW = A·B with A ∈ R^{out×r} (the "concept subspace") and B ∈ R^{r×in}.
peft calls A `lora_B` and B `lora_A`; the diffusers file calls them `lora.up` and `lora.down` (library.write_lora).
"""

from __future__ import annotations

import dataclasses

import torch

LORA_TARGETS = r".*attn2\.(to_q|to_k|to_v|to_out\.0)$"  # cross-attention q, k, v, out of every layer
LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclasses.dataclass
class LoRAWeights:
    """One task's LoRA: module name -> (A = up (out×r), B = down (r×in)), and its scale alpha/r."""

    up: dict[str, torch.Tensor]
    down: dict[str, torch.Tensor]
    scale: float = 1.0

    def delta(self, module: str) -> torch.Tensor:
        """ΔW = scale · A·B for one module: (out × in)."""
        return self.scale * self.up[module] @ self.down[module]

    @property
    def modules(self) -> list[str]:
        return list(self.up)


def add_task_lora(unet, name: str, rank: int = 4, targets: str = LORA_TARGETS) -> None:
    """A fresh LoRA (peft) named after the concept, the only trainable part of the UNet."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank should be a positive integer, got {rank}")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=targets),
                     adapter_name=name)
    unet.set_adapter(name)


def lora_modules(unet, name: str) -> dict[str, torch.nn.Module]:
    """peft LoRA layers that carry adapter `name`, keyed by module name (e.g. `...attn2.to_q`)."""
    return {n: m for n, m in unet.named_modules() if hasattr(m, "lora_A") and name in m.lora_A}


def live_weights(unet, name: str) -> LoRAWeights:
    """The adapter's current (trainable) tensors: paper A is peft lora_B.weight, paper B is lora_A.weight."""
    mods = lora_modules(unet, name)
    scale = next(iter(mods.values())).scaling[name]
    return LoRAWeights(up={n: m.lora_B[name].weight for n, m in mods.items()},
                       down={n: m.lora_A[name].weight for n, m in mods.items()}, scale=scale)


def remove_lora(unet) -> None:
    """Take every peft layer off the UNet (back to plain Linear modules and the base weights)."""
    if getattr(unet, "peft_config", None):
        unet.unload_lora()
