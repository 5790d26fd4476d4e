"""Learning one task (one concept) with CIDM's concept consolidation loss (Eq. 2 and Algorithm 1, Dong et al. 2024).

Task g trains a fresh LoRA on the frozen base weights θ0 and the concept's layer-wise tokens; the base UNet, VAE and
text encoder stay frozen. Each batch: (1) tokens and ΔW_g descend diffusion + γ1·R1 + γ2·R2 with H, W_* fixed;
(2) H_i and W_* descend R2 with the tokens and ΔW_g fixed (Eq. 7, as descent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import zlib
from pathlib import Path
from typing import Callable

import torch

from . import lora as lora_lib
from .attention import install_processors
from .ewa import merged
from .images import Augment
from .losses import TaskSharedKnowledge, diffusion_loss, orthogonal_subspace_loss
from .models import precision_context

OBJECT_TEMPLATES = ("a photo of a {}", "a close-up photo of a {}", "a picture of a {}", "a photo of the {}")
STYLE_TEMPLATES = ("a picture in {} style", "a photo in {} style", "a painting in {} style", "an image in {} style")


@dataclasses.dataclass
class TaskConfig:
    """Settings of one task; saved verbatim with the concept. Defaults follow the paper (§5.1, A.3)."""

    name: str
    class_word: str
    kind: str = "object"  # object | style
    steps: int = 800  # paper: 800 per task
    batch_size: int = 1  # paper/code: 1 per GPU
    rank: int = 4  # LoRA rank r (paper follows Mix-of-Show, r = 4)
    lr_lora: float = 1e-4  # UNet LoRA learning rate
    lr_embedding: float = 1e-3  # layer-wise token learning rate
    gamma1: float = 0.1  # R1 weight, §4.1
    gamma2: float = 1.0  # R2 weight, §4.1
    r1_reduction: str = "sum"  # "sum" (paper Eq. 2) | "mean" (official code)
    r1_form: str = "literal"  # "literal" |A_i A_gᵀ| (paper and code) | "subspace" |A_iᵀ A_g| (see losses.py)
    use_r1: bool = True  # ablation switch (cidm-no-r1)
    use_r2: bool = True  # ablation switch (cidm-no-r2)
    r2_rank: int = 16  # k of the factored W_* = U Vᵀ and H_i = P Qᵀ (see losses.TaskSharedKnowledge)
    r2_lr: float = 1e-3  # step-2 learning rate for H and W_*
    n_slots: int = 2  # tokens per concept (`<dog1> <dog2>` in the official code)
    sigma: float = 0.013  # std of the random first token (code: 0.011–0.020 by task)
    emb_norm_ratio: float = 1.4  # stop token updates at this × the vocabulary's mean norm (SD-1.5: 0.55)
    noise_offset: float = 0.01  # official code
    hflip: float = 0.5  # augmentation: horizontal flip probability
    grad_clip: float = 1.0
    seed: int = 0
    # switches used by the baselines (cidm/methods.py); CIDM leaves them at these defaults
    lora_targets: str = lora_lib.LORA_TARGETS  # C-LoRA: K and V only
    token_init: str = "class+noise"  # first slot: class word + N(0, σ²); "class": N(0, σ²) as the official code;
    # "random": every slot random (C-LoRA). Other slots: the class word
    train_on_merged_past: bool = False  # C-LoRA: W = W0 + Σ_past ΔW + ΔW_g while training
    clora_lambda: float = 0.0  # C-LoRA self-regularisation weight (0: off)
    init_from_previous: bool = False  # Finetuning: the new LoRA starts from the previous task's
    ewc_lambda: float = 0.0  # EWC: weight of Σ F̂ (θ − θ*)², F̂ the cumulative diagonal Fisher / its mean (0: off)
    fisher_batches: int = 16  # EWC: batches used to estimate this task's diagonal Fisher
    lwf_lambda: float = 0.0  # LwF: weight of the distillation from the previous task's model (0: off)
    lfs_lambda: float = 0.0  # LFS-Diffusion: weight of the distillation along the teacher's trajectory (0: off)
    lfs_trajectory_steps: int = 25  # LFS: sampling steps of one teacher trajectory (DDPM, as the paper's figure)
    lfs_refresh: int = 25  # LFS: a new teacher trajectory every this many training steps
    # GPU memory knobs (no effect on the method): autocast precision, activation recomputation, 8-bit AdamW
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False  # needs bitsandbytes

    def __post_init__(self):
        for field in ("steps", "batch_size", "rank", "n_slots"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:  # 0 steps: saved untrained
                raise ValueError(f"{field} must be a whole number of at least 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be a whole number from 0 to {SEED_MAX}, got {self.seed!r}")
        for field in ("lr_lora", "lr_embedding", "r2_lr", "gamma1", "gamma2"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{field} must be a finite number of at least 0, got {value!r}")


SEED_MAX = 2 ** 63 - 1  # seeds go to torch.Generator.manual_seed


@dataclasses.dataclass
class TaskResult:
    name: str
    steps_done: int
    seconds: float
    cancelled: bool
    final_terms: dict
    token_rows: torch.Tensor
    fisher: dict | None = None  # EWC: cumulative diagonal Fisher of the LoRA parameters, "<module>.up|down"


def get_lr(step: int, total: int) -> float:
    # linear decay to 0 over the task, no warm-up (official code's `get_scheduler('linear')`)
    return max(0.0, 1.0 - step / max(1, total))


def captions_for(config: TaskConfig, n_images: int, captions: list[str] | None) -> list[str]:
    """Each image's caption with `<name>`; without captions, the paper's templates (objects / styles)."""
    if captions is not None:
        if len(captions) != n_images:
            raise ValueError(f"{len(captions)} captions for {n_images} images; give one caption per image or none")
        missing = [c for c in captions if f"<{config.name}>" not in c]
        if missing:
            raise ValueError(f"caption {missing[0]!r} does not name <{config.name}>; every caption must")
        return list(captions)
    templates = STYLE_TEMPLATES if config.kind == "style" else OBJECT_TEMPLATES
    return [templates[i % len(templates)].format(f"<{config.name}>") for i in range(n_images)]


def learn_task(pipe, tokens, config: TaskConfig, images: torch.Tensor, out_dir: Path,
               past: dict[str, lora_lib.LoRAWeights] | None = None, shared: TaskSharedKnowledge | None = None,
               captions: list[str] | None = None, progress: Callable[[int, dict], None] | None = None,
               cancel: Callable[[], bool] | None = None, fisher: dict | None = None) -> TaskResult:
    """Learn one concept from `images` (N, 3, H, W) in [-1, 1]; writes its LoRA into `out_dir`.

    `past` are the earlier tasks' LoRAs by name (for R1); `shared` holds R2's H_i and W_* and is updated in place.
    """
    past = dict(past or {})
    unet, vae, scheduler = pipe.unet, pipe.vae, pipe.scheduler
    device = unet.device
    rank, world = data_parallel()
    generator = torch.Generator().manual_seed(config.seed + 7919 * rank)  # data parallel: each process its batches
    torch.manual_seed(config.seed)  # the same LoRA initialisation in every process
    captions = captions_for(config, len(images), captions)
    autocast = precision_context(config.mixed_precision, device)  # bad settings fail here, before any change
    adamw = optimizer_class(config.use_8bit_adam)
    for module in (unet, vae, *(getattr(pipe, enc) for _, enc in tokens.towers)):
        module.requires_grad_(False)
    from diffusers import DDPMScheduler
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)

    # 1. New task learner: layer-wise tokens and a fresh LoRA from θ0; the random first token is seeded by the name
    #    too, so that two concepts never start from the same vector
    init_generator = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(config.name.encode()))
    rows = tokens.initial_rows(config.class_word, config.n_slots, config.sigma, init_generator,
                               first="random" if config.token_init == "class" else "class+noise")
    if config.token_init == "random":
        rows = torch.randn(rows.shape, generator=init_generator) * config.sigma
    tokens.add(config.name, rows)
    token_rows = tokens.rows(config.name)
    token_rows.requires_grad_(True)
    lora_lib.add_task_lora(unet, config.name, config.rank, config.lora_targets)
    for p in unet.parameters():  # fp32 master weights of the LoRA, also on an fp16 base
        if p.requires_grad:
            p.data = p.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    layers = install_processors(unet)
    current = lora_lib.live_weights(unet, config.name)
    if config.init_from_previous and past:
        previous = list(past.values())[-1]
        with torch.no_grad():
            for module in current.modules:
                current.up[module].copy_(previous.up[module])
                current.down[module].copy_(previous.down[module])
    past_sum = {}  # C-LoRA: Σ_past ΔW per module
    if config.clora_lambda > 0 and past:
        past_sum = {m: sum(p.delta(m) for p in past.values() if m in p.up).to(device) for m in current.modules}
    ewc_anchor = {}  # EWC: θ* (the previous task's LoRA) and F̂ per parameter
    if config.ewc_lambda > 0 and past and fisher:
        previous = list(past.values())[-1]
        mean_f = torch.cat([f.flatten() for f in fisher.values()]).mean().clamp(min=1e-20)
        ewc_anchor = {(m, part): ((previous.up if part == "up" else previous.down)[m].to(device),
                                  (fisher[f"{m}.{part}"] / mean_f).to(device))
                      for m in current.modules for part in ("up", "down")}
    merged_past = contextlib.nullcontext()
    if config.train_on_merged_past and past:
        merged_past = merged(unet, layers, list(past.values()), torch.ones(len(layers), len(past)))
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = adamw([{"params": lora_params, "lr": config.lr_lora},
                       {"params": [token_rows], "lr": config.lr_embedding}], weight_decay=0.01)
    vocab_norm = tokens.vocab_norm()
    emb_norm_threshold = config.emb_norm_ratio * vocab_norm
    use_r2 = config.use_r2 and shared is not None and bool(shared.tasks)
    if use_r2:
        shared.add_task(config.name)
        shared_optimizer = torch.optim.Adam(shared.parameters(), lr=config.r2_lr, foreach=True)  # many small tensors
    augment = Augment(hflip=config.hflip)
    images = images.to(device, vae.dtype)
    terms, step, t0, cancelled = {}, 0, time.time(), False

    # 2. The loop
    unet.train()
    merged_past.__enter__()  # C-LoRA trains on W0 + Σ_past ΔW; always undone below
    try:
        for step in range(1, config.steps + 1):
            for group, base_lr in zip(optimizer.param_groups, (config.lr_lora, config.lr_embedding)):
                group["lr"] = base_lr * get_lr(step - 1, config.steps)
            idx = torch.randint(0, len(images), (config.batch_size,), generator=generator)
            with torch.no_grad():
                pixels = augment(images[idx].float().cpu(), generator).to(device, vae.dtype)
                latents = vae.encode(pixels).latent_dist.sample(generator=None) * vae.config.scaling_factor
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator).to(noise)
            noise = noise + config.noise_offset * offset
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,),
                              generator=generator)
            noisy = noise_scheduler.add_noise(latents, noise, t.to(device))
            with autocast():  # mixed precision (fp16/bf16) when asked; LoRA and tokens stay fp32
                text = tokens.encode([captions[i] for i in idx.tolist()])  # (B, L, N, D); grads reach the rows
                noise_pred = unet(noisy, t.to(device), encoder_hidden_states=text[:, 0],
                                  cross_attention_kwargs={"layerwise_text": text.to(unet.dtype)}).sample

                # step 1 of Eq. 7: tokens and ΔW_g on the concept consolidation loss (Eq. 2), H and W_* fixed
                diffusion = diffusion_loss(noise_pred, noise)
                r1 = torch.zeros(())
                if config.use_r1 and past:
                    r1 = orthogonal_subspace_loss(current, list(past.values()), config.r1_reduction, config.r1_form)
                r2 = shared.task_shared_loss(config.name, current) if use_r2 else torch.zeros(())
                loss = diffusion + config.gamma1 * r1 + config.gamma2 * r2
                if ewc_anchor:  # EWC: Σ F̂ (θ − θ*)²
                    ewc = sum((f * ((current.up if part == "up" else current.down)[m] - anchor) ** 2).sum()
                              for (m, part), (anchor, f) in ewc_anchor.items())
                    loss = loss + config.ewc_lambda * ewc
                if config.lwf_lambda > 0 and past:  # LwF: match the previous model on an old concept's prompt
                    old = list(past)[int(torch.randint(0, len(past), (1,), generator=generator))]
                    old_text = tokens.encode([OBJECT_TEMPLATES[0].format(f"<{old}>")] * config.batch_size)
                    old_kwargs = {"layerwise_text": old_text.to(unet.dtype)}
                    with torch.no_grad(), previous_model(unet, layers, list(past.values())[-1]):
                        teacher = unet(noisy, t.to(device), encoder_hidden_states=old_text[:, 0],
                                       cross_attention_kwargs=old_kwargs).sample
                    student = unet(noisy, t.to(device), encoder_hidden_states=old_text[:, 0],
                                   cross_attention_kwargs=old_kwargs).sample
                    loss = loss + config.lwf_lambda * diffusion_loss(student, teacher)
                if config.lfs_lambda > 0 and past:  # LFS: student matches the teacher at the teacher's own latents
                    if (step - 1) % config.lfs_refresh == 0:  # alternate the relevant (class) and a previous concept
                        old = list(past)[int(torch.randint(0, len(past), (1,), generator=generator))]
                        kd_prompt = relevant_prompt(config) if (step - 1) // config.lfs_refresh % 2 == 0 else \
                            OBJECT_TEMPLATES[0].format(f"<{old}>")
                        trajectory = teacher_trajectory(unet, layers, list(past.values())[-1], tokens, kd_prompt,
                                                        noise_scheduler, latents.shape, config, generator)
                    k = int(torch.randint(0, len(trajectory["t"]), (1,), generator=generator))
                    kd_text = trajectory["text"]
                    student = unet(trajectory["z"][k], trajectory["t"][k], encoder_hidden_states=kd_text[:, 0],
                                   cross_attention_kwargs={"layerwise_text": kd_text}).sample
                    loss = loss + config.lfs_lambda * diffusion_loss(student, trajectory["eps"][k])
                if past_sum:  # C-LoRA: ‖ |Σ_past ΔW| ⊙ ΔW_g ‖², normalised by the mean square of Σ_past ΔW
                    clora = sum(((past_sum[m] * current.delta(m)) ** 2).sum()
                                / (past_sum[m] ** 2).mean().clamp(min=1e-12) for m in past_sum)
                    loss = loss + config.clora_lambda * clora
            loss.backward()
            if world > 1:
                average_gradients(lora_params + [token_rows], world)
            torch.nn.utils.clip_grad_norm_(lora_params + [token_rows], config.grad_clip)
            if token_rows.grad is not None and token_rows.detach().norm(dim=-1).mean() >= emb_norm_threshold:
                token_rows.grad = None  # embedding-norm stop (official code: 0.55 on SD-1.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # step 2 of Eq. 7 (as descent; the printed '+' ascends): H_i and W_* on R2, tokens and ΔW_g fixed
            if use_r2:
                frozen = lora_lib.LoRAWeights({m: w.detach() for m, w in current.up.items()},
                                              {m: w.detach() for m, w in current.down.items()}, current.scale)
                learners = {**past, config.name: frozen}
                r2_all = sum(shared.task_shared_loss(name, learners[name]) for name in shared.tasks)
                r2_all.backward()
                shared_optimizer.step()
                shared_optimizer.zero_grad(set_to_none=True)

            terms = {"loss": loss.item(), "diffusion": diffusion.item(), "r1": r1.item(), "r2": r2.item(),
                     "token_norm": float(token_rows.detach().norm(dim=-1).mean())}
            if progress is not None:
                progress(step, terms)
            if cancel is not None and cancel():
                cancelled = True
                break
    except BaseException:  # leave the UNet as it was: no adapter, base weights
        merged_past.__exit__(None, None, None)
        merged_past = contextlib.nullcontext()
        lora_lib.remove_lora(unet)
        install_processors(unet)
        tokens.remove(config.name)
        raise
    finally:
        merged_past.__exit__(None, None, None)

    # 3. Save the task learner, take the LoRA off the UNet (θ0 again)
    unet.eval()
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    if world > 1 and not cancelled:
        check_in_sync(lora_params + [token_rows])
    token_rows.requires_grad_(False)
    new_fisher = None
    if not cancelled and config.ewc_lambda > 0:
        new_fisher = diagonal_fisher(unet, tokens, noise_scheduler, current, images, captions, augment, config,
                                     generator)
        for key, value in (fisher or {}).items():
            new_fisher[key] = new_fisher[key] + value.to(new_fisher[key])
    if not cancelled:
        lora_lib.save_lora(pipe, config.name, out_dir)
    lora_lib.remove_lora(unet)
    install_processors(unet)
    if cancelled:
        tokens.remove(config.name)
    if use_r2 and cancelled:
        shared.remove_task(config.name)
    return TaskResult(config.name, step, time.time() - t0, cancelled, terms, token_rows.detach().cpu().clone(),
                      new_fisher)


def optimizer_class(use_8bit_adam: bool):
    if not use_8bit_adam:
        return functools.partial(torch.optim.AdamW, foreach=True)  # one kernel per step, not one per tensor (CPU)
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ValueError("8-bit Adam needs bitsandbytes: pip install bitsandbytes (GPU), or leave it off") from err
    return bnb.optim.AdamW8bit


def data_parallel() -> tuple[int, int]:
    """(rank, world size) under `accelerate launch` (its process group), (0, 1) in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Data parallel: every process holds the same weights and averages its gradients with the others' (what DDP
    does, here over the few LoRA and token tensors, which live in two modules)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def check_in_sync(params: list[torch.Tensor]) -> None:
    """After data-parallel training every process must hold identical weights; say so loudly if not."""
    import torch.distributed as dist

    local = torch.stack([p.detach().double().sum() for p in params]).cpu()
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("data-parallel processes ended with different weights; report this with your command")


