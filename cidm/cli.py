"""`python -m cidm ...`: a thin command line over the package (it parses arguments and calls; no logic of its own)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

BENCH_STEPS = 300  # steps per task of the methods bench and --tune when --steps is not given


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

    steps = {f"{k}_steps": v for k, v in (("vae", args.vae_steps), ("clip", args.evaluator_steps),
                                          ("unet", args.unet_steps)) if v is not None}
    print(train_all(ToyTrainConfig(out=args.out, seed=args.seed, minutes=args.minutes, **steps)))
    return 0


def cmd_toyworld_tuning_set(args) -> int:
    from .toyworld.concepts import write_tuning_set

    names = write_tuning_set(Path(args.out), objects=args.objects, styles=args.styles, seed=args.seed)
    print(f"tuning sequence of {len(names)} concepts in {args.out}: {', '.join(names)}")
    return 0


def cmd_learn(args) -> int:
    from .studio import Studio

    device, main, processes = None, True, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # `accelerate launch`: join its process group, train data-parallel
        import torch.distributed as dist
        from accelerate import PartialState

        state = PartialState()  # GPUs: the NCCL group and this process's device
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        device, main, processes = str(state.device), dist.get_rank() == 0, dist.get_world_size()
    studio = Studio(args.library, base_model=args.base_model, device=device)
    settings = {k: v for k, v in (("steps", args.steps), ("seed", args.seed), ("rank", args.rank)) if v is not None}
    settings.update(mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                    use_8bit_adam=args.use_8bit_adam)
    every = max(1, min(50, (args.steps or 800) // 20))

    def progress(step, terms):
        if main and step % every == 0:
            print(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in terms.items()), flush=True)

    result = studio.learn(args.name, args.images, args.class_word, args.kind, replace=args.replace,
                          progress=progress, **settings)
    if main:
        where = f" × {processes} processes, data-parallel" if processes > 1 else ""
        print(f"learned <{result.name}> in {result.seconds:.1f} s ({result.steps_done} steps{where}); library: "
              f"{', '.join(studio.names)}")
    return 0


def cmd_generate(args) -> int:
    from .images import save_png
    from .studio import Studio

    studio = Studio(args.library, base_model=args.base_model)
    psi = {} if args.psi is None else {"psi": args.psi}  # by default the library's method decides, as in the app
    images = studio.generate(args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance,
                             num_images=args.num_images, seed=args.seed, **psi)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        save_png(image, path)
        print(path)
    return 0


def parse_region(text: str):
    """`x0,y0,x1,y1:region prompt` -> ((x0, y0, x1, y1), prompt)."""
    box, sep, prompt = text.partition(":")
    try:
        coords = tuple(float(v) for v in box.split(","))
    except ValueError:
        coords = ()
    if not sep or len(coords) != 4:
        raise ValueError(f"--region {text!r}: write it as x0,y0,x1,y1:prompt, e.g. '0,0,32,64:a <my-dog>'")
    return coords, prompt.strip()


def cmd_compose(args) -> int:
    from .images import save_png
    from .studio import Studio

    studio = Studio(args.library, base_model=args.base_model)
    regions = [parse_region(r) for r in args.region]
    image = studio.compose(args.prompt, regions, args.negative_prompt, alpha=args.alpha,
                           region_noise=args.region_noise, steps=args.steps, guidance=args.guidance,
                           seed=args.seed)[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_png(image, args.out)
    print(args.out)
    return 0


def parse_setting(value: str):
    """A setting's value from the command line: true / false, a number if it reads as one (1e-3, 10), else the
    text (mean)."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return float(value)
    except ValueError:
        return value


