"""Train the embedded toy-world models from scratch: tokenizer, VAE, CLIP evaluator, UNet.

`python -m cidm toyworld train --out DIR` runs every stage in order; each stage is skipped when its output exists, and
the UNet stage resumes from its last state (or from a shipped model folder with `--resume-from`; add `--new-unet` to
train a UNet of the current architecture from scratch on the shipped tokenizer, VAE, evaluator and text encoder). The
shipped UNet is
the checkpoint with the best *measured* prompt-following (the evaluator's zero-shot accuracy), never the lowest loss.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import quality
from . import world as W

MAX_TOKENS = 32  # text length; room for several concept tokens in a regional prompt


@dataclasses.dataclass
class ToyTrainConfig:
    out: str = "toyworld-run"
    seed: int = 0
    threads: int = 2
    # VAE: 64×64×3 -> 4×16×16
    vae_minutes: float = 15.0
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6  # KL weight; small, as SD's VAE
    vae_finetune_minutes: float = 9.0  # a second, low-learning-rate pass: sharper edges, fewer ring artefacts
    vae_finetune_lr: float = 5e-4
    # evaluator (CLIP), whose text tower is also the frozen text encoder of the diffusion model (as in SD)
    clip_minutes: float = 10.0
    clip_extra_minutes: float = 14.0  # a continuation from the saved evaluator, with probes (shapes come last)
    evaluator_more_minutes: float = 0.0  # on a resumed run: train the evaluator this much more first
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_shape_groups: float = 0.5  # share of each batch in groups that differ only in shape (hard negatives)
    # latent cache
    n_latents: int = 40_000
    # UNet
    unet_minutes: float = 60.0  # wall-clock budget of this invocation
    new_unet: bool = False  # with resume_from: a fresh UNet (a new architecture) instead of the shipped weights
    unet_batch: int = 32
    unet_lr: float = 6e-4
    unet_warmup: int = 300
    unet_total_steps: int = 7_000  # the cosine schedule's length across all resumed runs (~2 steps/s, 1 h)
    unet_min_lr_ratio: float = 0.1
    train_text_encoder: bool = True  # from the evaluator's text tower, trained jointly (the evaluator keeps its own)
    text_encoder_lr: float = 2e-4
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023) speeds up convergence
    uncond_prob: float = 0.1  # empty captions for classifier-free guidance
    ema_decay: float = 0.999
    ema_start: int = 1000  # EMA from here on (earlier EMA carries random weights too long)
    eval_every: int = 1500
    eval_prompts: int = 96


def log(out: Path, **record) -> None:
    record["time"] = time.strftime("%H:%M:%S")
    print(json.dumps(record), flush=True)
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def bpe_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges that turn every word into one token, learned deterministically (ties: smallest pair)."""
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == best:
                    w[i:i + 2] = [w[i] + w[i + 1]]
                i += 1


