"""Learning one task (one concept): the diffusion loss of Eq. 1 plus what the method adds (`method.loss`).

Task g trains a LoRA (fresh from θ0, or as the method starts it) and the concept's layer-wise tokens; the base UNet,
VAE and text encoder stay frozen. CIDM (cidm/methods/cidm.py) adds γ1·R1 + γ2·R2 (Eq. 2) and, after each step,
Eq. 7's second step on H and W_*. The baselines add their own terms in their own modules (cidm/methods/).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import zlib
from typing import Callable

import torch
import torch.distributed as dist
from diffusers import DDPMScheduler

from . import lora as lora_lib
from .attention import install_processors
from .generate import GenerateConfig, generate
from .images import Augment
from .losses import diffusion_loss
from .models import precision_context
from .sampling import SEED_MAX, encode, predict_noise
from .templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, check_kind, probe_prompt, training_captions

__all__ = ["OBJECT_TEMPLATES", "STYLE_TEMPLATES", "TaskConfig", "TaskResult", "Task", "Batch", "learn_task",
           "preview_images"]

# A preview is one image of 10 sampler steps: on the embedded world (CPU, one thread) 0.29-0.37 s against
# 0.057-0.086 s a learning step (medians, tasks 1 and 2), i.e. 4.4-5.0 steps: one every 50 steps adds 9-10 % to
# learning, less as the library grows (CIDM's steps get longer with every past task, a preview does not).
PREVIEW_EVERY = 50
PREVIEW_STEPS = 10  # DDIM: on the embedded world 10 steps draw what 25 draw


@dataclasses.dataclass
class TaskConfig:
    """Settings of one task; saved verbatim with the concept. Defaults follow the paper (§5.1, A.3). The method's
    own parameters (e.g. CIDM's γ1, γ2) live in its module (cidm/methods/)."""

    name: str
    class_word: str
    kind: str = "object"  # object | style
    steps: int = 800  # paper: 800 per task
    batch_size: int = 1  # paper/code: 1 per GPU
    rank: int = 4  # LoRA rank r (paper follows Mix-of-Show, r = 4)
    lr_lora: float = 1e-4  # UNet LoRA learning rate
    lr_embedding: float = 1e-3  # layer-wise token learning rate
    n_slots: int = 2  # tokens per concept (`<dog1> <dog2>` in the official code)
    sigma: float = 0.013  # std of the random first token (code: 0.011–0.020 by task)
    emb_norm_ratio: float = 1.4  # stop token updates at this × the vocabulary's mean norm (SD-1.5: 0.55)
    noise_offset: float = 0.01  # official code
    hflip: float = 0.5  # augmentation: horizontal flip probability
    grad_clip: float = 1.0
    seed: int = 0
    lora_targets: str = lora_lib.LORA_TARGETS  # which projections get the LoRA (C-LoRA: K and V only)
    token_init: str = "class+noise"  # first slot: class word + N(0, σ²); "class": N(0, σ²) as the official code;
    # "random": every slot random (C-LoRA). Other slots: the class word
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
        for field in ("lr_lora", "lr_embedding"):  # a method's weights are checked by `Method.overridden`
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{field} must be a finite number of at least 0, got {value!r}")


@dataclasses.dataclass
class TaskResult:
    name: str
    steps_done: int
    seconds: float
    cancelled: bool
    final_terms: dict
    token_rows: torch.Tensor
    lora: lora_lib.LoRAWeights | None = None  # the learned ΔW_g (None when cancelled)
    lora_config: dict | None = None  # its peft settings, written with the LoRA file


@dataclasses.dataclass
class Task:
    """What a method sees of the task being learned."""

    config: TaskConfig
    pipe: object
    tokens: object  # ConceptTokens
    layers: dict[str, int]  # cross-attention module -> layer index
    current: lora_lib.LoRAWeights  # ΔW_g: the live, trainable tensors
    past: dict[str, lora_lib.LoRAWeights]  # tasks 1..g-1 by name
    kinds: dict[str, str]  # tasks 1..g-1's kinds (object | style)
    images: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    captions: list[str]
    augment: Augment
    noise_scheduler: DDPMScheduler
    generator: torch.Generator
    context: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)  # undone at task end
    step: int = 0

    def learned(self) -> lora_lib.LoRAWeights:
        """A detached copy of ΔW_g as it stands."""
        up = {m: w.detach().clone() for m, w in self.current.up.items()}
        return lora_lib.LoRAWeights(up, {m: w.detach().clone() for m, w in self.current.down.items()},
                                    self.current.scale)


