"""The concept library: what a user keeps. A folder with `library.json` and one subfolder per concept.

    library.json                      manifest: base model, method + settings, task order, one record per concept
    <name>/pytorch_lora_weights.safetensors   the task's LoRA, diffusers format (`pipe.load_lora_weights(<name>)`)
    <name>/tokens.safetensors         layer-wise token embeddings (n_slots · L, D)
    <name>/learned_embeds.safetensors the tokens as one textual-inversion embedding per slot, for a plain pipeline
                                      (`pipe.load_textual_inversion(<file>, token="<name>")`)
    <name>/images/*.png               the reference images
    <name>/samples/*.png              images of the concept made right after it was learned (shown in the card)
    <name>/README.md                  model card
    <name>/<method's files>           what the library's method keeps per concept (EWC's Fisher, LFS's context)
    task_shared-*.safetensors         the method's state kept once per library (CIDM: R2's W_* and every task's
                                      H_i), the file the manifest names
    forgetting/after-<t>/             the concepts re-generated after task t (the new one and those due), scores

This module owns every file format of the library; the rest of the package hands it tensors, images and records.

Every change is atomic: files are written into a staging folder beside the concepts, moved into place, and the
change becomes real only when `library.json` is replaced (`os.replace`). A crash or kill at any moment leaves the
previous manifest and every earlier concept exactly as they were; stray staging folders are swept on the next open.

Several writers (two Studios, the app beside the command line) may share one library: every read-modify-write of the
manifest holds the lock file `.lock` and re-reads the manifest under it, so no writer's change is lost. A manifest is
never trusted: every read checks names, the task-shared file name and that every path stays inside the library.
What a library may hold is a closed list (`library_file_allowed`): a push uploads and a pull downloads nothing else.
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
from filelock import FileLock, Timeout
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from .cards import concept_card, library_card
from .images import save_png
from .lora import LORA_FILE, LoRAWeights

MANIFEST = "library.json"
FORMAT = 1
TOKENS_FILE = "tokens.safetensors"
CARD_FILE = "README.md"
TEXTUAL_INVERSION_FILE = "learned_embeds.safetensors"  # the name diffusers' textual-inversion scripts write
IMAGES = "images"
SAMPLES = "samples"
FORGETTING = "forgetting"
NAME_RULE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
NAME_HELP = ("1–40 characters: lower-case letters a–z, digits, '-' and '_', starting with a letter or digit "
             "(no spaces, no path separators, no '..'; not 'forgetting')")
RESERVED = (FORGETTING,)  # folders of a library that are not concepts (`write_forgetting` writes there)
TASK_SHARED_RULE = re.compile(r"^task_shared-[0-9a-f]{8}\.safetensors$")
LOCK_FILE = ".lock"
LOCK_TIMEOUT = 60.0  # seconds a writer waits for another one before giving up with a clear error
MAX_CONCEPTS = int(os.environ.get("CIDM_MAX_CONCEPTS", "50"))  # concepts one library may hold
MAX_MANIFEST_BYTES = 4 * 2 ** 20  # a library.json larger than this is refused before it is parsed
CONCEPT_FILES = (TOKENS_FILE, LORA_FILE)  # what marks a folder as a concept
FILE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")  # one part of a library file's path (no '.' first)


class LibraryError(ValueError):
    """A library operation was refused; the message says why and what to do."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RULE.match(name) or name in RESERVED:
        raise LibraryError(f"concept name {_short(name)} is not allowed: use {NAME_HELP}.")
    return name


