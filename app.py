"""CIDM Studio: the Gradio app. Thin by design: one builder per tab, handlers that call `cidm`, no method logic.

Each browser session has its own library (a folder under the system temp dir), unless `CIDM_LIBRARY` names one
persistent library (a duplicated private Space with storage at /data). Work on the model runs one request at a time
(`concurrency_id="gpu"`), so sessions share one base pipeline safely.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr
import spaces
from gradio_image_annotation import image_annotator
from PIL import Image

from cidm import models
from cidm.bench.results import EXAMPLES, ia_curves, load_results, results_markdown
from cidm.library import Library, LibraryError
from cidm.studio import Studio

ON_SPACE = bool(os.environ.get("SPACE_ID"))
SESSIONS = Path(tempfile.gettempdir()) / "cidm-sessions"
_BASE: dict = {}  # the base pipeline, loaded once on first use (keeps start-up fast)
_ACTIVE: dict = {}  # the Studio of the library in use (one at a time: requests are serialised)
_CANCEL: dict[str, threading.Event] = {}
USER_ERRORS = (ValueError, LibraryError, models.BaseModelError, FileNotFoundError)
BENCH_RESULTS = Path(__file__).resolve().parent / "bench" / "results" / "methods" / "results.json"
CSS = (".enlarge img { width: 100% !important; height: 100% !important; object-fit: contain; "
       "image-rendering: pixelated; }")  # small outputs (the toy world's 64 px) shown large, pixels kept
CANVAS = 512  # pixels of the Compose canvas at least (the toy world's 64-px images are too small to draw on)


_LOAD_LOCK = threading.Lock()  # page-load events run in threads; model loading must happen once, not concurrently


def base():
    with _LOAD_LOCK:  # two concurrent loads break each other (transformers materialises weights from "meta")
        if "pipe" not in _BASE:
            _BASE["pipe"], _BASE["info"] = models.load_base()
    return _BASE["pipe"], _BASE["info"]


def library_path(request: gr.Request | None) -> Path:
    if os.environ.get("CIDM_LIBRARY"):
        return Path(os.environ["CIDM_LIBRARY"])
    session = getattr(request, "session_hash", None) or "local"
    return SESSIONS / session


def studio(request: gr.Request | None) -> Studio:
    path = library_path(request)
    pipe, info = base()
    with _LOAD_LOCK:
        if _ACTIVE.get("path") != path:
            _ACTIVE.update(path=path, studio=Studio(path, pipe=pipe, info=info))
        return _ACTIVE["studio"]


def user_error(err: Exception) -> gr.Error:
    return gr.Error(str(err))


def concept_names(request: gr.Request | None) -> list[str]:
    """The session's concepts, read from its library on disk (never switches the shared model's active library,
    which a training of another session may be using)."""
    try:
        return Library(library_path(request), read_only=True).names
    except USER_ERRORS:
        return []


# ----------------------------------------------------------------------------------------------------------------
# Learn


@spaces.GPU(duration=300)
def learn(files, name, class_word, kind, steps, seed, replace, request: gr.Request = None,
          progress=gr.Progress(track_tqdm=True)):
    if not files:
        raise gr.Error("No photos: upload 3–10 photos of your concept.")
    if not 3 <= len(files) <= 10:
        raise gr.Error(f"{len(files)} photos: upload between 3 and 10 photos of your concept.")
    key = library_path(request).name
    cancel = _CANCEL.setdefault(key, threading.Event())
    cancel.clear()
    losses = []

    def report(step, terms):
        losses.append({"step": step, "loss": terms["diffusion"]})
        progress(step / int(steps), desc=f"step {step}/{int(steps)} · loss {terms['diffusion']:.4f}")

    try:
        s = studio(request)
        result = s.learn(name.strip(), [f if isinstance(f, str) else f.name for f in files], class_word, kind,
                         replace=replace, steps=int(steps), seed=int(seed), progress=report, cancel=cancel.is_set)
    except USER_ERRORS as err:
        raise user_error(err) from err
    import pandas as pd

    plot = pd.DataFrame(losses or [{"step": 0, "loss": 0.0}])
    if result.cancelled:
        return f"Stopped after {result.steps_done} steps; the library is unchanged.", plot, []
    samples = [(im, s.probe_prompt(name)) for im in s.generate(s.probe_prompt(name), num_images=2)]
    for old in [n for n in s.names if n != name][-2:]:  # a quick look at two earlier concepts
        samples.append((s.generate(s.probe_prompt(old))[0], f"earlier: {s.probe_prompt(old)}"))
    message = f"Learned `<{name}>` in {result.seconds:.0f} s. Write `<{name}>` in a prompt to use it."
    return message, plot, samples


def stop(request: gr.Request = None):
    _CANCEL.setdefault(library_path(request).name, threading.Event()).set()
    return "Stopping after the current step…"


def build_learn_tab():
    with gr.Row():
        with gr.Column():
            files = gr.File(label="3–10 photos of your concept", file_count="multiple", file_types=["image"])
            name = gr.Textbox(label="Name (written <name> in prompts)", placeholder="my-dog")
            class_word = gr.Textbox(label="What is it? (class word)", placeholder="dog, mug, star, style…")
            kind = gr.Radio(["object", "style"], value="object", label="Kind")
            steps = gr.Slider(10, 1000, value=300, step=10, label="Training steps (paper: 800)")
            seed = gr.Number(value=0, precision=0, label="Seed")
            replace = gr.Checkbox(label="Replace a concept of the same name", value=False)
            with gr.Row():
                train = gr.Button("Learn", variant="primary")
                halt = gr.Button("Stop")
        with gr.Column():
            status = gr.Markdown()
            plot = gr.LinePlot(x="step", y="loss", label="Diffusion loss")
            samples = gr.Gallery(label="The new concept, and two earlier ones", columns=4)
    if (EXAMPLES / "concepts.json").exists():  # the toy world's concepts, one click each
        import json

        spec = json.loads((EXAMPLES / "concepts.json").read_text())
        rows = [[[str(EXAMPLES / f) for f in c["images"]], n, c["class_word"], c["kind"]]
                for n, c in spec["concepts"].items() if n in spec["standard_sequence"]]
        gr.Examples(rows, [files, name, class_word, kind], label="Toy-world concepts (the standard sequence)")
    train.click(learn, [files, name, class_word, kind, steps, seed, replace], [status, plot, samples],
                api_name="learn", concurrency_id="gpu")
    halt.click(stop, None, status, api_name="stop")


# ----------------------------------------------------------------------------------------------------------------
# Generate


@spaces.GPU(duration=60)
def generate(prompt, negative, num_images, steps, guidance, seed, request: gr.Request = None):
    try:
        images = studio(request).generate(prompt, negative, num_images=int(num_images), steps=int(steps),
                                          guidance=float(guidance), seed=int(seed))
    except USER_ERRORS as err:
        raise user_error(err) from err
    return images


def build_generate_tab():
    with gr.Row():
        with gr.Column():
            prompt = gr.Textbox(label="Prompt (name your concepts as <name>)", value="a photo of a red star on a beach")
            negative = gr.Textbox(label="Negative prompt", value="")
            num_images = gr.Slider(1, 8, value=4, step=1, label="Images")
            steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
            guidance = gr.Slider(1.0, 15.0, value=5.0, step=0.5, label="Guidance")
            seed = gr.Number(label="Seed", value=0, precision=0)
            button = gr.Button("Generate", variant="primary")
        gallery = gr.Gallery(label="Images", columns=4)
    gr.on([prompt.submit, button.click], generate, [prompt, negative, num_images, steps, guidance, seed], gallery,
          api_name="generate", concurrency_id="gpu")


# ----------------------------------------------------------------------------------------------------------------
# Compose


def blank_canvas(request: gr.Request = None):
    """An empty canvas of the output size whose box labels are the session's concepts."""
    size = max(base()[1].resolution, CANVAS)  # boxes are read relative to the canvas, so it can be drawn on large
    names = concept_names(request)
    return image_annotator(value={"image": Image.new("RGB", (size, size), (235, 235, 235)), "boxes": []},
                           label_list=names or ["(learn a concept first)"])