@dataclasses.dataclass
class Batch:
    idx: torch.Tensor  # which images
    latents: torch.Tensor  # z_0
    noise: torch.Tensor  # ε
    t: torch.Tensor
    noisy: torch.Tensor  # z_t


def get_lr(step: int, total: int) -> float:
    # linear decay to 0 over the task, no warm-up (official code's `get_scheduler('linear')`)
    return max(0.0, 1.0 - step / max(1, total))


def captions_for(config: TaskConfig, n_images: int, captions: list[str] | None) -> list[str]:
    """Each image's caption with `<name>`; without captions, the paper's templates (objects / styles)."""
    check_kind(config.kind)
    if captions is None:
        return training_captions(config.name, config.kind, n_images)
    if len(captions) != n_images:
        raise ValueError(f"{len(captions)} captions for {n_images} images; give one caption per image or none")
    missing = [c for c in captions if f"<{config.name}>" not in c]
    if missing:
        raise ValueError(f"caption {missing[0]!r} does not name <{config.name}>; every caption must")
    return list(captions)


def noised_batch(task: Task, batch_size: int, noise_offset: float | None = None) -> Batch:
    # Eq. 1's input: z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε for augmented images of the concept and a random t
    vae, device, g = task.pipe.vae, task.pipe.unet.device, task.generator
    idx = torch.randint(0, len(task.images), (batch_size,), generator=g)
    with torch.no_grad():
        pixels = task.augment(task.images[idx].float().cpu(), g).to(device, vae.dtype)
        latents = encode(vae, pixels)
    noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
    if noise_offset is not None:
        noise = noise + noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g).to(noise)
    t = torch.randint(0, task.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=g).to(device)
    return Batch(idx, latents, noise, t, task.noise_scheduler.add_noise(latents, noise, t))


