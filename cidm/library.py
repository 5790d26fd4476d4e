"""The concept library: what a user keeps. A folder with `library.json` and one subfolder per concept.

    library.json                      manifest: base model, method + settings, task order, one record per concept
    <name>/pytorch_lora_weights.safetensors   the task's LoRA, diffusers format (`pipe.load_lora_weights(<name>)`)
    <name>/tokens.safetensors         layer-wise token embeddings (n_slots · L, D)
    <name>/images/*.png               the reference images
    <name>/README.md                  model card
    <name>/<method's files>           what the library's method keeps per concept (EWC's Fisher, LFS's context)
    task_shared-*.safetensors         the method's state kept once per library (CIDM: R2's W_* and every task's
                                      H_i), the file the manifest names
    forgetting/after-<t>/             every concept re-generated after task t, and its scores

This module owns every file format of the library; the rest of the package hands it tensors, images and records.

Every change is atomic: files are written into a staging folder beside the concepts, moved into place, and the
change becomes real only when `library.json` is replaced (`os.replace`). A crash or kill at any moment leaves the
previous manifest and every earlier concept exactly as they were; stray staging folders are swept on the next open.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from .lora import LORA_FILE, LoRAWeights
from .templates import card_prompt

MANIFEST = "library.json"
FORMAT = 1
TOKENS_FILE = "tokens.safetensors"
CARD_FILE = "README.md"
IMAGES = "images"
FORGETTING = "forgetting"
NAME_RULE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
NAME_HELP = ("1–40 characters: lower-case letters a–z, digits, '-' and '_', starting with a letter or digit "
             "(no spaces, no path separators, no '..')")


class LibraryError(ValueError):
    """A library operation was refused; the message says why and what to do."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RULE.match(name):
        raise LibraryError(f"concept name {name!r} is not allowed: use {NAME_HELP}.")
    return name


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# file formats


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def read_tensors(path: Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def write_lora(folder: Path, lora: LoRAWeights, adapter_config: dict) -> Path:
    """A task's LoRA as diffusers writes one (`pipe.load_lora_weights(folder)` reads it): keys
    `unet.<module>.lora.{down,up}.weight`, and peft's settings under `lora_adapter_metadata`."""
    tensors = {}
    for module in lora.modules:
        tensors[f"unet.{module}.lora.up.weight"] = lora.up[module]
        tensors[f"unet.{module}.lora.down.weight"] = lora.down[module]
    config = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in adapter_config.items()}
    path = Path(folder) / LORA_FILE
    write_tensors(path, tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2,
                                                                                      sort_keys=True)})
    return path


def read_lora(folder: Path, device="cpu") -> LoRAWeights:
    """Read a diffusers-format LoRA file (keys `unet.<module>.lora.{down,up}.weight`)."""
    tensors, meta = read_tensors(Path(folder) / LORA_FILE, device)
    up, down = {}, {}
    for key, tensor in tensors.items():
        module = key.removeprefix("unet.")
        if module.endswith(".lora.up.weight"):
            up[module.removesuffix(".lora.up.weight")] = tensor.float()
        elif module.endswith(".lora.down.weight"):
            down[module.removesuffix(".lora.down.weight")] = tensor.float()
    config = {k.removeprefix("unet."): v for k, v in json.loads(meta.get("lora_adapter_metadata", "{}")).items()}
    rank = next(iter(down.values())).shape[0]
    return LoRAWeights(up=up, down=down, scale=config.get("lora_alpha", rank) / config.get("r", rank))


