"""CIDM (Dong et al., NeurIPS 2024): a fresh LoRA per task from θ0, the concept consolidation loss (Eq. 2: γ1·R1 +
γ2·R2 on top of Eq. 1), R2's two-step update (Eq. 7), and elastic weight aggregation at inference (Eq. 3).
The ablations are parameters: `use_r1`, `use_r2`, and the inference `merge` / `psi`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import torch

from ..lora import LoRAWeights
from ..losses import GroupedLoRA, TaskSharedKnowledge, orthogonal_subspace_loss
from ..train import adam_kernels
from .base import Method


@dataclasses.dataclass
class CIDM(Method):
    gamma1: float = 0.1  # R1 weight, §4.1
    gamma2: float = 1.0  # R2 weight, §4.1
    r1_reduction: str = "sum"  # "sum" (paper Eq. 2) | "mean" (official code)
    r1_form: str = "literal"  # "literal" |A_i A_gᵀ| (paper and code) | "subspace" |A_iᵀ A_g| (see losses.py)
    use_r1: bool = True  # ablation switch (cidm-no-r1)
    use_r2: bool = True  # ablation switch (cidm-no-r2)
    r2_rank: int = 16  # k of the factored W_* = U Vᵀ and H_i = P Qᵀ (see losses.TaskSharedKnowledge)
    r2_lr: float = 1e-3  # step-2 learning rate for H and W_*
    # "zero": task g's LoRA from θ0 (paper) | "shared": from H_g W_*, H_g the mean past H_i | "previous": from the
    # LoRA of task g-1 (as a carried LoRA starts: EWC, LwF, LFS), the past tasks' LoRAs kept as they are
    lora_start: str = "zero"
    r2_update: str = "joint"  # Eq. 7's step 2: "joint" from step 1's backward | "alternating", a pass of its own

    def __post_init__(self):
        self.shared: TaskSharedKnowledge | None = None  # R2's H_i and W_*, kept once per library
        self.r2_active = False  # this task trains with R2 (from task 2 on)
        self.shared_optimizer: torch.optim.Optimizer | None = None  # Eq. 7's step 2
        self.past_factors: dict[str, GroupedLoRA] = {}  # the past tasks' LoRAs stacked once per task (R1, R2)
        self.groups: dict[str, list[str]] | None = None  # R2's shape groups (None before the first task: the LoRA's)

    def load(self, library) -> None:
        self.shared = read_task_shared(library)
        if self.shared is not None:
            self.r2_rank = self.shared.rank

    def forget(self, name: str) -> None:
        if self.shared is not None and name in self.shared.tasks:
            self.shared.remove_task(name)
            if not self.shared.tasks:
                self.shared = None

    def library_state(self) -> tuple[dict, dict] | None:
        return None if self.shared is None else stored_task_shared(self.shared)

    def merged_state(self, library, name: str) -> tuple[dict, dict] | None:
        """R2's state as it is on disk (W_* and every H_i there) with this task's H_g added. This task was learned
        without R1 against the concepts added meanwhile: CIDM learns one task after another."""
        theirs = read_task_shared(library)
        if theirs is None or self.shared is None or name not in self.shared.tasks:
            return self.library_state()
        if name in theirs.tasks:  # replaced meanwhile: this task's H_g is the newer one
            theirs.remove_task(name)
        theirs.put_task(name, self.shared.factors(name))
        return stored_task_shared(theirs)

    def before_task(self, task) -> None:
        if self.lora_start not in ("zero", "shared", "previous"):
            raise ValueError(f"lora_start must be 'zero', 'shared' or 'previous', got {self.lora_start!r}")
        if self.r2_update not in ("joint", "alternating"):
            raise ValueError(f"r2_update must be 'joint' or 'alternating', got {self.r2_update!r}")
        self.r2_active = self.use_r2 and self.shared is not None and bool(self.shared.tasks)
        self.groups = self.shared.groups if self.shared is not None else None
        self.past_factors = {name: GroupedLoRA.of(lora, self.groups) for name, lora in task.past.items()}
        if self.r2_active:
            self.shared.add_task(task.config.name, "zero" if self.lora_start == "zero" else "mean")
            self.shared_optimizer = torch.optim.Adam(self.shared.parameters(), lr=self.r2_lr,
                                                     **adam_kernels(self.shared.device))
        start = self.start_deltas(task)
        if start is not None:
            start_lora_at(task.current, start)

    def start_deltas(self, task) -> dict[str, torch.Tensor] | None:
        """Where task g's ΔW starts, per module; None for θ0 (the paper). DEVIATION options (README): "shared", what
        R2 keeps of the past tasks (H_g W_*, H_g their mean H_i); "previous", what task g-1 learned."""
        if self.lora_start == "shared" and self.r2_active:
            return self.shared.shared_delta(task.config.name)
        if self.lora_start == "previous" and task.past:
            previous = list(task.past.values())[-1]
            return {m: previous.delta(m) for m in task.current.modules}
        return None

    def loss(self, task, batch) -> dict[str, tuple[float, torch.Tensor]]:
        # step 1 of Eq. 7: tokens and ΔW_g on the concept consolidation loss (Eq. 2), H and W_* fixed
        current = GroupedLoRA.of(task.current, self.groups)
        r1 = r2 = torch.zeros(())
        device = next(iter(current.up.values())).device.type
        with torch.autocast(device, enabled=False):  # small products of fp32 factors: no gain from half precision
            if self.use_r1 and self.past_factors:
                r1 = orthogonal_subspace_loss(current, list(self.past_factors.values()), self.r1_reduction,
                                              self.r1_form)
            if self.r2_active and self.r2_update == "joint":
                # Σ_i R2(task i): only task g's term reaches ΔW_g (the past ΔW_i are fixed), and the same backward
                # gives step 2 its gradient on H and W_* (Eq. 6: ∂R2/∂H = −2(ΔW − HW_*)W_*ᵀ, ∂R2/∂W_* =
                # −2Hᵀ(ΔW − HW_*), by autograd), scaled by γ2, which Adam's update does not see
                r2 = self.shared.task_shared_loss_sum(self.learners(current))
            elif self.r2_active:
                with frozen_parameters(self.shared):
                    r2 = self.shared.task_shared_loss(task.config.name, current)
        return {"r1": (self.gamma1, r1), "r2": (self.gamma2, r2)}

    def learners(self, current: GroupedLoRA) -> dict[str, GroupedLoRA]:
        """Every task's ΔW_i in R2's task order: the past ones fixed, the current one as it stands."""
        learners = {**self.past_factors, self.shared.tasks[-1]: current}
        return {name: learners[name] for name in self.shared.tasks}

    def after_step(self, task) -> None:
        # step 2 of Eq. 7 (as descent; the printed '+' ascends): H_i and W_* on R2, tokens and ΔW_g fixed
        if not self.r2_active:
            return
        if self.r2_update == "alternating":  # a pass of its own, after step 1 has moved ΔW_g
            current = GroupedLoRA.of(task.learned(), self.groups)
            self.shared.task_shared_loss_sum(self.learners(current)).backward()  # Eq. 6 by autograd
        self.shared_optimizer.step()  # Eq. 7: H, W_* := H, W_* − η ∂R2/∂(H, W_*), with Adam
        self.shared_optimizer.zero_grad(set_to_none=True)

    def after_task(self, task) -> None:
        if self.shared is None:  # after the first task, W_* and H_1 from its ΔW
            self.shared = TaskSharedKnowledge(self.r2_rank)
            self.shared.initialise(task.config.name, task.learned())

    def abort_task(self, task) -> None:
        if self.r2_active:
            self.shared.remove_task(task.config.name)
        self.r2_active = False


@contextlib.contextmanager
def frozen_parameters(module: torch.nn.Module):
    """`module`'s parameters without gradients for a while (step 1 of Eq. 7 holds H and W_* fixed)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@torch.no_grad()