def build_tokenizer(words=W.WORDS, max_length: int = MAX_TOKENS):
    """A CLIPTokenizer whose BPE has one token per world word (new concept tokens are added as for SD)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # every byte, so that no word maps to unk
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges = bpe_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


# ---------------------------------------------------------------------------------------------------------------
# model configs


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
                         block_out_channels=(32, 64, 64), norm_num_groups=32,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)


def make_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=64, patch_size=8, num_channels=3, hidden_size=192, intermediate_size=384,
                  num_hidden_layers=4, num_attention_heads=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=128))


def make_unet():
    from diffusers import UNet2DConditionModel

    # cross-attention at 16×16 and 8×8 (down and up) and 4×4 (mid): 7 cross-attention layers in 3 resolutions.
    # diffusers' `attention_head_dim` is the number of heads in this config: 2 heads of 20-80 channels. (16 heads of
    # 4-8 channels spent half of a CPU forward in attention softmax.) Norm groups of 5-20 channels: with 1 channel per
    # group (32 groups of 32) GroupNorm becomes instance norm, and a trial run learned colours poorly.
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(40, 80, 160), norm_num_groups=8, cross_attention_dim=128,
                                attention_head_dim=2,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def make_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return DDPMScheduler(**common), DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def cosine_lr(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    # 1) linear warmup
    if step < warmup:
        return base * (step + 1) / warmup
    # 2) after the planned length, the floor
    if step >= total:
        return base * min_ratio
    # 3) cosine decay to the floor in between
    t = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------------------------------------------
# stage 1: VAE


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def train_vae(cfg: ToyTrainConfig, out: Path, vae=None, lr: float | None = None, minutes: float | None = None):
    """Train the VAE from scratch, or continue `vae` (lower `lr`, extra `minutes`) before any UNet uses it."""
    vae = vae.train().requires_grad_(True) if vae is not None else make_vae()
    base_lr = lr or cfg.vae_lr
    opt = torch.optim.AdamW(vae.parameters(), lr=base_lr, weight_decay=0.0)
    val = quality.to_pixel_values(W.batch(range(quality.HELD_OUT_SEED, quality.HELD_OUT_SEED + 64))[0])
    rng = np.random.default_rng(cfg.seed + 1 + (0 if lr is None else 1))
    t0, step, budget = time.time(), 0, (minutes or cfg.vae_minutes) * 60
    est_total = int(budget * 2.0)  # steps, for the schedule; refined as we go
    while time.time() - t0 < budget:
        lr = cosine_lr(step, base_lr, 100, est_total, 1e-5 / base_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        x = quality.to_pixel_values(W.batch(rng.integers(0, 2**31, cfg.vae_batch))[0])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + cfg.vae_kl * post.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step in (50, 300):  # re-estimate the schedule's length from the measured speed
            est_total = int(step + (budget - (time.time() - t0)) / ((time.time() - t0) / step))
        if step % 200 == 0:
            with torch.no_grad():
                p = psnr(vae.decode(vae.encode(val).latent_dist.mode()).sample, val)
            log(out, stage="vae", step=step, loss=round(loss.item(), 5), val_psnr=round(p, 2), lr=lr)
    vae.eval()
    with torch.no_grad():
        big = quality.to_pixel_values(W.batch(range(quality.HELD_OUT_SEED, quality.HELD_OUT_SEED + 256))[0])
        z = vae.encode(big).latent_dist
        p = psnr(vae.decode(z.mode()).sample, big)
        scale = 1.0 / z.mode().std().item()
    vae.register_to_config(scaling_factor=round(scale, 5))
    log(out, stage="vae", done=True, steps=step, val_psnr_256=round(p, 2), scaling_factor=scale)
    return vae, {"steps": step, "psnr_db": round(p, 2), "scaling_factor": round(scale, 5)}


# ---------------------------------------------------------------------------------------------------------------
# stage 2: CLIP evaluator


def dropout_caption(scene: W.Scene, rng: np.random.Generator) -> tuple[str, dict]:
    """A caption naming a random subset of the scene's attributes, and that subset (for multi-positive targets)."""
    if len(scene.objects) > 1 or rng.random() < 0.25:
        return scene.caption, {"full": scene.caption}
    shape, colour, style = scene.objects[0]
    keep = {k: rng.random() < 0.6 for k in ("shape", "colour", "style", "context")}
    if rng.random() < 0.3:  # shape-only captions: the contrastive signal that separates shapes
        keep = {"shape": True, "colour": False, "style": False, "context": False}
    attrs = {"shape": shape if keep["shape"] else None, "colour": colour if keep["colour"] else None,
             "style": style if keep["style"] else None, "context": scene.context if keep["context"] else None}
    noun = " ".join(w for w in (attrs["style"], attrs["colour"], attrs["shape"] or "thing") if w)
    caption = f"a photo of {W.with_article(noun)}"
    if attrs["context"]:
        caption += " " + W.context_phrase(attrs["context"])
    return caption, attrs


def contrast_batch(rng: np.random.Generator, size: int, shape_groups: float) -> list[W.Scene]:
    """Random scenes, and a `shape_groups` share of groups of 4 scenes that differ only in the shape.

    Colour and context differ between almost any two random scenes, so a contrastive loss learns them in minutes;
    shape is then never needed to tell a batch apart. Groups that differ only in shape (hard negatives) make it so.
    """
    n_groups = int(size * shape_groups) // 4
    scenes = [W.random_scene(int(s), two_object_prob=0.1) for s in rng.integers(0, 2**31, size - 4 * n_groups)]
    for seed in rng.integers(0, 2**31, n_groups):
        base = W.random_scene(int(seed), two_object_prob=0.0)
        _, colour, style = base.objects[0]
        for shape in rng.choice(W.SHAPES, 4, replace=False):
            scenes.append(dataclasses.replace(base, objects=((str(shape), colour, style),)))
    return scenes


