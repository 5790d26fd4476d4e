"""LFS-Diffusion (Song et al. 2024), built from its abstract and figure captions only (the body is not public; see
`research/peers.md` §2). Our design choices:
- one LoRA carried from task to task (it is a fine-tuning method, with no per-task adapters);
- data-free distillation: every `lfs_refresh` steps the teacher (the model before this task) samples a
  `lfs_trajectory_steps` DDPM trajectory from noise, alternately for the new concept's class ("relevant concepts")
  and for a random earlier concept ("previous concepts"); each step, the student matches the teacher's ε at one of
  the teacher's own latents;
- In-Context Generation: right after a task, one image of the concept is sampled and kept as its vision context
  (`context.png`, generated, so no user photo is stored); a later prompt naming the concept starts from that
  context's latents noised to `GenerateConfig.context_strength` (SDEdit-style conditioning on the vision context).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from diffusers import DDPMScheduler

from ..losses import diffusion_loss
from ..sampling import classifier_free_guidance, denoise, predict_noise
from ..templates import class_prompt, probe_prompt
from .base import Inference
from .lora_merge import Finetune
from .lwf import previous_model

CONTEXT_FILE = "context.png"  # beside each concept: its vision context, sampled right after its task


@dataclasses.dataclass
class LFS(Finetune):
    lfs_lambda: float = 1.0  # weight of the distillation along the teacher's trajectory
    lfs_trajectory_steps: int = 25  # sampling steps of one teacher trajectory (DDPM, as the paper's figure)
    lfs_refresh: int = 25  # a new teacher trajectory every this many training steps

    training_cost: ClassVar[float] = 2.0  # the teacher's trajectories and the student's extra pass

    def __post_init__(self):
        self.contexts: dict = {}  # concept -> its vision context (a PIL image)
        self.trajectory: dict | None = None

    def load(self, library) -> None:
        self.contexts = {n: image for n in library.names
                         if (image := library.read_image(n, CONTEXT_FILE)) is not None}

    def forget(self, name: str) -> None:
        self.contexts.pop(name, None)

    def concept_files(self, studio, config) -> dict:
        context = studio.generate(probe_prompt(config.name, config.kind), seed=config.seed)[0]
        self.contexts[config.name] = context
        return {CONTEXT_FILE: context}

    def prepare_inference(self) -> Inference:
        return Inference(self.merge, self.psi, self.contexts)

    def before_task(self, task) -> None:
        super().before_task(task)
        self.trajectory = None

    def loss(self, task, batch) -> dict[str, tuple[float, torch.Tensor]]:
        if self.lfs_lambda <= 0 or not task.past:
            return {}
        g, refresh = task.generator, self.lfs_refresh
        if (task.step - 1) % refresh == 0:  # alternate the relevant (class) and a previous concept
            old = list(task.past)[int(torch.randint(0, len(task.past), (1,), generator=g))]
            prompt = class_prompt(task.config.class_word, task.config.kind) if (task.step - 1) // refresh % 2 == 0 \
                else probe_prompt(old, task.kinds[old])
            self.trajectory = self.teacher_trajectory(task, prompt, batch.latents.shape)
        k = int(torch.randint(0, len(self.trajectory["t"]), (1,), generator=g))
        z, t, text = self.trajectory["z"][k], self.trajectory["t"][k], self.trajectory["text"]
        student = predict_noise(task.pipe.unet, z, t, text)
        return {"lfs": (self.lfs_lambda, diffusion_loss(student, self.trajectory["eps"][k]))}

    @torch.no_grad()
    def teacher_trajectory(self, task, prompt: str, shape, guidance: float = 5.0) -> dict:
        """The distillation targets: the teacher (θ0 + the previous task's LoRA, the current adapter off) samples
        from noise with `prompt`; every step's latent z*_t and conditional ε_teacher(z*_t) are kept. No earlier
        data is stored or replayed: the latents come from the teacher itself."""
        unet = task.pipe.unet
        device, dtype = unet.device, unet.dtype
        sampler = DDPMScheduler.from_config(task.noise_scheduler.config)
        sampler.set_timesteps(self.lfs_trajectory_steps, device=device)
        text = task.tokens.encode([prompt] * shape[0]).to(dtype)
        both = torch.cat([task.tokens.encode([""] * shape[0]).to(dtype), text])
        z = torch.randn(shape, generator=task.generator).to(device, dtype) * sampler.init_noise_sigma
        record = {"z": [], "t": [], "eps": [], "text": text}

        def guided_eps(x, t):
            eps_uncond, eps_cond = predict_noise(unet, torch.cat([x, x]), t, both).chunk(2)
            record["z"].append(x)
            record["t"].append(t.expand(shape[0]))
            record["eps"].append(eps_cond)
            return classifier_free_guidance(eps_uncond, eps_cond, guidance)

        was_training = unet.training
        unet.eval()
        try:
            with previous_model(unet, task.layers, list(task.past.values())[-1]):
                denoise(sampler, z, sampler.timesteps, guided_eps, generator=task.generator)
        finally:
            unet.train(was_training)
        return record
