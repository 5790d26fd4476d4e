"""Loading the base text-to-image model (and its evaluator) in one place, and describing it.

The same code path loads Stable Diffusion 1.5 / SDXL from the Hub and the embedded toy-world model shipped in this
package: every one is a diffusers folder (or Hub id) read with `DiffusionPipeline.from_pretrained`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path

import torch

EMBEDDED_MODEL = Path(__file__).parent / "toyworld" / "model"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
HUB_EVALUATOR = "openai/clip-vit-base-patch32"  # the CIDM paper's ViT-B/32 for IA / TA
EVALUATOR_POINTER = "cidm_evaluator.json"  # beside a base model folder: {"evaluator": "<path relative to it>"}
TASK_DEFAULTS = "cidm_task_defaults.json"  # beside a base model folder: TaskConfig settings tuned for that base
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class BaseModelError(RuntimeError):
    """The base model could not be loaded; the message says what was tried and what to do."""


@dataclasses.dataclass(frozen=True)
class BaseModelInfo:
    """What the rest of the package needs to know about a base model."""

    source: str  # Hub id or local folder
    pipeline_class: str  # e.g. StableDiffusionPipeline
    cross_attn_layers: tuple[str, ...]  # attn2 module names, in forward order down -> mid -> up
    text_hidden_size: int  # width of the text embeddings the cross-attention reads
    resolution: int  # native image side in pixels
    evaluator: str  # CLIP model (Hub id or folder) used for IA / TA
    task_defaults: dict = dataclasses.field(default_factory=dict)  # this base's learning settings (else the paper's)

    @property
    def num_cross_attn_layers(self) -> int:
        return len(self.cross_attn_layers)


def default_model() -> str:
    """`CIDM_BASE_MODEL`, else SD-1.5 when CUDA is available, else the embedded toy-world model."""
    if os.environ.get("CIDM_BASE_MODEL"):
        return os.environ["CIDM_BASE_MODEL"]
    if torch.cuda.is_available():
        return SD15
    return str(EMBEDDED_MODEL)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cross_attn_layers(unet) -> list[str]:
    """Names of the UNet's cross-attention modules, ordered down_blocks -> mid_block -> up_blocks.

    (`named_modules` lists down, up, mid: the registration order, not the forward order.)
    """
    from diffusers.models.attention_processor import Attention

    names = [n for n, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention]
    block_rank = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}

    def forward_order(name: str):
        return block_rank[name.split(".")[0]], [int(p) for p in name.split(".") if p.isdigit()]

    return sorted(names, key=forward_order)


def find_evaluator(source: str) -> str:
    """The evaluator that matches a base model: named beside a local folder, else CLIP ViT-B/32 from the Hub."""
    pointer = Path(source) / EVALUATOR_POINTER
    if pointer.is_file():
        return str((Path(source) / json.loads(pointer.read_text())["evaluator"]).resolve())
    return HUB_EVALUATOR


def find_task_defaults(source: str) -> dict:
    """Learning settings that a local base folder ships (e.g. the toy world's LoRA learning rate); Hub models and
    folders without the file learn with the paper's settings. Keys starting with '_' are comments."""
    path = Path(source) / TASK_DEFAULTS
    if not path.is_file():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def describe(pipe, source: str) -> BaseModelInfo:
    unet = pipe.unet
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return BaseModelInfo(
        source=source,
        pipeline_class=type(pipe).__name__,
        cross_attn_layers=tuple(cross_attn_layers(unet)),
        text_hidden_size=int(unet.config.cross_attention_dim),
        resolution=int(unet.config.sample_size) * vae_scale,
        evaluator=find_evaluator(source),
        task_defaults=find_task_defaults(source),
    )


def display_name(source: str) -> str:
    """What to show people for a base model: a Hub id as it is; a local folder by its name, never the server's path."""
    if Path(source).resolve() == EMBEDDED_MODEL.resolve():
        return "embedded toy world (64 px)"
    return Path(source).name if _looks_local(source) else source


def library_source(source: str) -> str:
    """How a library records its base model: a Hub id as it is, a local folder by its name (the library check
    compares names), never the path on the machine that learned it, which a shared library would carry."""
    return Path(source).name if _looks_local(source) else source


def is_hub_id(source: str) -> bool:
    """Whether a base model is named by its Hub id, not by a folder on this machine."""
    return not _looks_local(source) and not Path(source).expanduser().exists()


def _looks_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1] or not _HUB_ID.match(model)