def caption_matches(attrs: dict, scene: W.Scene) -> bool:
    if "full" in attrs:
        return attrs["full"] == scene.caption
    if len(scene.objects) > 1:
        return False
    shape, colour, style = scene.objects[0]
    return all(v is None or v == t for v, t in ((attrs["shape"], shape), (attrs["colour"], colour),
                                                (attrs["style"], style), (attrs["context"], scene.context)))


def train_clip(cfg: ToyTrainConfig, out: Path, tokenizer, clip=None, minutes: float | None = None,
               lr: float | None = None, run: int = 0):
    """Train the evaluator from scratch, or continue `clip` for `minutes` more."""
    clip = clip.train() if clip is not None else make_clip(tokenizer)
    base_lr = lr or cfg.clip_lr
    # auxiliary linear probes on the image embedding (discarded after training): a ViT from scratch learns colour
    # and context from the contrastive loss in minutes, but shape hardly at all without a direct signal
    contexts = list(W.CONTEXTS) + [f"bg:{c}" for c in W.COLOURS]
    dim = clip.config.projection_dim
    probes = torch.nn.ModuleDict({"shape": torch.nn.Linear(dim, len(W.SHAPES)),
                                  "colour": torch.nn.Linear(dim, len(W.COLOURS)),
                                  "context": torch.nn.Linear(dim, len(contexts))})
    opt = torch.optim.AdamW([*clip.parameters(), *probes.parameters()], lr=base_lr, weight_decay=0.05)
    rng = np.random.default_rng(cfg.seed + 2 + (0 if minutes is None else 7) + 100 * run)  # new data per run
    t0, step, budget = time.time(), 0, (minutes or cfg.clip_minutes) * 60
    est_total = int(budget * 2.0)
    while time.time() - t0 < budget:
        lr = cosine_lr(step, base_lr, 100, est_total, 0.02)
        for g in opt.param_groups:
            g["lr"] = lr
        scenes = contrast_batch(rng, cfg.clip_batch, cfg.clip_shape_groups)
        images = np.stack([W.render(s) for s in scenes])
        caps = [dropout_caption(s, rng) for s in scenes]
        # multi-positive contrastive targets: caption j is true of image i when every attribute it names matches
        match = torch.tensor([[caption_matches(a, s) for _, a in caps] for s in scenes], dtype=torch.float32)
        out_ = clip(input_ids=tokenize(tokenizer, [c for c, _ in caps]),
                    pixel_values=quality.to_pixel_values(images))
        logits = out_.logits_per_image  # (B images, B texts)
        loss = 0.5 * (torch.sum(-F.log_softmax(logits, 1) * match / match.sum(1, keepdim=True), 1).mean()
                      + torch.sum(-F.log_softmax(logits.T, 1) * match.T / match.T.sum(1, keepdim=True), 1).mean())
        single = [s for s in scenes if len(s.objects) == 1]
        keep = torch.tensor([len(s.objects) == 1 for s in scenes])
        labels = {"shape": [W.SHAPES.index(s.objects[0][0]) for s in single],
                  "colour": [list(W.COLOURS).index(s.objects[0][1]) for s in single],
                  "context": [contexts.index(s.context) for s in single]}
        feats = out_.image_embeds[keep] * 10.0  # unit vectors, scaled
        loss = loss + sum(F.cross_entropy(probes[k](feats), torch.tensor(v)) for k, v in labels.items())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step in (30, 200):  # re-estimate the schedule's length from the measured speed
            est_total = int(step + (budget - (time.time() - t0)) / ((time.time() - t0) / step))
        if step % 200 == 0:
            clip.eval()
            acc = quality.evaluator_accuracy(clip, tokenizer, n=200, seed=quality.HELD_OUT_SEED + 500)
            clip.train()
            log(out, stage="clip", step=step, loss=round(loss.item(), 4), acc200=acc, lr=lr)
    clip.eval()
    acc = quality.evaluator_accuracy(clip, tokenizer, n=1000)
    log(out, stage="clip", done=True, steps=step, zero_shot_1000=acc)
    return clip, {"steps": step, "zero_shot_accuracy_1000": acc}


def evaluator_image_processor():
    """The evaluator's preprocessing as a CLIPImageProcessor, so IA / TA code is the same as for OpenAI's CLIP."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def text_encoder_from_clip(clip):
    """The evaluator's text tower as a CLIPTextModel (SD's text encoder is CLIP's text tower too)."""
    from transformers import CLIPTextModel

    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())
    return te.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# stage 3: latent cache