def _short(value, limit: int = 60) -> str:
    """repr() of a value from outside, cut to `limit` characters (a hostile name can be a megabyte long)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def inside(root: str | Path, path: str | Path) -> Path:
    """`path`, once it is known to stay inside `root` after resolving '..' and symbolic links; else LibraryError."""
    root_resolved, resolved = Path(root).resolve(), Path(path).resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise LibraryError(f"{_short(str(Path(path).name))} points outside its folder; refused")
    return Path(path)


def check_manifest(data, where: str) -> dict:
    """The manifest if it follows the rules a library writes by, else LibraryError (it may come from the Hub)."""
    def bad(why: str):
        raise LibraryError(f"{where} is not a valid library manifest: {why}; restore it from a copy or start a new "
                           f"library folder")

    if not isinstance(data, dict):
        bad("it is not a JSON object")
    if data.get("format") != FORMAT:
        raise LibraryError(f"{where} has format {_short(data.get('format'))}; this version reads format {FORMAT}")
    tasks, concepts = data.get("tasks"), data.get("concepts")
    if not isinstance(tasks, list) or not isinstance(concepts, dict):
        bad("'tasks' must be a list and 'concepts' an object")
    for name in tasks:
        if not isinstance(name, str) or not NAME_RULE.match(name) or name in RESERVED:
            bad(f"concept name {_short(name)} breaks the naming rule ({NAME_HELP})")
    if len(set(tasks)) != len(tasks) or set(concepts) != set(tasks):
        bad("'tasks' and 'concepts' must name the same concepts, each once")
    for name, record in concepts.items():
        if not isinstance(record, dict) or not isinstance(record.get("class_word"), str) or \
                record.get("kind") not in ("object", "style"):
            bad(f"the record of {name!r} needs a class_word and a kind ('object' or 'style')")
    shared = data.get("task_shared")
    if shared is not None and (not isinstance(shared, str) or not TASK_SHARED_RULE.match(shared)):
        bad(f"task_shared {_short(shared)} is not a file name task_shared-<8 hex digits>.safetensors")
    base = data.get("base_model")
    if base is not None and not (isinstance(base, dict) and isinstance(base.get("source"), str)
                                 and type(base.get("n_layers")) is int):
        bad("base_model needs a 'source' and a whole number 'n_layers'")
    if not isinstance(data.get("settings", {}), dict) or not isinstance(data.get("method") or "", str):
        bad("'settings' must be an object and 'method' a name")
    return data


def library_file_allowed(path: str, names: list[str], task_shared: str | None = None) -> bool:
    """Whether `path` (relative, '/'-separated) is a file a library with concepts `names` may hold: the manifest,
    the card, the task-shared file; in a concept's folder its card, tensors (`*.safetensors`: tokens, LoRA,
    textual inversion, a method's) and images (`*.png` beside them, in `images/` or `samples/`); stored
    re-generations in `forgetting/after-<t>/`. A pulled repo brings nothing else, a push uploads nothing else."""
    parts = path.split("/")
    if not all(FILE_PART.match(p) for p in parts):
        return False
    if len(parts) == 1:
        return path in (MANIFEST, CARD_FILE) or path == task_shared
    if parts[0] == FORGETTING:
        return len(parts) == 3 and re.match(r"^after-\d+$", parts[1]) is not None and \
            parts[2].endswith((".png", ".json"))
    if parts[0] not in names:
        return False
    if len(parts) == 2:
        return parts[1] == CARD_FILE or parts[1].endswith((".safetensors", ".png"))
    return len(parts) == 3 and parts[1] in (IMAGES, SAMPLES) and parts[2].endswith(".png")


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


def write_textual_inversion(folder: Path, name: str, vectors: list[torch.Tensor]) -> Path:
    """A concept's single-vector embeddings (one (n_slots, D_i) tensor per text encoder) as diffusers'
    `load_textual_inversion` reads them: one text encoder, `{"<name>": (n_slots, D)}` (several slots make a
    multi-vector embedding: diffusers writes `<name>` as `<name> <name>_1 …`); two (SDXL), `{"clip_l", "clip_g"}`,
    as diffusers' SDXL textual-inversion scripts save them."""
    if len(vectors) not in (1, 2):
        raise ValueError(f"a textual-inversion file holds one or two text encoders' embeddings, not {len(vectors)}")
    keys = [f"<{name}>"] if len(vectors) == 1 else ["clip_l", "clip_g"]
    path = Path(folder) / TEXTUAL_INVERSION_FILE
    write_tensors(path, {k: v.float() for k, v in zip(keys, vectors)},
                  {"name": name, "made_from": "tokens.safetensors, mean over the cross-attention layers"})
    return path


def textual_inversion_encoders(path: Path) -> int:
    """How many text encoders a textual-inversion file written by `write_textual_inversion` serves."""
    with safe_open(str(path), "pt") as f:
        return 2 if "clip_g" in f.keys() else 1


