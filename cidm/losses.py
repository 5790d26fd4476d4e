"""Losses of CIDM's concept consolidation (Eqs. 1, 2, 6, 7 of Dong et al., NeurIPS 2024).

Shapes: paper A (out×r) is peft `lora_B`, paper B (r×in) is peft `lora_A`; ΔW = s·A·B (s = alpha/r).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRAWeights


def diffusion_loss(noise_pred: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    # Eq. 1: E‖ε − ε_θ(z_t | c, t)‖²
    return F.mse_loss(noise_pred.float(), noise.float())


def same_shape_groups(shapes: dict[str, tuple]) -> dict[str, list[str]]:
    """Modules whose tensors have the same shapes, in order: R1 and R2 batch over each group at once (one matmul per
    group instead of one per module and task; the per-step cost of consolidation then hardly grows with the tasks)."""
    groups: dict[str, list[str]] = {}
    for module, shape in shapes.items():
        groups.setdefault("g" + "x".join(str(d) for d in shape), []).append(module)
    return groups


def stacked(tensors: dict[str, torch.Tensor], modules: list[str]) -> torch.Tensor:
    return torch.stack([tensors[m] for m in modules])


def delta_groups(lora: LoRAWeights) -> dict[str, list[str]]:
    """A LoRA's modules grouped by the shape (a, b) of their ΔW, as R2's state groups them."""
    return same_shape_groups({m: (lora.up[m].shape[0], lora.down[m].shape[-1]) for m in lora.modules})


@dataclasses.dataclass
class GroupedLoRA:
    """One LoRA's factors stacked per group of same-shaped modules (`delta_groups`). R1 and R2 read the past tasks'
    factors at every step; stacked once per task, they cost one matmul per group and nothing to gather."""

    up: dict[str, torch.Tensor]  # group -> (M, a, r): the paper's A
    down: dict[str, torch.Tensor]  # group -> (M, r, b): the paper's B
    scale: float
    groups: dict[str, list[str]]  # group -> its modules, in order

    @classmethod
    def of(cls, lora: "LoRAWeights | GroupedLoRA", groups: dict[str, list[str]] | None = None) -> "GroupedLoRA":
        if isinstance(lora, cls):
            return lora
        groups = delta_groups(lora) if groups is None else groups
        return cls({g: stacked(lora.up, ms) for g, ms in groups.items()},
                   {g: stacked(lora.down, ms) for g, ms in groups.items()}, lora.scale, groups)

    @property
    def rank(self) -> int:
        return next(iter(self.up.values())).shape[-1]


R1_CHUNK = 1 << 24  # elements of |A_i A_gᵀ| formed at once (SD-1.5's 1280-wide layers: one past task at a time)


def orthogonal_subspace_loss(current: LoRAWeights | GroupedLoRA, past: list[LoRAWeights | GroupedLoRA],
                             reduction: str = "sum", form: str = "literal") -> torch.Tensor:
    # Eq. 2, R1 = Σ_i Σ_l |A_i^l (A_g^l)ᵀ|: earlier tasks' concept subspaces stay orthogonal to the new one
    """`reduction="sum"` is the paper's; `"mean"` is the official code's (mean |·| per pair, averaged over pairs).

    form="literal": |A_i A_gᵀ| (out×out), as printed in the paper and computed by the official code. It contracts the
    rank index, so it is NOT zero for orthogonal column spaces; for full-rank r×r factors it vanishes only at A_g = 0.
    form="subspace": |A_iᵀ A_g| (r×r), the inner products between the two concept subspaces' bases, which is zero
    exactly when the subspaces are orthogonal (what the text says R1 does). DEVIATION option; see README.
    """
    if form not in ("literal", "subspace"):
        raise ValueError(f"R1 form must be 'literal' or 'subspace', got {form!r}")
    current = GroupedLoRA.of(current)
    if not past:
        return next(iter(current.up.values())).new_zeros(())
    past = [GroupedLoRA.of(old, current.groups) for old in past]
    terms = []  # one |·| sum (or mean) per (past task, module)
    for group, a_g in current.up.items():  # a_g: (M, out, r)
        a_past = torch.stack([old.up[group] for old in past]).to(a_g).detach()  # (T, M, out, r), fixed
        size = a_g.shape[1] ** 2 if form == "literal" else a_g.shape[2] ** 2
        for a_i in a_past.split(max(1, R1_CHUNK // (a_g.shape[0] * size))):
            sums = (AbsOverlapSum.apply(a_i, a_g) if form == "literal"
                    else (a_i.mT @ a_g).abs().sum((-2, -1)))  # (t, M): Σ|A_i A_gᵀ| | Σ|A_iᵀ A_g|
            terms.append(sums if reduction == "sum" else sums / size)
    total = torch.cat([t.flatten() for t in terms])
    return total.sum() if reduction == "sum" else total.mean()


class AbsOverlapSum(torch.autograd.Function):
    """Σ|A_i A_gᵀ| over each (out × out) product, A_i fixed. The gradient, sign(A_i A_gᵀ)ᵀ A_i, needs only the sign,
    kept in the product's own buffer: R1's largest tensor (T·M·out²) then makes fewer passes through memory than
    with autograd's abs and sum (at task 10 on the embedded world: 1.8 ms a step instead of 2.5)."""

    @staticmethod
    def forward(ctx, a_past: torch.Tensor, a_g: torch.Tensor) -> torch.Tensor:  # (t, M, out, r), (M, out, r)
        product = a_past @ a_g.mT
        sums = product.abs().sum((-2, -1))  # (t, M)
        ctx.save_for_backward(a_past, product.sign_())
        return sums

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: (t, M)
        a_past, sign = ctx.saved_tensors
        return None, (sign.mT @ (a_past * grad[..., None, None])).sum(0)


