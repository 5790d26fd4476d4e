"""Pushing and pulling libraries (one Hub model repo each, with a library card)."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import tempfile
from pathlib import Path


def push_library(root, repo_id: str, token: str, private: bool = True, api=None, endpoint: str | None = None) -> str:
    """Upload a whole library (manifest + concept folders) as one model repo; returns its URL.

    What is uploaded is a snapshot taken under the library's lock: exactly the files the manifest accounts for, as
    they were at one moment (a concept learned meanwhile is not half in it), and never a staging or lock file.
    `endpoint`: another Hub (default: huggingface.co, or HF_ENDPOINT).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .library import MANIFEST, Library

    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise ValueError(f"{root} holds no library.json: learn a concept first")
    if not token:
        raise ValueError("no Hugging Face token: sign in with the Hugging Face button (on a Space) or set HF_TOKEN")
    check_repo_id(repo_id)
    library = Library(root)
    api = api or HfApi(token=token, endpoint=endpoint)
    library.write_card(repo_id)
    with library.staging() as stage:
        library.snapshot(stage / "library")
        try:
            url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, folder_path=str(stage / "library"), repo_type="model",
                              commit_message="Update CIDM concept library")
        except HfHubHTTPError as err:
            raise ValueError(f"the Hub refused the push to {repo_id!r}: {err}. Check that your token may write "
                             f"there (scope 'contribute-repos' or a write token)") from err
        except hub_errors() as err:
            raise ValueError(f"could not reach the Hub to push {repo_id!r} ({type(err).__name__}); check the network "
                             f"and try again") from err
    return str(url)


def pull_library(repo_id: str, dest, token: str | None = None, endpoint: str | None = None,
                 base: tuple[str, int] | None = None) -> Path:
    """Download a library pushed with `push_library` into `dest`, which must hold no concepts yet.

    Its `library.json` comes first and is checked (names, task-shared file, paths, base model, number of concepts);
    then the repo's listing tells the size of the files a library with those concepts may hold
    (`library.library_file_allowed`), which must stay under `MAX_PULL_BYTES`, and only those files are downloaded.
    It lands in a temporary folder beside `dest` and moves in by renames, under `dest`'s lock, `library.json` last:
    nothing the user has is overwritten and nothing outside `dest` is removed.
    `token`: the visitor's; None means anonymous (a stored or HF_TOKEN token is never picked up silently).
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.hf_api import RepoFile

    from .library import (CONCEPT_FILES, MANIFEST, MAX_CONCEPTS, MAX_MANIFEST_BYTES, Library, LibraryError,
                          library_file_allowed)

    check_repo_id(repo_id)
    dest = Path(dest)
    if Library(dest, read_only=True).names:
        raise ValueError(f"this library already has concepts ({', '.join(Library(dest, read_only=True).names)}); "
                         f"load a Hub library into an empty one (download or delete these first)")
    auth = token or False

    def fetch(what: str, call):
        try:
            return call()
        except hub_errors() as err:
            raise ValueError(f"could not download {repo_id!r} from the Hub ({what}): {err}. Check the repo id, that "
                             f"you may read it (private repos need your token), and the network") from err

    listing = fetch("its file list", lambda: {
        f.path: f.size or 0 for f in HfApi(endpoint=endpoint).list_repo_tree(repo_id, recursive=True, token=auth)
        if isinstance(f, RepoFile)})
    if MANIFEST not in listing:
        raise ValueError(f"{repo_id!r} holds no library.json: it is not a CIDM Studio library")
    if listing[MANIFEST] > MAX_MANIFEST_BYTES:
        raise ValueError(f"{repo_id!r}: its library.json is {listing[MANIFEST] / 2 ** 20:.0f} MB; a library "
                         f"manifest is a few KB")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull-") as tmp:
        stage = Path(tmp)

        def checked() -> Library:
            try:
                pulled = Library(stage, read_only=True)
                if base is not None:
                    pulled.check_base(*base)
            except LibraryError as err:
                raise ValueError(f"{repo_id!r}: {str(err).replace(str(stage), 'the pulled library')}") from err
            if len(pulled) > MAX_CONCEPTS:
                raise ValueError(f"{repo_id!r} holds {len(pulled)} concepts, more than the {MAX_CONCEPTS} a library "
                                 f"may hold here (CIDM_MAX_CONCEPTS)")
            return pulled

        fetch("library.json", lambda: hf_hub_download(repo_id, MANIFEST, local_dir=tmp, token=auth,
                                                      endpoint=endpoint, cache_dir=stage / ".cache"))
        pulled = checked()
        wanted = [f for f in listing if library_file_allowed(f, pulled.names, pulled.manifest.get("task_shared"))]
        size = sum(listing[f] for f in wanted)
        if size > MAX_PULL_BYTES or len(wanted) > MAX_PULL_FILES:
            raise ValueError(f"{repo_id!r} is too large to load here: {size / 2 ** 20:.0f} MB in {len(wanted)} files "
                             f"(at most {MAX_PULL_BYTES / 2 ** 20:.0f} MB and {MAX_PULL_FILES} files, "
                             f"CIDM_MAX_PULL_MB)")
        fetch("its files", lambda: snapshot_download(repo_id, local_dir=tmp, allow_patterns=wanted, token=auth,
                                                     endpoint=endpoint, cache_dir=stage / ".cache"))
        shutil.rmtree(stage / ".cache", ignore_errors=True)  # the hub's bookkeeping stays in here, not in ~/.cache
        pulled = checked()  # the repo may have changed between the two downloads
        got = [p for p in stage.rglob("*") if p.is_file()]
        if sum(p.stat().st_size for p in got) > MAX_PULL_BYTES:
            raise ValueError(f"{repo_id!r} grew beyond {MAX_PULL_BYTES / 2 ** 20:.0f} MB while it downloaded")
        missing = [f"{n}/{f}" for n in pulled.names for f in CONCEPT_FILES if not (stage / n / f).is_file()]
        if missing:
            raise ValueError(f"{repo_id!r} lacks {missing[0]}: it is not a complete CIDM Studio library")
        Library(dest).move_in(stage)
    return dest


MAX_PULL_BYTES = int(float(os.environ.get("CIDM_MAX_PULL_MB", "2048")) * 2 ** 20)  # what one pull may download
MAX_PULL_FILES = 20_000
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def hub_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the Hub refuses, cannot be reached or is switched off (HF_HUB_OFFLINE): its
    HTTP errors, those of its HTTP library (httpx or httpx2, by version), and OSError."""
    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [OSError, HfHubHTTPError]
    for module in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(module).HTTPError)
        except ImportError:
            pass
    return tuple(errors)


def check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id or \
            repo_id.endswith((".", "-")) or repo_id.split("/")[0].endswith((".", "-")):
        raise ValueError(f"repo id {repo_id!r:.80} should look like 'your-name/my-concepts' (letters, digits, '-', "
                         f"'_' and '.')")
