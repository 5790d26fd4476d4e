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


def push_library(root, repo_id: str, token: str, private: bool = True, api=None) -> str:
    """Upload a whole library (manifest + concept folders) as one model repo; returns its URL."""
    from pathlib import Path

    from huggingface_hub import HfApi

    root = Path(root)
    if not (root / "library.json").is_file():
        raise ValueError(f"{root} holds no library.json: learn a concept first")
    if not token:
        raise ValueError("no Hugging Face token: sign in with the Hugging Face button (on a Space) or set HF_TOKEN")
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise ValueError(f"repo id {repo_id!r} should look like 'your-name/my-concepts'")
    api = api or HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    card = ModelCard.from_template(
        ModelCardData(tags=["text-to-image", "diffusers", "lora", "cidm"], library_name="diffusers"),
        template_str="---\n{{ card_data }}\n---\n\n# A CIDM concept library\n\nConcepts learned one after another "
                     "with CIDM Studio; each folder holds a diffusers LoRA, layer-wise tokens and a model card.\n")
    card.save(root / "README.md")
    api.upload_folder(repo_id=repo_id, folder_path=str(root), repo_type="model",
                      ignore_patterns=[".staging-*", ".trash-*", "*.tmp"],
                      commit_message="Update CIDM concept library")
    return str(url)


def pull_library(repo_id: str, dest, token: str | None = None) -> str:
    """Download a library pushed with `push_library` into `dest`."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, repo_type="model", local_dir=str(dest), token=token)
