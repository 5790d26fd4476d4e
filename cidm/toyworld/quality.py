"""Measured quality of the toy world's models: evaluator zero-shot accuracy and generator prompt-following.

Five attributes are read from an image: the outer shape, the outer colour, the inner part (a shape, stripes, dots,
or none), the inner colour (only where there is an inner part) and the context.
"""

from __future__ import annotations

import numpy as np
import torch

from . import world as W

HELD_OUT_SEED = 10_000_000  # seeds at or above this are never used for training
GATE_SEED = HELD_OUT_SEED + 50_000  # the prompts that choose the shipped UNet; the reported ones are HELD_OUT_SEED + 1
ATTRIBUTES = ("shape", "colour", "inner", "inner_colour", "context")


def zero_shot_prompts() -> dict[str, dict[str, str]]:
    """Class name -> prompt, per attribute: the evaluator's zero-shot classifiers."""
    contexts = {c: f"a photo of a thing {W.CONTEXTS[c]}" for c in W.CONTEXTS}
    contexts.update({f"bg:{c}": f"a photo of a thing {W.context_phrase('bg:' + c)}" for c in W.COLOURS})
    inner = {s: f"a photo of a thing with {W.with_article(s)}" for s in W.SHAPES}
    inner.update({p: f"a photo of a thing with {p}" for p in W.PATTERNS})
    inner["none"] = "a photo of a plain thing"
    return {
        "shape": {s: f"a photo of a {s}" for s in W.SHAPES},
        "colour": {c: f"a photo of {W.with_article(c)} thing" for c in W.COLOURS},
        "inner": inner,
        "inner_colour": {c: f"a photo of a thing with {c} inside" for c in W.COLOURS},
        "context": contexts,
    }


def truth(scene: W.Scene) -> dict[str, str | None]:
    """The attributes of a one-object scene, as the zero-shot classes name them."""
    g = scene.glyphs[0]
    return {"shape": g.shape, "colour": g.colour, "inner": g.inner or "none", "inner_colour": g.inner_colour,
            "context": scene.context}


def to_pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the world's (and the evaluator's) input convention."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def embed_texts(clip, tokenizer, texts: list[str]) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return torch.nn.functional.normalize(clip.get_text_features(input_ids=ids).pooler_output, dim=-1)


@torch.no_grad()
def embed_images(clip, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        feats = clip.get_image_features(pixel_values=to_pixel_values(images[i:i + batch_size])).pooler_output
        out.append(torch.nn.functional.normalize(feats, dim=-1))
    return torch.cat(out)


@torch.no_grad()
def classify(clip, tokenizer, images: np.ndarray) -> dict[str, list[str]]:
    """Zero-shot labels of each attribute of each image."""
    img = embed_images(clip, images)
    labels = {}
    for attr, prompts in zero_shot_prompts().items():
        names = list(prompts)
        txt = embed_texts(clip, tokenizer, [prompts[n] for n in names])
        labels[attr] = [names[i] for i in (img @ txt.T).argmax(-1).tolist()]
    return labels


def accuracy(pred: dict[str, list[str]], truths: list[dict]) -> dict[str, float]:
    """Share of images whose label is right, per attribute; inner colour only over images with an inner part."""
    out = {}
    for a in ATTRIBUTES:
        pairs = [(p, t[a]) for p, t in zip(pred[a], truths) if t[a] is not None]
        out[a] = round(float(np.mean([p == t for p, t in pairs])), 4) if pairs else float("nan")
    return out


def evaluator_accuracy(clip, tokenizer, n: int = 1000, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """Zero-shot accuracy on n fresh one-object, unstyled world images (held-out seeds)."""
    images, _, scenes = W.batch(range(seed, seed + n), two_object_prob=0.0, style_prob=0.0)
    return accuracy(classify(clip, tokenizer, images), [truth(s) for s in scenes])


def random_prompts(n: int, seed: int = HELD_OUT_SEED + 1) -> tuple[list[str], list[dict]]:
    """n full base-vocabulary prompts (one object, no style) of held-out seeds, with their attributes."""
    scenes = [W.random_scene(s, two_object_prob=0.0, style_prob=0.0) for s in range(seed, seed + n)]
    return [s.caption for s in scenes], [truth(s) for s in scenes]


@torch.no_grad()
def generator_accuracy(pipe, clip, tokenizer, n: int = 200, steps: int = 25, guidance: float = 5.0,
                       batch_size: int = 50, seed: int = 0, prompt_seed: int = HELD_OUT_SEED + 1
                       ) -> tuple[dict[str, float], np.ndarray, list[str]]:
    """How often the evaluator finds the prompted attributes in generated images."""
    prompts, truths = random_prompts(n, prompt_seed)
    images = []
    for i in range(0, n, batch_size):
        g = torch.Generator().manual_seed(seed + i)
        out = pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance, generator=g,
                   output_type="np")
        images.append((out.images * 255).round().astype(np.uint8))
    images = np.concatenate(images)
    return accuracy(classify(clip, tokenizer, images), truths), images, prompts
