"""A working session: one base model, one concept library, every concept's tokens and LoRA ready for generation.

The CLI and the app call this; it calls the pieces (`train.learn_task`, `generate.generate`, `library.Library`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import images as images_lib
from . import lora as lora_lib
from .generate import GenerateConfig, generate
from .library import Library, LibraryError
from .losses import TaskSharedKnowledge
from .methods import get_method
from .models import load_base
from .tokens import ConceptTokens
from .train import TaskConfig, TaskResult, data_parallel, learn_task

TOKENS_FILE = "tokens.safetensors"
FISHER_FILE = "ewc_fisher.safetensors"  # EWC: cumulative diagonal Fisher up to this task
CONTEXT_FILE = "context.png"  # LFS in-context generation: the concept's vision context, sampled after its task
METHOD = "cidm"


class Studio:
    """Base model + concept library, loaded and kept consistent."""

    def __init__(self, library: str | Path, base_model: str | None = None, device: str | None = None,
                 dtype: torch.dtype | None = None, pipe=None, info=None, method: str | None = None):
        if pipe is None:
            pipe, info = load_base(base_model, device, dtype)
        self.pipe, self.info = pipe, info
        self.library = Library(library)
        learned_with = self.library.manifest.get("method")
        if method and learned_with and method != learned_with:
            raise LibraryError(f"this library was learned with method {learned_with!r}, not {method!r}; use a new "
                               f"library folder for another method")
        self.method = get_method(method or learned_with or METHOD)
        self.library.check_base(info.source, info.num_cross_attn_layers)
        self.tokens = ConceptTokens(pipe, info.num_cross_attn_layers)
        self.loras: dict[str, lora_lib.LoRAWeights] = {}
        self.contexts: dict = {}  # LFS vision contexts by concept (methods with `icgen`)
        self.shared: TaskSharedKnowledge | None = None
        self._load_library()

    # ------------------------------------------------------------------------------------------------------------
    # loading

    def _load_library(self) -> None:
        for name in self.library.names:
            folder = self.library.concept_dir(name)
            self.tokens.add(name, load_tokens(folder))
            self.loras[name] = lora_lib.load_lora(folder, device=self.pipe.device)
            if (folder / CONTEXT_FILE).exists():
                self.contexts[name] = images_lib.load_image(folder / CONTEXT_FILE)
        shared_file = self.library.task_shared_file
        if shared_file is not None and shared_file.exists():
            self.shared = load_shared(shared_file)

    @property
    def names(self) -> list[str]:
        return list(self.loras)

    # ------------------------------------------------------------------------------------------------------------
    # learning

    def learn(self, name: str, sources, class_word: str, kind: str = "object", captions: list[str] | None = None,
              replace: bool = False, progress: Callable[[int, dict], None] | None = None,
              cancel: Callable[[], bool] | None = None, **settings) -> TaskResult:
        """Learn a new concept from images (paths, PIL images, arrays…) and add it to the library atomically."""
        self.library.check_new(name, replace)
        if kind not in ("object", "style"):
            raise ValueError(f"kind must be 'object' or 'style', got {kind!r}")
        if not class_word or not class_word.strip():
            raise ValueError("the class word is empty; give the kind of thing it is, e.g. 'dog', 'mug' or 'style'")
        config = TaskConfig(name=name, class_word=class_word.strip(), kind=kind,
                            **{**self.info.task_defaults, **self.method.train, **settings})
        pixels = images_lib.prepare_training_images(sources, self.info.resolution)
        seen = self.library.manifest  # the library this task learns against; another writer may change it meanwhile
        if replace and name in self.loras:
            self._forget(name)
        past = dict(self.loras)
        shared = self.shared
        if shared is not None and config.r2_rank != shared.rank:
            config = dataclasses.replace(config, r2_rank=shared.rank)
        fisher = None  # EWC: the cumulative Fisher stored with the latest concept
        if config.ewc_lambda > 0 and self.names:
            fisher = load_fisher(self.library.concept_dir(self.names[-1]))
        if data_parallel()[0] > 0:  # a helper process of `accelerate launch`: trains in step, writes nothing
            with tempfile.TemporaryDirectory() as tmp:
                result = learn_task(self.pipe, self.tokens, config, pixels, Path(tmp), past=past, shared=shared,
                                    captions=captions, fisher=fisher)
            self._forget(name)  # back to the library as it was; the main process writes the new concept
            return result
        with self.library.staging() as stage:
            folder = stage / name
            folder.mkdir()
            try:
                result = learn_task(self.pipe, self.tokens, config, pixels, folder, past=past, shared=shared,
                                    captions=captions, progress=progress, cancel=cancel, fisher=fisher)
            except BaseException:
                self._reload()
                raise
            if result.cancelled:
                self._reload()
                return result
            save_tokens(folder, result.token_rows, config)
            if result.fisher is not None:
                save_file({k: v.contiguous() for k, v in result.fisher.items()}, str(folder / FISHER_FILE))
            save_images(folder, pixels)
            self.loras[name] = lora_lib.load_lora(folder, device=self.pipe.device)
            if self.method.icgen:  # LFS: the vision context, sampled from the model right after this task
                self.generate(self.probe_prompt(name, kind), seed=config.seed)[0].save(folder / CONTEXT_FILE)
                self.contexts[name] = images_lib.load_image(folder / CONTEXT_FILE)
            if self.shared is None:  # after the first task, W_* and H_1 from its ΔW
                self.shared = TaskSharedKnowledge(config.r2_rank)
                self.shared.initialise(name, self.loras[name])
            shared_file = stage / "task_shared.safetensors"
            save_shared(self.shared, shared_file)
            write_card(folder, config, self.info.source)
            record = {"class_word": config.class_word, "kind": kind, "task": len(self.library) + 1,
                      "tokens": self.tokens.slots[name], "training": dataclasses.asdict(config),
                      "seconds": round(result.seconds, 1), "final_terms": result.final_terms,
                      "n_images": len(pixels)}
            base = {"source": self.info.source, "n_layers": self.info.num_cross_attn_layers,
                    "pipeline_class": self.info.pipeline_class}
            try:
                with self.library.lock():  # the manifest as it is on disk now, not as it was when learning began
                    on_disk = Library(self.library.root, read_only=True).manifest
                    changed = [on_disk["tasks"], on_disk.get("task_shared")] != [seen["tasks"], seen.get("task_shared")]
                    if changed:
                        self._merge_task_shared(on_disk, name, shared_file)
                    self.library.commit_concept(name, folder, record, base, self.method.name,
                                                {"merge": self.method.merge, "psi": self.method.psi,
                                                 "gamma1": config.gamma1, "gamma2": config.gamma2},
                                                shared_file, replace=replace)
            except BaseException:
                self._reload()
                raise
        if changed:  # load what the other writer added
            self._reload()
        if self.record_forgetting:
            self.regenerate_all()
        return result

    # ------------------------------------------------------------------------------------------------------------
    # forgetting, shown

    record_forgetting = True  # after each task, re-generate every concept (fixed prompt and seed) and score it

    def probe_prompt(self, name: str, kind: str | None = None) -> str:
        """The fixed prompt a concept is re-generated with after each task."""
        kind = kind or self.library.record(name)["kind"]
        return f"a photo of a <{name}>" if kind == "object" else f"a picture in <{name}> style"  # training templates

    def evaluator(self):
        """The IA evaluator for this base, or None where it cannot be loaded (e.g. offline without a local one)."""
        if not hasattr(self, "_evaluator"):
            from .metrics import Evaluator
            from .models import BaseModelError

            try:
                self._evaluator = Evaluator(self.info.evaluator, str(self.pipe.device))
            except (BaseModelError, OSError):
                self._evaluator = None
        return self._evaluator

    def regenerate_all(self, seeds: tuple[int, ...] = (0, 1), steps: int = 25) -> dict:
        """Images of every learned concept after the latest task, stored under `forgetting/after-<t>/`, with IA."""
        from PIL import Image

        from .metrics import image_alignment, text_alignment

        t = len(self.library)
        folder = self.library.root / "forgetting" / f"after-{t:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        evaluator = self.evaluator()
        scores, text_scores = {}, {}
        for name in self.names:
            images = [self.generate(self.probe_prompt(name), seed=s, steps=steps)[0] for s in seeds]
            for s, im in zip(seeds, images):
                im.save(folder / f"{name}-{s}.png")
            if evaluator is not None:
                refs = [Image.open(p).convert("RGB") for p in
                        sorted((self.library.concept_dir(name) / "images").glob("*.png"))]
                scores[name] = round(image_alignment(evaluator, images, refs), 2)
                text = self.probe_prompt(name).replace(f"<{name}>", self.library.record(name)["class_word"])
                text_scores[name] = round(text_alignment(evaluator, images, [text] * len(images)), 2)
        (folder / "scores.json").write_text(json.dumps({"after_task": t, "ia": scores, "ta": text_scores}, indent=1))
        return scores

    def forgetting(self, metric: str = "ia") -> dict:
        """{after_task: {concept: score}} from what was stored as tasks were learned; metric "ia" or "ta"."""
        out = {}
        for f in sorted((self.library.root / "forgetting").glob("after-*/scores.json")):
            data = json.loads(f.read_text())
            out[data["after_task"]] = data.get(metric, {})
        return out

    def _forget(self, name: str) -> None:
        self.tokens.remove(name)
        self.loras.pop(name, None)
        self.contexts.pop(name, None)
        if self.shared is not None and name in self.shared.tasks:
            self.shared.remove_task(name)

    def _reload(self) -> None:
        """Back to exactly what the library on disk holds (after a cancelled or failed task), with the UNet at θ0."""
        from .attention import install_processors

        lora_lib.remove_lora(self.pipe.unet)
        install_processors(self.pipe.unet)
        for name in list(self.tokens.names):
            self.tokens.remove(name)
        self.loras.clear()
        self.contexts.clear()
        self.shared = None
        self.library.reload()
        self._load_library()

    def refresh(self) -> bool:
        """Reload when another Studio or the command line changed the library on disk; True if it did."""
        if Library(self.library.root, read_only=True).manifest == self.library.manifest:
            return False
        self._reload()
        return True

    def _merge_task_shared(self, on_disk: dict, name: str, path: Path) -> None:
        """Another writer changed the library while this task learned: keep R2's state as it is on disk (W_* and
        every H_i there) and add this task's H_g, so that neither writer's task loses its state. This task was
        learned without R1 against the concepts added meanwhile: CIDM learns one task after another."""
        shared_name = on_disk.get("task_shared")
        if not shared_name or not (self.library.root / shared_name).exists() or self.shared is None:
            return
        theirs = load_shared(self.library.root / shared_name)
        if name in theirs.tasks:  # replaced meanwhile: this task's H_g is the newer one
            theirs.remove_task(name)
        theirs.P[name], theirs.Q[name] = self.shared.P[name], self.shared.Q[name]
        save_shared(theirs, path)

    def delete(self, name: str) -> None:
        with self.library.lock():  # on the library as it is on disk (another writer may have added concepts)
            self.refresh()
            self.library.record(name)
            self._forget(name)
            shared_file = None
            if self.shared is not None and self.shared.tasks:
                shared_file = self.library.root / ".task_shared.tmp.safetensors"
                save_shared(self.shared, shared_file)
            else:
                self.shared = None
            self.library.delete(name, task_shared=shared_file)

    # ------------------------------------------------------------------------------------------------------------
    # generating

    def settings(self, **settings) -> GenerateConfig:
        """Generation settings: the library's method decides how the LoRAs merge, unless overridden."""
        return GenerateConfig(**{"merge": self.method.merge, "psi": self.method.psi, **settings})

    def generate(self, prompt: str | list[str], negative_prompt: str = "", callback=None, **settings):
        return generate(self.pipe, self.tokens, self.loras, prompt, negative_prompt, self.settings(**settings),
                        callback=callback, contexts=self.contexts if self.method.icgen else None)


    def compose(self, prompt: str, regions, negative_prompt: str = "", alpha: float = 0.1,
                region_noise: str = "normalised", callback=None, **settings):
        from .regions import Region, compose

        regions = [r if isinstance(r, Region) else Region(*r) for r in regions]
        return compose(self.pipe, self.tokens, self.loras, prompt, regions, negative_prompt,
                       self.settings(**settings), alpha=alpha, region_noise=region_noise, callback=callback)


    def edit(self, image, box, prompt: str, negative_prompt: str = "", strength: float = 0.8, **settings):
        """Regenerate inside `box` (pixels of `image`, or 0–1) of an image brought to the model's resolution first:
        its longer side becomes the model's side, so a large upload never goes through the VAE at full size."""
        from .regions import edit, pixel_box

        image = images_lib.load_image(image)  # at its own size (within the pixel budget): the box is in its pixels
        w, h = image.size
        x0, y0, x1, y1 = pixel_box(box, w, h)
        image = fit_model_side(image, self.info.resolution, 2 ** (len(self.pipe.vae.config.block_out_channels) - 1))
        box = (x0 / w, y0 / h, x1 / w, y1 / h)  # relative: the same place on the resized image
        return edit(self.pipe, self.tokens, self.loras, image, box, prompt, negative_prompt, strength,
                    self.settings(**settings))