def cmd_bench(args) -> int:
    from .bench.results import EXAMPLES, merge_results
    from .methods import METHODS, compared_methods

    concepts = Path(args.concepts or EXAMPLES)
    if args.merge:
        merge_results([Path(f) for f in args.merge.split(",") if f], Path(args.out))
        print((Path(args.out) / "results.md").read_text())
        return 0
    if args.quick:
        args.methods, args.tasks, args.steps, args.prompts, args.images = "cidm,lora-m", 3, 20, 2, 1
    if args.compose:
        from .bench.compose import run_compose_bench

        library = Path(args.library or Path(args.out) / "library")
        run_compose_bench(Path(args.out), library, base_model=args.base, layouts=args.layouts, seed=args.seed)
        return 0
    if args.tune:
        from .bench.tuning import run_tuning

        weighted = ",".join(m for m, method in METHODS.items() if method.weight)
        methods = [m.strip() for m in (args.methods or weighted).split(",") if m.strip()]
        extra: dict[str, list[dict]] = {}
        for item in args.also_try:
            method, _, settings = item.partition(":")
            pairs = [setting.partition("=") for setting in settings.split(",")]
            if not method or not all(key and value for key, _, value in pairs):
                raise ValueError(f"--also-try takes METHOD:SETTING=VALUE[,SETTING=VALUE…], e.g. cidm:lr_lora=1e-3 "
                                 f"or cidm:r1_form=subspace,gamma1=0.01; got {item!r}")
            extra.setdefault(method, []).append({key.strip(): parse_setting(value.strip()) for key, _, value in pairs})
            methods += [] if method in methods else [method]
        grid = None
        if args.grid:
            try:
                grid = tuple(float(v) for v in args.grid.split(","))
            except ValueError:
                raise ValueError(f"--grid takes comma-separated numbers, e.g. 0.1,1; got {args.grid!r}") from None
        run_tuning(Path(args.out), methods, base_model=args.base, concepts=concepts, grid=grid,
                   steps=args.steps or BENCH_STEPS, prompts=args.prompts, images=args.images, seed=args.seed,
                   extra=extra)
        return 0
    if not args.core:
        from .bench.methods import run_methods_bench

        methods = [m.strip() for m in (args.methods or ",".join(compared_methods())).split(",") if m.strip()]
        run_methods_bench(Path(args.out), methods, base_model=args.base, concepts=concepts, tasks=args.tasks,
                          steps=args.steps or BENCH_STEPS, prompts=args.prompts, images=args.images, seed=args.seed,
                          precision=args.precision, workers=args.workers)
        return 0
    from .bench.core import run_core_bench

    run_core_bench(Path(args.out), base_model=args.base, concepts=concepts, tasks=args.tasks, steps=args.steps,
                   prompts=args.prompts, seeds=args.seeds, seed=args.seed)
    return 0


