"""`python -m cidm ...`: a thin command line over the package (it parses arguments and calls; no logic of its own)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from pathlib import Path


def cmd_info(args) -> int:
    import torch

    from . import models

    print(f"cidm-studio {importlib.metadata.version('cidm-studio') if _installed() else '(not installed)'}")
    print(f"python {platform.python_version()}")
    for pkg in ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "huggingface_hub",
                "gradio", "gradio_image_annotation", "spaces"):
        try:
            print(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{pkg} (not installed)")
    device = models.default_device()
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""))
    base = args.base_model or models.default_model()
    print(f"base model {base}")
    local = Path(base)
    if local.exists():
        state = "present" if (local / "model_index.json").is_file() else "MISSING model_index.json"
        print(f"base model folder {state}")
    print(f"evaluator {models.find_evaluator(base)}")
    if args.load:
        _, info = models.load_base(base)
        print(json.dumps({k: v for k, v in info.__dict__.items() if k != "cross_attn_layers"}, indent=1))
        print(f"cross-attention layers ({info.num_cross_attn_layers}, down -> mid -> up):")
        for name in info.cross_attn_layers:
            print(f"  {name}")
    return 0


def _installed() -> bool:
    try:
        importlib.metadata.version("cidm-studio")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def cmd_toyworld_train(args) -> int:
    from .toyworld.train import ToyTrainConfig, train_all

    cfg = ToyTrainConfig(out=args.out, seed=args.seed, vae_minutes=args.vae_minutes, clip_minutes=args.clip_minutes,
                         unet_minutes=args.unet_minutes)
    print(train_all(cfg, resume_from=args.resume_from))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cidm", description="CIDM Studio: learn concepts one after another "
                                     "without forgetting, and compose them in boxes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, device, and the base model that would load")
    p.add_argument("--base-model", help="Hub id or local diffusers folder (default: CIDM_BASE_MODEL, else SD-1.5 "
                   "with CUDA, else the embedded toy model)")
    p.add_argument("--load", action="store_true", help="also load it and list its cross-attention layers")
    p.set_defaults(func=cmd_info)

    tw = sub.add_parser("toyworld", help="the embedded toy world").add_subparsers(dest="toy_command", required=True)
    p = tw.add_parser("train", help="train the toy world's tokenizer, VAE, evaluator and UNet from scratch")
    p.add_argument("--out", required=True, help="run folder; the model lands in OUT/model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-minutes", type=float, default=15.0)
    p.add_argument("--clip-minutes", type=float, default=12.0)
    p.add_argument("--unet-minutes", type=float, default=90.0, help="UNet budget of this invocation (resumable)")
    p.add_argument("--resume-from", help="a shipped model folder (e.g. cidm/toyworld/model) to continue from")
    p.set_defaults(func=cmd_toyworld_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