def fit_model_side(image, side: int, multiple: int):
    """The image resized so that its longer side is `side`, both sides multiples of `multiple` (the VAE's factor)."""
    from PIL import Image

    w, h = image.size
    scale = side / max(w, h)
    size = tuple(max(multiple, round(v * scale / multiple) * multiple) for v in (w, h))
    return image if size == (w, h) else image.resize(size, Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------------------------
# files


def save_tokens(folder: Path, rows: torch.Tensor, config: TaskConfig) -> None:
    save_file({"embeddings": rows.float().contiguous()}, str(folder / TOKENS_FILE),
              metadata={"name": config.name, "n_slots": str(config.n_slots), "class_word": config.class_word})


def load_tokens(folder: Path) -> torch.Tensor:
    with safe_open(str(folder / TOKENS_FILE), "pt") as f:
        return f.get_tensor("embeddings")


def load_fisher(folder: Path) -> dict | None:
    path = folder / FISHER_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def save_shared(shared: TaskSharedKnowledge, path: Path) -> None:
    meta = {"rank": str(shared.rank), "modules": json.dumps(shared.modules_), "tasks": json.dumps(shared.tasks)}
    save_file({k: v.contiguous() for k, v in shared.to_tensors().items()}, str(path), metadata=meta)


def load_shared(path: Path) -> TaskSharedKnowledge:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return TaskSharedKnowledge.from_tensors(tensors, json.loads(meta["modules"]), json.loads(meta["tasks"]),
                                            int(meta["rank"]))


def save_images(folder: Path, pixels: torch.Tensor) -> None:
    from PIL import Image

    (folder / "images").mkdir()
    for i, p in enumerate(pixels):
        array = ((p.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / "images" / f"{i}.png")


def write_card(folder: Path, config: TaskConfig, base_model: str) -> None:
    from .hub import concept_card

    concept_card(config.name, config.class_word, config.kind, base_model).save(folder / "README.md")


__all__ = ["Studio", "LibraryError"]
