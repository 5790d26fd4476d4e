"""Model cards: one per concept (written when it is learned) and one per library (written when it is pushed).

A card links to what is real: the paper, the official code, CIDM Studio's project page (`CIDM_PROJECT_URL`) and the
Space a concept was learned in (`SPACE_ID`, which Hugging Face Spaces set); a link that is not known is left out,
never replaced by a placeholder. Its snippet runs in a plain diffusers pipeline: the concept's LoRA, plus its
layer-wise tokens reduced to one textual-inversion embedding (`library.TEXTUAL_INVERSION_FILE`).
"""

from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData

from .models import EMBEDDED_MODEL, display_name, is_hub_id
from .templates import card_prompt

PAPER_URL = "https://arxiv.org/abs/2410.17594"  # Dong et al., NeurIPS 2024
CODE_URL = "https://github.com/JiahuaDong/CIFC"  # the paper's official code
TAGS = ["text-to-image", "diffusers", "lora", "textual-inversion", "cidm"]
SAMPLE_STEPS, SAMPLE_GUIDANCE = 25, 5.0  # how the snippet generates: CIDM Studio's defaults (`GenerateConfig`)


def space_url() -> str | None:
    """The Space this runs in, where it runs in one (Hugging Face Spaces set `SPACE_ID` to 'owner/name')."""
    space = os.environ.get("SPACE_ID", "").strip()
    return f"https://huggingface.co/spaces/{space}" if space.count("/") == 1 else None


def project_url() -> str | None:
    """CIDM Studio's project page: `CIDM_PROJECT_URL` where it is set to an http(s) address, else None."""
    url = os.environ.get("CIDM_PROJECT_URL", "").strip()
    return url if url.startswith(("https://", "http://")) else None


def links() -> dict:
    return {"paper_url": PAPER_URL, "code_url": CODE_URL, "project_url": project_url(), "space_url": space_url(),
            "space_id": os.environ.get("SPACE_ID", "").strip()}


def base_in_code(source: str) -> tuple[str, str]:
    """How a snippet loads the base model: (import line, argument of `from_pretrained`). A Hub id as it is, the toy
    world from the package that ships it, another local folder by its name (the server's path is never shown)."""
    if is_hub_id(source):
        return "", f'"{source}"'
    if os.path.realpath(source) == os.path.realpath(EMBEDDED_MODEL):
        return "from cidm.models import EMBEDDED_MODEL  # the toy world's base, shipped with CIDM Studio\n", \
            "EMBEDDED_MODEL"
    return "", f'"{display_name(source)}"  # the base model folder it was learned on'


CARD_TEMPLATE = """---
{{ card_data }}
---

# `<{{ name }}>`: a CIDM concept

{% if kind == "object" %}An object{% else %}A style{% endif %} concept (class word `{{ class_word }}`) learned on \
`{{ base_name }}` with \
{% if project_url %}[CIDM Studio]({{ project_url }}){% else %}CIDM Studio{% endif %}\
{% if space_url %}, in the Space [{{ space_id }}]({{ space_url }}){% endif %}: Concept-Incremental text-to-image \
Diffusion Models ([Dong et al., NeurIPS 2024]({{ paper_url }}), [official code]({{ code_url }})).

Write `<{{ name }}>` in a prompt, for example: `{{ instance_prompt }}`.
{% if samples %}
Made by CIDM Studio right after learning, from `{{ sample_prompt }}` (seed {{ sample_seed }}, {{ sample_steps }} \
steps):

{% for path in samples %}![{{ name }}, sample {{ loop.index }}]({{ path }}) {% endfor %}
{% endif %}
## Use it in a plain diffusers pipeline

```python
{{ snippet }}
```

A plain pipeline gives every cross-attention layer the same text, so `{{ ti_file }}` holds the layer-wise tokens
reduced to one embedding per token slot (their mean over the layers), and it loads this concept's LoRA alone, at
weight 1. CIDM Studio reads the layer-wise tokens themselves and merges the LoRAs of every concept of the library by
elastic weight aggregation (Eq. 3), which is what lets several learned concepts share one image.

## Files

- `pytorch_lora_weights.safetensors`: the concept's LoRA on the UNet cross-attention (diffusers format).
- `{{ ti_file }}`: one textual-inversion embedding per token slot (`pipe.load_textual_inversion`).
- `tokens.safetensors`: the layer-wise token embeddings (one per cross-attention layer and token slot), as CIDM
  Studio loads them.
- `images/`: the reference images it was learned from.{% if samples %}
- `samples/`: the images above.{% endif %}
"""