class TaskSharedKnowledge(nn.Module):
    """R2's H_i and W_* (Eqs. 2, 6, 7) in a factored form whose memory does not grow with a×a or a×b.

    The paper's W_*^l ∈ R^{a×b} is kept as U·Vᵀ (U: a×k, V: b×k) and each H_i^l ∈ R^{a×a} as P_i·Q_iᵀ (a×k each),
    so H_i W_* = P_i (Q_iᵀU) Vᵀ, rank ≤ k. ‖ΔW_i − H_i W_*‖²_F is then computed from r×k and k×k products without
    forming any a×b matrix: memory per layer (a+b)·k shared + 2·a·k per task (SD-1.5, k = 16, 64 modules: about
    1.3 M floats shared + 1.3 M per task, against 1.6 G for ten literal a×a H's), time O((a+b)(r+k)²) per term.
    Modules of one shape are stacked (`groups`) and so are the tasks: U is (M, a, k), P is (T, M, a, k) with one row
    per task, so R2 over every task is a few batched matmuls per group and Eq. 7's step 2 updates four tensors per
    group. Saved per module and task (`to_tensors`), as the library stores it.
    """

    def __init__(self, rank: int = 16):
        super().__init__()
        self.rank = rank
        self.U, self.V = nn.ParameterDict(), nn.ParameterDict()  # group -> W_* factors, (M, a, k) and (M, b, k)
        self.P, self.Q = nn.ParameterDict(), nn.ParameterDict()  # group -> H_i factors, (T, M, a, k), row i = task i
        self._tasks: list[str] = []
        self.modules_: list[str] = []
        self.groups: dict[str, list[str]] = {}  # group -> its modules, in order

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def device(self) -> torch.device:
        return next(iter(self.U.values())).device

    def _set_modules(self, shapes: dict[str, tuple]) -> None:
        self.modules_ = list(shapes)
        self.groups = same_shape_groups(shapes)

    def initialise(self, name: str, first: LoRAWeights, generator: torch.Generator | None = None) -> None:
        """W_* from the first task's ΔW (its SVD, padded to rank k), and H_1 = U·Uᵀ so that H_1 W_* = ΔW_1."""
        deltas = {m: first.delta(m).detach().float() for m in first.modules}  # (a, b) each
        self._set_modules({m: tuple(d.shape) for m, d in deltas.items()})
        U, V = {}, {}
        for module, delta in deltas.items():
            a, b = delta.shape
            k = min(self.rank, a, b)
            u, s, _ = torch.linalg.svd(delta, full_matrices=False)
            r = min(k, int((s > 1e-8 * max(float(s[0]), 1e-30)).sum()))
            pad = torch.randn(a, k - r, generator=generator)
            U[module] = torch.linalg.qr(torch.cat([u[:, :r], pad], 1))[0][:, :k]  # orthonormal, spans ΔW_1's columns
            V[module] = delta.T @ U[module]  # then U Vᵀ = U Uᵀ ΔW_1 = ΔW_1
        for group, modules in self.groups.items():
            self.U[group] = nn.Parameter(stacked(U, modules))
            self.V[group] = nn.Parameter(stacked(V, modules))
            self.P[group] = nn.Parameter(self.U[group].detach()[None].clone())
            self.Q[group] = nn.Parameter(self.U[group].detach()[None].clone())
        self._tasks = [name]

    def add_task(self, name: str, start: str = "zero") -> None:
        """start="zero": H_g starts at 0 (P_g = 0, Q_g = U), so at first R2 only asks the new ΔW_g to be small.
        start="mean": H_g W_* starts at the earlier tasks' mean H_i W_* (the task-shared knowledge, see
        `shared_delta`); Q_g = U and P_g = mean_i(P_i Q_iᵀU) (UᵀU)⁺, so P_g Q_gᵀU is that mean exactly.
        A task of that name already here is replaced (and moves to the end)."""
        if start not in ("zero", "mean"):
            raise ValueError(f"H_g starts at 'zero' or 'mean', got {start!r}")
        if name in self._tasks:
            self.remove_task(name)
        factors = {}
        for g, U in self.U.items():
            U = U.detach()
            P = torch.zeros_like(U)
            if start == "mean" and self._tasks:
                mean_pm = (self.P[g].detach() @ (self.Q[g].detach().mT @ U)).mean(0)
                P = mean_pm @ torch.linalg.pinv(U.mT @ U)
            factors[g] = (P, U.clone())
        self.put_task(name, factors)

    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Task `name`'s H factors by group: (P_i, Q_i), each (M, a, k), views of the stacked parameters."""
        i = self._tasks.index(name)
        return {g: (self.P[g][i], self.Q[g][i]) for g in self.groups}

    def put_task(self, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add task `name` with the H factors `factors` (as `factors` gives them) as the last row. The stacked
        parameters are new tensors: an optimizer over the old ones must be made again."""
        if name in self._tasks:
            raise ValueError(f"task {name!r} is already in R2's state")
        for g in self.groups:
            P, Q = (f.detach().to(self.U[g]) for f in factors[g])
            self.P[g] = nn.Parameter(torch.cat([self.P[g].detach(), P[None]]))
            self.Q[g] = nn.Parameter(torch.cat([self.Q[g].detach(), Q[None]]))
        self._tasks.append(name)

    def remove_task(self, name: str) -> None:
        i = self._tasks.index(name)
        for g in self.groups:
            self.P[g] = nn.Parameter(torch.cat([self.P[g].detach()[:i], self.P[g].detach()[i + 1:]]))
            self.Q[g] = nn.Parameter(torch.cat([self.Q[g].detach()[:i], self.Q[g].detach()[i + 1:]]))
        del self._tasks[i]

    @torch.no_grad()
    def shared_delta(self, name: str) -> dict[str, torch.Tensor]:
        """H_i W_* for task `name`, as a dense (a × b) matrix per module."""
        out = {}
        for group, (P, Q) in self.factors(name).items():
            U, V = self.U[group], self.V[group]
            out.update(zip(self.groups[group], P @ (Q.mT @ U) @ V.mT))
        return out

    def task_shared_loss(self, name: str, lora: LoRAWeights | GroupedLoRA) -> torch.Tensor:
        # Eq. 2, R2 = Σ_l ‖ΔW_i^l − H_i^l W_*^l‖²_F for task i = `name`, from factors only
        return self.task_shared_loss_sum({name: lora})

    def task_shared_loss_sum(self, loras: dict[str, LoRAWeights | GroupedLoRA]) -> torch.Tensor:
        """Σ_i R2(task i) over `loras` (task name -> its LoRA), batched over the tasks of one LoRA rank and scale."""
        grouped = {name: GroupedLoRA.of(lora, self.groups) for name, lora in loras.items()}
        by_form: dict[tuple, list[str]] = {}
        for name, lora in grouped.items():
            by_form.setdefault((lora.rank, lora.scale), []).append(name)
        total = 0.0
        for (_, s), names in by_form.items():
            rows = [self._tasks.index(n) for n in names]
            every = rows == list(range(len(self._tasks)))  # all tasks in order: the parameters as they are
            for group in self.groups:
                A = torch.stack([grouped[n].up[group] for n in names]).float()  # (T, M, a, r)
                B = torch.stack([grouped[n].down[group] for n in names]).float()  # (T, M, r, b)
                P, Q = (self.P[group], self.Q[group]) if every else (self.P[group][rows], self.Q[group][rows])
                total = total + self._residual_sq(A, B, s, self.U[group], self.V[group], P, Q)
        return total

    @staticmethod
    def _residual_sq(A, B, s, U, V, P, Q) -> torch.Tensor:
        # ‖sAB − P M Vᵀ‖²_F with M = QᵀU, summed over the batch, from r×k and k×k products (⟨X, Y⟩ = Σ X ⊙ Y)
        M = Q.mT @ U  # (T, M, k, k): H_i W_* = P M Vᵀ
        delta_sq = s * s * ((A.mT @ A) * (B @ B.mT)).sum()  # ‖sAB‖² = ⟨AᵀA, BBᵀ⟩, both symmetric
        cross = s * (((A.mT @ P) @ M) * (B @ V)).sum()  # ⟨sAB, P M Vᵀ⟩ = tr(Aᵀ P M Vᵀ Bᵀ)
        fit_sq = (((P.mT @ P) @ M) * (M @ (V.mT @ V))).sum()  # ‖P M Vᵀ‖² = tr(Mᵀ PᵀP M VᵀV)
        return delta_sq - 2 * cross + fit_sq

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors, one per module: `U.<m>`, `V.<m>`, `P.<task>.<m>`, `Q.<task>.<m>`."""
        out = {}
        for group, modules in self.groups.items():
            for j, m in enumerate(modules):
                out[f"U.{_key(m)}"] = self.U[group][j].detach().cpu()
                out[f"V.{_key(m)}"] = self.V[group][j].detach().cpu()
                for i, task in enumerate(self._tasks):
                    out[f"P.{task}.{_key(m)}"] = self.P[group][i, j].detach().cpu()
                    out[f"Q.{task}.{_key(m)}"] = self.Q[group][i, j].detach().cpu()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], modules: list[str], tasks: list[str],
                     rank: int) -> "TaskSharedKnowledge":
        shared = cls(rank)
        shared._set_modules({m: (len(tensors[f"U.{_key(m)}"]), len(tensors[f"V.{_key(m)}"])) for m in modules})

        def stack(prefix: str, group: list[str]) -> torch.Tensor:
            return torch.stack([tensors[f"{prefix}.{_key(m)}"].float() for m in group])

        for group, members in shared.groups.items():
            shared.U[group], shared.V[group] = nn.Parameter(stack("U", members)), nn.Parameter(stack("V", members))
            shared.P[group] = nn.Parameter(shared.U[group].detach().new_zeros((0, *shared.U[group].shape)))
            shared.Q[group] = nn.Parameter(shared.P[group].detach().clone())
        for task in tasks:
            shared.put_task(task, {g: (stack(f"P.{task}", ms), stack(f"Q.{task}", ms))
                                   for g, ms in shared.groups.items()})
        return shared


def _key(module: str) -> str:
    return re.sub(r"\W", "_", module)