def load_base(model: str | None = None, device: str | None = None, dtype: torch.dtype | None = None):
    """Load a base text-to-image pipeline and describe it.

    `model` is a Hub id or a local folder in diffusers layout (default: `default_model()`). Returns (pipeline, info).
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    model = str(model or default_model())
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(
                f"{path} exists but is not a diffusers model folder (no model_index.json). Point CIDM_BASE_MODEL "
                f"(or --base-model) at a folder written by `pipeline.save_pretrained`, or at a Hub id such as {SD15}.")
        source = str(path)
    elif _looks_local(model):
        raise BaseModelError(
            f"no local folder at {model}. Set CIDM_BASE_MODEL to a local diffusers folder, or to a Hub id such as "
            f"{SD15} on a machine with network access.")
    else:
        source = model
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype, safety_checker=None,
                                                 requires_safety_checker=False)
    except (OSError, ValueError, EnvironmentError) as err:
        where = "the local folder" if path.exists() else ("the Hub (HF_HUB_OFFLINE is set)" if offline
                                                          else "the Hub (no network, or no such repo)")
        raise BaseModelError(
            f"could not load base model {model!r} from {where}: {err}. Set CIDM_BASE_MODEL to a local diffusers "
            f"folder (for example one made with `pipeline.save_pretrained`), or unset it to use the embedded model "
            f"at {EMBEDDED_MODEL}.") from err
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise BaseModelError(f"{model!r} loads as {type(pipe).__name__}; CIDM needs a Stable Diffusion (1.x/2.x) or "
                             f"SDXL text-to-image pipeline.")
    info = describe(pipe, source)
    if not info.cross_attn_layers:
        raise BaseModelError(f"{model!r} has no cross-attention layers in its UNet; CIDM binds concepts there.")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, info


def load_evaluator(evaluator: str, device: str | None = None):
    """The CLIP-style model and tokenizer used for IA / TA (a local folder or a Hub id): OpenAI's `CLIPModel`, or
    the toy world's dual encoder (a `VisionTextDualEncoderModel` with a CNN image tower)."""
    from transformers import AutoModel, CLIPTokenizer

    from .toyworld import evaluator as _registers_the_toy_image_tower  # noqa: F401

    try:
        clip = AutoModel.from_pretrained(evaluator).eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(evaluator)
    except (OSError, ValueError) as err:  # ValueError: a config transformers does not know
        raise BaseModelError(f"could not load the evaluator {evaluator!r}: {err}. Put a CLIP model folder beside the "
                             f"base model and name it in {EVALUATOR_POINTER}.") from err
    if not all(hasattr(clip, f) for f in ("get_image_features", "get_text_features", "logit_scale")):
        raise BaseModelError(f"the evaluator {evaluator!r} loads as {type(clip).__name__}, which has no image and text "
                             f"embeddings; IA and TA need a CLIP-style model (e.g. openai/clip-vit-base-patch32).")
    return clip.to(device or default_device()), tokenizer


def precision_context(mixed_precision: str, device: torch.device):
    """A context that runs the forward passes in fp16/bf16 autocast, or a no-op for "no"."""
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    if mixed_precision == "no":
        return contextlib.nullcontext
    if mixed_precision not in dtypes:
        raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {mixed_precision!r}")
    return lambda: torch.autocast(device.type, dtype=dtypes[mixed_precision])