def learn_task(pipe, tokens, config: TaskConfig, method, images: torch.Tensor,
               past: dict[str, lora_lib.LoRAWeights] | None = None, kinds: dict[str, str] | None = None,
               captions: list[str] | None = None, progress: Callable[[int, dict], None] | None = None,
               cancel: Callable[[], bool] | None = None, preview: Callable[[int, list], None] | None = None,
               preview_every: int = PREVIEW_EVERY) -> TaskResult:
    """Learn one concept from `images` (N, 3, H, W) in [-1, 1] with `method` (cidm/methods/).

    `past` are the earlier tasks' LoRAs by name, `kinds` their kinds. The UNet is left at θ0, without adapter.
    `preview(step, images)` gets `preview_images` every `preview_every` steps and at the last; the learned concept
    is bit for bit the same with or without it (the time it takes is not counted in `TaskResult.seconds`).
    """
    if preview is not None and (isinstance(preview_every, bool) or not isinstance(preview_every, int)
                                or preview_every < 1):
        raise ValueError(f"preview_every must be a whole number of at least 1, got {preview_every!r}")
    unet = pipe.unet
    rank, world = data_parallel()
    generator = torch.Generator().manual_seed(config.seed + 7919 * rank)  # data parallel: each process its batches
    torch.manual_seed(config.seed)  # the same LoRA initialisation in every process
    captions = captions_for(config, len(images), captions)
    autocast = precision_context(config.mixed_precision, unet.device)  # bad settings fail here, before any change
    adamw = optimizer_class(config.use_8bit_adam, unet.device)
    freeze_base(pipe, tokens)

    # 1. New task learner: layer-wise tokens and a LoRA (from θ0; the method may start it elsewhere)
    token_rows = new_concept_tokens(tokens, config)
    layers = new_task_lora(pipe, config)
    task = Task(config, pipe, tokens, layers, lora_lib.live_weights(unet, config.name), dict(past or {}),
                dict(kinds or {}), images.to(unet.device, pipe.vae.dtype), captions, Augment(hflip=config.hflip),
                DDPMScheduler.from_config(pipe.scheduler.config), generator)
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = adamw([{"params": lora_params, "lr": config.lr_lora},
                       {"params": [token_rows], "lr": config.lr_embedding}], weight_decay=0.01)
    emb_norm_threshold = config.emb_norm_ratio * tokens.vocab_norm()
    terms, step, t0, cancelled, previewing = {}, 0, time.time(), False, 0.0

    # 2. The loop
    unet.train()
    try:
        with task.context:  # what the method holds for the task (e.g. C-LoRA's merged past) is undone on leaving
            method.before_task(task)
            for step in range(1, config.steps + 1):
                task.step = step
                for group, base_lr in zip(optimizer.param_groups, (config.lr_lora, config.lr_embedding)):
                    group["lr"] = base_lr * get_lr(step - 1, config.steps)
                batch = noised_batch(task, config.batch_size, config.noise_offset)
                with autocast():  # mixed precision (fp16/bf16) when asked; LoRA and tokens stay fp32
                    text = tokens.encode([captions[i] for i in batch.idx.tolist()])  # (B, L, N, D); grads reach rows
                    noise_pred = predict_noise(unet, batch.noisy, batch.t, text.to(unet.dtype))
                    diffusion = diffusion_loss(noise_pred, batch.noise)  # Eq. 1
                    extra = method.loss(task, batch)  # name -> (weight, term), e.g. CIDM's γ1·R1, γ2·R2 (Eq. 2)
                    loss = diffusion
                    for weight, term in extra.values():
                        loss = loss + weight * term
                loss.backward()
                update(optimizer, lora_params, token_rows, config.grad_clip, emb_norm_threshold, world)
                method.after_step(task)  # e.g. CIDM's step 2 of Eq. 7

                terms = {"loss": loss.item(), "diffusion": diffusion.item(),
                         **{name: term.item() for name, (_, term) in extra.items()},
                         "token_norm": float(token_rows.detach().norm(dim=-1).mean())}
                if progress is not None:
                    progress(step, terms)
                if cancel is not None and cancel():
                    cancelled = True
                    break
                if preview is not None and (step % preview_every == 0 or step == config.steps):
                    started = time.time()
                    preview(step, preview_images(task))
                    previewing += time.time() - started
    except BaseException:  # leave the UNet as it was: no adapter, base weights
        method.abort_task(task)
        take_off(task, keep_tokens=False)
        raise

    # 3. Keep the task learner, take the LoRA off the UNet (θ0 again)
    unet.eval()
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    if world > 1 and not cancelled:
        check_in_sync(lora_params + [token_rows])
    token_rows.requires_grad_(False)
    learned, lora_config = None, None
    if cancelled:
        method.abort_task(task)
    else:
        method.after_task(task)
        learned, lora_config = task.learned(), unet.peft_config[config.name].to_dict()
    take_off(task, keep_tokens=not cancelled)
    return TaskResult(config.name, step, time.time() - t0 - previewing, cancelled, terms,
                      token_rows.detach().cpu().clone(), learned, lora_config)


def preview_images(task: Task) -> list:
    """The concept as it stands mid-task: its probe prompt drawn with the live LoRA and tokens.

    No stored LoRA is merged (merge "none"): the task's own LoRA is on the UNet as peft layers, over whatever the
    method trains against (e.g. C-LoRA's merged past). Drawn in eval mode, without gradients, on a fork of the global
    RNG (training's VAE sampling draws from it; so may a sampler): the task goes on exactly as without a preview."""
    unet, config = task.pipe.unet, task.config
    settings = GenerateConfig(steps=PREVIEW_STEPS, merge="none", mixed_precision=config.mixed_precision)
    with torch.random.fork_rng(devices=[unet.device] if unet.device.type == "cuda" else []):
        unet.eval()
        try:
            return generate(task.pipe, task.tokens, {}, probe_prompt(config.name, config.kind), config=settings)
        finally:
            unet.train()