@spaces.GPU(duration=120)
def compose(annotation, prompt, box_prompts, steps, guidance, seed, request: gr.Request = None):
    boxes = (annotation or {}).get("boxes") or []
    if not boxes:
        raise gr.Error("No boxes: draw a box on the canvas for each concept, and pick its label.")
    canvas = annotation.get("image")
    if canvas is None:  # boxes without a canvas (API callers): pixels of the output image
        cw = ch = base()[1].resolution
    else:
        cw, ch = canvas.size if isinstance(canvas, Image.Image) else Image.open(canvas).size
    overrides = [line.strip() for line in (box_prompts or "").splitlines()]
    regions = []
    for i, b in enumerate(boxes):
        label = b.get("label") or ""
        text = overrides[i] if i < len(overrides) and overrides[i] else (f"a photo of a <{label}>" if label else "")
        box = (b["xmin"] / cw, b["ymin"] / ch, b["xmax"] / cw, b["ymax"] / ch)  # relative: any canvas size
        regions.append((box, text))
    try:
        image = studio(request).compose(prompt, regions, steps=int(steps), guidance=float(guidance),
                                        seed=int(seed))[0]
    except USER_ERRORS as err:
        raise user_error(err) from err
    w, h = image.size
    return image, (image, [((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)), text)
                           for (x0, y0, x1, y1), text in regions])


