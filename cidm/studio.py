"""A working session: one base model, one concept library, every concept's tokens and LoRA ready for generation.

The CLI and the app call this; it orchestrates the pieces (`train.learn_task`, the library's method from
`cidm.methods`, `generate`, `regions`, `library.Library`, which owns every file) and holds no file format.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from . import images as images_lib
from . import lora as lora_lib
from .attention import install_processors
from .generate import GenerateConfig, generate
from .library import Library, LibraryError
from .methods import get_method
from .metrics import Evaluator, image_alignment, text_alignment
from .models import BaseModelError, display_name, library_source, load_base
from .regions import Region, compose, edit, pixel_box
from .sampling import vae_scale
from .templates import check_kind, probe_prompt
from .tokens import ConceptTokens
from .train import PREVIEW_EVERY, TaskConfig, TaskResult, data_parallel, learn_task

METHOD = "cidm"
TASK_FIELDS = {f.name for f in dataclasses.fields(TaskConfig)} - {"name", "class_word", "kind"}


class Studio:
    """Base model + concept library, loaded and kept consistent."""

    def __init__(self, library, base_model: str | None = None, device: str | None = None,
                 dtype: torch.dtype | None = None, pipe=None, info=None, method: str | None = None):
        if pipe is None:
            pipe, info = load_base(base_model, device, dtype)
        self.pipe, self.info = pipe, info
        # a helper process of `accelerate launch` only reads: sweeping would remove the main process's staging
        self.library = Library(library, read_only=data_parallel()[0] > 0)
        learned_with = self.library.manifest.get("method")
        if method and learned_with and method != learned_with:
            raise LibraryError(f"this library was learned with method {learned_with!r}, not {method!r}; use a new "
                               f"library folder for another method")
        self.method = get_method(method or learned_with or METHOD)
        self.library.check_base(info.source, info.num_cross_attn_layers)
        self.tokens = ConceptTokens(pipe, info.num_cross_attn_layers)
        self.loras: dict[str, lora_lib.LoRAWeights] = {}
        self._load_library()

    def _load_library(self) -> None:
        for name in self.library.names:
            self.tokens.add(name, self.library.read_tokens(name))
            self.loras[name] = self.library.read_lora(name, device=self.pipe.device)
        self.method.load(self.library)

    @property
    def names(self) -> list[str]:
        return list(self.loras)

    # ------------------------------------------------------------------------------------------------------------
    # learning

    def learn(self, name: str, sources, class_word: str, kind: str = "object", captions: list[str] | None = None,
              replace: bool = False, progress: Callable[[int, dict], None] | None = None,
              cancel: Callable[[], bool] | None = None, preview: Callable[[int, list], None] | None = None,
              preview_every: int = PREVIEW_EVERY, **settings) -> TaskResult:
        """Learn a new concept from images (paths, PIL images, arrays…) and add it to the library atomically.

        `progress(step, terms)` after each step, `cancel()` to stop, `preview(step, images)` every `preview_every`
        steps (`train.learn_task`). `settings`: TaskConfig fields, or parameters of the library's method (e.g.
        CIDM's gamma1) for this task."""
        self.library.check_new(name, replace)
        check_kind(kind)
        if not class_word or not class_word.strip():
            raise ValueError("the class word is empty; give the kind of thing it is, e.g. 'dog', 'mug' or 'style'")
        task_settings = {k: v for k, v in settings.items() if k in TASK_FIELDS}
        config = TaskConfig(name=name, class_word=class_word.strip(), kind=kind,
                            **{**self.info.task_defaults, **self.method.task_settings, **task_settings})
        with self.method.overridden(**{k: v for k, v in settings.items() if k not in TASK_FIELDS}):
            pixels = images_lib.prepare_training_images(sources, self.info.resolution)
            seen = self.library.manifest  # the library this task learns against; another writer may change it
            if replace and name in self.loras:
                self._forget(name)
            kinds = {n: self.library.record(n)["kind"] for n in self.names}
            if data_parallel()[0] > 0:  # a helper process of `accelerate launch`: trains in step, writes nothing
                result = learn_task(self.pipe, self.tokens, config, self.method, pixels, dict(self.loras), kinds,
                                    captions)
                self._forget(name)  # back to the library as it was; the main process writes the new concept
                return result
            with self.library.staging() as stage:
                try:
                    result = learn_task(self.pipe, self.tokens, config, self.method, pixels, dict(self.loras),
                                        kinds, captions, progress=progress, cancel=cancel, preview=preview,
                                        preview_every=preview_every)
                    if result.cancelled:
                        self._reload()
                        return result
                    changed = self._add(stage, config, result, pixels, replace, seen)
                except BaseException:
                    self._reload()
                    raise
        if changed:  # load what the other writer added meanwhile
            self._reload()
        if self.record_forgetting:
            self.regenerate_all(budget=self.forgetting_budget)
        return result

    def _add(self, stage, config: TaskConfig, result: TaskResult, pixels: torch.Tensor, replace: bool,
             seen: dict) -> bool:
        """The learned concept joins the session, then the library: staged, and published in one step. True where
        another writer changed the library since `seen` (the method's state is then merged with theirs)."""
        name = config.name
        self.loras[name] = result.lora
        method_files = self.method.concept_files(self, config)  # e.g. LFS's vision context, sampled now
        samples, how = self._card_samples(config)
        card = {"name": name, "class_word": config.class_word, "kind": config.kind, "base_model": self.info.source,
                "pipeline_class": self.info.pipeline_class, **how}
        folder = self.library.stage_concept(
            stage, name, result.token_rows,
            {"name": name, "n_slots": str(config.n_slots), "class_word": config.class_word}, result.lora,
            result.lora_config, pixels, card, method_files, self.tokens.single_vectors(name), samples)
        record = {"class_word": config.class_word, "kind": config.kind, "task": len(self.library) + 1,
                  "tokens": self.tokens.slots[name], "training": {**dataclasses.asdict(config),
                                                                  **self.method.parameters()},
                  "seconds": round(result.seconds, 1), "final_terms": result.final_terms, "n_images": len(pixels)}
        base = {"source": library_source(self.info.source), "n_layers": self.info.num_cross_attn_layers,
                "pipeline_class": self.info.pipeline_class}
        with self.library.lock():  # the manifest as it is on disk now, not as it was when learning began
            on_disk = Library(self.library.root, read_only=True)
            changed = [on_disk.manifest["tasks"], on_disk.manifest.get("task_shared")] != \
                [seen["tasks"], seen.get("task_shared")]
            state = self.method.merged_state(on_disk, name) if changed else self.method.library_state()
            self.library.commit_concept(name, folder, record, base, self.method.name, self.method.settings(), state,
                                        replace=replace)
        return changed

    card_samples = 2  # images of a new concept made right after it is learned, for its model card (0: none)

    def _card_samples(self, config: TaskConfig) -> tuple[list, dict]:
        """Images of the concept just learned, for its card: its probe prompt, seed 0, in one batched call at the
        default steps; and how they were made."""
        if not self.card_samples:
            return [], {}
        prompt, settings = probe_prompt(config.name, config.kind), {"seed": 0, "num_images": self.card_samples}
        how = {"sample_prompt": prompt, "sample_seed": 0, "sample_steps": self.settings(**settings).steps}
        return self.generate(prompt, **settings), how

    def _forget(self, name: str) -> None:
        self.tokens.remove(name)
        self.loras.pop(name, None)
        self.method.forget(name)

    def _reload(self) -> None:
        """Back to exactly what the library on disk holds (after a cancelled or failed task), with the UNet at θ0."""
        lora_lib.remove_lora(self.pipe.unet)
        install_processors(self.pipe.unet)
        for name in list(self.tokens.names):
            self.tokens.remove(name)
        self.loras.clear()
        self.library.reload()  # read-only in a helper process of `accelerate launch`, as opened
        self._load_library()

    def refresh(self) -> bool:
        """Reload when another Studio or the command line changed the library on disk; True if it did."""
        if Library(self.library.root, read_only=True).manifest == self.library.manifest:
            return False
        self._reload()
        return True

    def delete(self, name: str) -> None:
        with self.library.lock():  # on the library as it is on disk (another writer may have added concepts)
            self.refresh()
            self.library.record(name)
            self._forget(name)
            self.library.delete(name, state=self.method.library_state())

    # ------------------------------------------------------------------------------------------------------------
    # forgetting, shown

    record_forgetting = True  # after each task, re-generate concepts (fixed prompt and seed) and score them
    forgetting_budget = 4  # concepts re-generated per task: the new one and those measured longest ago

    def probe_prompt(self, name: str) -> str:
        """The fixed prompt a concept is re-generated with after each task."""
        return probe_prompt(name, self.library.record(name)["kind"])

    def evaluator(self):
        """The IA evaluator for this base, or None where it cannot be loaded (e.g. offline without a local one)."""
        if not hasattr(self, "_evaluator"):
            try:
                self._evaluator = Evaluator(self.info.evaluator, str(self.pipe.device))
            except (BaseModelError, OSError):
                self._evaluator = None
        return self._evaluator

    def due_for_regeneration(self, budget: int | None = None) -> list[str]:
        """The concepts to re-generate after the latest task: the newest, then those whose last measurement is the
        oldest (earlier tasks first), `budget` in all (None: every concept). The others keep their last cells, so
        the record's cost per task stays fixed however many concepts the library holds."""
        if budget is None or budget >= len(self.names):
            return list(self.names)
        newest = self.names[-1]
        _, measured_at = self.library.forgetting_record("ia")
        last = measured_at[max(measured_at)] if measured_at else {}
        rest = sorted((n for n in self.names if n != newest), key=lambda n: (last.get(n, 0), self.names.index(n)))
        return [newest, *rest[:max(0, budget - 1)]]

    def regenerate_all(self, seeds: tuple[int, ...] = (0, 1), steps: int = 25, budget: int | None = None) -> dict:
        """Images of the concepts due after the latest task (`due_for_regeneration`), one batch per seed, stored by
        the library with their IA and TA."""
        names = self.due_for_regeneration(budget)
        prompts = [self.probe_prompt(n) for n in names]
        batches = {s: self.generate(prompts, seed=s, steps=steps) for s in seeds}  # one image per prompt
        images = {n: {s: batches[s][i] for s in seeds} for i, n in enumerate(names)}
        evaluator = self.evaluator()
        scores, text_scores = {}, {}
        for name in names if evaluator is not None else ():
            generated = list(images[name].values())
            scores[name] = round(image_alignment(evaluator, generated, self.library.reference_images(name)), 2)
            text = self.probe_prompt(name).replace(f"<{name}>", self.library.record(name)["class_word"])
            text_scores[name] = round(text_alignment(evaluator, generated, [text] * len(generated)), 2)
        self.library.write_forgetting(len(self.library), images, {"ia": scores, "ta": text_scores})
        return scores

    def forgetting(self, metric: str = "ia") -> dict:
        """{after_task: {concept: score}} from what was stored as tasks were learned; metric "ia" or "ta". A concept
        not re-generated after a task carries its last measured score (see `forgetting_record`)."""
        return self.library.forgetting_record(metric)[0]

    # ------------------------------------------------------------------------------------------------------------
    # generating

    def settings(self, **settings) -> GenerateConfig:
        """Generation settings: the library's method decides how the LoRAs merge, unless overridden."""
        inference = self.method.prepare_inference()
        return GenerateConfig(**{"merge": inference.merge, "psi": inference.psi, **settings})

    def generate(self, prompt: str | list[str], negative_prompt: str = "", callback=None, **settings):
        config = self.settings(**settings)
        images = generate(self.pipe, self.tokens, self.loras, prompt, negative_prompt, config, callback=callback,
                          contexts=self.method.prepare_inference().contexts)
        return self._described(images, [prompt] if isinstance(prompt, str) else list(prompt), negative_prompt,
                               config)

    def _described(self, images, prompts: list[str], negative_prompt: str, config: GenerateConfig, **extra):
        """The images with how they were made in their PNG metadata (reproducible from the same library)."""
        return images_lib.with_parameters(
            images, prompts, negative_prompt=negative_prompt, steps=config.steps, guidance=config.guidance,
            seed=config.seed, merge=config.merge, psi=config.psi, **extra, concepts=self.names,
            base_model=display_name(self.info.source), method=self.method.name, software="CIDM Studio")

    def compose(self, prompt: str, regions, negative_prompt: str = "", alpha: float = 0.1,
                region_noise: str = "normalised", callback=None, **settings):
        regions = [r if isinstance(r, Region) else Region(*r) for r in regions]
        config = self.settings(**settings)
        images = compose(self.pipe, self.tokens, self.loras, prompt, regions, negative_prompt, config, alpha=alpha,
                         region_noise=region_noise, callback=callback)
        return self._described(images, [prompt], negative_prompt, config, alpha=alpha, region_noise=region_noise,
                               regions=[{"box": list(r.box), "prompt": r.prompt} for r in regions])

    def edit(self, image, box, prompt: str, negative_prompt: str = "", strength: float = 0.8, **settings):
        """Regenerate inside `box` (pixels of `image`, or 0–1) of an image brought to the model's resolution first:
        its longer side becomes the model's side, so a large upload never goes through the VAE at full size."""
        image = images_lib.load_image(image)  # at its own size (within the pixel budget): the box is in its pixels
        w, h = image.size
        x0, y0, x1, y1 = pixel_box(box, w, h)
        image = images_lib.fit_model_side(image, self.info.resolution, vae_scale(self.pipe.vae))
        box = (x0 / w, y0 / h, x1 / w, y1 / h)  # relative: the same place on the resized image
        return edit(self.pipe, self.tokens, self.loras, image, box, prompt, negative_prompt, strength,
                    self.settings(**settings))


__all__ = ["Studio", "LibraryError"]
