"""Losses of CIDM's concept consolidation (Eqs. 1, 2, 6, 7 of Dong et al., NeurIPS 2024).

Shapes: paper A (out×r) is peft `lora_B`, paper B (r×in) is peft `lora_A`; ΔW = s·A·B (s = alpha/r).
"""

from __future__ import annotations

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


R1_CHUNK = 1 << 24  # elements of |A_i A_gᵀ| formed at once (SD-1.5's 1280-wide layers: one past task at a time)


def orthogonal_subspace_loss(current: LoRAWeights, past: list[LoRAWeights], reduction: str = "sum",
                             form: str = "literal") -> torch.Tensor:
    # Eq. 2, R1 = Σ_i Σ_l |A_i^l (A_g^l)ᵀ|: earlier tasks' concept subspaces stay orthogonal to the new one
    """`reduction="sum"` is the paper's; `"mean"` is the official code's (mean |·| per pair, averaged over pairs).

    form="literal": |A_i A_gᵀ| (out×out), as printed in the paper and computed by the official code. It contracts the
    rank index, so it is NOT zero for orthogonal column spaces; for full-rank r×r factors it vanishes only at A_g = 0.
    form="subspace": |A_iᵀ A_g| (r×r), the inner products between the two concept subspaces' bases, which is zero
    exactly when the subspaces are orthogonal (what the text says R1 does). DEVIATION option; see README.
    """
    if form not in ("literal", "subspace"):
        raise ValueError(f"R1 form must be 'literal' or 'subspace', got {form!r}")
    if not past:
        return next(iter(current.up.values())).new_zeros(())
    terms = []  # one |·| sum (or mean) per (past task, module)
    for modules in same_shape_groups({m: tuple(w.shape) for m, w in current.up.items()}).values():
        a_g = stacked(current.up, modules)  # (M, out, r)
        a_past = torch.stack([stacked(old.up, modules) for old in past]).to(a_g)  # (T, M, out, r)
        per_task = a_g.shape[0] * (a_g.shape[1] ** 2 if form == "literal" else a_g.shape[2] ** 2)
        chunk = max(1, R1_CHUNK // per_task)
        for a_i in a_past.split(chunk):
            overlap = (a_i @ a_g.mT if form == "literal" else a_i.mT @ a_g).abs()  # (t, M, out, out) | (t, M, r, r)
            terms.append(overlap.sum((-2, -1)) if reduction == "sum" else overlap.mean((-2, -1)))
    total = torch.cat([t.flatten() for t in terms])
    return total.sum() if reduction == "sum" else total.mean()


class TaskSharedKnowledge(nn.Module):
    """R2's H_i and W_* (Eqs. 2, 6, 7) in a factored form whose memory does not grow with a×a or a×b.

    The paper's W_*^l ∈ R^{a×b} is kept as U·Vᵀ (U: a×k, V: b×k) and each H_i^l ∈ R^{a×a} as P_i·Q_iᵀ (a×k each),
    so H_i W_* = P_i (Q_iᵀU) Vᵀ, rank ≤ k. ‖ΔW_i − H_i W_*‖²_F is then computed from r×k and k×k products without
    forming any a×b matrix: memory per layer (a+b)·k shared + 2·a·k per task (SD-1.5, k = 16, 64 modules: about
    1.3 M floats shared + 1.3 M per task, against 1.6 G for ten literal a×a H's), time O((a+b)(r+k)²) per term.
    Modules of one shape are stacked (`groups`): the factors are (M, a, k) tensors, and R2 over every task is a few
    batched matmuls per group. Saved per module (`to_tensors`), as the library stores it.
    """

    def __init__(self, rank: int = 16):
        super().__init__()
        self.rank = rank
        self.U, self.V = nn.ParameterDict(), nn.ParameterDict()  # group -> W_* factors, (M, a, k) and (M, b, k)
        self.P, self.Q = nn.ModuleDict(), nn.ModuleDict()  # task -> ParameterDict(group -> H_i factors, (M, a, k))
        self.modules_: list[str] = []
        self.groups: dict[str, list[str]] = {}  # group -> its modules, in order

    @property
    def tasks(self) -> list[str]:
        return list(self.P)

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
        P, Q = nn.ParameterDict(), nn.ParameterDict()
        for group, modules in self.groups.items():
            self.U[group] = nn.Parameter(stacked(U, modules))
            self.V[group] = nn.Parameter(stacked(V, modules))
            P[group] = nn.Parameter(self.U[group].detach().clone())
            Q[group] = nn.Parameter(self.U[group].detach().clone())
        self.P[name], self.Q[name] = P, Q

    def add_task(self, name: str, start: str = "zero") -> None:
        """start="zero": H_g starts at 0 (P_g = 0, Q_g = U), so at first R2 only asks the new ΔW_g to be small.
        start="mean": H_g W_* starts at the earlier tasks' mean H_i W_* (the task-shared knowledge, see
        `shared_delta`); Q_g = U and P_g = mean_i(P_i Q_iᵀU) (UᵀU)⁺, so P_g Q_gᵀU is that mean exactly."""
        if start not in ("zero", "mean"):
            raise ValueError(f"H_g starts at 'zero' or 'mean', got {start!r}")
        past = self.tasks
        P = {}
        for g, U in self.U.items():
            U = U.detach()
            if start == "mean" and past:
                mean_pm = torch.stack([self.P[t][g].detach() @ (self.Q[t][g].detach().mT @ U) for t in past]).mean(0)
                P[g] = mean_pm @ torch.linalg.pinv(U.mT @ U)
            else:
                P[g] = torch.zeros_like(U)
        self.P[name] = nn.ParameterDict({g: nn.Parameter(p) for g, p in P.items()})
        self.Q[name] = nn.ParameterDict({g: nn.Parameter(U.detach().clone()) for g, U in self.U.items()})

    @torch.no_grad()
    def shared_delta(self, name: str) -> dict[str, torch.Tensor]:
        """H_i W_* for task `name`, as a dense (a × b) matrix per module."""
        out = {}
        for group, modules in self.groups.items():
            P, Q, U, V = self.P[name][group], self.Q[name][group], self.U[group], self.V[group]
            for module, d in zip(modules, P @ (Q.mT @ U) @ V.mT):
                out[module] = d
        return out

    def remove_task(self, name: str) -> None:
        del self.P[name]
        del self.Q[name]

    def task_shared_loss(self, name: str, lora: LoRAWeights) -> torch.Tensor:
        # Eq. 2, R2 = Σ_l ‖ΔW_i^l − H_i^l W_*^l‖²_F for task i = `name`, from factors only
        return self.task_shared_loss_sum({name: lora})

    def task_shared_loss_sum(self, loras: dict[str, LoRAWeights]) -> torch.Tensor:
        """Σ_i R2(task i) over `loras` (task name -> its LoRA), batched over tasks of one LoRA rank and scale."""
        by_form: dict[tuple, list[str]] = {}
        for name, lora in loras.items():
            by_form.setdefault((lora.up[self.modules_[0]].shape[-1], lora.scale), []).append(name)
        total = 0.0
        for (_, s), names in by_form.items():
            for group, modules in self.groups.items():
                A = torch.stack([stacked(loras[n].up, modules) for n in names]).float()  # (T, M, a, r)
                B = torch.stack([stacked(loras[n].down, modules) for n in names]).float()  # (T, M, r, b)
                P = torch.stack([self.P[n][group] for n in names])  # (T, M, a, k)
                Q = torch.stack([self.Q[n][group] for n in names])
                total = total + self._residual_sq(A, B, s, self.U[group], self.V[group], P, Q)
        return total

    @staticmethod
    def _residual_sq(A, B, s, U, V, P, Q) -> torch.Tensor:
        # ‖sAB − P M Vᵀ‖²_F with M = QᵀU, summed over the batch; trace(X Y) = Σ X ⊙ Yᵀ
        M = Q.mT @ U  # (T, M, k, k): H_i W_* = P M Vᵀ
        delta_sq = s * s * ((A.mT @ A) * (B @ B.mT).mT).sum()  # ‖sAB‖²
        cross = s * ((A.mT @ P) @ M @ (V.mT @ B.mT)).diagonal(dim1=-2, dim2=-1).sum()  # ⟨sAB, P M Vᵀ⟩
        fit_sq = ((M.mT @ (P.mT @ P) @ M) * (V.mT @ V).mT).sum()  # ‖P M Vᵀ‖²
        return delta_sq - 2 * cross + fit_sq

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors, one per module: `U.<m>`, `V.<m>`, `P.<task>.<m>`, `Q.<task>.<m>`."""
        out = {}
        for group, modules in self.groups.items():
            for i, m in enumerate(modules):
                out[f"U.{_key(m)}"] = self.U[group][i].detach().cpu()
                out[f"V.{_key(m)}"] = self.V[group][i].detach().cpu()
                for task in self.tasks:
                    out[f"P.{task}.{_key(m)}"] = self.P[task][group][i].detach().cpu()
                    out[f"Q.{task}.{_key(m)}"] = self.Q[task][group][i].detach().cpu()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], modules: list[str], tasks: list[str],
                     rank: int) -> "TaskSharedKnowledge":
        shared = cls(rank)
        shared._set_modules({m: (len(tensors[f"U.{_key(m)}"]), len(tensors[f"V.{_key(m)}"])) for m in modules})

        def stack(prefix: str, group: list[str]) -> nn.Parameter:
            return nn.Parameter(torch.stack([tensors[f"{prefix}.{_key(m)}"].float() for m in group]))

        for group, members in shared.groups.items():
            shared.U[group], shared.V[group] = stack("U", members), stack("V", members)
        for task in tasks:
            shared.P[task] = nn.ParameterDict({g: stack(f"P.{task}", ms) for g, ms in shared.groups.items()})
            shared.Q[task] = nn.ParameterDict({g: stack(f"Q.{task}", ms) for g, ms in shared.groups.items()})
        return shared


def _key(module: str) -> str:
    return re.sub(r"\W", "_", module)