def start_lora_at(lora: LoRAWeights, deltas: dict[str, torch.Tensor]) -> None:
    """Set scale·A·B to the best rank-r approximation of each module's target ΔW (its truncated SVD, split evenly
    between A and B). Directions the target lacks keep the fresh LoRA's B row and a zero A column, so they still
    learn (A = B = 0 would have no gradient)."""
    for module in lora.modules:
        up, down = lora.up[module], lora.down[module]
        r = up.shape[1]
        u, s, vh = torch.linalg.svd(deltas[module].float().to(up.device) / lora.scale, full_matrices=False)
        s = s[:r]
        keep = s > 1e-6 * float(s[0]) if float(s[0]) > 0 else torch.zeros_like(s, dtype=torch.bool)
        root = s.sqrt()
        up.zero_()
        up[:, keep] = (u[:, :r] * root)[:, keep].to(up)
        down[keep] = (root[:, None] * vh[:r])[keep].to(down)


def stored_task_shared(shared: TaskSharedKnowledge) -> tuple[dict, dict]:
    """R2's state as the library stores it: tensors and metadata."""
    meta = {"rank": str(shared.rank), "modules": json.dumps(shared.modules_), "tasks": json.dumps(shared.tasks)}
    return {k: v.contiguous() for k, v in shared.to_tensors().items()}, meta


def read_task_shared(library) -> TaskSharedKnowledge | None:
    """R2's state as the library stores it, or None before the first task."""
    stored = library.read_task_shared()
    if stored is None:
        return None
    tensors, meta = stored
    return TaskSharedKnowledge.from_tensors(tensors, json.loads(meta["modules"]), json.loads(meta["tasks"]),
                                            int(meta["rank"]))
