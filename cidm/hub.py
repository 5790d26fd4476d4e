"""Model cards for concepts and libraries (huggingface_hub `ModelCard`); pushing and pulling libraries."""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData

CARD_TEMPLATE = """---
{{ card_data }}
---

# `<{{ name }}>`: a CIDM concept

A {{ kind }} concept learned with [CIDM Studio](https://github.com/) (Concept-Incremental text-to-image Diffusion,
Dong et al., NeurIPS 2024) on `{{ base_model }}`. Class word: `{{ class_word }}`.

Write `<{{ name }}>` in a prompt, for example: `{{ instance_prompt }}`.

- `pytorch_lora_weights.safetensors`: the concept's LoRA on the UNet cross-attention (diffusers format;
  `pipe.load_lora_weights(folder)` loads it).
- `tokens.safetensors`: the layer-wise token embeddings (one per cross-attention layer and token slot). With only the
  LoRA and no tokens, a plain pipeline does not know the word `<{{ name }}>`; CIDM Studio loads both.
- `images/`: the reference images it was learned from.
"""


def concept_card(name: str, class_word: str, kind: str, base_model: str) -> ModelCard:
    prompt = f"a photo of a <{name}> on a beach" if kind == "object" else f"a house in <{name}> style"
    data = ModelCardData(base_model=base_model if "/" in base_model and not base_model.startswith("/") else None,
                         tags=["text-to-image", "diffusers", "lora", "cidm"], library_name="diffusers",
                         instance_prompt=prompt)
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, name=name, kind=kind, class_word=class_word,
                                   base_model=base_model, instance_prompt=prompt)