@torch.no_grad()
def encode_latents(cfg: ToyTrainConfig, vae, tokenizer, path: Path) -> None:
    means, stds, ids = [], [], []
    for i in range(0, cfg.n_latents, 500):
        images, captions, _ = W.batch(range(i, min(i + 500, cfg.n_latents)))
        dist = vae.encode(quality.to_pixel_values(images)).latent_dist
        means.append(dist.mean.half())
        stds.append(dist.std.half())
        ids.append(tokenize(tokenizer, captions).to(torch.int16))
    torch.save({"mean": torch.cat(means), "std": torch.cat(stds), "ids": torch.cat(ids)}, path)


# ---------------------------------------------------------------------------------------------------------------
# stage 4: UNet


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    # Min-SNR-γ for epsilon prediction: w_t = min(SNR_t, γ) / SNR_t
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    return torch.clamp(snr, max=gamma) / snr


def build_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def train_unet(cfg: ToyTrainConfig, out: Path, model_dir: Path, vae, text_encoder, tokenizer, clip,
               resume_from: Path | None):
    from diffusers import UNet2DConditionModel

    ddpm, ddim = make_schedulers()
    cache = torch.load(out / "cache" / "latents.pt")
    n = len(cache["ids"])
    state_path = out / "state" / "unet.pt"
    unet = make_unet()
    ema, ema_te = None, None
    groups = [{"params": list(unet.parameters()), "lr": cfg.unet_lr}]
    if cfg.train_text_encoder:
        text_encoder.requires_grad_(True).train()
        groups.append({"params": list(text_encoder.parameters()), "lr": cfg.text_encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    step, best = 0, {"score": -1.0}
    if state_path.exists():
        state = torch.load(state_path)
        unet.load_state_dict(state["unet"])
        if state.get("text_encoder") is not None:
            text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["optimizer"])
        if state["ema"] is not None:
            ema = make_unet()
            ema.load_state_dict(state["ema"])
            ema_te = copy.deepcopy(text_encoder).eval().requires_grad_(False)
            if state.get("ema_text_encoder") is not None:
                ema_te.load_state_dict(state["ema_text_encoder"])
        step, best = state["step"], state["best"]
        log(out, stage="unet", resumed_from=str(state_path), step=step)
    elif resume_from is not None and not cfg.new_unet:  # weights only (a shipped model folder): fresh optimizer, schedule continues
        shipped = UNet2DConditionModel.from_pretrained(resume_from / "unet")
        unet.load_state_dict(shipped.state_dict())
        ema, ema_te = copy.deepcopy(unet), copy.deepcopy(text_encoder).eval().requires_grad_(False)
        info = json.loads((resume_from / "training.json").read_text())
        step, best = info["unet"]["steps"], info["unet"]["best"]
        log(out, stage="unet", resumed_from=str(resume_from), step=step)
    empty_ids = tokenize(tokenizer, [""])
    rng = torch.Generator().manual_seed(cfg.seed + 3 + step)
    t0, budget = time.time(), cfg.unet_minutes * 60
    losses, t_log = [], time.time()
    unet.train()
    while time.time() - t0 < budget:
        lr = cosine_lr(step, cfg.unet_lr, cfg.unet_warmup, cfg.unet_total_steps, cfg.unet_min_lr_ratio)
        for g, base in zip(opt.param_groups, (cfg.unet_lr, cfg.text_encoder_lr)):
            g["lr"] = lr * base / cfg.unet_lr
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=rng)
        z0 = (cache["mean"][idx].float() + cache["std"][idx].float() * torch.randn(
            cache["mean"][idx].shape, generator=rng)) * vae.config.scaling_factor
        ids = cache["ids"][idx].long()
        drop = torch.rand(cfg.unet_batch, generator=rng) < cfg.uncond_prob
        ids[drop] = empty_ids
        with torch.set_grad_enabled(cfg.train_text_encoder):
            cond = text_encoder(ids)[0]
        noise = torch.randn(z0.shape, generator=rng)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (cfg.unet_batch,), generator=rng)
        zt = ddpm.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        w = min_snr_weights(ddpm, t, cfg.min_snr_gamma)
        loss = (w * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        if step == cfg.ema_start or (ema is None and step > cfg.ema_start):
            ema, ema_te = copy.deepcopy(unet), copy.deepcopy(text_encoder).eval().requires_grad_(False)
        elif ema is not None:
            with torch.no_grad():
                for pe, p in [*zip(ema.parameters(), unet.parameters()),
                              *zip(ema_te.parameters(), text_encoder.parameters())]:
                    pe.lerp_(p, 1 - cfg.ema_decay)
        if step % 100 == 0:
            log(out, stage="unet", step=step, loss=round(float(np.mean(losses)), 5), lr=round(lr, 7),
                steps_per_s=round(len(losses) / (time.time() - t_log), 2))
            losses, t_log = [], time.time()
        if step % cfg.eval_every == 0 or time.time() - t0 >= budget:  # gate every eval_every and at the end
            best = gate_checkpoint(cfg, out, model_dir, (unet, text_encoder), (ema, ema_te), vae, tokenizer, ddim,
                                   clip, step, best)
            torch.save({"unet": unet.state_dict(), "optimizer": opt.state_dict(),
                        "text_encoder": text_encoder.state_dict() if cfg.train_text_encoder else None,
                        "ema_text_encoder": ema_te.state_dict() if ema_te is not None else None,
                        "ema": ema.state_dict() if ema is not None else None, "step": step, "best": best},
                       state_path)
            log(out, stage="unet", saved_state=step, budget_left_s=round(budget - (time.time() - t0)))
    return best


@torch.no_grad()
def gate_checkpoint(cfg, out, model_dir, raw, ema, vae, tokenizer, ddim, clip, step, best):
    """Measure prompt-following of the raw and EMA (UNet, text encoder) pairs; ship whichever beats the best."""
    results = {}
    for name, (unet, text_encoder) in (("raw", raw), ("ema", ema)):
        if unet is None:
            continue
        was_training = unet.training
        unet.eval()
        text_encoder.eval()
        pipe = build_pipeline(unet, vae, text_encoder, tokenizer, ddim)
        pipe.set_progress_bar_config(disable=True)
        acc, images, prompts = quality.generator_accuracy(pipe, clip, tokenizer, n=cfg.eval_prompts,
                                                          batch_size=48)
        if was_training:
            unet.train()
            text_encoder.train()
        score = min(acc["shape"], acc["colour"], acc["context"]) + 0.1 * sum(acc.values())
        results[name] = (score, acc, images, pipe)
        log(out, stage="unet", gate=name, step=step, accuracy=acc, score=round(score, 4))
    name, (score, acc, images, pipe) = max(results.items(), key=lambda kv: kv[1][0])
    if score > best["score"]:
        best = {"score": score, "step": step, "weights": name, "accuracy": acc}
        ship(model_dir, pipe, best)
        save_grid(images[:48], out / f"samples_step{step}.png")
        log(out, stage="unet", shipped=step, weights=name, accuracy=acc)
    return best


# Learning settings for this base (cidm.models.find_task_defaults). At the paper's LoRA learning rate (1e-4, tuned for
# SD-1.5) a toy concept's LoRA stays near zero: the learned <medic> (a white square with a red cross) came out as a
# green square, the same as with its LoRA switched off. At 1e-3 the LoRA carries the concept's identity.
TASK_DEFAULTS = {"lr_lora": 1e-3,
                 "_comment": "the toy base's LoRA learning rate; at the paper's 1e-4 toy LoRAs stay near zero"}


def write_pointers(model_dir: Path) -> None:
    """The files beside the pipeline that CIDM reads: where the evaluator is, and this base's learning settings."""
    (model_dir / "cidm_evaluator.json").write_text(json.dumps({"evaluator": "evaluator"}, indent=1) + "\n")
    (model_dir / "cidm_task_defaults.json").write_text(json.dumps(TASK_DEFAULTS, indent=1) + "\n")


def ship(model_dir: Path, pipe, best: dict) -> None:
    """Write the pipeline folder (diffusers layout) and record what was shipped and how well it measured."""
    pipe.save_pretrained(model_dir)
    # the UNet's weights stored in fp16 halve the repo's largest file; loading upcasts them to fp32 (as before)
    copy.deepcopy(pipe.unet).half().save_pretrained(model_dir / "unet")
    write_pointers(model_dir)
    info_path = model_dir / "training.json"
    info = json.loads(info_path.read_text())
    info["unet"] = {"steps": best["step"], "best": best}
    info_path.write_text(json.dumps(info, indent=1))


def save_grid(images: np.ndarray, path: Path, cols: int = 8) -> None:
    from PIL import Image

    cols = max(1, min(cols, len(images)))
    n = len(images) // cols * cols
    h, w = images.shape[1:3]
    grid = images[:n].reshape(-1, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(-1, cols * w, 3)
    Image.fromarray(grid).save(path)


# ---------------------------------------------------------------------------------------------------------------


def train_all(cfg: ToyTrainConfig, resume_from: str | None = None) -> Path:
    """Run (or resume) every stage; returns the diffusers model folder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    model_dir = out / "model"
    for d in (out, model_dir, out / "state", out / "cache"):
        d.mkdir(parents=True, exist_ok=True)
    info_path = model_dir / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if resume_from:
        src = Path(resume_from)
        info = json.loads((src / "training.json").read_text())
        for sub in ("tokenizer", "vae", "evaluator", "text_encoder", "scheduler"):
            if not (model_dir / sub).exists():
                import shutil
                shutil.copytree(src / sub, model_dir / sub)
    info["config"] = dataclasses.asdict(cfg)
    if cfg.new_unet:
        info["new_unet"] = True  # the UNet below starts from scratch; the other parts come from `resume_from`

    if not (model_dir / "tokenizer").exists():
        build_tokenizer().save_pretrained(model_dir / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")

    if not (model_dir / "vae").exists():
        vae, info["vae"] = train_vae(cfg, out)
        vae.save_pretrained(model_dir / "vae")
        info_path.write_text(json.dumps(info, indent=1))
    vae = AutoencoderKL.from_pretrained(model_dir / "vae")
    if "vae_finetune" not in info and cfg.vae_finetune_minutes > 0:
        vae, info["vae_finetune"] = train_vae(cfg, out, vae, lr=cfg.vae_finetune_lr, minutes=cfg.vae_finetune_minutes)
        vae.save_pretrained(model_dir / "vae")
        info_path.write_text(json.dumps(info, indent=1))
    vae = vae.eval().requires_grad_(False)

    if not (model_dir / "evaluator").exists():
        clip, info["evaluator"] = train_clip(cfg, out, tokenizer)
        clip.save_pretrained(model_dir / "evaluator")
        tokenizer.save_pretrained(model_dir / "evaluator")
        evaluator_image_processor().save_pretrained(model_dir / "evaluator")
        text_encoder_from_clip(clip).save_pretrained(model_dir / "text_encoder")
        info_path.write_text(json.dumps(info, indent=1))
    clip = CLIPModel.from_pretrained(model_dir / "evaluator").eval()
    if "evaluator_more" not in info and cfg.clip_extra_minutes > 0:
        clip, info["evaluator_more"] = train_clip(cfg, out, tokenizer, clip, minutes=cfg.clip_extra_minutes,
                                                  lr=cfg.clip_lr / 2)
        clip.save_pretrained(model_dir / "evaluator")
        text_encoder_from_clip(clip).save_pretrained(model_dir / "text_encoder")
        info_path.write_text(json.dumps(info, indent=1))
        clip.eval()
    if cfg.evaluator_more_minutes > 0:  # the evaluator alone; the text encoder trains with the UNet by now
        before = quality.evaluator_accuracy(clip, tokenizer, n=1000)
        runs = info.setdefault("evaluator_runs", [])
        more_clip, more = train_clip(cfg, out, tokenizer, copy.deepcopy(clip), minutes=cfg.evaluator_more_minutes,
                                     lr=cfg.clip_lr / 2, run=len(runs))
        more["shipped"] = min(more["zero_shot_accuracy_1000"].values()) > min(before.values())  # gate: worst attribute
        runs.append(more)
        if more["shipped"]:
            clip = more_clip
            clip.save_pretrained(model_dir / "evaluator")
        info_path.write_text(json.dumps(info, indent=1))
        clip.eval()
    from transformers import CLIPTextModel
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval().requires_grad_(False)

    ddpm, ddim = make_schedulers()
    ddim.save_pretrained(model_dir / "scheduler")
    write_pointers(model_dir)

    if not (out / "cache" / "latents.pt").exists():
        t0 = time.time()
        encode_latents(cfg, vae, tokenizer, out / "cache" / "latents.pt")
        log(out, stage="latents", n=cfg.n_latents, seconds=round(time.time() - t0, 1))

    info_path.write_text(json.dumps(info, indent=1))
    # model_index.json appears only when a gated UNet is shipped, so a half-trained folder never loads as a pipeline
    train_unet(cfg, out, model_dir, vae, text_encoder, tokenizer, clip, Path(resume_from) if resume_from else None)
    return model_dir