def take_off(task: Task, keep_tokens: bool) -> None:
    """The task's LoRA off the UNet (θ0 and the plain processors again), and its tokens unless kept."""
    lora_lib.remove_lora(task.pipe.unet)
    install_processors(task.pipe.unet)
    if not keep_tokens:
        task.tokens.remove(task.config.name)


def update(optimizer, lora_params: list, token_rows: torch.Tensor, grad_clip: float, emb_norm_threshold: float,
           world: int) -> None:
    """One step of the task learner: gradients averaged over processes, clipped, the embedding-norm stop."""
    params = lora_params + [token_rows]
    if world > 1:
        average_gradients(params, world)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if token_rows.grad is not None and token_rows.detach().norm(dim=-1).mean() >= emb_norm_threshold:
        token_rows.grad = None  # embedding-norm stop (official code: 0.55 on SD-1.5)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def freeze_base(pipe, tokens) -> None:
    """The base model (UNet, VAE, text encoders) learns nothing; the new LoRA and token rows are added trainable."""
    for module in (pipe.unet, pipe.vae, *(getattr(pipe, enc) for _, enc in tokens.towers)):
        module.requires_grad_(False)


def new_concept_tokens(tokens, config: TaskConfig) -> torch.Tensor:
    """The concept's layer-wise token rows, registered and trainable; the random first token is seeded by the name
    too, so that two concepts never start from the same vector."""
    init_generator = torch.Generator().manual_seed(config.seed * 1_000_003 + zlib.crc32(config.name.encode()))
    rows = tokens.initial_rows(config.class_word, config.n_slots, config.sigma, init_generator,
                               first="random" if config.token_init == "class" else "class+noise")
    if config.token_init == "random":
        rows = torch.randn(rows.shape, generator=init_generator) * config.sigma
    tokens.add(config.name, rows)
    token_rows = tokens.rows(config.name)
    token_rows.requires_grad_(True)
    return token_rows


def new_task_lora(pipe, config: TaskConfig) -> dict[str, int]:
    """A fresh LoRA named after the concept, fp32, the only trainable part of the UNet; returns the cross-attention
    layers."""
    unet = pipe.unet
    lora_lib.add_task_lora(unet, config.name, config.rank, config.lora_targets)
    for p in unet.parameters():  # fp32 master weights of the LoRA, also on an fp16 base
        if p.requires_grad:
            p.data = p.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return install_processors(unet)


def optimizer_class(use_8bit_adam: bool, device: torch.device):
    if not use_8bit_adam:
        return functools.partial(torch.optim.AdamW, **adam_kernels(device))
    try:
        import bitsandbytes as bnb  # optional: only for this knob
    except ImportError as err:
        raise ValueError("8-bit Adam needs bitsandbytes: pip install bitsandbytes (GPU), or leave it off") from err
    return bnb.optim.AdamW8bit


def adam_kernels(device: torch.device) -> dict:
    """Adam(W)'s fused kernel where torch has one (CPU, CUDA): one pass over every tensor, 2.5× faster than foreach
    over CIDM's R2 state on the embedded world; elsewhere foreach, one kernel per step, not one per tensor."""
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {"foreach": True}


def data_parallel() -> tuple[int, int]:
    """(rank, world size) under `accelerate launch` (its process group), (0, 1) in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Data parallel: every process holds the same weights and averages its gradients with the others' (what DDP
    does, here over the few LoRA and token tensors, which live in two modules)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def check_in_sync(params: list[torch.Tensor]) -> None:
    """After data-parallel training every process must hold identical weights; say so loudly if not."""
    local = torch.stack([p.detach().double().sum() for p in params]).cpu()
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, local)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("data-parallel processes ended with different weights; report this with your command")
