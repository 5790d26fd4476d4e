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
    terms = []
    for old in past:
        for module, a_g in current.up.items():
            a_i = old.up[module].to(a_g)
            overlap = (a_i @ a_g.T if form == "literal" else a_i.T @ a_g).abs()  # (out, out) | (r, r)
            terms.append(overlap.sum() if reduction == "sum" else overlap.mean())
    if not terms:
        return next(iter(current.up.values())).new_zeros(())
    total = torch.stack(terms)
    return total.sum() if reduction == "sum" else total.mean()


def _key(module: str) -> str:
    return re.sub(r"\W", "_", module)


class TaskSharedKnowledge(nn.Module):
    """R2's H_i and W_* (Eqs. 2, 6, 7) in a factored form whose memory does not grow with a×a or a×b.

    The paper's W_*^l ∈ R^{a×b} is kept as U·Vᵀ (U: a×k, V: b×k) and each H_i^l ∈ R^{a×a} as P_i·Q_iᵀ (a×k each),
    so H_i W_* = P_i (Q_iᵀU) Vᵀ, rank ≤ k. ‖ΔW_i − H_i W_*‖²_F is then computed from r×k and k×k products without
    forming any a×b matrix: memory per layer (a+b)·k shared + 2·a·k per task (SD-1.5, k = 16, 64 modules: about
    1.3 M floats shared + 1.3 M per task, against 1.6 G for ten literal a×a H's), time O((a+b)(r+k)²) per term.
    """

    def __init__(self, rank: int = 16):
        super().__init__()
        self.rank = rank
        self.U, self.V = nn.ParameterDict(), nn.ParameterDict()  # module -> W_* factors
        self.P, self.Q = nn.ModuleDict(), nn.ModuleDict()  # task -> ParameterDict(module -> H_i factors)
        self.modules_: list[str] = []

    @property
    def tasks(self) -> list[str]:
        return list(self.P)

    def initialise(self, name: str, first: LoRAWeights, generator: torch.Generator | None = None) -> None:
        """W_* from the first task's ΔW (its SVD, padded to rank k), and H_1 = U·Uᵀ so that H_1 W_* = ΔW_1."""
        self.modules_ = first.modules
        P, Q = nn.ParameterDict(), nn.ParameterDict()
        for module in self.modules_:
            delta = first.delta(module).detach().float()  # (a, b)
            a, b = delta.shape
            k = min(self.rank, a, b)
            u, s, _ = torch.linalg.svd(delta, full_matrices=False)
            r = min(k, int((s > 1e-8 * max(float(s[0]), 1e-30)).sum()))
            pad = torch.randn(a, k - r, generator=generator)
            U = torch.linalg.qr(torch.cat([u[:, :r], pad], 1))[0][:, :k]  # orthonormal, spans ΔW_1's columns
            V = delta.T @ U  # then U Vᵀ = U Uᵀ ΔW_1 = ΔW_1
            self.U[_key(module)] = nn.Parameter(U)
            self.V[_key(module)] = nn.Parameter(V)
            P[_key(module)] = nn.Parameter(U.clone())
            Q[_key(module)] = nn.Parameter(U.clone())
        self.P[name], self.Q[name] = P, Q

    def add_task(self, name: str) -> None:
        """H_g starts at 0 (P_g = 0, Q_g = U): at first R2 only asks the new ΔW_g to be small."""
        P, Q = nn.ParameterDict(), nn.ParameterDict()
        for module in self.modules_:
            U = self.U[_key(module)]
            P[_key(module)] = nn.Parameter(torch.zeros_like(U))
            Q[_key(module)] = nn.Parameter(U.detach().clone())
        self.P[name], self.Q[name] = P, Q

    def remove_task(self, name: str) -> None:
        del self.P[name]
        del self.Q[name]

    def task_shared_loss(self, name: str, lora: LoRAWeights) -> torch.Tensor:
        # Eq. 2, R2 = Σ_l ‖ΔW_i^l − H_i^l W_*^l‖²_F for task i = `name`, from factors only
        total = 0.0
        for module in self.modules_:
            k = _key(module)
            A, B, s = lora.up[module].float(), lora.down[module].float(), lora.scale  # (a, r), (r, b)
            U, V, P, Q = self.U[k], self.V[k], self.P[name][k], self.Q[name][k]
            M = Q.T @ U  # (k, k): H_i W_* = P M Vᵀ
            delta_sq = s * s * torch.trace((A.T @ A) @ (B @ B.T))  # ‖sAB‖²
            cross = s * torch.trace((A.T @ P) @ M @ (V.T @ B.T))  # ⟨sAB, P M Vᵀ⟩
            fit_sq = torch.trace(M.T @ (P.T @ P) @ M @ (V.T @ V))  # ‖P M Vᵀ‖²
            total = total + delta_sq - 2 * cross + fit_sq
        return total

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors: `U.<m>`, `V.<m>`, `P.<task>.<m>`, `Q.<task>.<m>`."""
        out = {f"U.{k}": p.detach().cpu() for k, p in self.U.items()}
        out.update({f"V.{k}": p.detach().cpu() for k, p in self.V.items()})
        for task in self.tasks:
            out.update({f"P.{task}.{k}": p.detach().cpu() for k, p in self.P[task].items()})
            out.update({f"Q.{task}.{k}": p.detach().cpu() for k, p in self.Q[task].items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], modules: list[str], tasks: list[str],
                     rank: int) -> "TaskSharedKnowledge":
        shared = cls(rank)
        shared.modules_ = list(modules)
        for module in modules:
            k = _key(module)
            shared.U[k] = nn.Parameter(tensors[f"U.{k}"].float())
            shared.V[k] = nn.Parameter(tensors[f"V.{k}"].float())
        for task in tasks:
            shared.P[task] = nn.ParameterDict({_key(m): nn.Parameter(tensors[f"P.{task}.{_key(m)}"].float())
                                               for m in modules})
            shared.Q[task] = nn.ParameterDict({_key(m): nn.Parameter(tensors[f"Q.{task}.{_key(m)}"].float())
                                               for m in modules})
        return shared

    def dense_h_w(self, name: str, module: str) -> torch.Tensor:
        """H_i W_* as a dense (a × b) matrix, for tests and inspection."""
        k = _key(module)
        return self.P[name][k] @ (self.Q[name][k].T @ self.U[k]) @ self.V[k].T