def build_compose_tab():
    with gr.Row():
        with gr.Column():
            canvas = image_annotator(label="Draw a box per concept; its label is the concept", label_list=[],
                                     image_type="pil")
            fresh = gr.Button("New canvas (with your latest concepts)")
            prompt = gr.Textbox(label="Global prompt (the whole scene)", value="a photo on a beach")
            box_prompts = gr.Textbox(label="Box prompts, one line per box (default: 'a photo of a <label>')",
                                     lines=3)
            steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
            guidance = gr.Slider(1.0, 15.0, value=5.0, step=0.5, label="Guidance")
            seed = gr.Number(label="Seed", value=0, precision=0)
            button = gr.Button("Compose", variant="primary")
        with gr.Column():
            image = gr.Image(label="Image", type="pil", height=384, elem_classes="enlarge")
            layout = gr.AnnotatedImage(label="Boxes over the image", height=384)
    button.click(compose, [canvas, prompt, box_prompts, steps, guidance, seed], [image, layout], api_name="compose",
                 concurrency_id="gpu")
    fresh.click(blank_canvas, None, canvas, api_name="canvas")
    with gr.Accordion("Edit inside a box of your own image", open=False):
        with gr.Row():
            with gr.Column():
                source = gr.Image(label="Image", type="pil")
                box = gr.Textbox(label="Box x0,y0,x1,y1 (pixels, or 0–1)", value="0,0,0.5,0.5")
                edit_prompt = gr.Textbox(label="What goes in the box", placeholder="a photo of a <name>")
                strength = gr.Slider(0.1, 1.0, value=0.8, step=0.05, label="Strength")
                edit_button = gr.Button("Edit")
            edited = gr.Image(label="Edited", type="pil", elem_classes="enlarge")
    edit_button.click(edit, [source, box, edit_prompt, strength, steps, guidance, seed], edited, api_name="edit",
                      concurrency_id="gpu")
    return canvas


@spaces.GPU(duration=60)
def edit(image, box, prompt, strength, steps, guidance, seed, request: gr.Request = None):
    if image is None:
        raise gr.Error("No image: upload the image to edit.")
    try:
        coords = tuple(float(v) for v in box.split(","))
        return studio(request).edit(image, coords, prompt, strength=float(strength), steps=int(steps),
                                    guidance=float(guidance), seed=int(seed))
    except USER_ERRORS as err:
        raise user_error(err) from err


