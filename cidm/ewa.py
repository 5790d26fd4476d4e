"""Elastic weight aggregation (EWA, Eq. 3 of Dong et al., NeurIPS 2024): merge every task's LoRA per layer by how
much the prompt resembles each task's concept tokens. Nothing is learned; the weights depend only on the prompt, so
they are computed and merged once per prompt, not per denoising step.
"""

from __future__ import annotations

import contextlib

import torch

from .lora import LoRAWeights

PSI = ("paper", "code", "sharp")  # EWA's weightings ψ(M), see elastic_weights


def elastic_weights(c_hat: torch.Tensor, e_hat, psi: str = "paper") -> torch.Tensor:
    # Eq. 3: M = max_rows(ĉ^l ê^lᵀ), weights ψ(M)
    """Implements Eq. 3 (EWA weights) of Dong et al., NeurIPS 2024.

    c_hat (L, N, D): the prompt's layer-wise embeddings at its N real tokens; e_hat: each task's concept embeddings,
    (T, L, D), or per task its slots (S_t, L, D). A slot's similarity is its best cosine among the prompt tokens; a
    task's M is its slots' average, so a prompt that names a concept scores it exactly 1 (averaging the slots' rows
    first let a look-alike concept outscore it). Returns ψ (L, T). psi="paper": M²/‖M²‖₂; psi="code": 0.8·M⁴/ΣM⁴
    (official code); psi="sharp": M⁸/‖M⁸‖₂, the paper's form at a higher power (DEVIATION option, see README): a
    named concept still scores 1 and two named ones 0.71 each, but a look-alike at M = 0.6 keeps 0.02 instead of
    0.36. Similarities are cosines (as in the official code); negative ones count as 0.
    """
    c = torch.nn.functional.normalize(c_hat.float(), dim=-1)  # (L, N, D)
    tasks = [e[None] if e.dim() == 2 else e for e in e_hat]  # per task (S, L, D)
    M = torch.stack([torch.einsum("lnd,sld->lns", c, torch.nn.functional.normalize(e.float(), dim=-1))
                     .amax(dim=1).mean(dim=-1) for e in tasks], dim=-1).clamp(min=0)  # (L, T)
    if psi in ("paper", "sharp"):
        mp = M ** (2 if psi == "paper" else 8)
        return mp / mp.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    if psi == "code":
        m4 = M ** 4
        return 0.8 * m4 / m4.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    raise ValueError(f"psi must be one of {', '.join(PSI)}, got {psi!r}")


def prompt_token_embeddings(tokens, prompt: str, space: str = "token") -> torch.Tensor:
    """The prompt's layer-wise embeddings at its real tokens (no BOS, EOS or padding): (L, N, D).

    space="token": the input embeddings of the layer-l bound prompt (the rows the text encoder reads);
    space="encoded": the text encoder's output at those positions (the paper's wording; see README).
    """
    tokenizer = tokens.pipe.tokenizer
    n_real = len(tokenizer(tokens.bind(prompt, 0)).input_ids)  # BOS … EOS
    if space == "encoded":
        return tokens.encode([prompt])[0][:tokens.n_layers, 1:n_real - 1]
    if space == "token":
        return torch.stack([tokens.input_embeddings(prompt, l) for l in range(tokens.n_layers)])
    raise ValueError(f"EWA space must be 'token' or 'encoded', got {space!r}")


@torch.no_grad()
def ewa_weights(tokens, names: list[str], prompt: str, psi: str = "paper", space: str = "token") -> torch.Tensor:
    """ψ (L, T) for the tasks `names` and a prompt."""
    if not names:
        return torch.zeros(tokens.n_layers, 0)
    e_hat = [tokens.concept_embeddings(n, space) for n in names]  # per task (S, L, D)
    return elastic_weights(prompt_token_embeddings(tokens, prompt, space), e_hat, psi)


def layer_of(module: str) -> str:
    """`...attn2.to_q` / `...attn2.to_out.0` -> `...attn2`."""
    return module.rsplit(".to_", 1)[0]


@contextlib.contextmanager
@torch.no_grad()
def merged(unet, layers: dict[str, int], loras: list[LoRAWeights], weights: torch.Tensor):
    """Within the block, W^l = W0^l + Σ_i ψ_i^l ΔW_i^l (ΔŴ of Eq. 3); afterwards the base weights, bit for bit.

    weights: (L, T), or (B, L, T) with one row per sample of every UNet call in the block (a batch of prompts whose
    EWA weights differ). Equal rows merge into the weights once; differing rows add each sample's Σ_i ψ_i ΔW_i x to
    the projections' outputs instead (peft's mixed-batch inference): the same Eq. 3, per sample.
    """
    if weights.dim() == 3 and not torch.equal(weights, weights[:1].expand_as(weights)):
        with per_sample_deltas(unet, layers, loras, weights):
            yield
        return
    weights = weights[0] if weights.dim() == 3 else weights
    modules = dict(unet.named_modules())
    originals: list[tuple[torch.nn.Module, torch.Tensor]] = []
    try:
        targets = sorted({m for lora in loras for m in lora.modules})
        for module in targets:
            if module not in modules:
                continue
            linear = modules[module]
            linear = getattr(linear, "base_layer", linear)
            l = layers[layer_of(module)]
            delta = sum(w * lora.delta(module) for w, lora in zip(weights[l].tolist(), loras) if module in lora.up)
            new = linear.weight.float() + delta.to(linear.weight.device)
            if not torch.isfinite(new).all():
                raise ValueError(f"NaNs or infs in the merged weights of {module}; a concept's LoRA is corrupt")
            originals.append((linear, linear.weight.data))
            linear.weight.data = new.to(linear.weight.dtype)
        yield
    finally:
        for linear, weight in reversed(originals):  # unmerge last in, first out
            linear.weight.data = weight


@contextlib.contextmanager
def per_sample_deltas(unet, layers: dict[str, int], loras: list[LoRAWeights], weights: torch.Tensor):
    """Forward hooks that add Σ_i ψ_i^l[b] · s_i A_i (B_i x_b) to each LoRA target's output, sample b by sample b:
    two thin matmuls per module (all tasks' B stacked, then all A), the base weights untouched."""
    modules = dict(unet.named_modules())
    handles = []

    def hook_for(module: str, l: int):
        present = [i for i, lora in enumerate(loras) if module in lora.up]
        linear = modules[module]
        device, dtype = linear.weight.device, linear.weight.dtype
        down = torch.cat([loras[i].down[module] for i in present]).to(device, dtype)  # (Σr, in)
        up = torch.cat([loras[i].scale * loras[i].up[module] for i in present], 1).to(device, dtype)  # (out, Σr)
        ranks = [loras[i].down[module].shape[0] for i in present]
        psi = weights[:, l, present].to(device, dtype).repeat_interleave(torch.tensor(ranks), dim=1)  # (B, Σr)

        def hook(_module, inputs, output):
            x = inputs[0]
            if x.shape[0] != psi.shape[0]:
                raise ValueError(f"{module}: a batch of {x.shape[0]} samples, but EWA weights for {psi.shape[0]}")
            h = (x @ down.T) * psi.view(-1, *[1] * (x.dim() - 2), psi.shape[1])
            return output + h @ up.T
        return hook

    try:
        for module in sorted({m for lora in loras for m in lora.modules}):
            if module in modules:
                handles.append(modules[module].register_forward_hook(hook_for(module, layers[layer_of(module)])))
        yield
    finally:
        for handle in handles:
            handle.remove()