def write_images(folder: Path, pixels: torch.Tensor) -> None:
    """Images (N, 3, H, W) in [-1, 1] as `0.png`, `1.png`, …"""
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(pixels):
        array = ((p.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{i}.png")


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
    prompt = card_prompt(name, kind)
    data = ModelCardData(base_model=base_model if "/" in base_model and not base_model.startswith("/") else None,
                         tags=["text-to-image", "diffusers", "lora", "cidm"], library_name="diffusers",
                         instance_prompt=prompt)
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, name=name, kind=kind, class_word=class_word,
                                   base_model=base_model, instance_prompt=prompt)


class Library:
    """A concept library on disk (created on first write)."""

    def __init__(self, root: str | Path, read_only: bool = False):
        """`read_only`: only read the manifest (safe beside a writer in another thread; nothing is swept)."""
        self.root = Path(root).expanduser()
        self.manifest = self._read()
        if not read_only:
            self._sweep()

    def _read(self) -> dict:
        path = self.root / MANIFEST
        if not path.exists():
            return {"format": FORMAT, "base_model": None, "method": None, "settings": {}, "tasks": [],
                    "concepts": {}, "task_shared": None}
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LibraryError(f"{path} is not valid JSON ({err}); restore it from a copy or start a new library "
                               f"folder") from err
        if data.get("format") != FORMAT:
            raise LibraryError(f"{path} has format {data.get('format')!r}; this version reads format {FORMAT}")
        return data

    def _sweep(self) -> None:
        """Remove what an interrupted write left behind: staging folders and unreferenced concept folders."""
        if not self.root.exists():
            return
        for p in self.root.iterdir():
            if p.name.startswith(".staging-") or p.name.startswith(".trash-") or p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------------------
    # reading

    @property
    def names(self) -> list[str]:
        return list(self.manifest["tasks"])

    def __len__(self) -> int:
        return len(self.manifest["tasks"])

    def record(self, name: str) -> dict:
        if name not in self.manifest["concepts"]:
            known = ", ".join(self.names) or "none yet"
            raise LibraryError(f"no concept {name!r} in the library at {self.root}; known: {known}")
        return self.manifest["concepts"][name]

    def concept_dir(self, name: str) -> Path:
        self.record(name)
        return self.root / name

    @property
    def task_shared_file(self) -> Path | None:
        name = self.manifest.get("task_shared")
        return self.root / name if name else None

    def read_tokens(self, name: str) -> torch.Tensor:
        return read_tensors(self.concept_dir(name) / TOKENS_FILE)[0]["embeddings"]

    def read_lora(self, name: str, device="cpu") -> LoRAWeights:
        return read_lora(self.concept_dir(name), device)

    def read_tensors(self, name: str, file: str) -> dict[str, torch.Tensor] | None:
        """A method's tensors kept beside a concept, or None where it kept none."""
        path = self.concept_dir(name) / file
        return read_tensors(path)[0] if path.exists() else None

    def read_image(self, name: str, file: str) -> Image.Image | None:
        """A method's image kept beside a concept, or None where it kept none."""
        path = self.concept_dir(name) / file
        return Image.open(path).convert("RGB") if path.exists() else None

    def reference_images(self, name: str) -> list[Image.Image]:
        return [Image.open(p).convert("RGB") for p in sorted((self.concept_dir(name) / IMAGES).glob("*.png"))]

    def read_task_shared(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The method's state kept once per library (tensors, metadata), or None."""
        path = self.task_shared_file
        return read_tensors(path) if path is not None and path.exists() else None

    def forgetting(self, metric: str = "ia") -> dict:
        """{after_task: {concept: score}} from what was stored as tasks were learned; metric "ia" or "ta"."""
        out = {}
        for f in sorted((self.root / FORGETTING).glob("after-*/scores.json")):
            data = json.loads(f.read_text())
            out[data["after_task"]] = data.get(metric, {})
        return out

    def write_forgetting(self, task: int, images: dict[str, dict[int, Image.Image]], scores: dict) -> None:
        """Every concept's images re-generated after `task` (by seed), and their scores."""
        folder = self.root / FORGETTING / f"after-{task:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, by_seed in images.items():
            for seed, image in by_seed.items():
                image.save(folder / f"{name}-{seed}.png")
        (folder / "scores.json").write_text(json.dumps({"after_task": task, **scores}, indent=1))

    def check_base(self, base_model: str, n_layers: int) -> None:
        """Refuse to use a library with another base model than the one it was learned on."""
        want = self.manifest.get("base_model")
        if want is None:
            return
        if want["n_layers"] != n_layers or want["source"].rstrip("/").split("/")[-1] != \
                str(base_model).rstrip("/").split("/")[-1]:
            raise LibraryError(
                f"this library was learned on base model {want['source']!r} ({want['n_layers']} cross-attention "
                f"layers), but {base_model!r} ({n_layers} layers) is loaded; load that base model (CIDM_BASE_MODEL) "
                f"or start a new library folder")

    # ------------------------------------------------------------------------------------------------------------
    # writing

    @contextlib.contextmanager
    def staging(self):
        """A fresh folder beside the concepts for writing a change; removed if the change is not committed."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f".staging-{uuid.uuid4().hex}"
        path.mkdir()
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def stage_concept(self, stage: Path, name: str, token_rows: torch.Tensor, token_meta: dict, lora: LoRAWeights,
                      lora_config: dict, pixels: torch.Tensor, card: dict, method_files: dict) -> Path:
        """Write a new concept's folder inside a staging folder: tokens, LoRA, reference images, card, and the
        method's files (tensors as safetensors, images as PNG)."""
        folder = stage / name
        folder.mkdir()
        write_tensors(folder / TOKENS_FILE, {"embeddings": token_rows.float()}, token_meta)
        write_lora(folder, lora, lora_config)
        write_images(folder / IMAGES, pixels)
        concept_card(**card).save(folder / CARD_FILE)
        for file, content in method_files.items():
            if isinstance(content, Image.Image):
                content.save(folder / file)
            else:
                write_tensors(folder / file, content)
        return folder

    def check_new(self, name: str, replace: bool = False) -> None:
        validate_name(name)
        if name in self.manifest["concepts"] and not replace:
            raise LibraryError(f"a concept named {name!r} already exists; choose another name, or ask to replace it "
                               f"(--replace / the Replace box)")

    def commit_concept(self, name: str, staged: Path, record: dict, base: dict, method: str, settings: dict,
                       state: tuple[dict, dict] | None, replace: bool = False) -> None:
        """Move a staged concept folder into place and publish it (and the method's new state) in the manifest."""
        self.check_new(name, replace)
        manifest = json.loads(json.dumps(self.manifest))
        if manifest["base_model"] is None:
            manifest.update(base_model=base, method=method, settings=settings)
        trash = None
        target = self.root / name
        if target.exists():  # a replaced concept, or a leftover not in the manifest
            trash = self.root / f".trash-{uuid.uuid4().hex}"
            os.replace(target, trash)
        os.replace(staged, target)
        old_state = self._write_state(manifest, state)
        record = {**record, "name": name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")}
        manifest["concepts"][name] = record
        if name not in manifest["tasks"]:
            manifest["tasks"].append(name)
        self._publish(manifest, old_state)  # the change becomes real here
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def delete(self, name: str, state: tuple[dict, dict] | None = None) -> None:
        self.record(name)
        manifest = json.loads(json.dumps(self.manifest))
        del manifest["concepts"][name]
        manifest["tasks"].remove(name)
        old_state = self._write_state(manifest, state)
        if not manifest["tasks"]:
            manifest.update(base_model=None, method=None, settings={}, task_shared=None)
        self._publish(manifest, old_state)
        shutil.rmtree(self.root / name, ignore_errors=True)

    def _write_state(self, manifest: dict, state: tuple[dict, dict] | None) -> str | None:
        """Write the method's new library-wide state under a fresh name and point `manifest` at it (nothing is
        published yet); returns the file named before."""
        old = manifest.get("task_shared")
        if state is None:
            return old
        name = f"task_shared-{uuid.uuid4().hex[:8]}.safetensors"
        tmp = self.root / f".{name}.tmp"
        write_tensors(tmp, *state)
        os.replace(tmp, self.root / name)
        manifest["task_shared"] = name
        return old

    def _publish(self, manifest: dict, old_state: str | None = None) -> None:
        """Replace the manifest (atomic), then remove the state file it no longer names."""
        _write_json_atomic(self.root / MANIFEST, manifest)
        self.manifest = manifest
        if old_state and old_state != manifest.get("task_shared"):
            (self.root / old_state).unlink(missing_ok=True)

    def update_record(self, name: str, **fields) -> None:
        """Add fields (e.g. scores) to a concept's record."""
        self.record(name)
        manifest = json.loads(json.dumps(self.manifest))
        manifest["concepts"][name].update(fields)
        self._publish(manifest)
