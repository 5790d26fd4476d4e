"""IA and TA (CIDM §5.1, following Custom Diffusion's evaluation), with whichever CLIP evaluator matches the base.

IA: mean cosine between the evaluator's embeddings of generated and reference images (all pairs), ×100.
TA: CLIPScore, 2.5·max(cos(image, text), 0), with `<name>` replaced by the class word in the text, ×100.
"""

from __future__ import annotations

import torch
from PIL import Image

from .models import load_evaluator


class Evaluator:
    """A CLIP model with its own preprocessing (the toy evaluator's 64 px or OpenAI ViT-B/32's 224 px)."""

    def __init__(self, source: str, device: str = "cpu"):
        from transformers import CLIPImageProcessor

        self.clip, self.tokenizer = load_evaluator(source, device)
        self.processor = CLIPImageProcessor.from_pretrained(source)
        self.device = device

    @torch.no_grad()
    def image_embeddings(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        feats = self.clip.get_image_features(pixel_values=pixels.to(self.device)).pooler_output
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", truncation=True,
                             max_length=min(self.tokenizer.model_max_length, 77), return_tensors="pt").input_ids
        feats = self.clip.get_text_features(input_ids=ids.to(self.device)).pooler_output
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def image_alignment(evaluator: Evaluator, generated: list[Image.Image], references: list[Image.Image]) -> float:
    """IA ×100: mean cosine over all (generated, reference) pairs."""
    g, r = evaluator.image_embeddings(generated), evaluator.image_embeddings(references)
    return 100.0 * (g @ r.T).mean().item()


def text_alignment(evaluator: Evaluator, generated: list[Image.Image], texts: list[str]) -> float:
    """TA ×100: CLIPScore 2.5·max(cos, 0), each image against its own text."""
    g, t = evaluator.image_embeddings(generated), evaluator.text_embeddings(texts)
    return 100.0 * (2.5 * (g * t).sum(-1).clamp(min=0)).mean().item()


def identity_confusion(evaluator: Evaluator, generated: dict[str, list[Image.Image]],
                       references: dict[str, list[Image.Image]]) -> dict[str, dict[str, float]]:
    """Which learned concept the evaluator sees in each concept's images: {prompted: {recognised: share}}.

    An image is recognised as the concept whose reference images it is nearest to on average (mean cosine), among
    the concepts in `references`; the diagonal is how often each concept is *identified*.
    """
    names = list(references)
    refs = [evaluator.image_embeddings(references[n]) for n in names]
    out = {}
    for name, images in generated.items():
        emb = evaluator.image_embeddings(images)
        scores = torch.stack([(emb @ r.T).mean(1) for r in refs], 1)  # (images, concepts)
        picks = scores.argmax(1).tolist()
        out[name] = {n: picks.count(i) / len(picks) for i, n in enumerate(names)}
    return out