def cmd_demo(args) -> int:
    from .demo import build_demo_library

    build_demo_library(args.out, base_model=args.base_model, seed=args.seed)
    print(f"demo library in {args.out}")
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

    p = sub.add_parser("learn", help="learn a new concept from a few images and add it to a library")
    p.add_argument("--library", required=True, help="library folder (created if missing)")
    p.add_argument("--name", required=True, help="concept name, written <name> in prompts")
    p.add_argument("--images", nargs="+", required=True, help="3-10 image files (JPEG, PNG, WebP, …)")
    p.add_argument("--class-word", default="object", help="what it is: dog, mug, star, style, …")
    p.add_argument("--kind", choices=("object", "style"), default="object")
    p.add_argument("--steps", type=int, help="training steps (paper: 800)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 4)")
    p.add_argument("--seed", type=int)
    p.add_argument("--replace", action="store_true", help="replace a concept of the same name")
    p.add_argument("--base-model")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="autocast precision of the forward passes (GPU memory and speed); LoRA stays fp32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less GPU memory")
    p.add_argument("--use-8bit-adam", action="store_true", help="bitsandbytes AdamW8bit (needs bitsandbytes)")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("generate", help="generate images; prompts may name learned concepts as <name>")
    p.add_argument("--library", required=True)
    p.add_argument("--prompt", required=True, action="append",
                   help="repeat for several prompts: one batch, each prompt from the same seed")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", required=True, help="PNG path (with -0, -1, … for several images, prompt by prompt)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--psi", choices=("paper", "code", "sharp"),
                   help="EWA weighting (Eq. 3); default: the library's method's (CIDM: sharp, see README)")
    p.add_argument("--base-model")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compose", help="concepts inside boxes: --region 'x0,y0,x1,y1:a <name>' (repeatable)")
    p.add_argument("--library", required=True)
    p.add_argument("--prompt", required=True, help="the global prompt (the whole scene)")
    p.add_argument("--region", action="append", default=[], help="x0,y0,x1,y1:prompt, pixels or 0-1")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.1, help="Eq. 5 weight of the global estimate in boxes")
    p.add_argument("--region-noise", choices=("normalised", "literal"), default="normalised")
    p.add_argument("--base-model")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("bench", help="benchmarks, printed as tables (default: every method on one protocol)")
    p.add_argument("--out", required=True, help="an empty folder for the library, samples and results")
    p.add_argument("--core", action="store_true", help="learning time, IA vs base, EWA routing and cost")
    p.add_argument("--compose", action="store_true", help="concept neglect in boxes and the cost of regions")
    p.add_argument("--tune", action="store_true", help="choose the methods' weights (λ) on the tuning sequence")
    p.add_argument("--also-try", action="append", default=[], metavar="METHOD:SETTING=VALUE",
                   help="--tune: one more trial on the tuning sequence, one or more settings, e.g. "
                        "cidm:lr_lora=1e-3 or cidm:r1_form=subspace,gamma1=0.01")
    p.add_argument("--grid", help="--tune: the weight values to try for every method, comma-separated (default: "
                   "each method's own grid)")
    p.add_argument("--library", help="--compose: a library to use (default: OUT/library from a --core run)")
    p.add_argument("--layouts", type=int, default=50, help="--compose: random layouts per number of boxes")
    p.add_argument("--concepts", help="a concept set in the examples/concepts format (default: the toy world's)")
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--steps", type=int, help="training steps per task (default: --core learns as `cidm learn` does, "
                   f"with the base's learning default; the methods bench and --tune: {BENCH_STEPS})")
    p.add_argument("--prompts", type=int, default=10, help="evaluation prompts per concept")
    p.add_argument("--seeds", type=int, default=2, help="--core: images per prompt")
    p.add_argument("--images", type=int, default=2, help="images per evaluation prompt")
    p.add_argument("--methods", help="comma-separated method ids (default: all but the diagnostic cidm-tokens-only; "
                   "see cidm/methods/)")
    p.add_argument("--quick", action="store_true", help="3 tasks, 20 steps, 2 prompts, cidm and lora-m")
    p.add_argument("--workers", type=int, default=1,
                   help="methods bench: run the training groups in this many processes at once (2 on 2 cores)")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no",
                   help="methods bench: autocast of the evaluation's generation (bf16: ~1.4× faster on CPU)")
    p.add_argument("--merge", help="comma-separated OUT folders of method runs (one protocol) to table together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", help="base model (default as for `info`)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="learn the standard sequence (with its forgetting record) into a library: the "
                       "demo library the app offers on a first visit")
    p.add_argument("--out", required=True, help="an empty library folder (the shipped one: examples/demo-library)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-model")
    p.set_defaults(func=cmd_demo)

    tw = sub.add_parser("toyworld", help="the embedded toy world").add_subparsers(dest="toy_command", required=True)
    p = tw.add_parser("train", help="train the toy world's tokenizer, VAE, evaluator, text encoder and UNet from "
                      "scratch (about 3 h on 2 CPU cores); run it again with the same --out to continue")
    p.add_argument("--out", required=True, help="run folder; the model lands in OUT/model, states in OUT/state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, help="end this sitting after this long, state saved (default: run to "
                   "the end)")
    p.add_argument("--vae-steps", type=int, help="default 4000")
    p.add_argument("--evaluator-steps", type=int, help="default 3000")
    p.add_argument("--unet-steps", type=int, help="default 18000")
    p.set_defaults(func=cmd_toyworld_train)
    p = tw.add_parser("tuning-set", help="write a longer tuning sequence (the shipped tuning concepts and new "
                      "procedural ones) for `cidm bench --tune --concepts OUT`")
    p.add_argument("--out", required=True, help="a folder for the concept set")
    p.add_argument("--objects", type=int, default=4, help="new procedural objects")
    p.add_argument("--styles", type=int, default=1, help="new procedural styles")
    p.add_argument("--seed", type=int, default=3000, help="the first procedural concept's seed")
    p.set_defaults(func=cmd_toyworld_tuning_set)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