def write_images(folder: Path, pixels: torch.Tensor) -> None:
    """Images (N, 3, H, W) in [-1, 1] as `0.png`, `1.png`, …"""
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(pixels):
        array = ((p.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(array).save(folder / f"{i}.png")


class Library:
    """A concept library on disk (created on first write)."""

    def __init__(self, root: str | Path, read_only: bool = False):
        """`read_only`: only read the manifest (safe beside a writer in another thread; nothing is swept)."""
        self.root = Path(root).expanduser()
        self.read_only = read_only
        self._lock: FileLock | None = None
        self.manifest = self._read()
        if not read_only:
            self._sweep()

    def _read(self) -> dict:
        path = self.root / MANIFEST
        if not path.exists():
            return {"format": FORMAT, "base_model": None, "method": None, "settings": {}, "tasks": [],
                    "concepts": {}, "task_shared": None}
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise LibraryError(f"{path} is larger than {MAX_MANIFEST_BYTES // 2 ** 20} MB; it is not a library "
                               f"manifest")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise LibraryError(f"{path} is not valid JSON ({err}); restore it from a copy or start a new library "
                               f"folder") from err
        check_manifest(data, str(path))
        for name in data["tasks"]:
            inside(self.root, self.root / name)
        if data.get("task_shared"):
            inside(self.root, self.root / data["task_shared"])
        return data

    def reload(self) -> None:
        """Read the manifest again (another writer may have changed it) and, unless read-only, sweep what interrupted
        writes left."""
        self.manifest = self._read()
        if not self.read_only:
            self._sweep()

    @contextlib.contextmanager
    def lock(self, timeout: float = LOCK_TIMEOUT):
        """Hold the library's lock file: other Studios, the command line and other threads wait (reentrant for this
        object in one thread). Writers re-read the manifest under it before they change it."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._lock = FileLock(str(self.root / LOCK_FILE))
        try:
            self._lock.acquire(timeout=timeout)
        except Timeout:
            raise LibraryError(f"the library is busy: another Studio or the command line has been writing it for "
                               f"{timeout:.0f} s; try again in a moment") from None
        try:
            yield self
        finally:
            self._lock.release()

    def _sweep(self) -> None:
        """Remove what an interrupted write left behind: dead staging folders, trash, temporary files, and the
        concept folders and task-shared files the manifest does not name. A replace that crashed before its manifest
        was published is rolled back: the old concept returns to its folder."""
        if not self.root.exists():
            return
        try:
            with self.lock(timeout=0):  # another writer at work: it cleans up after itself, the next open sweeps
                self.manifest = manifest = self._read()
                named = set(manifest["tasks"]) | set(RESERVED) | {manifest.get("task_shared")}
                is_library = (self.root / MANIFEST).exists()
                for p in sorted(self.root.iterdir()):
                    if p.name.startswith(".trash-"):
                        self._restore_or_drop(p, manifest)
                    elif p.name.startswith(".staging-"):
                        if not _staging_alive(p):
                            _remove(p)
                    elif p.name.endswith(".tmp") or p.name.startswith(".task_shared"):
                        _remove(p)
                    elif is_library and p.name not in named and (
                            TASK_SHARED_RULE.match(p.name) or (NAME_RULE.match(p.name) and p.is_dir() and any(
                                (p / f).exists() for f in CONCEPT_FILES))):
                        _remove(p)  # written by a commit whose manifest never appeared
        except LibraryError:
            return

    def _restore_or_drop(self, trash: Path, manifest: dict) -> None:
        """`.trash-<name>-<commit>` holds a replaced concept: garbage once the manifest names that commit, else the
        replace never got published and the old concept goes back into place."""
        name, _, commit = trash.name.removeprefix(".trash-").rpartition("-")
        record = manifest["concepts"].get(name)
        if record is None or record.get("commit") == commit or not trash.is_dir() or trash.is_symlink():
            _remove(trash)
            return
        target = self.root / name
        if target.exists() or target.is_symlink():
            _remove(target)
        os.replace(trash, target)

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
        return inside(self.root, self.root / name)

    def images(self, name: str) -> list[Path]:
        """A concept's reference images (files inside the library only)."""
        folder = self.concept_dir(name) / IMAGES
        return [p for p in sorted(folder.glob("*.png")) if p.is_file() and _is_inside(self.root, p)]

    @property
    def task_shared_file(self) -> Path | None:
        name = self.manifest.get("task_shared")
        return inside(self.root, self.root / name) if name else None

    def files(self) -> list[str]:
        """Every file that belongs to the library, relative to its root: the manifest, the model card, the
        task-shared state, the concept folders it names and the stored re-generations, as `library_file_allowed`
        lists them. Nothing else (no staging, lock or temporary files, no stray file a user dropped in a concept's
        folder, nothing that resolves outside the library)."""
        names, shared = self.manifest["tasks"], self.manifest.get("task_shared")
        top = [MANIFEST, CARD_FILE, shared]
        out = [f for f in top if f and (self.root / f).is_file() and _is_inside(self.root, self.root / f)]
        for folder in [*names, *RESERVED]:
            base = self.root / folder
            if base.is_dir() and _is_inside(self.root, base):
                out += [rel for p in sorted(base.rglob("*")) if p.is_file() and _is_inside(self.root, p)
                        and library_file_allowed(rel := p.relative_to(self.root).as_posix(), names, shared)]
        return out

    def snapshot(self, dest: str | Path, link: bool = True) -> list[str]:
        """Hard-link (`link`, else copy) every file of the library into `dest`, under the lock: a consistent copy
        that later changes do not touch (a change writes new files and renames them into place; it never rewrites
        one). A read-only library (e.g. the shipped demo) is copied without its lock: nothing is written there."""
        dest = Path(dest)
        with contextlib.nullcontext() if self.read_only else self.lock():
            self.manifest = self._read()
            names = self.files()
            for rel in names:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                if not (link and _hard_link(self.root / rel, dest / rel)):
                    shutil.copy2(self.root / rel, dest / rel)
        return names

    def read_tokens(self, name: str) -> torch.Tensor:
        return read_tensors(self.concept_dir(name) / TOKENS_FILE)[0]["embeddings"]

    def read_lora(self, name: str, device="cpu") -> LoRAWeights:
        return read_lora(self.concept_dir(name), device)

    def _concept_file(self, name: str, file: str) -> Path | None:
        """A file kept beside a concept, if it is there and stays inside the library."""
        path = self.concept_dir(name) / file
        return path if path.is_file() and _is_inside(self.root, path) else None

    def read_tensors(self, name: str, file: str) -> dict[str, torch.Tensor] | None:
        """A method's tensors kept beside a concept, or None where it kept none."""
        path = self._concept_file(name, file)
        return read_tensors(path)[0] if path is not None else None

    def read_image(self, name: str, file: str) -> Image.Image | None:
        """A method's image kept beside a concept, or None where it kept none."""
        path = self._concept_file(name, file)
        return Image.open(path).convert("RGB") if path is not None else None

    def reference_images(self, name: str) -> list[Image.Image]:
        return [Image.open(p).convert("RGB") for p in self.images(name)]

    def read_task_shared(self) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The method's state kept once per library (tensors, metadata), or None."""
        path = self.task_shared_file
        return read_tensors(path) if path is not None and path.exists() else None

    def _forgetting_scores(self):
        """Each after-task scores file, oldest first, as {after_task, regenerated, ia, ta}. The files may come from
        the Hub: one that is not what `write_forgetting` writes is skipped, never trusted."""
        def numbers(d) -> dict:
            return {n: float(v) for n, v in d.items() if isinstance(n, str) and isinstance(v, (int, float))} \
                if isinstance(d, dict) else {}

        found = []
        for f in (self.root / FORGETTING).glob("after-*/scores.json"):
            try:
                data = json.loads(f.read_text()) if f.stat().st_size <= MAX_MANIFEST_BYTES else None
            except (OSError, ValueError):
                continue
            task = data.get("after_task") if isinstance(data, dict) else None
            if not isinstance(task, int) or isinstance(task, bool) or f.parent.name != f"after-{task:02d}":
                continue
            ia, ta = numbers(data.get("ia")), numbers(data.get("ta"))
            regenerated = data.get("regenerated")
            if not isinstance(regenerated, list) or not all(isinstance(n, str) for n in regenerated):
                regenerated = list(ia)
            found.append({"after_task": task, "regenerated": regenerated, "ia": ia, "ta": ta})
        return sorted(found, key=lambda d: d["after_task"])

    def forgetting_record(self, metric: str = "ia") -> tuple[dict, dict]:
        """The record with every cell filled: ({after_task: {concept: score}}, {after_task: {concept: the task
        after which that score was measured}}). A concept not re-generated after a task carries its last score."""
        scores, measured_at, last = {}, {}, {}
        for data in self._forgetting_scores():
            task, values = data["after_task"], data.get(metric, {})
            last.update({n: (task, values.get(n)) for n in data["regenerated"]})
            scores[task] = {n: v for n, (_, v) in last.items() if v is not None}
            measured_at[task] = {n: t for n, (t, _) in last.items()}
        return scores, measured_at

    def write_forgetting(self, task: int, images: dict[str, dict[int, Image.Image]], scores: dict) -> None:
        """The concepts' images re-generated after `task` (by seed), and their scores."""
        folder = inside(self.root, self.root / FORGETTING / f"after-{task:02d}")
        folder.mkdir(parents=True, exist_ok=True)
        for name, by_seed in images.items():
            for seed, image in by_seed.items():
                image.save(folder / f"{name}-{seed}.png")
        (folder / "scores.json").write_text(json.dumps({"after_task": task, "regenerated": list(images), **scores},
                                                       indent=1))

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
        """A fresh folder beside the concepts for writing a change; removed if the change is not committed. It holds
        a lock of its own while in use, so that a sweep (from another Studio or process) leaves it alone."""
        with self.lock():  # made and marked live at once: a sweep never sees it unmarked
            path = self.root / f".staging-{uuid.uuid4().hex}"
            path.mkdir()
            live = FileLock(str(path / ".live"))
            live.acquire(timeout=0)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            live.release()

    def stage_concept(self, stage: Path, name: str, token_rows: torch.Tensor, token_meta: dict, lora: LoRAWeights,
                      lora_config: dict, pixels: torch.Tensor, card: dict, method_files: dict,
                      single_vectors: list[torch.Tensor], samples: list[Image.Image] = ()) -> Path:
        """Write a new concept's folder inside a staging folder: tokens, LoRA, their textual-inversion form
        (`single_vectors`, one (n_slots, D) tensor per text encoder), reference images, samples made right after
        learning (PNG with how they were made), card, and the method's files (tensors as safetensors, images as
        PNG)."""
        folder = stage / name
        folder.mkdir()
        write_tensors(folder / TOKENS_FILE, {"embeddings": token_rows.float()}, token_meta)
        write_lora(folder, lora, lora_config)
        write_textual_inversion(folder, name, single_vectors)
        write_images(folder / IMAGES, pixels)
        if samples:
            (folder / SAMPLES).mkdir()
        for i, image in enumerate(samples):
            save_png(image, folder / SAMPLES / f"{i}.png")
        concept_card(**card, n_text_encoders=len(single_vectors), ti_file=TEXTUAL_INVERSION_FILE,
                     samples=[f"{SAMPLES}/{i}.png" for i in range(len(samples))]).save(folder / CARD_FILE)
        for file, content in method_files.items():
            if isinstance(content, Image.Image):
                content.save(folder / file)
            else:
                write_tensors(folder / file, content)
        return folder

    def check_new(self, name: str, replace: bool = False) -> None:
        _check_new(self.manifest, name, replace)

    def commit_concept(self, name: str, staged: Path, record: dict, base: dict, method: str, settings: dict,
                       state: tuple[dict, dict] | None, replace: bool = False) -> None:
        """Move a staged concept folder into place and publish it (and the method's new state) in the manifest.

        Under the lock, on the manifest as it is on disk now. A replaced concept is kept in `.trash-<name>-<commit>`
        until the new manifest is published, and put back if anything fails before that."""
        with self.lock():
            manifest = self._read()
            _check_new(manifest, name, replace)
            if manifest["base_model"] is None:
                manifest.update(base_model=base, method=method, settings=settings)
            commit = uuid.uuid4().hex
            target, trash = self.root / name, self.root / f".trash-{name}-{commit}"
            old_state = manifest.get("task_shared")
            moved = {"old": False, "new": False}
            try:
                if target.exists() or target.is_symlink():  # a replaced concept, or a leftover not in the manifest
                    os.replace(target, trash)
                    moved["old"] = True
                os.replace(staged, target)
                moved["new"] = True
                self._write_state(manifest, state)
                manifest["concepts"][name] = {
                    **record, "name": name, "task": len(manifest["tasks"]) + 1, "commit": commit,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                if name not in manifest["tasks"]:
                    manifest["tasks"].append(name)
                _write_json_atomic(self.root / MANIFEST, manifest)  # the change becomes real here
            except BaseException:
                if manifest.get("task_shared") not in (None, old_state):
                    (self.root / manifest["task_shared"]).unlink(missing_ok=True)
                if moved["new"]:
                    _remove(target)
                if moved["old"]:
                    os.replace(trash, target)
                raise
            self._published(manifest, old_state)
            if moved["old"]:
                _remove(trash)

    def delete(self, name: str, state: tuple[dict, dict] | None = None) -> None:
        """Remove a concept and publish the method's state without it, on the manifest as it is on disk now."""
        with self.lock():
            self.manifest = manifest = self._read()
            self.record(name)
            del manifest["concepts"][name]
            manifest["tasks"].remove(name)
            old_state = self._write_state(manifest, state)
            if not manifest["tasks"]:
                manifest.update(base_model=None, method=None, settings={}, task_shared=None)
            self._publish(manifest, old_state)
            _remove(self.root / name)

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
        self._published(manifest, old_state)

    def _published(self, manifest: dict, old_state: str | None) -> None:
        self.manifest = manifest
        if old_state and old_state != manifest.get("task_shared"):
            (self.root / old_state).unlink(missing_ok=True)

    def write_card(self, repo_id: str | None = None) -> None:
        """The library's model card (for the Hub repo `repo_id`), written aside and renamed under the lock: a
        snapshot taken meanwhile keeps the old card intact. Its snippet uses the first concept, where that concept
        has its textual-inversion file (libraries learned before it existed have none)."""
        with self.lock():
            self.manifest = manifest = self._read()
            concepts = [{**manifest["concepts"][n], "name": n} for n in manifest["tasks"]]
            base = manifest.get("base_model") or {}
            embeds = self.root / concepts[0]["name"] / TEXTUAL_INVERSION_FILE if concepts else None
            usable = embeds is not None and embeds.is_file() and _is_inside(self.root, embeds)
            card = library_card(concepts, base.get("source") if usable else None, base.get("pipeline_class", ""),
                                textual_inversion_encoders(embeds) if usable else 1, TEXTUAL_INVERSION_FILE, repo_id)
            tmp = self.root / f".{CARD_FILE}.{uuid.uuid4().hex}.tmp"
            card.save(tmp)
            os.replace(tmp, self.root / CARD_FILE)

    def move_in(self, stage: Path) -> None:
        """Move a checked library (a pulled one, in `stage` beside this one) into this library, which holds no
        concepts, by renames under the lock, `library.json` last: nothing outside this folder is removed."""
        with self.lock():
            if Library(self.root, read_only=True).names:
                raise LibraryError("this library got concepts while the Hub library downloaded; load it into an "
                                   "empty one")
            replaced = []
            for entry in sorted(stage.iterdir()):
                if entry.name == MANIFEST or entry.name.startswith("."):
                    continue
                target = self.root / entry.name
                if target.exists() or target.is_symlink():  # left by deleted concepts (an empty library has no other)
                    replaced.append(self.root / f".trash-{uuid.uuid4().hex}")  # swept if a crash comes before the end
                    os.replace(target, replaced[-1])
                os.replace(entry, target)
            os.replace(stage / MANIFEST, self.root / MANIFEST)  # the pulled library becomes real here
            self.manifest = self._read()
            for old in replaced:
                _remove(old)

    def update_record(self, name: str, **fields) -> None:
        """Add fields (e.g. scores) to a concept's record."""
        with self.lock():
            self.manifest = manifest = self._read()
            self.record(name)
            manifest["concepts"][name].update(fields)
            self._publish(manifest)


def _hard_link(src: Path, dest: Path) -> bool:
    try:
        os.link(src, dest)
        return True
    except OSError:  # another file system, or links not allowed
        return False


def _check_new(manifest: dict, name: str, replace: bool) -> None:
    validate_name(name)
    if name in manifest["concepts"]:
        if not replace:
            raise LibraryError(f"a concept named {name!r} already exists; choose another name, or ask to replace it "
                               f"(--replace / the Replace box)")
    elif len(manifest["tasks"]) >= MAX_CONCEPTS:
        raise LibraryError(f"the library already holds {len(manifest['tasks'])} concepts, the most one library may "
                           f"hold (CIDM_MAX_CONCEPTS); delete one or start a new library")


def _is_inside(root: Path, path: Path) -> bool:
    try:
        inside(root, path)
        return True
    except LibraryError:
        return False


def _remove(path: Path) -> None:
    """Delete a file, a link (never what it points to) or a folder."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _staging_alive(path: Path) -> bool:
    """Whether a staging folder is still being written (its creator holds the lock on its `.live` file)."""
    if not (path / ".live").is_file():
        return False
    probe = FileLock(str(path / ".live"))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:
        return False
    probe.release()
    return False