def relevant_prompt(config: TaskConfig) -> str:
    """LFS: a prompt of the concepts relevant to the new one (its class), which fine-tuning on it tends to overwrite."""
    return OBJECT_TEMPLATES[0].format(config.class_word) if config.kind == "object" else "a picture"


@torch.no_grad()
def teacher_trajectory(unet, layers, teacher_lora, tokens, prompt: str, noise_scheduler, shape, config: TaskConfig,
                       generator: torch.Generator, guidance: float = 5.0) -> dict:
    """LFS-Diffusion's data-free distillation targets: the teacher (θ0 + the previous task's LoRA, the current
    adapter off) samples from noise with `prompt`; every step's latent z*_t and conditional ε_teacher(z*_t) are kept.
    No earlier data is stored or replayed: the latents come from the teacher itself."""
    from diffusers import DDPMScheduler

    device, dtype = unet.device, unet.dtype
    sampler = DDPMScheduler.from_config(noise_scheduler.config)
    sampler.set_timesteps(config.lfs_trajectory_steps, device=device)
    text = tokens.encode([prompt] * shape[0]).to(dtype)
    uncond = tokens.encode([""] * shape[0]).to(dtype)
    both = torch.cat([uncond, text])
    z = torch.randn(shape, generator=generator).to(device, dtype) * sampler.init_noise_sigma
    record = {"z": [], "t": [], "eps": [], "text": text}
    was_training = unet.training
    unet.eval()
    try:
        with previous_model(unet, layers, teacher_lora):
            for t in sampler.timesteps:
                eps = unet(torch.cat([z, z]), t, encoder_hidden_states=both[:, 0],
                           cross_attention_kwargs={"layerwise_text": both}).sample
                eps_uncond, eps_cond = eps.chunk(2)
                record["z"].append(z)
                record["t"].append(t.expand(shape[0]))
                record["eps"].append(eps_cond)
                z = sampler.step(eps_uncond + guidance * (eps_cond - eps_uncond), t, z, generator=generator).prev_sample
    finally:
        unet.train(was_training)
    return record