def concept_snippet(name: str, folder: str, base_model: str, pipeline_class: str, ti_file: str,
                    n_text_encoders: int, prompt: str, download: str = "") -> str:
    """Python that loads a concept into a stock pipeline and makes an image of it. `folder`: a Python expression
    for the concept's folder; `download`: lines that fetch it first."""
    base_import, base_arg = base_in_code(base_model)
    token = f'"<{name}>"'
    if n_text_encoders == 1:
        embeddings = f'pipe.load_textual_inversion(f"{{folder}}/{ti_file}", token={token})\n'
    else:  # SDXL: one embedding per text encoder, as diffusers' SDXL textual-inversion scripts save them
        embeddings = (f'embeddings = load_file(f"{{folder}}/{ti_file}")\n'
                      f'pipe.load_textual_inversion(embeddings["clip_l"], token={token}, '
                      f'text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)\n'
                      f'pipe.load_textual_inversion(embeddings["clip_g"], token={token}, '
                      f'text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)\n')
    imports = f"from diffusers import {pipeline_class}\n" + base_import
    imports += "from safetensors.torch import load_file\n" if n_text_encoders > 1 else ""
    return (f"{imports}{download}\nfolder = {folder}\npipe = {pipeline_class}.from_pretrained({base_arg})\n"
            f"pipe.load_lora_weights(folder)\n{embeddings}"
            f'image = pipe("{prompt}", num_inference_steps={SAMPLE_STEPS}, guidance_scale={SAMPLE_GUIDANCE})'
            f'.images[0]').strip()


def concept_card(name: str, class_word: str, kind: str, base_model: str, pipeline_class: str = "",
                 n_text_encoders: int = 1, ti_file: str = "learned_embeds.safetensors", samples: tuple = (),
                 sample_prompt: str = "", sample_seed: int = 0, sample_steps: int = SAMPLE_STEPS) -> ModelCard:
    """A concept's card. `samples`: paths (relative to the concept's folder) of images made right after learning,
    from `sample_prompt`; shown in the card and as the Hub's widget."""
    prompt = card_prompt(name, kind)
    pipeline_class = pipeline_class or "StableDiffusionPipeline"
    widget = [{"text": sample_prompt, "output": {"url": path}} for path in samples]
    data = ModelCardData(base_model=base_model if is_hub_id(base_model) else None, tags=TAGS,
                         library_name="diffusers", instance_prompt=prompt, widget=widget or None)
    snippet = concept_snippet(name, f'"{name}"  # this folder', base_model, pipeline_class, ti_file,
                              n_text_encoders, prompt)
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, name=name, kind=kind, class_word=class_word,
                                   base_name=display_name(base_model), instance_prompt=prompt, snippet=snippet,
                                   ti_file=ti_file, samples=list(samples), sample_prompt=sample_prompt,
                                   sample_seed=sample_seed, sample_steps=sample_steps, **links())


LIBRARY_TEMPLATE = """---
{{ card_data }}
---

# A CIDM concept library

Concepts learned one after another with \
{% if project_url %}[CIDM Studio]({{ project_url }}){% else %}CIDM Studio{% endif %}\
{% if space_url %}, in the Space [{{ space_id }}]({{ space_url }}){% endif %} (Concept-Incremental text-to-image \
Diffusion Models: [Dong et al., NeurIPS 2024]({{ paper_url }}), [official code]({{ code_url }})). Each folder holds
a diffusers LoRA, a textual-inversion embedding, the layer-wise tokens and a model card.

| concept | kind | class word |
|---|---|---|
{% for c in concepts %}| [`<{{ c.name }}>`]({{ c.name }}/README.md) | {{ c.kind }} | {{ c.class_word }} |
{% endfor %}{% if snippet %}
## One concept in a plain diffusers pipeline

```python
{{ snippet }}
```

CIDM Studio loads the whole library (`library.json`), with every concept's layer-wise tokens and LoRA.
{% endif %}"""


def library_card(concepts: list[dict], base_model: str | None = None, pipeline_class: str = "",
                 n_text_encoders: int = 1, ti_file: str = "learned_embeds.safetensors",
                 repo_id: str | None = None) -> ModelCard:
    """A library's card: its concepts (manifest records with their `name`) and, once it has a concept and a repo,
    a snippet that downloads the first concept and uses it in a plain pipeline."""
    snippet = ""
    if concepts and base_model and repo_id:
        first = concepts[0]["name"]
        download = (f'from huggingface_hub import snapshot_download\n\n'
                    f'root = snapshot_download("{repo_id}", allow_patterns="{first}/*")\n')
        snippet = concept_snippet(first, f'f"{{root}}/{first}"', base_model, pipeline_class or
                                  "StableDiffusionPipeline", ti_file, n_text_encoders,
                                  card_prompt(first, concepts[0]["kind"]), download)
    data = ModelCardData(base_model=base_model if base_model and is_hub_id(base_model) else None, tags=TAGS,
                         library_name="diffusers")
    return ModelCard.from_template(data, template_str=LIBRARY_TEMPLATE, concepts=concepts, snippet=snippet,
                                   **links())