# ----------------------------------------------------------------------------------------------------------------
# Forgetting


def forgetting(request: gr.Request = None):
    from cidm.plots import forgetting_grid, ia_heatmap, ia_lines

    s = studio(request)
    scores, text_scores = s.forgetting("ia"), s.forgetting("ta")
    tasks = sorted(scores)

    def cell(t, n):
        ia, ta = scores[t].get(n), text_scores.get(t, {}).get(n)
        return "" if ia is None else (f"{ia:.1f}" if ta is None else f"{ia:.1f} / {ta:.1f}")

    rows = [[f"<{n}>", *[cell(t, n) for t in tasks]] for n in s.names]
    header = ["concept", *[f"after task {t} (IA / TA)" for t in tasks]]
    grid = forgetting_grid(s.library.root, s.names, tasks) if tasks else None
    has_ia = any(scores[t] for t in tasks)
    heatmap = ia_heatmap(scores, s.names) if has_ia else None
    lines = None
    if has_ia:
        lines = ia_lines({f"<{n}>": {t: scores[t][n] for t in tasks if n in scores[t]} for n in s.names},
                         title="IA of each concept, from the task that learned it")
    return gr.update(value=rows, headers=header), grid, heatmap, lines


def build_forgetting_tab():
    gr.Markdown("Every learned concept is re-generated (fixed prompt and seed) after each new task. IA is the image "
                "similarity to its own photos (×100): a falling row means forgetting.")
    refresh = gr.Button("Refresh")
    table = gr.Dataframe(label="IA after each task", interactive=False)
    grid = gr.Image(label="Concept × after task", type="pil")
    with gr.Row():
        heatmap = gr.Plot(label="IA heatmap")
        lines = gr.Plot(label="IA over tasks")
    refresh.click(forgetting, None, [table, grid, heatmap, lines], api_name="forgetting", concurrency_id="gpu")
    with gr.Accordion("All methods side by side (a `cidm bench` results file)", open=False):
        results = gr.File(label="results.json (default: the toy-world benchmark shipped with the project)",
                          file_types=[".json"], value=str(BENCH_RESULTS) if BENCH_RESULTS.exists() else None)
        compare = gr.Button("Show")
        tables = gr.Markdown()
        curves = gr.Plot(label="Average IA of the learned concepts after each task")
    compare.click(methods_view, results, [tables, curves], api_name="methods")


def methods_view(results_file):
    """The benchmark's tables (IA, TA, forgetting, time) and the average-IA curve of every method."""
    from cidm.plots import ia_lines

    path = results_file if isinstance(results_file, str) else getattr(results_file, "name", None)
    if not path:
        raise gr.Error("No results file: run `python -m cidm bench --out DIR` and pick DIR/results.json.")
    try:
        results = load_results(path)
        return results_markdown(results, results["protocol"]["tasks"]), ia_lines(ia_curves(results))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise gr.Error(f"{Path(path).name} is not a `cidm bench` results.json ({err!r}); pick DIR/results.json of "
                       f"a benchmark run") from err


# ----------------------------------------------------------------------------------------------------------------
# Library


def library_view(request: gr.Request = None):
    try:
        lib = Library(library_path(request), read_only=True)  # reading only: safe beside a running task
    except USER_ERRORS as err:
        raise user_error(err) from err
    rows = [[n, r["class_word"], r["kind"], r["task"], r["created"], r.get("seconds", "")]
            for n, r in ((n, lib.record(n)) for n in lib.names)]
    images = [(str(p), f"<{n}>") for n in lib.names for p in sorted((lib.concept_dir(n) / "images").glob("*"))[:2]]
    return rows, images, gr.update(choices=lib.names, value=None)


@spaces.GPU(duration=30)
def delete(name, request: gr.Request = None):
    if not name:
        raise gr.Error("Pick a concept to delete.")
    try:
        studio(request).delete(name)
    except USER_ERRORS as err:
        raise user_error(err) from err
    return library_view(request)


