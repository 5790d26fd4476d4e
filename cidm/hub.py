"""Pushing and pulling libraries (one Hub model repo each, with a library card)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


def push_library(root, repo_id: str, token: str, private: bool = True, api=None, endpoint: str | None = None) -> str:
    """Upload a whole library (manifest + concept folders) as one model repo; returns its URL.

    `endpoint`: another Hub (default: huggingface.co, or HF_ENDPOINT).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    root = Path(root)
    if not (root / "library.json").is_file():
        raise ValueError(f"{root} holds no library.json: learn a concept first")
    if not token:
        raise ValueError("no Hugging Face token: sign in with the Hugging Face button (on a Space) or set HF_TOKEN")
    check_repo_id(repo_id)
    api = api or HfApi(token=token, endpoint=endpoint)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        card = ModelCard.from_template(
            ModelCardData(tags=["text-to-image", "diffusers", "lora", "cidm"], library_name="diffusers"),
            template_str="---\n{{ card_data }}\n---\n\n# A CIDM concept library\n\nConcepts learned one after "
                         "another with CIDM Studio; each folder holds a diffusers LoRA, layer-wise tokens and a model "
                         "card.\n")
        card.save(root / "README.md")
        api.upload_folder(repo_id=repo_id, folder_path=str(root), repo_type="model",
                          ignore_patterns=[".staging-*", ".trash-*", "*.tmp"],
                          commit_message="Update CIDM concept library")
    except HfHubHTTPError as err:
        raise ValueError(f"the Hub refused the push to {repo_id!r}: {err}. Check that your token may write there "
                         f"(scope 'contribute-repos' or a write token)") from err
    return str(url)


def pull_library(repo_id: str, dest, token: str | None = None, endpoint: str | None = None,
                 base: tuple[str, int] | None = None) -> Path:
    """Download a library pushed with `push_library` into `dest`, which must hold no concepts yet.

    It lands in a temporary folder first and moves into place only when it is a valid library (and, given `base` =
    (base model, cross-attention layers), one learned on that base): nothing the user has is overwritten.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from .library import Library, LibraryError

    check_repo_id(repo_id)
    dest = Path(dest)
    if (dest / "library.json").is_file() and Library(dest, read_only=True).names:
        raise ValueError(f"this library already has concepts ({', '.join(Library(dest, read_only=True).names)}); "
                         f"load a Hub library into an empty one (download or delete these first)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".pull-") as tmp:
        try:
            snapshot_download(repo_id, repo_type="model", local_dir=tmp, token=token or None, endpoint=endpoint)
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
            raise ValueError(f"could not download {repo_id!r} from the Hub: {err}. Check the repo id, that you may "
                             f"read it (private repos need your token), and the network") from err
        shutil.rmtree(Path(tmp) / ".cache", ignore_errors=True)
        if not (Path(tmp) / "library.json").is_file():
            raise ValueError(f"{repo_id!r} holds no library.json: it is not a CIDM Studio library")
        try:
            pulled = Library(tmp)
            if base is not None:
                pulled.check_base(*base)
        except LibraryError as err:
            raise ValueError(f"{repo_id!r}: {err}") from err
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(tmp, dest)
        Path(tmp).mkdir()  # for TemporaryDirectory's own clean-up
    return dest


def check_repo_id(repo_id: str) -> None:
    if not repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo id {repo_id!r} should look like 'your-name/my-concepts'")
