"""The concept library: what a user keeps. A folder with `library.json` and one subfolder per concept.

    library.json                      manifest: base model, method + settings, task order, one record per concept
    <name>/pytorch_lora_weights.safetensors   the task's LoRA, diffusers format (`pipe.load_lora_weights(<name>)`)
    <name>/tokens.safetensors         layer-wise token embeddings (n_slots · L, D)
    <name>/images/*.png               the reference images
    <name>/README.md                  model card
    task_shared-*.safetensors         R2's W_* and every task's H_i (the file the manifest names)

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

MANIFEST = "library.json"
FORMAT = 1
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

    def check_new(self, name: str, replace: bool = False) -> None:
        validate_name(name)
        if name in self.manifest["concepts"] and not replace:
            raise LibraryError(f"a concept named {name!r} already exists; choose another name, or ask to replace it "
                               f"(--replace / the Replace box)")

    def commit_concept(self, name: str, staged: Path, record: dict, base: dict, method: str, settings: dict,
                       task_shared: Path | None, replace: bool = False) -> None:
        """Move a staged concept folder into place and publish it (and the new task-shared state) in the manifest."""
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
        old_shared = manifest.get("task_shared")
        if task_shared is not None:
            shared_name = f"task_shared-{uuid.uuid4().hex[:8]}.safetensors"
            os.replace(task_shared, self.root / shared_name)
            manifest["task_shared"] = shared_name
        record = {**record, "name": name, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")}
        manifest["concepts"][name] = record
        if name not in manifest["tasks"]:
            manifest["tasks"].append(name)
        _write_json_atomic(self.root / MANIFEST, manifest)  # the change becomes real here
        self.manifest = manifest
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        if task_shared is not None and old_shared:
            (self.root / old_shared).unlink(missing_ok=True)

    def delete(self, name: str, task_shared: Path | None = None) -> None:
        self.record(name)
        manifest = json.loads(json.dumps(self.manifest))
        del manifest["concepts"][name]
        manifest["tasks"].remove(name)
        old_shared = manifest.get("task_shared")
        if task_shared is not None:
            shared_name = f"task_shared-{uuid.uuid4().hex[:8]}.safetensors"
            os.replace(task_shared, self.root / shared_name)
            manifest["task_shared"] = shared_name
        elif not manifest["tasks"]:
            manifest["task_shared"] = None
        if not manifest["tasks"]:
            manifest.update(base_model=None, method=None, settings={})
        _write_json_atomic(self.root / MANIFEST, manifest)
        self.manifest = manifest
        shutil.rmtree(self.root / name, ignore_errors=True)
        if old_shared and old_shared != manifest.get("task_shared"):
            (self.root / old_shared).unlink(missing_ok=True)

    def update_record(self, name: str, **fields) -> None:
        """Add fields (e.g. scores) to a concept's record."""
        self.record(name)
        manifest = json.loads(json.dumps(self.manifest))
        manifest["concepts"][name].update(fields)
        _write_json_atomic(self.root / MANIFEST, manifest)
        self.manifest = manifest