def download(request: gr.Request = None):
    root = library_path(request)
    if not (root / "library.json").exists():
        raise gr.Error("The library is empty: learn a concept first.")
    archive = shutil.make_archive(str(Path(tempfile.mkdtemp()) / "cidm-library"), "zip", root)
    return archive


def push(repo_id, private, oauth_token: gr.OAuthToken | None = None, request: gr.Request = None):
    from cidm.hub import push_library

    token = oauth_token.token if oauth_token is not None else os.environ.get("HF_TOKEN")
    try:
        url = push_library(library_path(request), (repo_id or "").strip(), token, private=private,
                           endpoint=os.environ.get("HF_ENDPOINT"))
    except USER_ERRORS as err:
        raise user_error(err) from err
    return f"Pushed to {url}"


def pull(repo_id, oauth_token: gr.OAuthToken | None = None, request: gr.Request = None):
    """Load a library from the Hub into this session's (empty) library."""
    from cidm.hub import pull_library

    token = oauth_token.token if oauth_token is not None else os.environ.get("HF_TOKEN")
    path = library_path(request)
    pipe, info = base()
    try:
        pull_library((repo_id or "").strip(), path, token, endpoint=os.environ.get("HF_ENDPOINT"),
                     base=(info.source, info.num_cross_attn_layers))
    except USER_ERRORS as err:
        raise user_error(err) from err
    with _LOAD_LOCK:
        _ACTIVE.clear()  # the next use loads the pulled library
    rows, images, names = library_view(request)
    return rows, images, names, f"Loaded {len(rows)} concepts from `{repo_id.strip()}`."


def build_library_tab():
    refresh = gr.Button("Refresh")
    table = gr.Dataframe(headers=["name", "class word", "kind", "task", "created", "seconds"], interactive=False)
    images = gr.Gallery(label="Reference photos", columns=6)
    with gr.Row():
        name = gr.Dropdown(label="Concept", choices=[])
        remove = gr.Button("Delete", variant="stop")
        zipped = gr.DownloadButton("Download the library (zip)")
    with gr.Row():
        if ON_SPACE:  # the login button breaks construction off a Space
            gr.LoginButton()
        repo = gr.Textbox(label="Hub repo id", placeholder="your-name/my-concepts")
        private = gr.Checkbox(label="Private", value=True)
        upload = gr.Button("Push to the Hub")
        download_hub = gr.Button("Load from the Hub (into an empty library)")
    status = gr.Markdown()
    refresh.click(library_view, None, [table, images, name], api_name="library")
    remove.click(delete, name, [table, images, name], api_name="delete", concurrency_id="gpu")
    zipped.click(download, None, zipped, api_name="download")
    upload.click(push, [repo, private], status, api_name="push")
    download_hub.click(pull, repo, [table, images, name, status], api_name="pull", concurrency_id="gpu")


# ----------------------------------------------------------------------------------------------------------------


def build_app() -> gr.Blocks:
    with gr.Blocks(title="CIDM Studio") as demo:
        gr.Markdown("# CIDM Studio\nLearn your own concepts one after another without forgetting the earlier ones, "
                    f"and compose them where you draw boxes. Base model: `{models.default_model()}`.")
        if ON_SPACE:
            gr.Markdown("Your concepts and photos stay in your browser session. For a private library that persists, "
                        "and a GPU, duplicate this Space.")
            gr.DuplicateButton()
        with gr.Tabs():
            with gr.Tab("Generate"):
                build_generate_tab()
            with gr.Tab("Learn a concept"):
                build_learn_tab()
            with gr.Tab("Compose"):
                canvas = build_compose_tab()
            with gr.Tab("Forgetting"):
                build_forgetting_tab()
            with gr.Tab("Library"):
                build_library_tab()
        demo.load(blank_canvas, None, canvas)
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo


if __name__ == "__main__":
    build_app().launch(css=CSS, server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                       server_port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