@contextlib.contextmanager
def previous_model(unet, layers, lora: lora_lib.LoRAWeights):
    """The model before this task, as LwF's and LFS's teacher: θ0 + the previous task's LoRA merged in, the
    current task's adapter off; all undone on exit."""
    unet.disable_adapters()
    try:
        with merged(unet, layers, [lora], torch.ones(len(layers), 1)):
            yield
    finally:
        unet.enable_adapters()


def diagonal_fisher(unet, tokens, noise_scheduler, current, images, captions, augment, config, generator) -> dict:
    """EWC's diagonal Fisher of the LoRA parameters: mean squared gradient of the diffusion loss on the task."""
    vae = tokens.pipe.vae
    device = unet.device
    params = {f"{m}.{part}": (current.up if part == "up" else current.down)[m]
              for m in current.modules for part in ("up", "down")}
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    for _ in range(config.fisher_batches):
        idx = torch.randint(0, len(images), (1,), generator=generator)
        with torch.no_grad():
            pixels = augment(images[idx].float().cpu(), generator).to(device, vae.dtype)
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            text = tokens.encode([captions[idx.item()]])
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=generator).to(device)
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text[:, 0],
                    cross_attention_kwargs={"layerwise_text": text}).sample
        grads = torch.autograd.grad(diffusion_loss(pred, noise), list(params.values()))
        for k, g in zip(params, grads):
            total[k] += g.detach() ** 2 / config.fisher_batches
    return {k: v.cpu() for k, v in total.items()}


def assert_finite(terms: dict) -> None:
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"training diverged: {bad}; lower the learning rates or the steps")
